"""What a batched step costs on this machine, measured once and remembered (`BatchCostBook`, batch-costs.json
in the store), and what follows from it: how many sequences `run --batch` keeps at once by default, and
whether its jobs go faster one at a time with speculative decoding than together in plain batched steps."""

# v(B) is the cost of one llama_decode of B sequences' one token each (B sequences generating, each after a
# short prompt of its own) over one of a single token. B sequences at once give B / v(B) times one sequence's
# tokens per second, all together: the weights are read once a step whoever uses them, while the arithmetic
# grows with B. Where v(B) grows as fast as B, more sequences only lengthen each answer's wait. Like
# speculation's pass costs, v(B) belongs to the CPU, the threads, the model file, the cache type and the
# offload; the ratios hold on a shared machine where absolute timings drift (docs/batching.md).

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from statistics import median
from typing import TYPE_CHECKING

from edgeinfer.errors import GenerationError
from edgeinfer.speculative.costs import PairKey, pair_key, read_book, write_book

if TYPE_CHECKING:
    from edgeinfer.engine import LoadOptions, Model
    from edgeinfer.ggufinfo import GGUFInfo

CPU_SIZES = (1, 2, 4, 8)  # at most 8 sequences on a CPU (issue 22): past that each answer waits too long a step
GPU_SIZES = (1, 2, 4, 8, 16, 32)  # a GPU's steps stay cheap far longer
NEAR_BEST = 0.95  # the fewest sequences within 5% of the best aggregate speed: more would buy little
PROMPT = 8  # tokens each measuring sequence reads first (its attention then covers a few cells; B prompts cost
# B x 8 tokens of prompt processing, 1.3 s at B = 8 on the 1.5B Q4_K_M on 2 cores)
ROUNDS = 5  # timed steps of each size, after an untimed one (a size's first step allocates compute buffers)
QUIET = 0.5  # cores other programs may keep busy for the CPU to count as quiet (threads.ThreadTuner's test)
FORMAT = 1  # entries written in another layout are measured again
_STALE_SECONDS = 7 * 24 * 3600  # as speculation's costs: machines and builds change


@dataclass(frozen=True)
class StepCosts:
    """v(B) for the sizes measured (v(1) = 1), and how they were measured."""

    ratios: dict[int, float]
    step: float  # seconds of a one-token step then (for people: the ratios are what decides)
    contended: bool = False  # other programs shared the CPU meanwhile
    updated: float = field(default_factory=time.time)

    def speedup(self, b: int) -> float:
        """B / v(B): how many times one sequence's tokens per second b sequences give together. Between the
        sizes measured v is interpolated; past the largest no further gain is assumed."""
        sizes = sorted(self.ratios)
        if b >= sizes[-1]:
            return sizes[-1] / self.ratios[sizes[-1]]
        below, above = max(s for s in sizes if s <= b), min(s for s in sizes if s >= b)
        if below == above:
            return b / self.ratios[b]
        v = self.ratios[below] + (self.ratios[above] - self.ratios[below]) * (b - below) / (above - below)
        return b / v

    @property
    def fresh(self) -> bool:
        return time.time() - self.updated < _STALE_SECONDS

    def describe(self) -> str:
        sizes = sorted(self.ratios)
        return (f"v(B) = {', '.join(f'{self.ratios[b]:.2f}' for b in sizes)} for B = {', '.join(map(str, sizes))}"
                + (" (measured while other programs shared the CPU)" if self.contended else ""))

    def to_json(self) -> dict:
        return {"format": FORMAT, "ratios": {str(b): v for b, v in sorted(self.ratios.items())},
                "step_s": self.step, "contended": self.contended, "updated": self.updated}

    @classmethod
    def from_json(cls, data: object) -> StepCosts | None:
        """None for an entry of another format or a damaged one (it is measured again)."""
        try:
            ratios = {int(b): float(v) for b, v in data["ratios"].items()}
            if data["format"] != FORMAT or ratios.get(1) != 1.0 or min(ratios.values()) <= 0:
                return None
            return cls(ratios, float(data["step_s"]), bool(data["contended"]), float(data["updated"]))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None


