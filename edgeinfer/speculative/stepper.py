"""One round of speculative decoding: draft, verify the draft in one target pass, keep the accepted
prefix and one token of the target's own. What to verify and how long is the policy's call."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np

from edgeinfer.engine import Model
from edgeinfer.sampling import Sampler
from edgeinfer.speculative.costs import CostModel, repays_loading
from edgeinfer.speculative.drafters import Draft, Drafter
from edgeinfer.speculative.plan import LONG_CONTEXT, NOT_EXACT, DraftOptions, measure_exactness
from edgeinfer.speculative.policy import Choice, DraftPolicy


class SpeculativeStepper:
    """Draft, verify in one target pass, keep the accepted prefix and a bonus token.

    It plugs into `engine.generate` like the plain stepper, so streaming, stop strings, --max-tokens and
    KV reuse are the same code. Greedy, the output is token for token the target's own; with sampling,
    a drafted token is accepted with probability min(1, p/q) and a rejection redrawn from max(0, p - q)."""

    def __init__(self, target: Model, sampler: Sampler, drafter: Drafter, options: DraftOptions,
                 costs: CostModel, max_tokens: int | None = None) -> None:
        self.target, self.sampler, self.drafter, self.options = target, sampler, drafter, options
        self.costs, self.max_tokens = costs, max_tokens
        self.policy = DraftPolicy(costs, options, drafter.step_cost_hint)
        self.prompt_len: int | None = None
        self.note: str | None = None  # what the plan changed (a draft model set aside), for the stats
        self.counts = dict(drafted=0, accepted=0, rejections=0, doubts=0, passes=0, tokens=0, k_sum=0, copies=0,
                           copied=0)
        self.seconds = 0.0
        self.produced = 0  # the answer's tokens so far (a server's request may have begun in batched steps)
        self.finished = False

    def prepare(self, prompt: Sequence[int]) -> None:
        """The draft reads the prompt now, with the target, rather than in the first round; and on the first
        use of this pair on this machine, which passes are exact and what they cost are measured before
        they decide anything."""
        start = time.perf_counter()
        self.prompt_len = len(prompt)
        stand_in = self.drafter.copies_only()
        if stand_in is not None and not self._reading_repays(prompt):
            unread, name = self.drafter.unread(prompt), self.drafter.name
            self.drafter = stand_in
            self.policy = DraftPolicy(self.costs, self.options, self.drafter.step_cost_hint)
            self.note = (f"{name} set aside for this answer, copies out of the context only: its reading of "
                         f"{unread} prompt tokens would cost more than it saves")
        read = self.drafter.prepare(prompt)
        reading = time.perf_counter() - start
        upto = self.options.draft_max + 1
        # (the probe past LONG_CONTEXT only for a run that may get there, or whose cache others share)
        long = len(prompt) + (self.max_tokens or self.target.n_ctx) > LONG_CONTEXT or self.target.shares_cache
        if not self.costs.knows_exactness(upto, long):
            measure_exactness(self.target, prompt, self.costs, upto, long)
        if self._verify_cap() < 1:
            self.note = NOT_EXACT
        untimed_draft = self.drafter.step_cost_hint > 0 and not self.costs.draft_steps
        if self.options.adaptive and self._verify_cap() > 0 and (self.costs.measured(2) is None or untimed_draft):
            self._calibrate(prompt)
        if read > 2 and not self.costs.catch_ups:
            # A first guess at what reading a backlog costs the draft, the price of a probe (low: a long
            # prompt is read in bigger batches than a catch-up; real catch-ups replace it).
            self.costs.observe_catch_up(reading, read)

    def _reading_repays(self, prompt: Sequence[int]) -> bool:
        """Would the answer (as long as answers here tend to be, within --max-tokens) repay what the draft model
        has not read of the prompt? A server's request with a long new prompt and a short answer may not; then
        copies out of the context (--draft-lookup) stand in for the draft model. Unknown costs: yes."""
        unread = self.drafter.unread(prompt)
        answer = self.costs.typical_answer(self.max_tokens)
        if not unread or not self.options.adaptive or answer is None:
            return True
        cap = self.costs.verify_cap(self.options.draft_max, long=self.target.shares_cache)
        return repays_loading(self.costs, self.drafter.step_cost_hint, max(cap, 1), unread, answer,
                              self.options.draft_min, loaded=True)

    def _calibrate(self, prompt: Sequence[int]) -> None:
        """Time one target pass of each size a round may verify, on the prompt's own tokens, then forget them;
        and one draft step. Once per pair on a machine (about 40 tokens' time): the first rounds would
        otherwise guess at the costs that decide between a speed-up and a loss."""
        base = len(self.target.cached)
        sizes = min(self._verify_cap() + 1, self.target.n_ctx - base - 1, self.target.n_batch, len(prompt))
        for n in range(1, sizes + 1):
            if self.costs.measured(n) is not None:  # (timed while its exactness was measured)
                continue
            start = time.perf_counter()
            self.target.decode(prompt[:n], all_logits=True)
            self.costs.observe_pass(n, time.perf_counter() - start)
            self.target.truncate(base)
        step = self.drafter.time_step(prompt)
        if step is not None:
            self.costs.observe_draft(step)

    def _verify_cap(self) -> int:
        return self.costs.verify_cap(self.options.draft_max)

    def advance(self, history: list[int]) -> list[int]:
        """One round: the policy's choice, the draft (or the copy), one target pass that verifies it, the
        accepted prefix and one token of the target's own; or one plain step."""
        start = time.perf_counter()
        if self.prompt_len is None:  # (never prepared: the history is a prompt and one token)
            self.prompt_len = len(history) - 1
        length, copy = self._choose(history)
        out, catch_up = None, 0.0
        if length:
            draft = self._draft(history, length, copy)
            catch_up = draft.catch_up_seconds
            if len(draft.tokens) >= max(1, self.options.draft_min):
                out = self._verify(history, draft, length)
            elif not self.policy.asking_is_free:  # a draft model paid for its doubts and proposed too little
                self._record(draft, 0, length, rejected=None)
        # A round in which a draft model was asked is speculative whatever it proposed: it paid for the asking.
        asked = bool(length) and copy is None and not self.policy.asking_is_free
        if out is not None:
            kind = "copy" if copy is not None else "draft"
        else:
            kind, out = "draft" if asked else "plain", self._plain(history)
        elapsed = time.perf_counter() - start
        # A catch-up (the draft reading the prompt or what plain rounds produced) is paid once and then
        # sunk: it says nothing about what speculating from here on will deliver.
        self.policy.record_delivery(kind, len(out), elapsed - (catch_up if kind == "draft" else 0.0), asked)
        self.counts["tokens"] += len(out)
        self.counts["passes"] += 1
        self.seconds += elapsed
        self.produced = len(history) - self.prompt_len + len(out)
        return out

    def _choose(self, history: list[int]) -> Choice:
        """What to verify this round: the policy weighs the copy the context offers, then the draft model."""
        # (in a cache other sequences share, the pass's kernel depends on their cells too: held as long)
        context = LONG_CONTEXT if self.target.shares_cache else len(history)
        limit = self.policy.limit(context, self._room(history))
        if not self.options.adaptive:
            return Choice(self.policy.choose(limit), None)
        self.policy.judge_copies(history)
        copy = self.drafter.copy(history, limit) if self.policy.weighs_copies(limit) else None
        return self.policy.next_round(limit, copy, len(history))

    def _room(self, history: list[int]) -> int:
        """The most tokens a draft may have before the context, the batch or --max-tokens runs out."""
        room = min(self.target.n_ctx - len(history), self.target.n_batch - 1)
        if self.max_tokens is not None:
            room = min(room, self.max_tokens - (len(history) - self.prompt_len) - 1)
        return room

    def _draft(self, history: list[int], length: int, copy: Draft | None) -> Draft:
        """The copy cut to length, or the drafter's proposal, whose timings go to the cost model; under a
        grammar (structured output), cut where the grammar refuses a token, which the target never picks."""
        if copy is not None:  # proposed before the length was chosen
            return _allowed(replace(copy, tokens=copy.tokens[:length], dists=copy.dists[:length]), history, self.sampler)
        start = time.perf_counter()
        # (a fork: the draft model's proposals follow the grammar on a copy of the answer's state)
        draft = self.drafter.propose(history, length, self.sampler.fork(), self.options.p_min)
        spent = time.perf_counter() - start
        self.costs.observe_catch_up(draft.catch_up_seconds, draft.catch_up_tokens)
        if draft.sync_seconds:
            self.costs.observe_sync(draft.sync_seconds)
        if draft.steps:
            self.costs.observe_draft((spent - draft.catch_up_seconds - draft.sync_seconds) / draft.steps)
        # (a draft model's tokens were sampled under the fork: allowed; a copy, prompt lookup's, is checked)
        return _allowed(draft, history, self.sampler) if draft.source else draft

    def _verify(self, history: list[int], draft: Draft, length: int) -> list[int]:
        """One target pass over the last token and the draft; the tokens it gives."""
        start = time.perf_counter()
        # Logits at every position of the batch: each one verifies the draft token after it.
        rows = self.target.decode([history[-1], *draft.tokens], all_logits=True)
        self.costs.observe_pass(len(draft.tokens) + 1, time.perf_counter() - start)
        out, accepted = accept(rows, draft, history, self.sampler, self.target.is_eog)
        self.target.truncate(len(history) + accepted)  # the rejected tail leaves the target's cache
        self._record(draft, accepted, length, rejected=accepted < len(draft.tokens) and not self.target.is_eog(out[-1]))
        return out

    def _plain(self, history: list[int]) -> list[int]:
        start = time.perf_counter()
        logits = self.target.decode(history[-1:])[0]
        self.costs.observe_pass(1, time.perf_counter() - start)
        return [self.sampler.sample(logits, history)]

    def _record(self, draft: Draft, accepted: int, length: int, rejected: bool | None) -> None:
        """One speculative round for the stats and the policy (rejected None: nothing was verified)."""
        c = self.counts
        if draft.source:  # a copy out of the context
            c["copies"] += 1
            c["copied"] += accepted
        c["drafted"] += len(draft.tokens) if rejected is not None else 0
        c["accepted"] += accepted
        c["rejections"] += bool(rejected)
        c["doubts"] += draft.doubted
        c["k_sum"] += length
        self.policy.record(draft, accepted, rejected)

    def finish(self) -> None:
        """The answer is over: how long it ran goes to the costs (what a draft model's loading must repay)."""
        if not self.finished:
            self.finished = True
            self.costs.observe_answer(self.produced)

    def stats(self) -> dict:
        c, rounds, cut = self.counts, self.policy.rounds, self._long_context_note()
        return {
            "drafter": self.drafter.name,
            "cache_type": self.target.cache_type,
            **({"note": self.note} if self.note else {}),
            # A user who asked for speed and got plain decoding there should learn why without --stats.
            **({"long_context": cut} if cut else {}),
            "drafted": c["drafted"],
            "accepted": c["accepted"],
            "rejections": c["rejections"],
            "doubts": c["doubts"],
            "copies": c["copies"],  # rounds that verified a copy out of the context
            "copied": c["copied"],  # accepted tokens that came from those copies
            "acceptance_rate": round(c["accepted"] / c["drafted"], 3) if c["drafted"] else 0.0,
            "target_passes": c["passes"],
            "speculative_passes": rounds,
            "tokens_per_pass": round(c["tokens"] / c["passes"], 3) if c["passes"] else 0.0,
            "draft_length": self.policy.length,
            "mean_draft_length": round(c["k_sum"] / rounds, 2) if rounds else 0.0,
            "probes": self.policy.probes,
            "explored": self.policy.explored,  # rounds that tried a neighbouring length to time its pass again
            "tokens_per_second": round(c["tokens"] / self.seconds, 2) if self.seconds else 0.0,
            # Against the plain steps measured here (this run's among them): what speculating bought.
            "speedup": round(c["tokens"] / self.seconds * plain, 2) if self.seconds and (plain := self.costs.measured(1)) else None,
            "pass_cost_ratios": self.costs.ratios(self.options.draft_max + 1),
            "exact_pass_limit": self._verify_cap() + 1,  # the largest pass verified: one that scores exactly
            "exact_pass_limit_long": self.costs.verify_cap(self.options.draft_max, long=True) + 1,  # past LONG_CONTEXT
            "draft_step_ms": round(self.costs.draft_step(self.drafter.step_cost_hint) * 1000, 2),
            "draft_sync_ms": round(self.costs.draft_sync(self.drafter.step_cost_hint) * 1000, 2),
        }

    def _long_context_note(self) -> str | None:
        """Say so where verification was cut back past LONG_CONTEXT, and what keeps it whole."""
        short, long = self._verify_cap(), self.costs.verify_cap(self.options.draft_max, long=True)
        went_long = self.prompt_len is not None and self.policy.reaches_long_context(self.prompt_len + self.counts["tokens"])
        if not went_long or long >= short:
            return None
        where = f"only passes of up to {long + 1} tokens" if long > 0 else "no pass of 2 tokens or more"
        fix = "; --cache-type q8_0 or bf16 keeps them exact" if self.target.cache_type == "f16" else ""
        return (f"past {LONG_CONTEXT} tokens of context {where} score exactly as one-token steps here, "
                f"so no longer draft was verified there{fix}")


def _allowed(draft: Draft, history: list[int], sampler: Sampler) -> Draft:
    """The draft up to its first token the sampler's grammar refuses (all of it without a grammar)."""
    n = sampler.allowed(history, draft.tokens)
    return draft if n == len(draft.tokens) else replace(draft, tokens=draft.tokens[:n], dists=draft.dists[:n])


def accept(rows: np.ndarray, draft: Draft, history: list[int], sampler: Sampler,
           is_eog: Callable[[int], bool]) -> tuple[list[int], int]:
    """The accepted draft prefix plus one token of the target's own (a correction or a bonus), and how many
    draft tokens were accepted: greedy, while the target's pick is the draft's; with sampling, each with
    probability min(1, p/q), a rejection redrawn from max(0, p - q) (Leviathan et al. 2023)."""
    out, context = [], list(history)
    for i, token in enumerate(draft.tokens):
        if sampler.params.greedy:
            best = sampler.sample(rows[i], context)
            if best != token:
                return out + [best], i
        else:
            p = sampler.distribution(rows[i], context)
            q = draft.dists[i]
            q_token = 1.0 if q is None else float(q[token])
            if sampler.rng.random() * q_token >= p[token]:  # rejected with probability 1 - min(1, p/q)
                return out + [sampler.draw(_residual(p, q, token))], i
        out.append(token)
        context.append(token)
        if is_eog(token):  # generation ends here: no bonus token
            return out, i + 1
    return out + [sampler.sample(rows[len(draft.tokens)], context)], len(draft.tokens)


def _residual(p: np.ndarray, q: np.ndarray | None, token: int) -> np.ndarray:
    """Where the target wants more than the draft offered: max(0, p - q) (unnormalised)."""
    residual = p.copy()
    if q is None:
        residual[token] = 0.0
    else:
        residual = (p - q).clip(min=0.0)
    return residual if residual.sum() > 0 else p
