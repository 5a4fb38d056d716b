"""Speculative decoding: a drafter proposes tokens, the target verifies them all in one batch.

The stepper plugs into `engine.generate` like the plain one, so streaming, stop
strings, --max-tokens and KV reuse are the same code. It is exact: at
temperature 0 the output is token for token the target's own; with sampling,
each drafted token x is accepted with probability min(1, p(x)/q(x)) and a
rejection is resampled from max(0, p - q) (Leviathan et al. 2023; Chen et al.
2023), where p and q come from the same `Sampler.distribution`.

It is adaptive: a verification batch of n tokens is not free on a small CPU, and
its cost v(n) is neither linear nor monotonic in n. `CostModel` measures v(n)
and the draft's step cost on this machine as generation goes; the stepper picks
the draft length with the best expected tokens per second from those costs and
the running acceptance rate, drafts nothing when plain decoding would be faster,
and probes again from time to time.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median

from edgeinfer.drafters import Draft, Drafter, ModelDrafter, NgramDrafter
from edgeinfer.engine import LoadOptions, Model, load
from edgeinfer.errors import IncompatibleModelsError, UsageError
from edgeinfer.sampling import Sampler

NGRAM, AUTO = "ngram", "auto"
_VOCAB_SLACK = 128  # converters pad vocabularies to a multiple of 64 or 128; those ids are never produced


@dataclass(frozen=True)
class DraftOptions:
    """How to speculate (the --draft* options of `edgeinfer run`, named as llama.cpp names them)."""

    ref: str  # a model reference, "auto" (the catalog's draft for the target) or "ngram" (prompt lookup)
    draft_max: int = 8  # --draft-max: never draft more tokens than this per round
    draft_min: int = 0  # --draft-min: a shorter draft is not worth a verification; decode plainly instead
    p_min: float = 0.75  # --draft-p-min: stop drafting when the draft's probability for its token is lower
    n_threads: int | None = None  # --draft-threads (None: the target's)
    n_gpu_layers: int | None = None  # --draft-gpu-layers (None: as for the target)
    adaptive: bool = True  # False: always draft up to draft_max (for tests and benchmarks)

    def __post_init__(self) -> None:
        if self.draft_max < 1:
            raise UsageError("--draft-max must be at least 1")
        if not 0 <= self.draft_min <= self.draft_max:
            raise UsageError("--draft-min must be between 0 and --draft-max")
        if not 0 <= self.p_min <= 1:
            raise UsageError("--draft-p-min must be in [0, 1]")


# --- pairing ----------------------------------------------------------------------


def resolve_draft(lib, target_ref: str | None, options: DraftOptions, progress=None) -> Path | None:
    """The draft model's file (pulled if needed), or None for prompt lookup."""
    from edgeinfer.catalog import CatalogRef
    from edgeinfer.models import locate

    if options.ref == NGRAM:
        return None
    ref = options.ref
    if ref == AUTO:
        parsed = lib.parse(target_ref)
        ref = parsed.spec.draft if isinstance(parsed, CatalogRef) else None
        if not ref:
            raise UsageError(f"--draft auto: the catalog names no draft model for {target_ref or lib.catalog.default}; "
                             "give one with --draft MODEL, or use --draft ngram")
    return locate(lib, ref, pull_missing=True, progress=progress)


