"""`edgeinfer run` on a tiny model, through the real llama.cpp: what a user sees."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_edgeinfer, subprocess_env


def test_greedy_raw_run_matches_llama_cpp_python(tiny_model, cli, edgeinfer_home):
    """Given a tiny model, `run --raw --temperature 0` prints exactly llama-cpp-python's greedy completion."""
    from llama_cpp import Llama

    prompt = "the quick brown fox"
    # llama.cpp's own default turns flash attention on for the CPU; llama-cpp-python's Llama turns it off.
    llm = Llama(model_path=str(tiny_model), n_ctx=512, n_threads=2, flash_attn=True, verbose=False)
    expected = llm.create_completion(prompt, max_tokens=40, temperature=0)["choices"][0]["text"]
    llm.close()

    code, out, _ = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "40", "-c", "512", "-t", "2", prompt)

    assert code == 0
    assert out == expected + "\n"
    assert len(expected) > 20  # the model really generated something


def test_same_seed_same_sampled_output(tiny_model, cli, edgeinfer_home):
    args = ("run", "-m", tiny_model, "--raw", "--temperature", "1.2", "-n", "30", "hello there")
    first = cli(*args, "--seed", "7")
    again = cli(*args, "--seed", "7")
    other = cli(*args, "--seed", "8")
    assert first.exit_code == again.exit_code == other.exit_code == 0
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout


def test_max_tokens_and_json_fields(tiny_model, cli, edgeinfer_home):
    code, out, _ = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "12", "--json", "once upon")
    assert code == 0
    data = json.loads(out)
    assert data["completion_tokens"] == 12
    assert data["finish_reason"] == "length"
    assert data["model"] == str(tiny_model)
    for key in ("text", "prompt_tokens", "time_to_first_token_s", "prompt_tokens_per_second", "generation_tokens_per_second"):
        assert key in data
    assert data["prompt_tokens"] >= 2


def test_stop_string_ends_the_answer_and_is_not_printed(tiny_model, cli, edgeinfer_home):
    base = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "40", "--json", "a stop test")
    text = json.loads(base.stdout)["text"]
    stop = text[10:13]  # three characters from the middle of the greedy answer
    assert stop.strip(), text
    code, out, _ = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "40", "--stop", stop, "--json", "a stop test")
    stopped = json.loads(out)
    assert code == 0
    assert stopped["finish_reason"] == "stop"
    assert stopped["text"] == text[: text.find(stop)]
    assert stop not in stopped["text"]


def test_stdin_is_joined_with_the_argument(tiny_model, cli, edgeinfer_home):
    joined = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "10", "--json", "alpha", input="beta gamma\n")
    direct = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "10", "--json", "alpha\n\nbeta gamma\n")
    assert joined.exit_code == 0
    assert json.loads(joined.stdout)["text"] == json.loads(direct.stdout)["text"]
    assert json.loads(joined.stdout)["prompt_tokens"] == json.loads(direct.stdout)["prompt_tokens"]