def choose_parallel(costs: StepCosts, most: int) -> int:
    """The fewest sequences, of the sizes measured up to `most`, whose aggregate speed-up is within NEAR_BEST
    of the best of them."""
    sizes = [b for b in sorted(costs.ratios) if b <= most] or [1]
    best = max(costs.speedup(b) for b in sizes)
    return next(b for b in sizes if costs.speedup(b) >= NEAR_BEST * best)


def speculate_or_batch(speculation: float | None, costs: StepCosts | None, parallel: int) -> tuple[bool, str]:
    """--draft with --batch: one sequence at a time with speculative decoding (True), or `parallel` sequences
    in plain batched steps, whichever promises more tokens per second, each figure a multiple of one
    sequence's plain speed (`speculation`: the plan's promise for one sequence). Where either is not
    measured yet: plain batched steps. The reason is the second value, one line for the user."""
    if speculation is None:
        return False, (f"--draft with --batch: plain batched steps, {parallel} sequence{'s' * (parallel > 1)} at once: "
                       "what speculation gains here is not measured yet (a run --draft measures it)")
    batch = costs.speedup(parallel) if costs is not None else (1.0 if parallel == 1 else None)
    if batch is None:
        return False, (f"--draft with --batch: plain batched steps, {parallel} sequences at once: what a batch gains "
                       "here is not measured yet (a run --batch without --parallel measures it)")
    figures = f"speculation promises {speculation:.2f}x one sequence's plain speed, {parallel} sequences in " \
              f"batched steps {batch:.2f}x"
    if speculation > batch:
        return True, f"--draft with --batch: one request at a time, speculative: {figures}"
    return False, f"--draft with --batch: plain batched steps: {figures}"


# --- measuring and remembering ---------------------------------------------------------