def check_pair(target: Path, draft: Path, cache_file: Path | None = None) -> None:
    """Raise IncompatibleModelsError unless the draft's tokens mean what the target's mean.

    Only metadata and vocabularies are read: the gguf reader's (cached) facts, then
    llama.cpp's own vocabulary loaded with vocab_only (no weights), whose token
    strings compare in a fraction of a second where the gguf reader takes seconds.
    """
    from edgeinfer.ggufinfo import inspect

    t, d = inspect(target, cache_file), inspect(draft, cache_file)
    names = f"the draft {draft.name} cannot pair with {target.name}"
    facts = [("tokenizer model", t.tokenizer_model, d.tokenizer_model), ("BOS token", t.bos_token_id, d.bos_token_id),
             ("EOS token", t.eos_token_id, d.eos_token_id), ("add-BOS flag", t.add_bos_token, d.add_bos_token)]
    for what, ours, theirs in facts:
        if ours != theirs:
            raise IncompatibleModelsError(f"{names}: {what} differs ({theirs!r} in the draft, {ours!r} in the target)")
    if abs(t.vocab_size - d.vocab_size) > _VOCAB_SLACK:
        raise IncompatibleModelsError(f"{names}: vocabularies of {d.vocab_size} and {t.vocab_size} tokens "
                                      f"(more than {_VOCAB_SLACK} apart)")
    ours, theirs = _token_texts(target), _token_texts(draft)
    for i in range(min(len(ours), len(theirs))):
        if ours[i] != theirs[i]:
            raise IncompatibleModelsError(f"{names}: token {i} is {theirs[i]!r} in the draft and {ours[i]!r} in the target")


def _token_texts(path: Path) -> list[bytes]:
    import llama_cpp

    from edgeinfer.engine import _init_backend

    _init_backend(False)
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True  # the tokenizer only: no tensor is read
    model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
    if not model:
        raise IncompatibleModelsError(f"llama.cpp could not read the vocabulary of {path.name}")
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        return [llama_cpp.llama_vocab_get_text(vocab, i) for i in range(llama_cpp.llama_vocab_n_tokens(vocab))]
    finally:
        llama_cpp.llama_model_free(model)


def target_load_options(options: LoadOptions, draft: DraftOptions | None) -> LoadOptions:
    """How to load a target that will verify drafts: without weight repacking.

    With repacked weights, llama.cpp computes a batch of tokens and a single token
    with different kernels whose logits differ (by up to 0.46 on Qwen2.5-1.5B Q4_K_M
    on an AVX2 CPU), so a verify batch could pick another token than one-token decoding
    would at a near-tie. Unrepacked, batches of up to 7 tokens agree with one-token steps to the
    bit at short contexts (not everywhere: llama.cpp's batch-of-8+ and long-context attention
    kernels still round differently). The price: one-token steps 0-5% slower (48.4 against 49.8 ms there).
    """
    return options if draft is None else replace(options, repack=False)


@contextmanager
def speculation(target: Model, draft_path: Path | None, options: DraftOptions | None, target_load: LoadOptions,
                max_tokens: int | None = None, cache_file: Path | None = None) -> Iterator[Callable | None]:
    """Load the draft (if any) beside a loaded target; yields the stepper factory for `generate`."""
    if options is None:
        yield None
        return
    if draft_path is None:
        yield stepper_factory(lambda: NgramDrafter(), options, max_tokens)
        return
    draft_load = LoadOptions(n_ctx=target.n_ctx, n_threads=options.n_threads or target.n_threads,
                             n_gpu_layers=options.n_gpu_layers if options.n_gpu_layers is not None else target_load.n_gpu_layers,
                             n_batch=target_load.n_batch, verbose=target_load.verbose)
    with load(draft_path, draft_load, cache_file) as draft:
        drafter = ModelDrafter(draft, target.n_vocab, target.info.file_size)
        yield stepper_factory(lambda: drafter, options, max_tokens)


def stepper_factory(make_drafter: Callable[[], Drafter], options: DraftOptions,
                    max_tokens: int | None = None) -> Callable[[Model, Sampler], "SpeculativeStepper"]:
    def factory(target: Model, sampler: Sampler) -> SpeculativeStepper:
        drafter = make_drafter()
        costs = cost_model(target, drafter)
        return SpeculativeStepper(target, sampler, drafter, options, costs, max_tokens)

    return factory


# --- the cost model -----------------------------------------------------------------


