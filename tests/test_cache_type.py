"""The KV cache's type by default: llama.cpp's f16 for plain answers, q8_0 or bf16 where a CPU run verifies
drafts (their passes stay exact past 256 tokens of context, where f16's do not), whichever this machine measured
faster; a type the user names always wins."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeinfer.engine import LoadOptions, gpu_offload
from edgeinfer.errors import UsageError
from edgeinfer.speculative import DraftOptions
from edgeinfer.speculative.costs import CostBook, pair_key
from edgeinfer.speculative.plan import choose_cache
from test_speculative import models, remember_costs  # noqa: F401 (the tiny target and its drafts, a fixture)


@pytest.mark.skipif(gpu_offload(), reason="a GPU build keeps f16 for speculation too")
def test_auto_is_f16_for_plain_decoding_and_the_speculation_cache_on_the_cpu():
    auto = LoadOptions()
    assert auto.cache_type == "auto" and auto.kv_type == "f16"
    assert auto.decided().cache_type == "f16"
    assert auto.decided("q8_0").cache_type == "q8_0" and auto.decided("bf16").cache_type == "bf16"
    assert LoadOptions(n_gpu_layers=0).decided("q8_0").cache_type == "q8_0"
    for named in ("f16", "bf16", "q8_0"):  # named by the user: kept, whatever runs
        assert LoadOptions(cache_type=named).decided("bf16").cache_type == named
    with pytest.raises(UsageError, match="--cache-type must be auto or one of f16, bf16, q8_0"):
        LoadOptions(cache_type="q4_0")


@pytest.mark.skipif(gpu_offload(), reason="a GPU build keeps f16 for speculation too")
def test_a_draft_run_names_its_cache_type_and_answers_as_the_target_does_with_it(models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "128", "--json", "Once upon a time"]
    plain = json.loads(cli(*args).stdout)
    assert plain["cache_type"] == "f16"  # plain answers stay llama.cpp's own
    code, out, err = cli(*args, "--draft", "ngram", "--stats")
    spec = json.loads(out)
    assert code == 0 and spec["cache_type"] == "q8_0" and spec["speculative"]["cache_type"] == "q8_0"
    assert "q8_0 cache" in err
    same_cache = json.loads(cli(*args, "--cache-type", "q8_0").stdout)
    assert spec["text"] == same_cache["text"]  # exactly the target's own answer with that cache
    named = json.loads(cli(*args, "--draft", "ngram", "--cache-type", "f16").stdout)
    assert named["cache_type"] == "f16" and named["text"] == plain["text"]


def _book_with(tmp_path: Path, target: Path, **step_by_cache: float) -> CostBook:
    """A cost book where one run with each named cache type measured passes of n tokens at step * (1 + n/4)."""
    book = CostBook(tmp_path / "costs.json")
    for cache, step in step_by_cache.items():
        costs = book.get(pair_key(target, "ngram", 2, None, cache))
        for n in range(1, 10):
            costs.observe_pass(n, step * (1 + n / 4))
        costs.observe_exactness(9, 9, 9)
    return book


def test_auto_tries_q8_0_then_bf16_once_each_and_then_keeps_the_faster(tmp_path):
    target = tmp_path / "target.gguf"
    target.write_bytes(b"GGUF" + bytes(100))
    load, draft = LoadOptions(n_threads=2), DraftOptions(ref="ngram")
    assert choose_cache(CostBook(None), target, None, load, draft) == "q8_0"  # nothing measured: q8_0 first
    assert choose_cache(_book_with(tmp_path, target, q8_0=0.05), target, None, load, draft) == "bf16"  # then bf16
    assert choose_cache(_book_with(tmp_path, target, q8_0=0.05, bf16=0.04), target, None, load, draft) == "bf16"
    assert choose_cache(_book_with(tmp_path, target, q8_0=0.04, bf16=0.05), target, None, load, draft) == "q8_0"
    # A bf16 cache whose passes are not exact here promises nothing, measured once.
    book = _book_with(tmp_path, target, q8_0=0.05, bf16=0.01)
    book.get(pair_key(target, "ngram", 2, None, "bf16")).observe_exactness(1, 9, 1)
    assert choose_cache(book, target, None, load, draft) == "q8_0"


@pytest.mark.skipif(gpu_offload(), reason="a GPU build keeps f16 for speculation too")
def test_a_draft_run_takes_the_cache_type_this_machine_measured_faster(models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "12", "-t", "2", "--json",
            "--draft", "ngram", "Once upon a time"]
    # Earlier runs measured q8_0 here and found bf16 passes twice as cheap: this run takes bf16.
    remember_costs(edgeinfer_home, models.target.path, "ngram", lambda n: 0.0002 * (1 + n / 20), 0.0, cache_type="q8_0")
    remember_costs(edgeinfer_home, models.target.path, "ngram", lambda n: 0.0001 * (1 + n / 20), 0.0, cache_type="bf16")
    spec = json.loads(cli(*args).stdout)
    assert spec["cache_type"] == "bf16" and spec["speculative"]["cache_type"] == "bf16"
    assert spec["text"] == json.loads(cli(*args[:-3], "--cache-type", "bf16", "Once upon a time").stdout)["text"]
    # And the other way round.
    remember_costs(edgeinfer_home, models.target.path, "ngram", lambda n: 0.0004 * (1 + n / 20), 0.0, cache_type="bf16")
    assert json.loads(cli(*args).stdout)["cache_type"] == "q8_0"
