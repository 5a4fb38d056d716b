"""When to speculate and how long: the running rates, drafts and copies switched on and off, probes,
exploration, copy against draft, and waiting for copies. Numbers in, one decision per round out; no model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from edgeinfer.speculative.costs import SWITCH_ON_MARGIN, CostModel, Tally, can_win, expected_speeds
from edgeinfer.speculative.drafters import Draft
from edgeinfer.speculative.plan import LONG_CONTEXT, DraftOptions

RATE_DECAY = 0.9  # the rejection and doubt rates forget old rounds at this rate per round
# What earlier runs saw counts as this many tokens of evidence. A draft model that stops must later read
# all it missed before it can draft again, so one unlucky round must not stop it: about five rounds' worth.
# Prompt lookup stops and starts for free and may follow the evidence closely.
PRIOR_TOKENS_DRAFT_MODEL = 20.0
PRIOR_TOKENS_FREE = 3.0
DELIVERED_DECAY = 0.8  # the measured speed of each kind of round forgets at this rate per round
PROBE_BUDGET = 2.0  # a probe may make the drafter catch up on at most this many plain steps' worth of time
FIRST_PROBE_GAP, LONGEST_PROBE_GAP = 8, 64  # rounds off before a probe; the gap doubles after each probe
EXPLORE_GAP = 24  # speculative rounds before a neighbouring draft length whose pass was not timed is tried
EXPLORE_FLOOR = 0.7  # ... if it promises at least this share of the best length's speed


class Choice(NamedTuple):
    length: int  # tokens to draft, or of the copy to verify; 0: one plain step
    copy: Draft | None  # the copy out of the context to verify; None: the drafter drafts


class CopyRecords:
    """How often each kind of copy out of the context (its match length, and whether it copies the prompt
    or the answer) was wrong: every copy offered is judged, verified or passed over."""

    def __init__(self, costs: CostModel) -> None:
        self.costs = costs
        self.by_kind: dict[str, Tally] = {}  # rejected among judged tokens, per kind of copy
        self.to_judge: list[tuple[int, Draft, int]] = []  # (where the copy starts, the copy, how much is judged)

    def offer(self, position: int, copy: Draft) -> None:
        if copy.tokens:
            self.to_judge.append((position, copy, 0))

    def rejection(self, kind: str) -> float:
        """The chance a token copied by this kind of match is rejected, lately."""
        return self._record(kind).rate()

    def _record(self, kind: str) -> Tally:
        """Started from what earlier runs saw of this kind. Passing over a copy costs nothing (the draft
        model, if any, drafts instead), so the record may follow the evidence closely, whatever the drafter."""
        if kind not in self.by_kind:
            self.by_kind[kind] = Tally(RATE_DECAY, PRIOR_TOKENS_FREE * self.costs.copy_prior(kind), PRIOR_TOKENS_FREE)
        return self.by_kind[kind]

    def judge(self, history: Sequence[int]) -> None:
        """Judge the copies offered against what the target has said since, each token as soon as it is said.

        A copy passed over is evidence too: judging only verified copies would keep a kind whose record fell
        just short of paying off for the rest of the answer. With sampling, a copied token is what the target
        says with the chance that verification accepts it: the same evidence."""
        evidence: dict[str, list[int]] = {}  # kind -> [wrong, judged]
        waiting = []
        for start, copy, seen in self.to_judge:
            said = history[start + seen : start + len(copy.tokens)]
            right = next((i for i, (a, b) in enumerate(zip(copy.tokens[seen:], said)) if a != b), len(said))
            wrong = right < len(said)
            tally = evidence.setdefault(copy.source, [0, 0])
            tally[0] += wrong
            tally[1] += right + wrong
            if not wrong and seen + right < len(copy.tokens):
                waiting.append((start, copy, seen + right))
        self.to_judge = waiting
        for kind, (wrong, judged) in evidence.items():
            if judged:
                self._record(kind).add(wrong, judged)
                self.costs.observe_copy(kind, judged, wrong)


class DraftPolicy:
    """What to verify next and how long, from the measured costs and the rates of recent rounds.

    Drafts (a draft model's) and copies (out of the context) are switched on and off apart, each on its
    own record: bad copies on new code must not turn off a draft model that is winning there."""

    def __init__(self, costs: CostModel, options: DraftOptions, step_cost_hint: float) -> None:
        self.costs, self.options, self.step_cost_hint = costs, options, step_cost_hint
        self.asking_is_free = step_cost_hint == 0  # prompt lookup: look first, judge after
        weight = PRIOR_TOKENS_FREE if self.asking_is_free else PRIOR_TOKENS_DRAFT_MODEL
        self.rejected = Tally(RATE_DECAY, weight * costs.rejection_prior(), weight)  # among judged drafted tokens
        self.doubted = Tally(RATE_DECAY, weight * costs.doubt_prior(), weight)  # stops among tests of --draft-p-min
        self.copies = CopyRecords(costs)
        self.speculating = {"draft": False, "copy": False}
        self.rounds_off = {"draft": 0, "copy": 0}
        self.probe_gap = {"draft": FIRST_PROBE_GAP, "copy": FIRST_PROBE_GAP}
        # What each kind of round really delivered, catch-ups and all: tokens among seconds.
        self.delivered = {kind: Tally(DELIVERED_DECAY) for kind in ("plain", "draft", "copy")}
        self.tokens_unread = 0  # tokens produced since the draft model last read the history: a probe's catch-up
        self.behind_after_copies = False  # copies left the draft model behind since it last read the history
        self.copy_wait: tuple[float, float] | None = None  # (the catch-up to beat, what waiting has cost so far)
        self.round_last_timed: dict[int, int] = {}  # pass size -> the speculative round that last timed one
        self.rounds = self.probes = self.explored = 0  # speculative rounds, probes among them, explorations
        self.length = 0  # of the latest round that speculated

    @property
    def rejection(self) -> float:
        """The chance a proposed token is rejected, lately."""
        return self.rejected.rate()

    @property
    def doubt(self) -> float:
        """The chance the draft stops, unsure, at a position it reached, lately (0 for prompt lookup)."""
        return 0.0 if self.asking_is_free else self.doubted.rate()

    def reaches_long_context(self, context_len: int) -> bool:
        """Would a pass from here reach LONG_CONTEXT, past which other passes may score exactly?"""
        return context_len + self.options.draft_max >= LONG_CONTEXT

    def limit(self, context_len: int, room: int) -> int:
        """The longest draft a round may verify: --draft-max within the exact passes, and within the room
        that the context, the batch and --max-tokens leave."""
        return min(self.costs.verify_cap(self.options.draft_max, self.reaches_long_context(context_len)), room)

    def weighs_copies(self, limit: int) -> bool:
        """Is a copy worth asking for: may this round verify a draft, and is a plain step's cost known?"""
        return limit >= max(1, self.options.draft_min) and self.costs.measured(1) is not None

    def choose(self, limit: int, reject: float | None = None) -> int:
        """The draft model's length for this round, up to `limit`; 0: one plain step."""
        if limit < max(1, self.options.draft_min):
            return 0
        if not self.options.adaptive:
            self.length = limit
            return limit
        speeds = self.speeds(limit, reject)
        if speeds is None:  # nothing measured yet: one plain step measures v(1)
            return 0
        return self.decide(speeds, limit)

    def next_round(self, limit: int, copy: Draft | None, context_len: int) -> Choice:
        """The copy out of the context (asked first: free), rated by how often copies of its kind were right,
        when it promises more than the draft model and than plain decoding; else the draft model's length."""
        if not self.weighs_copies(limit):
            return Choice(0, None)
        drafting = None if self.asking_is_free else self.speeds(limit)
        copy = copy or Draft()
        self.copies.offer(context_len, copy)
        if len(copy.tokens) >= max(1, self.options.draft_min):  # (a copy cut off by the history's end may be short)
            copying = self.speeds(len(copy.tokens), self.copies.rejection(copy.source), copy=True)
            if drafting is None or self._copy_first(copying, drafting):
                length = self.decide(copying, len(copy.tokens), "copy")
                if length or drafting is None:
                    return Choice(length, copy)
        length = 0 if drafting is None else self.decide(drafting, limit)
        if length and self.speculating["draft"] and self._wait_for_copies(drafting):
            return Choice(0, None)
        return Choice(length, None)

    def speeds(self, limit: int, reject: float | None = None, copy: bool = False) -> dict[int, float] | None:
        """Expected tokens per second for each length up to limit (None: a plain step is yet to be timed);
        a copy takes no draft step and tests no doubt."""
        if self.costs.measured(1) is None:
            return None
        reject = self.rejection if reject is None else reject
        return expected_speeds(self.costs, self.step_cost_hint, self.options.draft_min, limit, reject,
                               0.0 if copy else self.doubt, copy)

    def decide(self, speeds: dict[int, float], limit: int, kind: str = "draft") -> int:
        """The best length of those rated if it beats plain decoding; else 0, or now and then a probe."""
        best = max(speeds, key=speeds.get)
        if self._promising(speeds, kind):
            best = self._explore(speeds, best)
            self.speculating[kind], self.rounds_off[kind], self.probe_gap[kind] = True, 0, FIRST_PROBE_GAP
            self.length = best
            return best
        self.speculating[kind] = False
        self.rounds_off[kind] += 1
        if not can_win(self.costs, self.step_cost_hint, self.options.draft_min, limit, copy=kind == "copy"):
            return 0  # perfect drafts would lose too
        # Has the text become predictable? Ask again now and then (a copy needs no catch-up to be verified).
        if self.rounds_off[kind] >= self.probe_gap[kind] and (kind == "copy" or self._probe_affordable()):
            self.rounds_off[kind], self.probe_gap[kind] = 0, min(self.probe_gap[kind] * 2, LONGEST_PROBE_GAP)
            self.probes += 1
            self.delivered[kind] = Tally(DELIVERED_DECAY)  # judge the probe on its own result
            return best
        return 0

    def losing(self, kind: str) -> bool:
        """Have recent rounds of this kind ("draft" or "copy"), everything included, delivered fewer tokens
        per second than plain steps? The cost model predicts; this checks the prediction against the clock."""
        spec, plain = self.delivered[kind], self.delivered["plain"]
        if spec.events < 6 or spec.trials <= 0:
            return False
        # Speculating from the first round leaves no plain rounds to compare with: a plain step's cost stands in.
        plain_rate = plain.rate() if plain.events >= 3 and plain.trials > 0 else 1.0 / self.costs.measured(1)
        return spec.rate() < plain_rate

    def _promising(self, speeds: dict[int, float], kind: str) -> bool:
        """Turning speculation on takes a clear promise; once on, it stays while it is not a loss, since a
        draft model that stops must later read everything it missed before it can draft again."""
        plain = (SWITCH_ON_MARGIN if not self.speculating[kind] else 1.0) / self.costs.measured(1)
        return max(speeds.values()) > plain and not self.losing(kind)

    def _explore(self, speeds: dict[int, float], best: int) -> int:
        """The best length, or now and then a neighbour whose pass has not been timed for a while: a size
        timed as dear in a busy moment would otherwise never be chosen, so never timed again."""
        stale = [n for n in (best + 1, best - 1) if n in speeds and speeds[n] >= EXPLORE_FLOOR * speeds[best]
                 and self.rounds - self.round_last_timed.get(n + 1, 0) >= EXPLORE_GAP]
        if not stale:
            return best
        n = min(stale, key=lambda m: self.round_last_timed.get(m + 1, 0))
        self.round_last_timed[n + 1] = self.rounds  # asked for: a draft that stops short does not ask again at once
        self.explored += 1
        return n

    def _probe_affordable(self) -> bool:
        """A probe first makes a draft model read every token it missed: worth it only while that costs no
        more than PROBE_BUDGET plain steps. Prompt lookup reads for free and may always probe."""
        return self._catch_up_cost(self.tokens_unread) <= PROBE_BUDGET * self.costs.measured(1)

    def _wait_for_copies(self, drafting: dict[int, float]) -> bool:
        """After a run of copies the next copy is often a token or two away: take plain steps while what they
        have cost against drafting at once (the slower token, one more to read later) stays below the
        draft model's catch-up; within twice the better choice, whichever way the text goes."""
        if not self.behind_after_copies:
            return False
        if self.copy_wait is None:
            self.copy_wait = (self._catch_up_cost(self.tokens_unread, beyond_sync=True), 0.0)
        catch_up, spent = self.copy_wait
        if spent >= catch_up:
            return False
        slower = max(0.0, self.costs.measured(1) - 1.0 / max(drafting.values()))
        self.copy_wait = (catch_up, spent + slower + self._catch_up_cost(1))
        return True

    def _copy_first(self, copying: dict[int, float], drafting: dict[int, float]) -> bool:
        """Weigh the copy before the draft model? Against plain steps a copy is judged as it is (the draft
        model must read plain tokens and copied ones alike); against drafting it also pays that catch-up,
        less the re-sync that a drafting round pays anyway."""
        if not self._promising(drafting, "draft"):
            return True
        k = max(copying, key=copying.get)
        seconds = self.costs.pass_cost(k + 1)  # a copy's round is one pass
        tokens = copying[k] * seconds  # expected per round
        return tokens / (seconds + self._catch_up_cost(tokens, beyond_sync=True)) >= max(drafting.values())

    def _catch_up_cost(self, tokens: float, beyond_sync: bool = False) -> float:
        """Seconds for the draft model to read this many tokens it skipped; beyond_sync: only what exceeds
        the re-sync that the catch-up does in passing and that a drafting round pays anyway."""
        seconds = tokens * self.costs.catch_up_per_token(self.step_cost_hint)
        return max(0.0, seconds - self.costs.draft_sync(self.step_cost_hint)) if beyond_sync else seconds

    def record(self, draft: Draft, accepted: int, rejected: bool | None) -> None:
        """One speculative round: `accepted` tokens, then a rejection or not (None: nothing was verified).
        A draft model's round updates the rejection and doubt rates; a copy is judged with every copy offered."""
        if rejected is not None:  # a pass of this size was timed
            self.round_last_timed[len(draft.tokens) + 1] = self.rounds
        self.rounds += 1
        if draft.source:
            return
        tests, judged = len(draft.tokens) + draft.doubted, accepted + bool(rejected)  # tokens after a rejection: unjudged
        self.rejected.add(bool(rejected), judged)
        self.doubted.add(draft.doubted, tests)
        self.costs.observe_round(judged, bool(rejected), tests, draft.doubted)

    def record_delivery(self, kind: str, tokens: int, seconds: float, draft_model_read: bool) -> None:
        """What a round of this kind ("plain", "draft", "copy") delivered, and whether the draft model read the
        history in it (then it is caught up); a copy starts the wait for the next copy afresh."""
        self.tokens_unread = 0 if draft_model_read else self.tokens_unread + tokens
        if draft_model_read or kind == "copy":
            self.behind_after_copies, self.copy_wait = not draft_model_read, None
        self.delivered[kind].add(tokens, seconds)

    def judge_copies(self, history: Sequence[int]) -> None:
        self.copies.judge(history)