class CostModel:
    """What a target pass of n tokens and a draft step cost on this machine, measured as we go.

    Medians of the last few observations, because a shared small machine has
    outliers. A pass size never measured is estimated from its measured
    neighbours, a little optimistically so that it gets tried once.
    """

    PRIOR_SLOPE = 0.5  # v(n)/v(1) grows by about this per extra token on the CPUs we know
    OPTIMISM = 0.85

    def __init__(self, window: int = 7) -> None:
        self.window = window
        self.passes: dict[int, deque[float]] = {}
        self.draft_steps: deque[float] = deque(maxlen=window)

    def observe_pass(self, n: int, seconds: float) -> None:
        self.passes.setdefault(n, deque(maxlen=self.window)).append(seconds)

    def observe_draft(self, seconds_per_token: float) -> None:
        self.draft_steps.append(seconds_per_token)

    def measured(self, n: int) -> float | None:
        samples = self.passes.get(n)
        if not samples:
            return None
        # The first pass of a new size may also allocate llama.cpp's compute buffers: until there
        # are three samples, the fastest is the best guess.
        return min(samples) if len(samples) < 3 else median(samples)

    def pass_cost(self, n: int) -> float | None:
        """Seconds for one target pass of n tokens: measured, or estimated from the measured sizes."""
        own = self.measured(n)
        if own is not None:
            return own
        v1 = self.measured(1)
        if v1 is None:
            return None
        ratios = {m: self.measured(m) / v1 for m in self.passes if self.passes[m]}
        below = max(m for m in ratios if m < n)
        above = [m for m in ratios if m > n]
        if above:
            hi = min(above)
            ratio = ratios[below] + (ratios[hi] - ratios[below]) * (n - below) / (hi - below)
        else:
            ratio = ratios[below] + self.PRIOR_SLOPE * (n - below)
        return v1 * ratio * self.OPTIMISM

    def draft_step(self, hint: float) -> float:
        if self.draft_steps:
            return median(self.draft_steps)
        return hint * (self.measured(1) or 0.0)

    def ratios(self, upto: int) -> dict[int, float]:
        v1 = self.measured(1)
        return {n: round(self.measured(n) / v1, 2) for n in range(1, upto + 1) if v1 and self.measured(n)}


_cost_models: dict[tuple, CostModel] = {}


def cost_model(target: Model, drafter: Drafter) -> CostModel:
    """One cost model per (target, threads, drafter) in this process: chat turns and benchmark runs share it."""
    key = (str(target.path), target.n_threads, drafter.name)
    return _cost_models.setdefault(key, CostModel())


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one round yields when each drafted token is accepted with probability alpha: accepted + bonus."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


# --- the stepper --------------------------------------------------------------------


