"""`edgeinfer run --batch` on a tiny model, through the real llama.cpp: a file of prompts in, answers out."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO_ROOT, subprocess_env
from test_speculative import PROMPTS, quantize

FIELDS = {"id", "text", "finish_reason", "prompt_tokens", "completion_tokens", "time_to_first_token_s", "total_s"}


@pytest.fixture(scope="module")
def q8(tiny_family, tmp_path_factory) -> Path:
    """The tiny target in Q8_0: over a q8_0 cache its batched rows are scored as one-token steps are (test_batch.py)."""
    return quantize(tiny_family.target, tmp_path_factory.mktemp("batch-cli") / "tiny-q8_0.gguf", "LLAMA_FTYPE_MOSTLY_Q8_0")


def requests_file(path: Path, rows: list[dict | str]) -> Path:
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows), encoding="utf-8")
    return path


def lines(text: str) -> list[dict]:
    assert text == "" or text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


SETTINGS = ("--temperature", "0", "-n", "12", "-c", "256", "-t", "2", "--cache-type", "q8_0")


def batch(cli, model: Path, source: Path | str, *args: str, input: str | None = None):
    return cli("run", "-m", model, "--batch", source, *SETTINGS, *args, input=input)


def test_answers_come_in_the_files_order_each_as_run_alone_would_give_it(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [{"id": f"p{i}", "prompt": text} for i, text in enumerate(PROMPTS)])
    code, out, err = batch(cli, q8, source, "--parallel", "3")
    assert code == 0, err
    answers = lines(out)
    assert [a["id"] for a in answers] == [f"p{i}" for i in range(len(PROMPTS))]
    assert all(set(a) == FIELDS and a["completion_tokens"] == 12 and a["finish_reason"] == "length" for a in answers)
    for answer, text in zip(answers, PROMPTS):
        single = cli("run", "-m", q8, *SETTINGS, "--json", text)
        assert answer["text"] == json.loads(single.stdout)["text"]


def test_each_line_may_choose_its_own_settings_over_the_commands(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [
        {"id": 1, "prompt": PROMPTS[0], "max_tokens": 3},
        {"id": 2, "messages": [{"role": "user", "content": PROMPTS[1]}], "system": "Be brief.", "stop": ["e"]},
        {"id": 3, "prompt": PROMPTS[2], "temperature": 1.5, "seed": 3, "top_k": 0, "top_p": 1, "min_p": 0},
    ])
    code, out, _ = batch(cli, q8, source)
    assert code == 0
    first, second, third = lines(out)
    assert first["completion_tokens"] == 3
    assert "e" not in second["text"]
    again = lines(batch(cli, q8, source).stdout)[2]
    assert third["text"] == again["text"]  # (seeded)
    system = cli("run", "-m", q8, *SETTINGS, "--json", "--system", "Be brief.", "--stop", "e", PROMPTS[1])
    assert second["text"] == json.loads(system.stdout)["text"]


def test_unordered_writes_each_answer_when_it_is_complete(q8, cli, edgeinfer_home, tmp_path):
    # The first request is the longest: in order, it comes first; unordered, last.
    rows = [{"id": "long", "prompt": PROMPTS[0], "max_tokens": 40}] + \
           [{"id": f"short{i}", "prompt": text, "max_tokens": 2} for i, text in enumerate(PROMPTS[1:4])]
    source = requests_file(tmp_path / "in.jsonl", rows)
    ordered = lines(batch(cli, q8, source, "--parallel", "4").stdout)
    unordered = lines(batch(cli, q8, source, "--parallel", "4", "--unordered").stdout)
    assert [a["id"] for a in ordered] == ["long", "short0", "short1", "short2"]
    assert unordered[-1]["id"] == "long"
    assert {a["id"]: a["text"] for a in unordered} == {a["id"]: a["text"] for a in ordered}


def test_requests_on_stdin(q8, cli, edgeinfer_home):
    text = "".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:3]))
    code, out, _ = batch(cli, q8, "-", input=text)
    assert code == 0 and [a["id"] for a in lines(out)] == [0, 1, 2]


def test_a_bad_line_gets_its_error_line_and_the_others_are_answered(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [
        {"id": "good1", "prompt": PROMPTS[0]},
        "{not json",
        {"id": "no-prompt"},
        {"id": "hot", "prompt": "hi", "temperature": -1},
        {"id": "typo", "prompt": "hi", "max_token": 5},
        {"id": "too-long", "prompt": "word " * 400},
        {"id": "good2", "prompt": PROMPTS[1]},
    ])
    result = batch(cli, q8, source, "--parallel", "2")
    assert result.exit_code == 12
    assert "5 of 7 requests failed" in result.error_line
    answers = lines(result.stdout)
    assert [a["id"] for a in answers] == ["good1", None, "no-prompt", "hot", "typo", "too-long", "good2"]
    errors = {a["id"]: a["error"] for a in answers if "error" in a}
    assert errors[None].startswith("line 2: not JSON")
    assert "line 3" in errors["no-prompt"] and "prompt" in errors["no-prompt"]
    assert "temperature must be >= 0" in errors["hot"] and "'max_token'" in errors["typo"]
    assert "line 6" in errors["too-long"] and "the context holds 256" in errors["too-long"]
    assert set(answers[0]) == set(answers[-1]) == FIELDS


def test_an_id_given_twice_is_refused_before_any_work(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [{"id": "a", "prompt": "x"}, {"id": "b", "prompt": "y"},
                                                   {"id": "a", "prompt": "z"}])
    output = tmp_path / "out.jsonl"
    result = batch(cli, q8, source, "--output", output)
    assert result.exit_code == 2 and "\"a\" is given twice (lines 1 and 3)" in result.error_line
    assert result.stdout == "" and not output.exists()


def test_a_file_that_is_not_utf8_or_too_large_is_one_line_and_exit_2(q8, cli, edgeinfer_home, tmp_path, monkeypatch):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b'{"id": 1, "prompt": "caf\xe9"}\n')
    result = batch(cli, q8, source)
    assert result.exit_code == 2 and "not UTF-8" in result.error_line
    from edgeinfer import batchjob

    monkeypatch.setattr(batchjob, "FILE_LIMIT", 100)  # (the real limit, 256 MiB, is a large file to write)
    requests_file(source, [{"id": i, "prompt": "hello"} for i in range(10)])
    result = batch(cli, q8, source)
    assert result.exit_code == 2 and "larger than" in result.error_line


def test_a_rerun_with_the_same_output_answers_only_what_is_missing(q8, cli, edgeinfer_home, tmp_path):
    rows = [{"id": i, "prompt": text} for i, text in enumerate(PROMPTS)]
    output = tmp_path / "out.jsonl"
    first = batch(cli, q8, requests_file(tmp_path / "in.jsonl", rows[:3]), "--output", output)
    assert first.exit_code == 0 and first.stdout == ""
    before = output.read_text()
    with output.open("a") as handle:
        handle.write('{"id": 3, "text": "cut sho')  # a crash mid-line: the rerun must not append after it
    result = batch(cli, q8, requests_file(tmp_path / "in.jsonl", rows), "--output", output)
    assert result.exit_code == 0 and "3 of 6 requests are answered" in result.stderr
    text = output.read_text()
    assert text.startswith(before)
    assert [a["id"] for a in lines(text)] == [0, 1, 2, 3, 4, 5]
    done = batch(cli, q8, tmp_path / "in.jsonl", "--output", output)
    assert done.exit_code == 0 and output.read_text() == text and "6 of 6" in done.stderr


def test_ctrl_c_mid_job_leaves_whole_lines_and_a_rerun_finishes(q8, edgeinfer_home, tmp_path):
    rows = [{"id": i, "prompt": PROMPTS[i % len(PROMPTS)]} for i in range(48)]
    source, output = requests_file(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    args = [sys.executable, "-m", "edgeinfer", "run", "-m", str(q8), "--batch", str(source), "--output", str(output),
            "--temperature", "0", "-n", "200", "-c", "256", "-t", "1", "--parallel", "2", "--cache-type", "q8_0"]
    for attempt in range(3):  # on a fast machine the job may end before Ctrl-C arrives: then try again
        output.unlink(missing_ok=True)
        process = subprocess.Popen(args, env=subprocess_env({"EDGEINFER_HOME": str(edgeinfer_home)}), cwd=REPO_ROOT,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (output.exists() and output.stat().st_size):  # the first answer is written
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no answer was ever written"
            time.sleep(0.005)
        process.send_signal(signal.SIGINT)
        _, err = process.communicate(timeout=120)
        if process.returncode != 0:
            break
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    kept = lines(output.read_text())  # whole lines only (lines() asserts the file ends with a newline)
    assert 0 < len(kept) < 48 and all(set(a) == FIELDS for a in kept)
    rerun = subprocess.run(args, env=subprocess_env({"EDGEINFER_HOME": str(edgeinfer_home)}), cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert sorted(a["id"] for a in lines(output.read_text())) == list(range(48))


@pytest.mark.parametrize("extra", [["--output", "x.jsonl"], ["--parallel", "2"], ["--unordered"]])
def test_batch_options_without_batch_are_refused(q8, cli, edgeinfer_home, extra):
    result = cli("run", "-m", q8, *extra, "hello")
    assert result.exit_code == 2 and "--batch" in result.error_line


@pytest.mark.parametrize("extra", [["hello"], ["--json"], ["-f", "in.jsonl"]])
def test_what_does_not_go_with_batch_is_refused(q8, cli, edgeinfer_home, tmp_path, extra, monkeypatch):
    monkeypatch.chdir(tmp_path)
    requests_file(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    result = cli("run", "-m", q8, "--batch", "in.jsonl", *extra)
    assert result.exit_code == 2 and "batch" in result.error_line and result.stdout == ""


def test_the_memory_check_counts_every_sequences_cache(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [{"id": 1, "prompt": "hi"}])
    needs = {}
    for parallel in ("1", "4"):
        result = cli("run", "-m", q8, "--batch", source, "-c", "100000000", "--parallel", parallel)
        assert result.exit_code == 7, result.stderr
        needs[parallel] = float(result.error_line.split("needs about ")[1].split(" GiB")[0])
    assert "4 sequences of 100000000 tokens" in result.error_line
    assert needs["4"] / needs["1"] == pytest.approx(4, rel=0.01)


def test_the_python_api_answers_a_batch_in_order(q8, edgeinfer_home):
    from edgeinfer import api

    request = api.BatchRequest(model=str(q8), sampling=api.SamplingParams(temperature=0), max_tokens=5,
                               load=api.LoadOptions(n_ctx=256, n_threads=2), parallel=2)
    items = [api.BatchItem(f"q{i}", prompt=text) for i, text in enumerate(PROMPTS[:4])]
    results = list(api.run_batch(request, items))
    assert [r.id for r in results] == ["q0", "q1", "q2", "q3"]
    assert all(r.error is None and r.result.completion_tokens == 5 for r in results)


def test_raw_prompts_are_plain_completions_and_messages_need_the_template(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [{"id": "raw", "prompt": PROMPTS[3]},
                                                   {"id": "chat", "messages": [{"role": "user", "content": "hi"}]}])
    result = batch(cli, q8, source, "--raw")
    assert result.exit_code == 12
    raw, chat = lines(result.stdout)
    alone = cli("run", "-m", q8, *SETTINGS, "--raw", "--json", PROMPTS[3])
    assert raw["text"] == json.loads(alone.stdout)["text"]
    assert "messages need the chat template" in chat["error"]


def test_at_a_terminal_a_bar_counts_the_answers_and_the_tokens_per_second(q8, edgeinfer_home, tmp_path):
    import pexpect

    source = requests_file(tmp_path / "in.jsonl", [{"id": i, "prompt": text} for i, text in enumerate(PROMPTS)])
    output = tmp_path / "out.jsonl"
    child = pexpect.spawn(sys.executable, ["-m", "edgeinfer", "run", "-m", str(q8), "--batch", str(source), "-o",
                                           str(output), *SETTINGS], env=subprocess_env({"TERM": "xterm"}),
                          encoding="utf-8", timeout=120, dimensions=(24, 100))
    child.expect(pexpect.EOF)
    child.close()
    shown = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\r", "", child.before)
    assert child.exitstatus == 0, shown
    assert re.search(r"answering.*6/6.*tok/s", shown)
    assert len(lines(output.read_text())) == 6


# --- the sequences at once, measured; --stats; --draft -----------------------------------------


def test_a_first_run_measures_what_a_batched_step_costs_and_later_runs_read_it(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [{"id": i, "prompt": text} for i, text in enumerate(PROMPTS)])
    book = edgeinfer_home / "batch-costs.json"
    code, out, err = batch(cli, q8, source, "--stats", "--json")
    assert code == 0, err
    note = next(line for line in err.splitlines() if "measured once what a batched step costs here" in line)
    assert "for B = 1, 2, 4, 8" in note
    (entry,) = json.loads(book.read_text()).values()
    assert sorted(entry["ratios"]) == ["1", "2", "4", "8"] and entry["ratios"]["1"] == 1.0
    summary = json.loads(err.splitlines()[-1])
    assert summary["parallel_from"] == "measured now" and 1 <= summary["parallel"] <= 6
    assert f"{summary['parallel']} sequence" in note or summary["parallel"] == len(PROMPTS)
    # (as if measured on a quiet CPU: one taken beside other programs is taken again when the CPU is quiet)
    book.write_text(json.dumps({key: {**value, "contended": False} for key, value in json.loads(book.read_text()).items()}))
    recorded = book.read_text()
    code, again, err = batch(cli, q8, source, "--stats", "--json")
    assert code == 0 and "what a batched step costs" not in err
    assert json.loads(err.splitlines()[-1])["parallel_from"] == "measured earlier"
    assert book.read_text() == recorded
    assert [a["text"] for a in lines(again)] == [a["text"] for a in lines(out)]


def test_stats_sum_up_the_batch_on_stderr(q8, cli, edgeinfer_home, tmp_path):
    header = "You are a careful assistant who answers every question about numbers in one short line. "
    source = requests_file(tmp_path / "in.jsonl", [{"id": i, "prompt": header + text} for i, text in enumerate(PROMPTS)])
    code, out, err = batch(cli, q8, source, "--parallel", "3", "--stats")
    assert code == 0, err
    answers = lines(out)
    line = err.strip().splitlines()[-1]
    generated = sum(a["completion_tokens"] for a in answers)
    assert re.match(rf"6 requests \(0 failed\); {sum(a['prompt_tokens'] for a in answers)} prompt tokens \(\d+ read, "
                    rf"\d+ given by a shared prefix\), {generated} generated in [\d.]+ s: [\d.]+ tok/s together; first "
                    rf"token \d+ ms median, \d+ ms p90; \d+ steps, 3 sequences at once \(--parallel\)$", line), line
    code, _, err = batch(cli, q8, source, "--parallel", "3", "--stats", "--json")
    summary = json.loads(err.strip().splitlines()[-1])
    assert summary["jobs"] == 6 and summary["generated_tokens"] == generated and summary["parallel"] == 3
    # (the shared header is read once, then given: the first sequences read it beside each other, later ones not)
    assert summary["prompt_tokens_read"] < summary["prompt_tokens"]
    assert summary["steps"] >= 12 and summary["p90_time_to_first_token_s"] >= summary["median_time_to_first_token_s"]


def _speculation_against_batch(home: Path, q8: Path, pass_cost, batch_ratios: dict[int, float]) -> None:
    """What earlier runs would have measured: speculation's pass costs (prompt lookup) and a batched step's."""
    from edgeinfer.batchcost import BatchCostBook, StepCosts, step_key
    from test_speculative import remember_costs

    remember_costs(home, q8, "ngram", pass_cost, 0.0, cache_type="q8_0")
    BatchCostBook(home / "batch-costs.json").record(step_key(q8, 2, None, "q8_0"), StepCosts(batch_ratios, 0.01))


def _alone(cli, q8: Path, prompts: list[str]) -> list[str]:
    return [json.loads(cli("run", "-m", q8, *SETTINGS, "--json", text).stdout)["text"] for text in prompts]


def test_with_draft_a_batch_goes_one_at_a_time_speculating_where_that_promises_more(q8, cli, edgeinfer_home, tmp_path):
    # Verification nearly free, and a step of B sequences costing B steps of one: speculation wins.
    _speculation_against_batch(edgeinfer_home, q8, lambda n: 0.01 * (1 + 0.02 * n), {1: 1.0, 2: 2.0, 4: 4.0, 8: 8.0})
    source = requests_file(tmp_path / "in.jsonl", [{"id": i, "prompt": text} for i, text in enumerate(PROMPTS)])
    code, out, err = batch(cli, q8, source, "--draft", "ngram", "--stats", "--json")
    assert code == 0, err
    assert re.search(r"one request at a time, speculative: speculation promises [\d.]+x one sequence's plain speed, "
                     r"\d sequences in batched steps 1.00x", err), err
    assert json.loads(err.splitlines()[-1])["parallel_from"] == "one at a time, speculative"
    assert [a["id"] for a in lines(out)] == list(range(len(PROMPTS)))
    assert [a["text"] for a in lines(out)] == _alone(cli, q8, PROMPTS)


def test_with_draft_a_batch_keeps_plain_batched_steps_where_they_promise_more(q8, cli, edgeinfer_home, tmp_path):
    # Each verified token costs half a step more, and a step of B sequences costs one step: the batch wins.
    _speculation_against_batch(edgeinfer_home, q8, lambda n: 0.01 * (1 + 0.5 * (n - 1)), {1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0})
    source = requests_file(tmp_path / "in.jsonl", [{"id": i, "prompt": text} for i, text in enumerate(PROMPTS)])
    code, out, err = batch(cli, q8, source, "--draft", "ngram", "--parallel", "3", "--stats", "--json")
    assert code == 0, err
    assert re.search(r"plain batched steps: speculation promises [\d.]+x one sequence's plain speed, 3 sequences in "
                     r"batched steps 3.00x", err), err
    assert json.loads(err.splitlines()[-1])["parallel_from"] == "--parallel"
    assert [a["text"] for a in lines(out)] == _alone(cli, q8, PROMPTS)


def test_with_draft_and_nothing_measured_a_batch_is_plain_and_says_so(q8, cli, edgeinfer_home, tmp_path):
    source = requests_file(tmp_path / "in.jsonl", [{"id": i, "prompt": text} for i, text in enumerate(PROMPTS[:3])])
    code, out, err = batch(cli, q8, source, "--draft", "ngram", "--parallel", "2")
    assert code == 0, err
    assert "plain batched steps, 2 sequences at once: what speculation gains here is not measured yet" in err
    assert len(lines(out)) == 3
