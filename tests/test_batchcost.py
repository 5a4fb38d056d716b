"""What a batched step costs, and what follows from it: numbers in, decisions out (no model needed but for
the plan, which reads a tiny model's metadata)."""

from __future__ import annotations

import json
import time

import pytest

from edgeinfer.batchcost import (BatchCostBook, StepCosts, choose_parallel, plan_batch, speculate_or_batch,
                                 step_key)
from edgeinfer.batchjob import BatchResult, BatchSummary
from edgeinfer.engine import GenerationResult, LoadOptions
from edgeinfer.ggufinfo import inspect


def costs(*ratios: float, **kwargs) -> StepCosts:
    """v(B) for B = 1, 2, 4, 8 (as many as given)."""
    return StepCosts(dict(zip((1, 2, 4, 8), ratios)), 0.05, **kwargs)


# --- the default number of sequences ----------------------------------------------------


def test_the_default_is_the_fewest_sequences_within_five_percent_of_the_best():
    # Speed-ups B / v(B): 1, 1.82, 2.50, 2.22: four is best.
    assert choose_parallel(costs(1.0, 1.1, 1.6, 3.6), most=8) == 4
    # 1, 1.67, 1.95, 2.00: four is within 5% of eight's best, and waits less per answer.
    assert choose_parallel(costs(1.0, 1.2, 2.05, 4.0), most=8) == 4
    # 1, 2.00, 1.90, 1.95: two sequences are as fast as any more.
    assert choose_parallel(costs(1.0, 1.0, 2.1, 4.1), most=8) == 2
    # A step of B costs B steps of one: batching gains nothing, one at a time.
    assert choose_parallel(costs(1.0, 2.0, 4.0, 8.0), most=8) == 1


def test_memory_caps_the_default():
    assert choose_parallel(costs(1.0, 1.05, 1.2, 1.5), most=8) == 8
    assert choose_parallel(costs(1.0, 1.05, 1.2, 1.5), most=6) == 4
    assert choose_parallel(costs(1.0, 1.05, 1.2, 1.5), most=1) == 1


def test_the_speedup_between_and_past_the_sizes_measured():
    measured = costs(1.0, 1.2, 2.0)
    assert measured.speedup(2) == pytest.approx(2 / 1.2)
    assert measured.speedup(3) == pytest.approx(3 / 1.6)  # (v interpolated between 2 and 4)
    assert measured.speedup(8) == measured.speedup(4) == pytest.approx(2.0)  # (no gain assumed past 4)


# --- --draft with --batch ------------------------------------------------------------------


def test_speculation_one_at_a_time_only_where_it_promises_more_than_the_batch():
    batch = costs(1.0, 1.1, 1.6, 3.2)  # 4 sequences: 2.5x
    speculate, why = speculate_or_batch(3.0, batch, 4)
    assert speculate and "one request at a time" in why and "3.00x" in why and "2.50x" in why
    speculate, why = speculate_or_batch(1.8, batch, 4)
    assert not speculate and "plain batched steps" in why and "1.80x" in why and "2.50x" in why
    assert speculate_or_batch(1.8, batch, 1)[0]  # (one sequence: a batch gains nothing)


def test_what_is_not_measured_yet_leaves_plain_batched_steps_and_says_so():
    speculate, why = speculate_or_batch(None, costs(1.0, 2.0, 4.0, 8.0), 4)
    assert not speculate and "speculation gains here is not measured yet" in why
    speculate, why = speculate_or_batch(3.0, None, 4)
    assert not speculate and "what a batch gains here is not measured yet" in why
    assert speculate_or_batch(3.0, None, 1)[0]


# --- the book -----------------------------------------------------------------------------


def test_the_book_remembers_each_model_file_threads_cache_and_offload_apart(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"x" * 100)
    keys = {step_key(model, 2, None, "f16"), step_key(model, 1, None, "f16"), step_key(model, 2, None, "q8_0"),
            step_key(model, 2, 10, "f16")}
    assert len(keys) == 4
    book = BatchCostBook(tmp_path / "batch-costs.json")
    key = step_key(model, 2, None, "f16")
    assert book.get(key) is None
    book.record(key, costs(1.0, 1.3, 2.1, 3.9))
    book.record(step_key(model, 1, None, "f16"), costs(1.0, 1.9))
    again = BatchCostBook(tmp_path / "batch-costs.json").get(key)
    assert again.ratios == {1: 1.0, 2: 1.3, 4: 2.1, 8: 3.9} and not again.contended
    assert len(json.loads((tmp_path / "batch-costs.json").read_text())) == 2


def test_a_stale_damaged_or_foreign_entry_is_measured_again(tmp_path):
    path = tmp_path / "batch-costs.json"
    book = BatchCostBook(path)
    book.record("old", costs(1.0, 1.2, updated=time.time() - 30 * 24 * 3600))
    book.record("fine", costs(1.0, 1.2))
    data = json.loads(path.read_text())
    data["damaged"] = {"format": 1, "ratios": {"1": "x"}}
    data["other"] = {**data["fine"], "format": 99}
    path.write_text(json.dumps(data))
    assert [book.get(k) is None for k in ("old", "damaged", "other", "fine")] == [True, True, True, False]
    path.write_text("not json")
    assert book.get("fine") is None


def test_the_plan_takes_parallel_or_the_measured_best_or_measures(tiny_model, tmp_path):
    info, options = inspect(tiny_model), LoadOptions(n_ctx=256, n_threads=2)
    book = BatchCostBook(tmp_path / "batch-costs.json")
    first = plan_batch(tiny_model, info, 256, options, None, book)
    assert first.measures and first.parallel == first.most == 8 and first.loaded(jobs=3) == 8
    assert first.slots(jobs=3) == 3 and first.how == "most that fit"
    measured = first.measured(costs(1.0, 1.1, 1.6, 3.6))
    assert measured.parallel == 4 and measured.how == "measured now" and not measured.measures
    book.record(first.key, measured.costs)
    later = plan_batch(tiny_model, info, 256, options, None, book)
    assert later.parallel == 4 and later.how == "measured earlier" and later.loaded(jobs=2) == 2
    given = plan_batch(tiny_model, info, 256, options, 3, book)
    assert given.parallel == 3 and given.how == "--parallel" and not given.measures and given.costs is not None


# --- the summary --------------------------------------------------------------------------


def test_the_summary_adds_up_the_answers():
    summary = BatchSummary(seconds=2.0, steps=30, parallel=4, how="--parallel")
    for i, first in enumerate([0.1, 0.4, 0.2, 0.3, 1.0]):
        result = GenerationResult("x", "length", prompt_tokens=10, completion_tokens=8, time_to_first_token=first,
                                  total_seconds=1.0, cached_tokens=0 if i % 2 else 6)
        summary.add(BatchResult(i, i, result))
    summary.add(BatchResult("bad", 5, error="line 6: not JSON"))
    data = summary.to_json()
    assert (data["jobs"], data["failed"], data["prompt_tokens"], data["prompt_tokens_read"]) == (6, 1, 50, 32)
    assert data["generated_tokens"] == 40 and data["generation_tokens_per_second"] == 20.0
    assert data["median_time_to_first_token_s"] == 0.3 and data["p90_time_to_first_token_s"] == 1.0
    assert (data["steps"], data["parallel"], data["parallel_from"]) == (30, 4, "--parallel")