class SpeculativeStepper:
    """Draft, verify in one target pass, keep the accepted prefix and a bonus token."""

    HYSTERESIS = 1.03  # speculate only when it promises to be this much faster than plain decoding
    DECAY = 0.9  # the acceptance rate forgets old rounds at this rate per round
    REALIZED_DECAY = 0.8  # the measured speed of each kind of round forgets at this rate per round

    def __init__(self, target: Model, sampler: Sampler, drafter: Drafter, options: DraftOptions,
                 costs: CostModel, max_tokens: int | None = None) -> None:
        self.target, self.sampler, self.drafter, self.options = target, sampler, drafter, options
        self.costs, self.max_tokens = costs, max_tokens
        self.prompt_len: int | None = None
        self.successes, self.failures = 1.2, 0.8  # a prior acceptance of 0.6, worth two tokens
        self.off_rounds, self.probe_gap = 0, 8
        self.k = 0
        self.counts = dict(drafted=0, accepted=0, rejections=0, passes=0, speculative_passes=0, probes=0, tokens=0, k_sum=0)
        self.seconds = 0.0
        # What each kind of round really delivered, catch-ups and all: (tokens, seconds), decayed.
        self.realized = {"plain": [0.0, 0.0], "speculative": [0.0, 0.0]}
        self._catch_up = 0.0

    def prepare(self, prompt: Sequence[int]) -> None:
        """The draft reads the prompt now, with the target, rather than in the first round."""
        self.drafter.prepare(prompt)

    def advance(self, history: list[int]) -> list[int]:
        start = time.perf_counter()
        if self.prompt_len is None:
            self.prompt_len = len(history) - 1
        k = self._choose(history)
        out = self._speculate(history, k) if k else None
        kind = "plain" if out is None else "speculative"
        if out is None:
            out = self._plain(history)
        elapsed = time.perf_counter() - start
        # A catch-up (the draft reading the prompt, or what plain rounds produced) is paid once and
        # then sunk: it says nothing about what speculating from here on will deliver.
        self._realize(kind, len(out), elapsed - (self._catch_up if kind == "speculative" else 0.0))
        self.counts["tokens"] += len(out)
        self.counts["passes"] += 1
        self.seconds += elapsed
        return out

    def _realize(self, kind: str, tokens: int, seconds: float) -> None:
        tally = self.realized[kind]
        tally[0] = tally[0] * self.REALIZED_DECAY + tokens
        tally[1] = tally[1] * self.REALIZED_DECAY + seconds

    def _losing(self) -> bool:
        """Have recent speculative rounds, everything included, delivered fewer tokens per second than
        plain steps? The cost model predicts; this checks the prediction against the clock."""
        (spec_tokens, spec_seconds), (plain_tokens, plain_seconds) = self.realized["speculative"], self.realized["plain"]
        if spec_tokens < 6 or plain_tokens < 3 or spec_seconds <= 0 or plain_seconds <= 0:
            return False
        return spec_tokens / spec_seconds < plain_tokens / plain_seconds

    def _plain(self, history: list[int]) -> list[int]:
        t0 = time.perf_counter()
        logits = self.target.decode(history[-1:])[0]
        self.costs.observe_pass(1, time.perf_counter() - t0)
        return [self.sampler.sample(logits, history)]

    def _speculate(self, history: list[int], k: int) -> list[int] | None:
        t0 = time.perf_counter()
        draft = self.drafter.propose(history, k, self.sampler, self.options.p_min)
        t1 = time.perf_counter()
        self._catch_up = draft.catch_up_seconds
        if draft.tokens:
            self.costs.observe_draft((t1 - t0 - draft.catch_up_seconds) / len(draft.tokens))
        if not draft.tokens or len(draft.tokens) < self.options.draft_min:
            return None
        # Logits at every position of the batch: each one verifies the draft token after it.
        rows = self.target.decode([history[-1], *draft.tokens], all_logits=True)
        self.costs.observe_pass(len(draft.tokens) + 1, time.perf_counter() - t1)
        out, accepted = self._verify(rows, draft, history)
        self.target.truncate(len(history) + accepted)  # the rejected tail leaves the target's cache
        self._record(len(draft.tokens), accepted, k)
        return out

    def _verify(self, rows, draft: Draft, history: list[int]) -> tuple[list[int], int]:
        """The accepted draft prefix plus one token of the target's own (a correction or a bonus),
        and how many draft tokens were accepted."""
        sampler, out, context = self.sampler, [], list(history)
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
            if self.target.is_eog(token):  # generation ends here: no bonus token
                return out, i + 1
        return out + [sampler.sample(rows[len(draft.tokens)], context)], len(draft.tokens)

    def _record(self, drafted: int, accepted: int, k: int) -> None:
        self.successes = self.successes * self.DECAY + accepted
        self.failures = self.failures * self.DECAY + (1 if accepted < drafted else 0)
        c = self.counts
        c["drafted"] += drafted
        c["accepted"] += accepted
        c["rejections"] += accepted < drafted
        c["speculative_passes"] += 1
        c["k_sum"] += k

    # --- choosing the draft length ---------------------------------------------

    @property
    def acceptance(self) -> float:
        return self.successes / (self.successes + self.failures)

    def _choose(self, history: list[int]) -> int:
        """The draft length for this round; 0 means one plain target step."""
        cap = min(self.options.draft_max, self.target.n_ctx - len(history), self.target.n_batch - 1)
        if self.max_tokens is not None:
            cap = min(cap, self.max_tokens - (len(history) - self.prompt_len) - 1)
        if cap < max(1, self.options.draft_min):
            return 0
        if not self.options.adaptive:
            self.k = cap
            return cap
        rates = self._rates(cap)
        if rates is None:  # nothing measured yet: one plain step measures v(1)
            return 0
        best = max(rates, key=rates.get)
        plain = self.HYSTERESIS / self.costs.measured(1)
        if rates[best] > plain and not self._losing():
            self.off_rounds, self.probe_gap, self.k = 0, 8, best
            return best
        self.k, self.off_rounds = 0, self.off_rounds + 1
        if self._hopeless(cap, plain):  # not even a drafter that is always right would win: never probe
            return 0
        if self.off_rounds >= self.probe_gap:  # has the text become predictable? ask the drafter again
            self.off_rounds, self.probe_gap = 0, min(self.probe_gap * 2, 64)
            self.counts["probes"] += 1
            self.realized["speculative"] = [0.0, 0.0]  # judge the probe on its own result
            return best
        return 0

    def _hopeless(self, cap: int, plain_rate: float) -> bool:
        """Would speculation lose even if every drafted token were accepted? Then a probe only costs:
        a model drafter must first read every token produced since it last ran."""
        return max(self._rates(cap, alpha=1.0).values()) <= plain_rate

    def _rates(self, cap: int, alpha: float | None = None) -> dict[int, float] | None:
        """Expected tokens per second for each draft length 1..cap, from the costs and the acceptance."""
        if self.costs.measured(1) is None:
            return None
        alpha = self.acceptance if alpha is None else alpha
        step = self.costs.draft_step(self.drafter.step_cost_hint)
        lo = max(1, self.options.draft_min)
        return {k: expected_tokens(alpha, k) / (k * step + self.costs.pass_cost(k + 1)) for k in range(lo, cap + 1)}

    def stats(self) -> dict:
        c = self.counts
        rounds = c["speculative_passes"]
        return {
            "drafter": self.drafter.name,
            "drafted": c["drafted"],
            "accepted": c["accepted"],
            "rejections": c["rejections"],
            "acceptance_rate": round(c["accepted"] / c["drafted"], 3) if c["drafted"] else 0.0,
            "target_passes": c["passes"],
            "speculative_passes": rounds,
            "tokens_per_pass": round(c["tokens"] / c["passes"], 3) if c["passes"] else 0.0,
            "draft_length": self.k,
            "mean_draft_length": round(c["k_sum"] / rounds, 2) if rounds else 0.0,
            "probes": c["probes"],
            "tokens_per_second": round(c["tokens"] / self.seconds, 2) if self.seconds else 0.0,
            "pass_cost_ratios": self.costs.ratios(self.options.draft_max + 1),
            "draft_step_ms": round(self.costs.draft_step(self.drafter.step_cost_hint) * 1000, 2),
        }


def _residual(p, q, token: int):
    """Where the target wants more than the draft offered: max(0, p - q) (unnormalised)."""
    residual = p.copy()
    if q is None:
        residual[token] = 0.0
    else:
        residual = (p - q).clip(min=0.0)
    return residual if residual.sum() > 0 else p


def describe_stats(stats: dict) -> str:
    """One line for people: what speculation did in a generation (`edgeinfer run --stats`)."""
    return (f"speculative ({stats['drafter']}): {stats['accepted']}/{stats['drafted']} drafted tokens accepted "
            f"({stats['acceptance_rate']:.0%}), {stats['tokens_per_pass']:.2f} tokens per target pass, "
            f"draft length {stats['draft_length']} (mean {stats['mean_draft_length']}), "
            f"{stats['tokens_per_second']:.1f} tok/s")
