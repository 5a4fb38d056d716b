"""What speculation costs and yields for one pair of models on this machine, measured and remembered
(`CostModel` in a `CostBook` file beside the store), and the round formula that prices a draft length."""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from statistics import median

_STALE_SECONDS = 7 * 24 * 3600  # a verdict older than this is learned again: machines and builds change
# The timings of an entry: what another program's load distorts (docs/speculative.md, the cost book).
# Rates and exactness are not.
TIMINGS = ("steps", "passes", "draft_steps", "draft_syncs", "catch_ups", "loads")
REEXAMINE = 0.67  # plain steps this much faster than the recorded ones: the recorded timings were a bad minute
SWITCH_ON_MARGIN = 1.03  # speculate only when it promises to be this much faster than plain decoding


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round yields when each drafted token is accepted with probability alpha: accepted + bonus."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def expected_round(k: int, reject: float, doubt: float, step: float, pass_cost,
                   sync: float | None = None) -> tuple[float, float]:
    """Expected (tokens, seconds) of one round that drafts up to k tokens.

    A round's first draft evaluation re-syncs the draft with the verified tokens (the bonus token,
    and the last drafted one when all were accepted: often a batch of 2, dearer than a step) and
    costs `sync` (default: a step); each further one costs `step`.

    A draft model stops early where it doubts its next token (probability `doubt` at
    each position, the --draft-p-min test), so a round often verifies fewer than k
    tokens, and pays one draft step more than it proposed: the step whose logits
    raised the doubt. Each proposed token is rejected with probability `reject`.
    Averaging over where the draft stops matters on a small CPU, where a pass of
    2 tokens may cost far less than one of k + 1.
    """
    first = step if sync is None else sync
    tokens = seconds = 0.0
    reach = 1.0  # the chance the draft gets as far as proposing its j-th token
    for j in range(k + 1):
        stops_here = reach * (doubt if j < k else 1.0)
        steps = j + 1 if j < k else k
        tokens += stops_here * expected_tokens(1.0 - reject, j)
        seconds += stops_here * (first + (steps - 1) * step + pass_cost(j + 1))
        reach *= 1.0 - doubt
    return tokens, seconds


def expected_speeds(costs: "CostModel", step_hint: float, draft_min: int, cap: int, reject: float,
                    doubt: float = 0.0, copy: bool = False) -> dict[int, float]:
    """Expected tokens per second for each draft length from --draft-min (at least 1) up to cap, from the
    costs, the chance a proposed token is rejected and the chance the draft stops, unsure, at a position.
    A copy out of the context takes no draft step."""
    step, sync = (0.0, 0.0) if copy else (costs.draft_step(step_hint), costs.draft_sync(step_hint))
    passes = {n: costs.pass_cost(n) for n in range(1, cap + 2)}  # once, not once per length and stop
    out = {}
    for k in range(max(1, draft_min), cap + 1):
        tokens, seconds = expected_round(k, reject, doubt, step, passes.__getitem__, sync)
        out[k] = tokens / seconds
    return out


def can_win(costs: "CostModel", step_hint: float, draft_min: int, cap: int, copy: bool = False) -> bool:
    """Could drafts (copies) that were always accepted beat plain decoding by SWITCH_ON_MARGIN? If not,
    speculating only costs: neither loading the draft nor a probe (asking it) is worth anything."""
    best = max(expected_speeds(costs, step_hint, draft_min, cap, reject=0.0, copy=copy).values())
    return best > SWITCH_ON_MARGIN / costs.measured(1)


def repays_loading(costs: "CostModel", step_hint: float, cap: int, prompt_tokens: int, answer_tokens: int,
                   draft_min: int = 0, loaded: bool = False) -> bool:
    """Would speculating over an answer of `answer_tokens` save more time than loading the draft model (unless
    it is `loaded`) and its reading of `prompt_tokens` cost, at the best draft length and the rates seen so
    far? (What the user waits for is the whole run, not the token loop.) Unknown costs: yes, the run learns them."""
    step = costs.measured(1)
    if (not loaded and not costs.loads) or step is None or costs.measured(2) is None:
        return True
    speed = max(expected_speeds(costs, step_hint, draft_min, cap, reject=costs.rejection_prior(),
                                doubt=costs.doubt_prior()).values())
    saved = answer_tokens * (step - 1.0 / speed)
    loading = 0.0 if loaded else median(costs.loads)
    return saved > loading + prompt_tokens * costs.catch_up_per_token(step_hint)


