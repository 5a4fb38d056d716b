"""Throughput of a model on this machine, measured like llama-bench's pp and tg tests
(and, with --draft, plain generation against speculative on a code edit)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from edgeinfer.engine import LoadOptions, Model, load
from edgeinfer.progress import ProgressReporter, SilentProgress
from edgeinfer.sampling import Sampler, SamplingParams


@dataclass(frozen=True)
class BenchResult:
    model: str
    test: str  # "pp512", "tg128"
    tokens_per_second: tuple[float, ...]  # one per repetition
    time_to_first_token_ms: tuple[float, ...] = ()  # pp only

    @property
    def median(self) -> float:
        return statistics.median(self.tokens_per_second)

    @property
    def spread(self) -> float:
        """Standard deviation over the repetitions (0 with one)."""
        return statistics.stdev(self.tokens_per_second) if len(self.tokens_per_second) > 1 else 0.0

    def to_json(self) -> dict:
        data = {"model": self.model, "test": self.test, "median_tokens_per_second": round(self.median, 2),
                "stdev_tokens_per_second": round(self.spread, 2), "repetitions": [round(x, 2) for x in self.tokens_per_second]}
        if self.time_to_first_token_ms:
            data["median_time_to_first_token_ms"] = round(statistics.median(self.time_to_first_token_ms), 1)
        return data


def bench(name: str, path: Path, options: LoadOptions, *, n_prompt: int = 512, n_gen: int = 128, repetitions: int = 3,
          cache_file: Path | None = None, progress: ProgressReporter | None = None) -> list[BenchResult]:
    """pp and tg figures for one model (a test is skipped when its size is 0).

    pp: a prompt of n tokens evaluated in batches (prompt tokens/s), and the time to the first token it
    gives. tg: n tokens generated one at a time through the same decode-and-sample step as `edgeinfer run`
    (generation tokens/s). Each repetition starts from an empty KV cache; the figures are medians with
    their spread.
    """
    progress = progress or SilentProgress()
    need = max(n_prompt, n_gen) + 8
    options = replace(options, n_ctx=max(options.n_ctx or 0, need))
    with load(path, options, cache_file) as model:
        prompt = _prompt_tokens(model, n_prompt)
        _warm_up(model)
        pp, ttft, tg = [], [], []
        progress.start(f"{name}: pp{n_prompt} tg{n_gen}", repetitions)
        for _ in range(repetitions):
            if n_prompt:
                seconds = _time_prompt(model, prompt)
                pp.append(n_prompt / seconds)
                ttft.append(seconds * 1000)
            if n_gen:
                tg.append(n_gen / _time_generation(model, n_gen))
            progress.advance(1)
    results = []
    if n_prompt:
        results.append(BenchResult(name, f"pp{n_prompt}", tuple(pp), tuple(ttft)))
    if n_gen:
        results.append(BenchResult(name, f"tg{n_gen}", tuple(tg)))
    return results


SPECULATION_PROMPT = """Add a docstring to this function and return the whole function.

def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    result = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            result.append(total / window)
    return result