def measure(model: Model, sizes: Sequence[int]) -> StepCosts:
    """v(B) for each size the context holds (model.n_seq at most): steps of B one-token rows, B sequences each
    after a short prompt of its own, the sizes interleaved (a drifting machine favours none), medians."""
    sizes = [b for b in sizes if b <= model.n_seq]
    prompt = counting_tokens(model, min(PROMPT, model.n_ctx // 2))
    n = len(prompt)
    model.forget(-1)
    times: dict[int, list[float]] = {b: [] for b in sizes}
    try:
        rows = [(seq, i) for seq in range(max(sizes)) for i in range(n)]  # (every prompt, in as few steps as fit)
        for at in range(0, len(rows), model.n_batch):
            chunk = rows[at:at + model.n_batch]
            _decode(model, [prompt[i] for _, i in chunk], [i for _, i in chunk], [seq for seq, _ in chunk],
                    [False] * len(chunk))
        for rep in range(ROUNDS + 1):
            for b in sizes if rep % 2 else sizes[::-1]:
                start = time.perf_counter()
                _decode(model, [prompt[-1]] * b, [n] * b, range(b), [True] * b)  # (logits on every row: each is sampled)
                if rep:
                    times[b].append(time.perf_counter() - start)
                model.forget(-1, n)  # (every step at the same place: the sizes compare like for like)
    finally:
        model.forget(-1)
    one = median(times[1])
    return StepCosts({b: round(median(times[b]) / one, 3) for b in sizes}, one, model.contended)


def _decode(model: Model, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
            outputs: Sequence[bool]) -> None:
    if not model.decode_rows(tokens, positions, seqs, outputs):
        raise GenerationError("llama.cpp found no KV cells to measure a batched step")


def counting_tokens(model: Model, n: int) -> list[int]:
    """n tokens of "1, 2, 3, ...": a model goes on counting rather than ending its answer, so every sequence
    generates all its tokens, as llama-batched-bench's do (it never stops at an end-of-generation token;
    on random tokens a model often says one within a few tokens, and S_TG would time a smaller batch)."""
    text = ", ".join(str(i) for i in range(1, 4 * n + 2))
    return model.tokenize(text, add_special=False)[:n]


def step_key(path: Path, threads: int, gpu_layers: int | None, cache_type: str) -> str:
    """Whose costs: the CPU, the threads, the model file, the cache type, the offload (a speculation pair's
    key without its drafter)."""
    return json.dumps(PairKey.target_of(pair_key(path, "", threads, gpu_layers, cache_type).text()))


class BatchCostBook:
    """v(B) of each key, in one JSON file (None: nothing is remembered). A measurement taken while other
    programs shared the CPU is kept, marked, until a run finds the CPU quiet and measures again."""

    def __init__(self, path: Path | None) -> None:
        self.path = path

    def get(self, key: str) -> StepCosts | None:
        """What an earlier run measured, unless it is stale."""
        costs = StepCosts.from_json(read_book(self.path).get(key))
        return costs if costs is not None and costs.fresh else None

    def record(self, key: str, costs: StepCosts) -> None:
        if self.path is None:
            return
        data = read_book(self.path)  # (now: another run may have recorded another model since)
        data[key] = costs.to_json()
        write_book(self.path, data)


# --- the plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class BatchPlan:
    """How many sequences a batch keeps at once, decided before it loads: --parallel, or the measured best,
    or, where nothing is measured yet, the most that fit, for this run to measure (`measures`)."""

    parallel: int  # sequences at once (fewer where there are fewer jobs)
    most: int  # the most that memory and the device allow: what a measuring run loads
    book: BatchCostBook
    key: str
    sizes: tuple[int, ...] = CPU_SIZES  # what a measurement times
    given: bool = False  # --parallel named it
    costs: StepCosts | None = None  # v(B) measured here, now or by an earlier run
    measured_now: bool = False
    again: bool = False  # what was measured before had other programs beside it: measured again

    @property
    def measures(self) -> bool:
        """(Not where one sequence is all that fits: there is nothing to compare, and a later run may have more room.)"""
        return not self.given and self.costs is None and self.most > 1

    def loaded(self, jobs: int | None = None) -> int:
        """The sequences the context is made for: the most that fit for a run that measures, else `slots`."""
        return self.most if self.measures else self.slots(jobs)

    def slots(self, jobs: int | None = None) -> int:
        """Sequences at once for `jobs` requests (None: unknown): never more than there are."""
        return max(1, min(self.parallel, jobs)) if jobs is not None else self.parallel

    def measured(self, costs: StepCosts) -> BatchPlan:
        """This plan once `costs` were measured: the best number of sequences they show."""
        return replace(self, costs=costs, measured_now=True, parallel=choose_parallel(costs, self.most))

    @property
    def how(self) -> str:
        """Where `parallel` came from, for people."""
        if self.given:
            return "--parallel"
        return "measured now" if self.measured_now else "measured earlier" if self.costs else "most that fit"


def plan_batch(path: Path, info: GGUFInfo, n_ctx: int, load_options: LoadOptions, parallel: int | None,
               book: BatchCostBook) -> BatchPlan:
    """The sequences of a batch on `path`: `parallel` (--parallel) if given, else the fewest near the best
    aggregate speed that earlier runs measured here, within the memory available now and the device's cap
    (8 on a CPU), else the most that fit (the run measures; also where the last measurement had other
    programs beside it and the CPU is quiet now)."""
    from edgeinfer import machine

    sizes = CPU_SIZES if load_options.on_cpu else GPU_SIZES
    key = step_key(path, load_options.threads, load_options.n_gpu_layers, load_options.kv_type)
    costs = book.get(key)
    again = costs is not None and costs.contended and parallel is None and machine.others_busy() < QUIET
    if again:
        costs = None  # (timings taken beside other programs are not the machine's: on a quiet CPU, again)
    if parallel is not None:
        return BatchPlan(parallel, parallel, book, key, sizes, given=True, costs=costs)
    most = machine.most_sequences(info, n_ctx, load_options.kv_type, sizes[-1])
    chosen = choose_parallel(costs, most) if costs is not None else most
    return BatchPlan(chosen, most, book, key, sizes, costs=costs, again=again)