class Tally:
    """Events among trials, the past forgotten at `decay` per update: a rate that follows change."""

    __slots__ = ("decay", "events", "trials")

    def __init__(self, decay: float, events: float = 0.0, trials: float = 0.0) -> None:
        self.decay, self.events, self.trials = decay, float(events), float(trials)

    def add(self, events: float, trials: float) -> None:
        self.events = self.events * self.decay + events
        self.trials = self.trials * self.decay + trials

    def rate(self, default: float = 0.0, enough: float = 0.0) -> float:
        """events / trials, or the default until the trials are `enough` (and more than none)."""
        return self.events / self.trials if self.trials > 0 and self.trials >= enough else default

    def to_json(self) -> list[float]:
        return [self.events, self.trials]


class CostModel:
    """Target pass costs v(n), the draft's step and catch-up costs, and the long-run rejection and doubt rates.

    Every cost but v(1) is kept as a multiple of it, since on a shared machine the absolute figures drift
    with the load while the ratios hold; medians of the last few, since such a machine has outliers.
    """

    FORMAT = 2  # entries written in another layout are learned again
    PRIOR_SLOPE = 0.5  # v(n)/v(1) grows by about this per extra token on the CPUs we know
    OPTIMISM = 0.85
    LONG_DECAY = 0.98  # the rates remembered across runs forget at this rate per round

    def __init__(self, window: int = 7) -> None:
        self.window = window
        self.steps: deque[float] = deque(maxlen=window)  # seconds of a one-token target step, v(1)
        self.passes: dict[int, deque[float]] = {}  # v(n)/v(1), n >= 2
        self.draft_steps: deque[float] = deque(maxlen=window)  # a draft model's one-token step / v(1)
        self.draft_syncs: deque[float] = deque(maxlen=window)  # its first evaluation in a round / v(1)
        self.catch_ups: deque[float] = deque(maxlen=window)  # a draft's catch-up per token / v(1)
        self.loads: deque[float] = deque(maxlen=window)  # seconds to load the draft model (disk, not compute)
        self.answers: deque[int] = deque(maxlen=window)  # tokens of the latest answers: how long one runs here
        self.rejections = Tally(self.LONG_DECAY)  # rejected among judged proposed tokens
        self.doubts = Tally(self.LONG_DECAY)  # stops below --draft-p-min among tests of it
        self.sources: dict[str, Tally] = {}  # rejected among judged, per kind of copy (prompt lookup's match length)
        # The largest pass whose logits agree bit for bit with one-token steps, of the sizes tried: none is
        # verified beyond it, for a batch that rounds differently could break a near-tie another way.
        self.exact: tuple[int, int] | None = None  # (agreeing, tried)
        self.exact_long: int | None = None  # agreeing, of those tried, past plan.LONG_CONTEXT tokens of context
        self.updated = 0.0  # when this was last measured (seconds since the epoch)
        self.forgotten = False  # its timings were dropped (outdated_by) and must be dropped in the file too

    # --- observing ---------------------------------------------------------------

    def observe_pass(self, n: int, seconds: float) -> None:
        """(A one-token step is always timed first: calibration starts with it, rounds follow it.)"""
        if n == 1:
            self.steps.append(seconds)
        else:
            self._relative(self.passes.setdefault(n, deque(maxlen=self.window)), seconds)
        self.updated = time.time()

    def observe_draft(self, seconds: float) -> None:
        self._relative(self.draft_steps, seconds)

    def observe_sync(self, seconds: float) -> None:
        self._relative(self.draft_syncs, seconds)

    def observe_catch_up(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self._relative(self.catch_ups, seconds / tokens)

    def _relative(self, samples: deque[float], seconds: float) -> None:
        if (v1 := self.measured(1)) is not None:
            samples.append(seconds / v1)

    def observe_load(self, seconds: float) -> None:
        self.loads.append(seconds)

    def observe_answer(self, tokens: int) -> None:
        self.answers.append(tokens)

    def typical_answer(self, max_tokens: int | None) -> int | None:
        """How many tokens an answer will likely have: the latest answers' median, within --max-tokens
        (None: nothing to go by)."""
        known = int(median(self.answers)) if self.answers else None
        if max_tokens is None or known is None:
            return known if max_tokens is None else max_tokens
        return min(max_tokens, known)

    def observe_round(self, judged: int, rejected: bool, tests: int, doubted: bool) -> None:
        self.rejections.add(rejected, judged)
        self.doubts.add(doubted, tests)

    def observe_copy(self, source: str, judged: int, rejected: int) -> None:
        """One round's evidence on copies out of the context of one kind (whose quality is the kind's, not the
        model's): tokens judged, and how many of them were wrong."""
        self.sources.setdefault(source, Tally(self.LONG_DECAY)).add(rejected, judged)

    # --- estimates ---------------------------------------------------------------

    def measured(self, n: int) -> float | None:
        """Seconds for a pass of n tokens, if that size was measured."""
        v1 = _robust(self.steps)
        if n == 1 or v1 is None:
            return v1
        ratio = _robust(self.passes.get(n, ()))
        return None if ratio is None else v1 * ratio

    def pass_cost(self, n: int) -> float | None:
        """Seconds for one target pass of n tokens: measured, or estimated from the measured sizes."""
        own = self.measured(n)
        if own is not None:
            return own
        v1 = self.measured(1)
        if v1 is None:
            return None
        ratios = {1: 1.0, **{m: _robust(samples) for m, samples in self.passes.items() if samples}}
        below = max(m for m in ratios if m < n)
        above = [m for m in ratios if m > n]
        if above:
            hi = min(above)
            ratio = ratios[below] + (ratios[hi] - ratios[below]) * (n - below) / (hi - below)
        else:
            ratio = ratios[below] + self.PRIOR_SLOPE * (n - below)
        return v1 * ratio * self.OPTIMISM

    def draft_step(self, hint: float) -> float:
        """Seconds for one draft model evaluation (the hint: its ratio to v(1) before any was timed)."""
        return self._seconds(self.draft_steps, hint)

    def _step_ratio(self, hint: float) -> float:
        return median(self.draft_steps) if self.draft_steps else hint

    def draft_sync(self, hint: float) -> float:
        """Seconds for a round's first draft evaluation (before any was timed: a step)."""
        return self._seconds(self.draft_syncs, self._step_ratio(hint))

    def catch_up_per_token(self, hint: float) -> float:
        """What the draft pays per token it must read after plain rounds (before any was timed: a step)."""
        return self._seconds(self.catch_ups, self._step_ratio(hint))

    def _seconds(self, ratios: deque[float], fallback: float) -> float:
        """The median of ratios to v(1) (the fallback ratio when there are none), in seconds."""
        return (median(ratios) if ratios else fallback) * (self.measured(1) or 0.0)

    def rejection_prior(self, default: float = 0.1) -> float:
        """The chance a proposed token is rejected, as earlier runs saw it (before any, a hopeful guess:
        a pair's first run must draft to learn anything, and a model drafter that stops cannot cheaply
        start again)."""
        return self.rejections.rate(default, enough=3)

    def copy_prior(self, source: str, default: float = 0.1) -> float:
        """The chance a token copied by this kind of match is rejected, as earlier runs saw it: a 2-token
        match on new code is usually wrong, a 4-token one in an edited function usually right, and a
        generation that starts from what it already knows verifies fewer bad copies before it learns
        (before any, a hopeful guess: copies must be tried to be judged)."""
        return self.sources.get(source, Tally(self.LONG_DECAY)).rate(default, enough=3)

    def doubt_prior(self, default: float = 0.1) -> float:
        """The chance the draft stops, unsure, at a position it reached, as earlier runs saw it."""
        return self.doubts.rate(default, enough=3)

    def observe_exactness(self, agreeing: int, tried: int, agreeing_long: int | None) -> None:
        """(agreeing_long None: the long context was not probed; what an earlier run found there stays.)"""
        self.exact = (agreeing, tried)
        if agreeing_long is not None:
            self.exact_long = agreeing_long
        self.updated = time.time()

    def knows_exactness(self, upto: int, long: bool = True) -> bool:
        """Is it known which passes of up to `upto` tokens score exactly as one-token steps do, in a short
        context and (long) in one past plan.LONG_CONTEXT tokens?"""
        if self.exact is None or (long and self.exact_long is None):
            return False
        agreeing, tried = self.exact
        return tried >= upto or (agreeing < tried and (not long or self.exact_long < tried))

    def verify_cap(self, draft_max: int, long: bool = False) -> int:
        """The most tokens a round may draft: --draft-max, within the passes known to be exact (long: past
        plan.LONG_CONTEXT tokens of context, where none is verified until one was found exact there)."""
        if self.exact is None:
            return draft_max
        agreeing = (self.exact_long or 1) if long else self.exact[0]
        return min(draft_max, agreeing - 1)

    def ratios(self, upto: int) -> dict[int, float]:
        v1 = self.measured(1)
        return {n: round(self.measured(n) / v1, 2) for n in range(1, upto + 1) if v1 and self.measured(n)}

    # --- remembering -------------------------------------------------------------

    def to_json(self) -> dict:
        return {"format": self.FORMAT, "steps": list(self.steps),
                "passes": {str(n): list(v) for n, v in self.passes.items()}, "draft_steps": list(self.draft_steps),
                "draft_syncs": list(self.draft_syncs), "catch_ups": list(self.catch_ups), "loads": list(self.loads),
                "answers": list(self.answers),
                "rejections": self.rejections.to_json(), "doubts": self.doubts.to_json(),
                "sources": {k: t.to_json() for k, t in self.sources.items()},
                **({"exact": list(self.exact)} if self.exact else {}),
                **({"exact_long": self.exact_long} if self.exact_long is not None else {}), "updated": self.updated}

    @classmethod
    def from_json(cls, data: dict) -> "CostModel":
        model = cls()
        if data.get("format") != cls.FORMAT:
            return model
        model.steps.extend(float(s) for s in data.get("steps", []))
        for n, samples in data.get("passes", {}).items():
            model.passes[int(n)] = deque((float(s) for s in samples), maxlen=model.window)
        model.draft_steps.extend(float(s) for s in data.get("draft_steps", []))
        model.draft_syncs.extend(float(s) for s in data.get("draft_syncs", []))
        model.catch_ups.extend(float(s) for s in data.get("catch_ups", []))
        model.loads.extend(float(s) for s in data.get("loads", []))
        model.answers.extend(int(n) for n in data.get("answers", []))
        model.rejections = Tally(cls.LONG_DECAY, *data.get("rejections", ()))
        model.doubts = Tally(cls.LONG_DECAY, *data.get("doubts", ()))
        model.sources = {k: Tally(cls.LONG_DECAY, *v) for k, v in data.get("sources", {}).items()}
        if len(exact := data.get("exact", ())) == 2:
            model.exact = (int(exact[0]), int(exact[1]))
        if isinstance(data.get("exact_long"), int):
            model.exact_long = data["exact_long"]
        model.updated = float(data.get("updated", 0.0))
        return model

    def outdated_by(self, step: float) -> bool:
        """Are the recorded timings from a slower moment than now, where a one-token step takes `step` s?"""
        recorded = self.measured(1)
        return recorded is not None and step < REEXAMINE * recorded

    def forget_timings(self) -> None:
        """Drop what was timed (kept: the rates and which passes are exact), to be measured again."""
        self.steps.clear()
        self.passes.clear()
        for samples in (self.draft_steps, self.draft_syncs, self.catch_ups, self.loads):
            samples.clear()
        self.forgotten = True

    @property
    def fresh(self) -> bool:
        return time.time() - self.updated < _STALE_SECONDS


def _robust(samples) -> float | None:
    """A typical value of a few timings: the fastest until there are three (the first pass of a new size
    may also allocate llama.cpp's compute buffers), then the median."""
    if not samples:
        return None
    return min(samples) if len(samples) < 3 else median(samples)


@dataclass(frozen=True)
class PairKey:
    """Whose costs these are: the CPU, the threads, the target file, the drafter, the offload."""

    cpu: str
    threads: int
    target: str  # file name and size: a requantized file under the same name is another model
    drafter: str
    gpu_layers: int | None

    def text(self) -> str:
        return json.dumps([self.cpu, self.threads, self.target, self.drafter, self.gpu_layers])

    @staticmethod
    def target_of(text: str) -> list | None:
        """What a key's text names besides the drafter: CPU, threads, target and offload (None: not a key)."""
        try:
            key = json.loads(text)
        except ValueError:
            return None
        return key[:3] + key[4:] if isinstance(key, list) and len(key) == 5 else None


def pair_key(target: Path, drafter: str, threads: int, gpu_layers: int | None, cache_type: str = "f16") -> PairKey:
    """(Another KV cache type is another target: its passes cost and agree otherwise.)"""
    from edgeinfer import machine

    cache = "" if cache_type == "f16" else f":{cache_type}"
    return PairKey(f"{machine.cpu_name()} {' '.join(machine.cpu_flags())}", threads,
                   f"{target.name}:{target.stat().st_size}{cache}", drafter, gpu_layers)


class CostBook:
    """The cost models of this process, loaded from and saved to one JSON file (None: memory only).

    Entries are merged into the file on save, so two runs at once lose at most
    each other's latest figures, never the file.
    """

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._models: dict[str, CostModel] = {}
        self._stored: dict | None = None  # the file as first read: the plan and the steppers share one read

    def peek(self, key: PairKey) -> CostModel | None:
        """The remembered model, or None: nothing is created (but what another drafter's runs found out
        about this target: a new drafter starts from it)."""
        text = key.text()
        if text not in self._models:
            if self._stored is None:
                self._stored = self._read()
            stored = self._stored.get(text)
            model = CostModel.from_json(stored) if stored else self._target_facts(text)
            if model is None:
                return None
            self._models[text] = model
        return self._models[text]

    def _target_facts(self, text: str) -> CostModel | None:
        """Which passes are exact, and what they cost, is the target's (on this CPU, threads, cache and offload),
        not the pair's: learned with one drafter, it holds for the next, which then neither measures it again
        nor, where no pass is exact, loads at all. So is how often copies out of the context were right (the
        text's and the target's, whoever verified them). What the draft model costs and how often it is
        right, a new drafter learns."""
        target = PairKey.target_of(text)
        known = [m for k, m in self._models.items() if PairKey.target_of(k) == target]
        known += [CostModel.from_json(d) for k, d in self._stored.items()
                  if k not in self._models and isinstance(d, dict) and PairKey.target_of(k) == target]
        known = [m for m in known if m.exact is not None and m.fresh]
        if not known:
            return None
        latest = max(known, key=lambda m: m.updated)
        model = CostModel()
        model.exact, model.exact_long, model.updated = latest.exact, latest.exact_long, latest.updated
        model.steps.extend(latest.steps)
        for n, ratios in latest.passes.items():
            model.passes[n] = deque(ratios, maxlen=model.window)
        model.sources = {kind: Tally(t.decay, t.events, t.trials) for kind, t in latest.sources.items()}
        return model

    def get(self, key: PairKey) -> CostModel:
        """The remembered model, or a new one that this book will save."""
        return self.peek(key) or self._models.setdefault(key.text(), CostModel())

    def save(self, trusted: bool = True) -> None:
        """Merge this process's models into the file. Untrusted (timed while other programs shared the CPU):
        their timings are not the machine's and are not kept; the file's earlier ones stay."""
        if self.path is None or not self._models:
            return
        data = self._read()  # again: another run may have saved since (merge, do not overwrite)
        for key, model in self._models.items():
            if not (model.steps or model.forgotten):
                continue
            entry = model.to_json()
            if not trusted:
                earlier = data.get(key) if isinstance(data.get(key), dict) else {}
                entry.update({name: earlier.get(name, {} if name == "passes" else []) for name in TIMINGS})
            data[key] = entry
        write_book(self.path, data)

    def _read(self) -> dict:
        return read_book(self.path)


def read_book(path: Path | None) -> dict:
    """A book of measured figures (a JSON object); empty when it is missing or unreadable: it is learned again."""
    if path is None or not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_book(path: Path, data: dict) -> None:
    """Replace a book whole (readers see the old one or the new); a read-only home only costs the next
    run some learning."""
    from edgeinfer.store import atomic_write_text

    try:
        atomic_write_text(path, json.dumps(data))
    except OSError:
        pass