"""


def bench_speculative(name: str, path: Path, options: LoadOptions, plan, *, n_gen: int = 128,
                      repetitions: int = 3, cache_file: Path | None = None,
                      progress: ProgressReporter | None = None) -> list[BenchResult]:
    """Greedy generation on a code-edit prompt, plain and speculative, interleaved: tg tok/s of each.

    Both on one loaded target, with the plan a user's `run --draft` gets, so a pair that
    earlier runs found hopeless here is benchmarked as skipped.
    """
    from edgeinfer.speculative import speculation
    from edgeinfer.template import chat_tokens

    progress = progress or SilentProgress()
    with load(path, options, cache_file) as model, speculation(model, plan, options, n_gen, cache_file) as factory:
        prompt = chat_tokens(model, [{"role": "user", "content": SPECULATION_PROMPT}])
        progress.start(f"{name}: tg{n_gen} plain and with --draft {plan.options.ref}", repetitions)
        speeds = _alternated(model, prompt, n_gen, {"plain": {}, "draft": {"stepper_factory": factory}},
                             repetitions, progress)
    label = (f"tg{n_gen} code-edit --draft {plan.options.ref}" + (" (speculation off)" if plan.skipped else "")
             + (" (prompt lookup only)" if plan.note else ""))
    return [BenchResult(name, f"tg{n_gen} code-edit", tuple(speeds["plain"])), BenchResult(name, label, tuple(speeds["draft"]))]


STRUCTURED_PROMPT = ("Describe a small bookshop as JSON: its name, its address (street, city, country) and a list of "
                     "six books, each with title, author, year and price. Reply with the JSON only.")


def bench_structured(name: str, path: Path, options: LoadOptions, constraint, *, n_gen: int = 128,
                     repetitions: int = 3, cache_file: Path | None = None,
                     progress: ProgressReporter | None = None) -> list[BenchResult]:
    """Greedy generation on a prompt asking for JSON, free and under the constraint (--format json,
    --json-schema, --grammar), interleaved: tg tok/s of each. A constrained answer may end before n_gen
    tokens (its JSON is whole): its speed is over the tokens it has."""
    from edgeinfer.template import chat_tokens

    progress = progress or SilentProgress()
    with load(path, options, cache_file) as model:
        prompt = chat_tokens(model, [{"role": "user", "content": STRUCTURED_PROMPT}])
        progress.start(f"{name}: tg{n_gen} free and with {constraint.describe()}", repetitions)
        speeds = _alternated(model, prompt, n_gen, {"free": {}, "constrained": {"grammar": constraint.compile(model)}},
                             repetitions, progress)
    return [BenchResult(name, f"tg{n_gen} json-prompt", tuple(speeds["free"])),
            BenchResult(name, f"tg{n_gen} json-prompt {constraint.describe()}", tuple(speeds["constrained"]))]


def _alternated(model: Model, prompt: list[int], n_gen: int, runs: dict[str, dict], repetitions: int,
                progress: ProgressReporter) -> dict[str, list[float]]:
    """Greedy tg tok/s of each way to generate (`generate`'s keyword arguments), interleaved ABBA on one
    loaded model, each from an empty cache; the first round warms every path up and is not counted."""
    from edgeinfer.engine import generate

    greedy = SamplingParams(temperature=0)
    speeds: dict[str, list[float]] = {key: [] for key in runs}
    for rep in range(repetitions + 1):
        for key in (list(runs) if rep % 2 else list(runs)[::-1]):
            model.truncate(0)
            result = generate(model, prompt, greedy, max_tokens=n_gen, **runs[key])
            if rep:
                speeds[key].append(result.completion_tokens / (result.total_seconds - result.time_to_first_token + 1e-9))
        progress.advance(1 if rep else 0)
    return speeds


def _prompt_tokens(model: Model, n: int) -> list[int]:
    """Deterministic ordinary tokens (llama-bench uses random ones too): content does not change the cost."""
    rng = np.random.default_rng(0)
    ordinary = [t for t in range(min(model.n_vocab, 32000)) if not model.is_eog(t)]
    return [int(t) for t in rng.choice(ordinary, size=n)]


def _warm_up(model: Model) -> None:
    model.truncate(0)
    model.decode([model.bos_token if model.bos_token >= 0 else 0])
    model.truncate(0)


def _time_prompt(model: Model, prompt: list[int]) -> float:
    """Time to the first sampled token: the whole prompt evaluated, then one greedy pick."""
    model.truncate(0)
    sampler = Sampler(SamplingParams(temperature=0))
    start = time.perf_counter()
    logits = model.prefill(prompt)
    sampler.sample(logits, prompt)
    return time.perf_counter() - start


def _time_generation(model: Model, n: int) -> float:
    """n steps of the plain token loop's work: decode one token, sample the next greedily."""
    model.truncate(0)
    sampler = Sampler(SamplingParams(temperature=0))
    token = model.bos_token if model.bos_token >= 0 else 0
    history = [token]
    start = time.perf_counter()
    for _ in range(n):
        logits = model.decode([token])[0]
        token = sampler.sample(logits, history)
        history.append(token)
    return time.perf_counter() - start


def bench_parallel(name: str, path: Path, options: LoadOptions, sizes: tuple[int, ...], *, n_prompt: int = 32,
                   n_gen: int = 64, repetitions: int = 3, cache_file: Path | None = None,
                   progress: ProgressReporter | None = None) -> list[BenchResult]:
    """Aggregate generation speed of B sequences in one context for each B, as llama-batched-bench's S_TG:
    B prompts of n_prompt tokens read first, then B * n_gen tokens generated, over the generation's time.
    Each result's time to first token is the last sequence's (every prompt read)."""
    progress = progress or SilentProgress()
    progress.start(f"{name}: pp{n_prompt} tg{n_gen} at B = {', '.join(map(str, sizes))}", repetitions * len(sizes))
    speeds: dict[int, list[float]] = {b: [] for b in sizes}
    ttfts: dict[int, list[float]] = {b: [] for b in sizes}
    for rep in range(repetitions):
        for b in sizes if rep % 2 == 0 else sizes[::-1]:  # (alternating order: a drifting machine favours no B)
            s_tg, ttft = aggregate_generation(path, replace(options, n_ctx=n_prompt + n_gen + 8), b, n_prompt, n_gen,
                                              cache_file)
            speeds[b].append(s_tg)
            ttfts[b].append(ttft * 1000)
            progress.advance(1)
    return [BenchResult(name, f"pp{n_prompt}+tg{n_gen} x{b} (S_TG)", tuple(speeds[b]), tuple(ttfts[b])) for b in sizes]


def aggregate_generation(path: Path, options: LoadOptions, batch: int, n_prompt: int, n_gen: int,
                         cache_file: Path | None = None) -> tuple[float, float]:
    """(S_TG, seconds to the last first token) of `batch` greedy sequences of one prompt, shared with no one:
    generated tokens over the time after all prompts were read."""
    from edgeinfer.batch import AdmissionPolicy, Job, generate_batch
    from edgeinfer.batchcost import counting_tokens

    with load(path, replace(options, n_seq=batch), cache_file) as model:
        prompt = tuple(counting_tokens(model, n_prompt))
        # All prompts in the first steps (as llama-batched-bench reads them), each read by its own sequence.
        policy = AdmissionPolicy(slots=batch, cells=model.n_cells,
                                 step_tokens=max(min(batch * n_prompt, model.n_batch), batch), min_shared=n_prompt + 1)
        jobs = [Job(i, prompt, SamplingParams(temperature=0), max_tokens=n_gen) for i in range(batch)]
        results = [answer.result for answer in generate_batch(model, jobs, policy)]
    first = max(r.time_to_first_token for r in results)
    generated = sum(r.completion_tokens - 1 for r in results)
    return generated / max(max(r.total_seconds for r in results) - first, 1e-9), first