def test_file_option_adds_the_file(tiny_model, cli, edgeinfer_home, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes\n")
    with_file = cli("run", "-m", tiny_model, "--raw", "-n", "5", "--json", "summarise", "-f", notes)
    without = cli("run", "-m", tiny_model, "--raw", "-n", "5", "--json", "summarise")
    assert json.loads(with_file.stdout)["prompt_tokens"] > json.loads(without.stdout)["prompt_tokens"]


def test_chat_template_is_applied_unless_raw(tiny_model, cli, edgeinfer_home):
    chat = json.loads(cli("run", "-m", tiny_model, "-n", "3", "--json", "hi").stdout)
    raw = json.loads(cli("run", "-m", tiny_model, "--raw", "-n", "3", "--json", "hi").stdout)
    system = json.loads(cli("run", "-m", tiny_model, "-n", "3", "--json", "--system", "be brief", "hi").stdout)
    assert chat["prompt_tokens"] > raw["prompt_tokens"]  # <|im_start|>user ... <|im_start|>assistant
    assert system["prompt_tokens"] > chat["prompt_tokens"]


def test_stats_go_to_stderr_and_stdout_stays_clean(tiny_model, cli, edgeinfer_home):
    code, out, err = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "8", "--stats", "hello")
    plain = cli("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "8", "hello")
    assert code == 0
    assert out == plain.stdout
    assert "tok/s" in err and "tok/s" not in out


# --- bad input: one line on stderr, a documented exit code, no traceback ---------------------


@pytest.mark.parametrize(
    "args, code, words",
    [
        (("run", "-m", "no-such-model", "hi"), 3, "unknown model"),
        (("run", "-m", "smollm2-135m", "hi"), 3, "did you mean smollm2-135m-instruct"),
        (("run", "-m", "./missing.gguf", "hi"), 3, "no such model file"),
        (("run", "-m", "{tiny}", ""), 2, "empty prompt"),
        (("run", "-m", "{tiny}", "hi", "--top-p", "1.5"), 2, "--top-p"),
        (("run", "-m", "{tiny}", "hi", "--temperature", "-1"), 2, "--temperature"),
        (("run", "-m", "{tiny}", "hi", "--max-tokens", "0"), 2, "--max-tokens"),
        (("run", "-m", "{tiny}", "hi", "--ctx-size", "4"), 2, "--ctx-size"),
        (("run", "-m", "{tiny}", "hi", "-f", "/no/such/file"), 2, "cannot read --file"),
        (("run", "-m", "{tiny}", "hi", "--gpu-layers", "-7"), 2, "--gpu-layers"),
        (("run", "-m", "{tiny}", "hi", "--draft", "ngram", "--draft-threads", "0"), 2, "--draft-threads"),
        (("chat", "-m", "{tiny}", "--max-tokens", "0"), 2, "--max-tokens"),
        (("chat", "-m", "{tiny}", "--threads", "0"), 2, "--threads"),
        (("run", "-m", "{tiny}", "hi", "--threads", "100000"), 2, "--threads must be between 1 and 512"),
        (("run", "-m", "{tiny}", "hi", "--seed", "-2"), 2, "--seed must be -1"),
        (("run", "-m", "{tiny}", "hi", "-f", "/dev/zero"), 2, "more than any context holds"),
        (("run", "-m", "{tiny}", "hi", "--draft", "ngram", "--draft-threads", "100000"), 2, "--draft-threads"),
        (("quantize", "{tiny}", "--bits", "8", "-t", "100000"), 2, "--threads must be between 1 and 512"),
        (("run", "-m", "{tiny}", "hi", "--cache-type", "q4"), 2, "--cache-type must be auto or one of f16, bf16, q8_0"),
        (("quantize", "{tiny}", "--bits", "8", "-t", "-5"), 2, "--threads must be between 1 and 512"),
    ],
)
def test_bad_input_is_one_clear_line(args, code, words, tiny_model, cli, edgeinfer_home):
    result = cli(*[a.replace("{tiny}", str(tiny_model)) for a in args])
    assert result.exit_code == code, result.stderr
    assert words in result.error_line


@pytest.mark.parametrize("command", [("run", ""), ("run", "-n", "0", "hi"), ("chat", "-n", "0"), ("run", "-c", "4", "hi"),
                                     ("bench", "-t", "0")])
def test_bad_input_is_told_before_a_missing_model_is_pulled(command, cli, edgeinfer_home, wheelhouse):
    result = cli(*command)  # the default model, not in the store yet
    assert result.exit_code == 2, result.stderr
    assert not (edgeinfer_home / ".partial").exists() and "Pulling" not in result.stderr


def test_a_reader_that_stops_reading_ends_the_run_quietly(tiny_model, edgeinfer_home):
    # `edgeinfer run ... | head -1`: once the reader has gone, the next write fails; the run stops there,
    # with no error message, as a shell reports a tool that SIGPIPE ended.
    process = subprocess.Popen([sys.executable, "-m", "edgeinfer", "run", "-m", str(tiny_model), "--raw", "-n", "200",
                                "Once upon a time"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env=subprocess_env({"EDGEINFER_HOME": str(edgeinfer_home)}), cwd=REPO_ROOT)
    process.stdout.close()  # before the first token: every write finds the pipe closed
    _, err = process.communicate(timeout=120)
    assert (process.returncode, err) == (141, b"")


def test_the_memory_check_counts_the_cache_type_asked_for(tiny_model, cli, edgeinfer_home):
    # A q8_0 cache takes 34 bytes per 32 values where f16 takes 64: a context too large either way is
    # refused with what it would need in that type (the weights are a rounding error here).
    needs = {}
    for cache in ("f16", "q8_0"):
        result = cli("run", "-m", tiny_model, "-c", "100000000", "--cache-type", cache, "hi")
        assert result.exit_code == 7, result.stderr
        needs[cache] = float(result.error_line.split("needs about ")[1].split(" GiB")[0])
    assert needs["q8_0"] / needs["f16"] == pytest.approx(34 / 64, rel=0.01)


def test_prompt_longer_than_the_context_names_both_lengths(tiny_model, cli, edgeinfer_home):
    result = cli("run", "-m", tiny_model, "--raw", "-c", "64", "word " * 200)
    assert result.exit_code == 10
    line = result.error_line
    assert "the context holds 64" in line and "tokens" in line


def test_non_utf8_stdin_is_refused(tiny_model, edgeinfer_home):
    done = subprocess.run([sys.executable, "-m", "edgeinfer", "run", "-m", str(tiny_model), "hi"],
                          input=b"\xff\xfe\x00bad", capture_output=True, env=subprocess_env())
    assert done.returncode == 2
    assert b"not UTF-8" in done.stderr and b"Traceback" not in done.stderr


@pytest.mark.parametrize("damage", ["not-gguf", "truncated"])
def test_a_broken_model_file_never_reaches_llama_cpp(damage, tiny_model, tmp_path, edgeinfer_home):
    broken = tmp_path / "broken.gguf"
    data = tiny_model.read_bytes()
    broken.write_bytes(b"this is not a model at all" * 10 if damage == "not-gguf" else data[: len(data) // 2])
    result = run_edgeinfer("run", "-m", broken, "hi")
    assert result.exit_code == 6, result.stderr  # a crash inside llama.cpp would be a negative signal code
    assert "broken.gguf" in result.error_line


def test_a_model_too_big_for_memory_is_refused_before_loading(tiny_model, cli, edgeinfer_home):
    # A context of 2^30 tokens needs a KV cache (1 TiB here) far larger than any machine's memory.
    result = cli("run", "-m", tiny_model, "-c", str(2**30), "hi")
    assert result.exit_code == 7
    assert "--ctx-size" in result.error_line


def test_a_context_past_the_models_own_is_noted_and_run(tiny_model, cli, edgeinfer_home):
    # The tiny model was trained on 512 tokens: asking for more is allowed (RoPE scaling), with a word about it.
    longer = cli("run", "-m", tiny_model, "--raw", "-n", "4", "-c", "1024", "hi")
    assert longer.exit_code == 0, longer.stderr
    assert "--ctx-size 1024 is past the 512 tokens tiny.gguf was trained on" in longer.stderr
    within = cli("run", "-m", tiny_model, "--raw", "-n", "4", "-c", "512", "hi")
    assert within.exit_code == 0 and "trained on" not in within.stderr


def test_python_api_streams_the_same_text(tiny_model, edgeinfer_home):
    from edgeinfer.api import RunRequest, run
    from edgeinfer.sampling import SamplingParams

    pieces: list[str] = []
    result = run(RunRequest(prompt="streaming", model=str(tiny_model), raw=True, max_tokens=25,
                            sampling=SamplingParams(temperature=0)), on_text=pieces.append)
    assert "".join(pieces) == result.text
    assert result.completion_tokens == 25


def test_python_api_prepares_first_then_answers(tiny_model, edgeinfer_home):
    """What may download or fail comes first and comes back as data (the file, the plan, the notes); then the answer."""
    from edgeinfer import api

    request = api.RunRequest(prompt="hello", model=str(tiny_model), raw=True, max_tokens=12,
                             sampling=api.SamplingParams(temperature=0), load=api.LoadOptions(n_ctx=1024))
    prepared = api.prepare(request)
    assert prepared.path == tiny_model and prepared.name == str(tiny_model)
    assert prepared.notes == (f"--ctx-size 1024 is past the 512 tokens {tiny_model.name} was trained on: "
                              "text beyond that may come out garbled",)
    assert prepared.plan.options is None  # no --draft: plain decoding
    assert api.run(prepared).text == api.run(request).text  # a request is prepared on the way


def test_a_run_looks_at_the_catalog_and_the_store_once(tiny_model, cli, edgeinfer_home, monkeypatch):
    """`run --json --draft`: the model found, the draft planned and the answer named from one opening of the library."""
    from edgeinfer.library import Library

    opened, open_library = [], Library.open

    def counted(home=None):
        opened.append(home)
        return open_library(home)

    monkeypatch.setattr(Library, "open", counted)
    code, out, _ = cli("run", "-m", tiny_model, "--raw", "-n", "4", "--json", "--draft", "ngram", "hi")
    assert code == 0 and json.loads(out)["model"] == str(tiny_model)
    assert len(opened) == 1


def test_ctrl_c_ends_run_with_the_text_so_far_and_exit_130(tiny_model, edgeinfer_home):
    import pexpect

    for _ in range(3):  # on a busy machine the answer may end before Ctrl-C arrives: then try again
        child = pexpect.spawn(sys.executable, ["-m", "edgeinfer", "run", "-m", str(tiny_model), "-c", "4096", "--raw",
                                               "go on"], env=subprocess_env(), encoding="utf-8", timeout=60)
        child.expect(r"\w+\W+\w+\W+\w+")  # text is streaming
        child.sendintr()
        child.expect(pexpect.EOF)
        child.close()
        if child.exitstatus != 0:
            break
    assert child.exitstatus == 130
    assert "Traceback" not in child.before


def test_llama_cpps_own_log_stays_silent_unless_asked_for(tiny_model, edgeinfer_home):
    """In a real process, where llama.cpp writes to the file descriptor itself, not through Python."""
    args = ("run", "-m", tiny_model, "--raw", "--temperature", "0", "-n", "4", "Once upon a time")
    quiet = run_edgeinfer(*args)
    assert quiet.exit_code == 0 and quiet.stdout.strip() and quiet.stderr == ""
    loud = run_edgeinfer(*args, "--verbose")
    assert loud.exit_code == 0 and loud.stdout == quiet.stdout and "llama_" in loud.stderr


def test_seed_minus_one_means_a_random_seed_as_in_llama_cpp(tiny_model, cli, edgeinfer_home):
    runs = [cli("run", "-m", tiny_model, "--raw", "--seed", "-1", "-n", "24", "Once upon a time") for _ in range(2)]
    assert all(r.exit_code == 0 and r.stdout.strip() for r in runs)
