"""What a new user coming from ollama and llama.cpp types in the first hour (issue 27, items 1, 6, 7, 9),
as sessions at the CLI on tiny models: `run MODEL PROMPT`, `chat MODEL`, `--system-file`, messages that
help, `info --template` and the quantize report of a quantized source.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import run_edgeinfer, tiny_catalog_entry, write_user_catalog
from test_cli_models import tiny_in_store  # noqa: F401 (the fixture: `tiny-test` in the user catalog, pulled)
from tinymodel import CHATML_TEMPLATE, make_tiny_model

GREEDY = ("-n", "4", "--temperature", "0", "-t", "1")


def answer(cli, *args: str | Path, input: str | None = None) -> dict:
    """`edgeinfer run ... --json`, which must succeed."""
    code, out, err = cli("run", *args, *GREEDY, "--json", input=input)
    assert code == 0, err
    return json.loads(out)


# --- item 1: run MODEL PROMPT, as ollama has it ------------------------------------------------


def test_run_model_prompt_answers_as_run_with_m(cli, edgeinfer_home, tiny_model):
    with_m = answer(cli, "-m", tiny_model, "hello there")
    positional = answer(cli, tiny_model, "hello there")

    assert positional["text"] == with_m["text"] and positional["prompt_tokens"] == with_m["prompt_tokens"]
    assert positional["model"] == str(tiny_model)


def test_run_takes_a_store_name_first_in_any_case(cli, tiny_in_store, tiny_model):
    plain = answer(cli, "-m", tiny_model, "hi")

    assert answer(cli, "tiny-test", "hi")["text"] == plain["text"]
    assert answer(cli, "TINY-Test", "hi")["text"] == plain["text"]


@pytest.mark.parametrize("typed", ["smollm2-135m-instruct", "SmolLM2-135M-Instruct"])
def test_a_lone_model_name_is_not_answered_as_a_prompt(cli, edgeinfer_home, typed):
    result = cli("run", typed)

    assert result.exit_code == 2 and result.stdout == ""
    line = result.error_line
    assert f'edgeinfer run {typed} "your prompt"' in line and f"edgeinfer chat {typed}" in line


def test_a_lone_store_name_is_not_answered_either(cli, tiny_in_store):
    result = cli("run", "tiny-test")

    assert result.exit_code == 2
    assert "names a model, not a prompt" in result.error_line


def test_a_lone_model_name_with_the_prompt_on_stdin_is_the_model(cli, tiny_in_store, tiny_model):
    piped = answer(cli, "tiny-test", input="hello there")

    assert piped["text"] == answer(cli, "-m", tiny_model, "hello there")["text"]


def test_with_m_a_lone_argument_is_the_prompt_whatever_it_says(cli, edgeinfer_home, tiny_model):
    assert answer(cli, "-m", tiny_model, "smollm2-135m-instruct")["prompt_tokens"] > 0


def test_the_model_given_twice_is_a_usage_error(cli, edgeinfer_home, tiny_model):
    result = cli("run", "-m", tiny_model, tiny_model, "hi")

    assert result.exit_code == 2
    assert "two models given" in result.error_line


@pytest.mark.parametrize("args, says", [
    (("smollm", "hi"), "did you mean smollm2-135m-instruct?"),
    (("why", "is", "the sky blue"), "at most two arguments"),
], ids=["misspelled-model", "unquoted-prompt"])
def test_arguments_that_are_no_model_and_prompt_say_so(cli, edgeinfer_home, args, says):
    result = cli("run", *args)

    assert result.exit_code == 2
    assert says in result.error_line and "quote a prompt of several words" in result.error_line


def test_chat_model_opens_a_chat_on_that_model(edgeinfer_home, tiny_model):
    by_argument = run_edgeinfer("chat", tiny_model, *GREEDY, input="hello there\n")
    by_option = run_edgeinfer("chat", "-m", tiny_model, *GREEDY, input="hello there\n")

    assert by_argument.exit_code == 0, by_argument.stderr
    assert by_argument.stdout.strip() and by_argument.stdout == by_option.stdout


def test_chat_with_the_model_given_twice_is_a_usage_error(cli, edgeinfer_home, tiny_model):
    result = cli("chat", tiny_model, "-m", tiny_model)

    assert result.exit_code == 2
    assert "two models given" in result.error_line


# --- item 6: --system-file ------------------------------------------------------------------


@pytest.fixture
def system_file(tmp_path) -> Path:
    path = tmp_path / "system.txt"
    path.write_text("You answer in one short sentence, and never more than that.\n", encoding="utf-8")
    return path


def test_system_file_reads_the_system_message_and_system_stays_literal(cli, edgeinfer_home, tiny_model,
                                                                       system_file):
    from_file = answer(cli, "-m", tiny_model, "--system-file", system_file, "hi")
    as_text = answer(cli, "-m", tiny_model, "--system", system_file.read_text(encoding="utf-8"), "hi")
    the_name = answer(cli, "-m", tiny_model, "--system", system_file, "hi")

    assert from_file["prompt_tokens"] == as_text["prompt_tokens"] and from_file["text"] == as_text["text"]
    assert the_name["prompt_tokens"] != from_file["prompt_tokens"]  # the text "/tmp/…/system.txt", as llama.cpp's -sys


def test_chat_takes_a_system_file_too(edgeinfer_home, tiny_model, system_file):
    from_file = run_edgeinfer("chat", "-m", tiny_model, *GREEDY, "--system-file", system_file, input="hi\n")
    as_text = run_edgeinfer("chat", "-m", tiny_model, *GREEDY, "--system", system_file.read_text(encoding="utf-8"),
                            input="hi\n")

    assert from_file.exit_code == 0, from_file.stderr
    assert from_file.stdout == as_text.stdout


@pytest.mark.parametrize("command", ["run", "chat"])
def test_system_and_system_file_together_are_a_usage_error(cli, edgeinfer_home, tiny_model, system_file, command):
    prompt = ["hi"] if command == "run" else []
    result = cli(command, "-m", tiny_model, "--system", "be brief", "--system-file", system_file, *prompt)

    assert result.exit_code == 2
    assert "--system TEXT or --system-file PATH" in result.error_line


def test_a_system_file_that_cannot_be_used_is_one_line(cli, edgeinfer_home, tiny_model, tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes(b"caf\xe9")

    missing = cli("run", "-m", tiny_model, "--system-file", tmp_path / "nothing.txt", "hi")
    not_utf8 = cli("run", "-m", tiny_model, "--system-file", latin1, "hi")

    assert missing.exit_code == not_utf8.exit_code == 2
    assert "cannot read --system-file" in missing.error_line and "nothing.txt" in missing.error_line
    assert f"--system-file {latin1} is not UTF-8 text" in not_utf8.error_line


# --- item 7: messages that help ----------------------------------------------------------------


def test_did_you_mean_names_a_model_once_though_catalog_and_store_both_know_it(cli, tiny_in_store):
    result = cli("info", "tiny-tes")

    assert result.exit_code == 3
    assert result.error_line.count("tiny-test") == 1


def test_a_name_in_another_case_finds_its_model(cli, tiny_in_store, tiny_model):
    code, out, err = cli("info", "Tiny-Test", "--json")

    assert code == 0, err
    assert json.loads(out)["file_size"] == tiny_model.stat().st_size


def test_a_name_whose_case_matches_two_models_is_not_guessed(cli, edgeinfer_home, tiny_model):
    entry = tiny_catalog_entry(tiny_model.read_bytes())
    write_user_catalog(edgeinfer_home, {"twin": entry, "TWIN": entry})

    result = cli("run", "Twin", "hi")

    assert result.exit_code == 2
    assert "unknown model 'Twin'" in result.error_line


def test_an_unknown_draft_says_that_auto_and_ngram_are_taken_too(cli, edgeinfer_home, tiny_model):
    result = cli("run", "-m", tiny_model, "--draft", "nonsense", "hi")

    assert result.exit_code == 3
    line = result.error_line
    assert "nonsense" in line and "'auto'" in line and "'ngram'" in line


def test_quantizing_a_quantized_source_up_says_what_it_compares_with_and_warns_of_the_size(cli, edgeinfer_home,
                                                                                            tiny_model, tmp_path):
    assert cli("quantize", tiny_model, "--type", "Q4_K_M", "--no-eval", "-o", tmp_path, "-t", "1").exit_code == 0
    source = tmp_path / "tiny-Q4_K_M.gguf"

    code, out, err = cli("quantize", source, "--type", "Q8_0", "-o", tmp_path / "up.gguf", "-t", "1")

    assert code == 0, err
    assert "from the source model (Q4_K_M)" in out and "unquantized" not in out
    assert "the Q8_0 output is larger than its source (Q4_K_M)" in err


def test_quantizing_an_unquantized_source_compares_with_the_unquantized_model(cli, edgeinfer_home, tiny_model,
                                                                              tmp_path):
    code, out, err = cli("quantize", tiny_model, "--type", "Q8_0", "-o", tmp_path, "-t", "1")

    assert code == 0, err
    assert "from the unquantized model (F32)" in out and "larger than its source" not in err


# --- item 9: info --template ---------------------------------------------------------------------


def test_info_template_prints_the_chat_template(cli, edgeinfer_home, tiny_model):
    code, out, err = cli("info", tiny_model, "--template")

    assert code == 0, err
    assert out == CHATML_TEMPLATE + "\n"


def test_info_template_of_a_model_without_one_is_one_line(cli, edgeinfer_home, tmp_path):
    bare = make_tiny_model(tmp_path / "bare.gguf", chat_template=None)

    result = cli("info", bare, "--template")

    assert result.exit_code == 11 and result.stdout == ""
    assert "bare.gguf carries no chat template" in result.error_line
