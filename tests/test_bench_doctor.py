"""`edgeinfer bench` and `edgeinfer doctor` as a user runs them."""

from __future__ import annotations

import json
import shutil


def test_bench_reports_pp_and_tg_with_repetitions(tiny_model, cli, edgeinfer_home):
    code, out, _ = cli("bench", tiny_model, "-p", "32", "-n", "16", "-r", "2", "-t", "2", "--json")
    assert code == 0
    results = json.loads(out)
    assert [r["test"] for r in results] == ["pp32", "tg16"]
    for r in results:
        assert len(r["repetitions"]) == 2
        assert r["median_tokens_per_second"] > 0
    assert results[0]["median_time_to_first_token_ms"] > 0


def test_bench_table_names_every_model(tiny_model, cli, edgeinfer_home, tmp_path):
    other = tmp_path / "other.gguf"
    shutil.copy(tiny_model, other)
    code, out, _ = cli("bench", tiny_model, other, "-p", "8", "-n", "4", "-r", "1")
    assert code == 0
    assert out.count("pp8") == 2 and out.count("tg4") == 2  # one row per model and test


def test_python_api_benches_and_chats_as_the_cli_does(tiny_model, edgeinfer_home):
    from edgeinfer import api

    rows = api.bench(api.BenchRequest(models=(str(tiny_model),), n_prompt=8, n_gen=4, repetitions=1))
    assert [(r.model, r.test) for r in rows] == [(str(tiny_model), "pp8"), (str(tiny_model), "tg4")]
    with api.open_chat(api.ChatRequest(model=str(tiny_model), max_tokens=4,
                                       sampling=api.SamplingParams(temperature=0))) as chat:
        reply = chat.ask("hello")
        assert reply.result.completion_tokens <= 4
        assert chat.conversation.turns == [{"role": "user", "content": "hello"},
                                           {"role": "assistant", "content": reply.result.text}]


def test_bench_refuses_nothing_to_measure(tiny_model, cli, edgeinfer_home):
    result = cli("bench", tiny_model, "-p", "0", "-n", "0")
    assert result.exit_code == 2
    assert "--n-prompt" in result.error_line


def test_doctor_describes_the_build_the_machine_and_the_store(tiny_model, cli, edgeinfer_home):
    from edgeinfer.library import Library
    from edgeinfer.store import sha256_file

    lib = Library.open()
    stored = lib.store.model_path("tiny", tiny_model.name)
    stored.parent.mkdir(parents=True)
    shutil.copy(tiny_model, stored)
    lib.store.register("tiny", stored, sha256=sha256_file(stored), source="test")

    code, out, _ = cli("doctor", "--json")
    assert code == 0
    report = json.loads(out)
    assert "CPU" in report["system_info"]
    assert report["physical_cores"] >= 1
    assert report["memory_total"] >= report["memory_available"] > 0
    assert report["devices"] and report["devices"][0]["kind"] == "cpu"
    assert report["store"] == str(edgeinfer_home)
    [model] = report["models"]
    assert model["name"] == "tiny" and model["fits"] is True and model["needs"] > model["size"]

    code, out, _ = cli("doctor")
    assert code == 0 and "fits" in out and "physical cores" in out


def test_bench_with_a_draft_compares_plain_and_speculative(tiny_model, cli, edgeinfer_home):
    code, out, _ = cli("bench", tiny_model, "-p", "8", "-n", "16", "-r", "1", "--draft", "ngram", "--json")
    assert code == 0
    tests = {r["test"]: r for r in json.loads(out)}
    assert set(tests) == {"pp8", "tg16", "tg16 code-edit", "tg16 code-edit --draft ngram"}
    assert all(r["median_tokens_per_second"] > 0 for r in tests.values())


def test_bench_parallel_gives_the_aggregate_speed_of_each_batch_size(tiny_model, cli, edgeinfer_home):
    code, out, _ = cli("bench", str(tiny_model), "--parallel", "1,2,4", "-p", "8", "-n", "16", "-r", "1", "--json")
    assert code == 0
    rows = json.loads(out)
    assert [r["test"] for r in rows] == [f"pp8+tg16 x{b} (S_TG)" for b in (1, 2, 4)]
    assert all(r["median_tokens_per_second"] > 0 and r["median_time_to_first_token_ms"] > 0 for r in rows)
    code, out, _ = cli("bench", str(tiny_model), "--parallel", "1,2", "-p", "8", "-n", "8", "-r", "1")
    assert code == 0 and "x2 (S_TG)" in out
    result = cli("bench", str(tiny_model), "--parallel", "1,x")
    assert result.exit_code == 2 and "is not a list of sizes" in result.stderr
    result = cli("bench", str(tiny_model), "--parallel", "0,2")
    assert result.exit_code == 2 and "--parallel takes sizes from 1 to" in result.stderr
