"""The KV cache's type by default: llama.cpp's f16 for plain answers, q8_0 where a CPU run verifies drafts
(its passes stay exact past 256 tokens of context, where f16's do not); a type the user names always wins."""

from __future__ import annotations

import json

import pytest

from edgeinfer.engine import LoadOptions, gpu_offload
from edgeinfer.errors import UsageError
from test_speculative import models  # noqa: F401 (the tiny target and its drafts, a fixture)


@pytest.mark.skipif(gpu_offload(), reason="a GPU build keeps f16 for speculation too")
def test_auto_is_f16_for_plain_decoding_and_q8_0_for_speculation_on_the_cpu():
    auto = LoadOptions()
    assert auto.cache_type == "auto" and auto.kv_type == "f16"
    assert auto.for_speculation(False).cache_type == "f16"
    assert auto.for_speculation(True).cache_type == "q8_0"
    assert LoadOptions(n_gpu_layers=0).for_speculation(True).cache_type == "q8_0"
    for named in ("f16", "bf16", "q8_0"):  # named by the user: kept, whatever runs
        assert LoadOptions(cache_type=named).for_speculation(True).cache_type == named
    with pytest.raises(UsageError, match="--cache-type must be auto or one of f16, bf16, q8_0"):
        LoadOptions(cache_type="q4_0")


@pytest.mark.skipif(gpu_offload(), reason="a GPU build keeps f16 for speculation too")
def test_a_draft_run_names_its_cache_type_and_answers_as_the_target_does_with_it(models, edgeinfer_home, cli):
    args = ["run", "--raw", "-m", models.target.path, "--temperature", "0", "-n", "24", "--json", "Once upon a time"]
    plain = json.loads(cli(*args).stdout)
    assert plain["cache_type"] == "f16"  # plain answers stay llama.cpp's own
    code, out, err = cli(*args, "--draft", "ngram", "--stats")
    spec = json.loads(out)
    assert code == 0 and spec["cache_type"] == "q8_0" and spec["speculative"]["cache_type"] == "q8_0"
    assert "KV cache q8_0" in err
    same_cache = json.loads(cli(*args, "--cache-type", "q8_0").stdout)
    assert spec["text"] == same_cache["text"]  # exactly the target's own answer with that cache
    named = json.loads(cli(*args, "--draft", "ngram", "--cache-type", "f16").stdout)
    assert named["cache_type"] == "f16" and named["text"] == plain["text"]
