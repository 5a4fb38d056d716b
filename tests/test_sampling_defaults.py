"""A catalog entry's recommended sampling settings, as a user meets them: `info` shows them, `run` and
`chat` answer with them unless an option says otherwise, and chat's /set and /show change and print them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_edgeinfer, tiny_catalog_entry, write_user_catalog
from pypimirror import split_into_wheels

# Greedy, and answers of three tokens at most: what `tiny-test` recommends.
RECOMMENDED = '\n[models."tiny-test".sampling]\ntemperature = 0.0\ntop_k = 5\ntop_p = 0.9\nmax_tokens = 3\n'


@pytest.fixture
def tiny_with_settings(cli, tiny_model, edgeinfer_home, wheelhouse, monkeypatch) -> Path:
    """Given a user-catalog model `tiny-test` that recommends RECOMMENDED, pulled into the store."""
    tiny_bytes = tiny_model.read_bytes()
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=2)
    catalog = write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})
    catalog.write_text(catalog.read_text() + RECOMMENDED)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, _, err = cli("pull", "tiny-test")
    assert code == 0, err
    return edgeinfer_home


def _answer(*args: str) -> dict:
    result = run_edgeinfer("run", "--json", *args, "Tell me about the sea.")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_info_shows_what_a_catalog_model_recommends(cli, tiny_with_settings):
    code, out, err = cli("info", "tiny-test")
    assert code == 0, err
    assert "temperature 0.0, top-k 5, top-p 0.9, max-tokens 3" in out

    code, out, err = cli("info", "tiny-test", "--json")
    assert json.loads(out)["sampling"] == {"temperature": 0.0, "top_k": 5, "top_p": 0.9, "max_tokens": 3}


def test_info_of_a_file_outside_the_catalog_has_no_recommendation(cli, tiny_model, edgeinfer_home):
    code, out, err = cli("info", str(tiny_model), "--json")
    assert code == 0, err
    assert json.loads(out)["sampling"] is None


def test_run_answers_with_the_catalog_settings_and_options_override_them(tiny_with_settings, tiny_model):
    recommended = _answer("-m", "tiny-test")
    assert (recommended["completion_tokens"], recommended["finish_reason"]) == (3, "length")
    # The same file outside the catalog, greedy by option: the same three tokens.
    assert _answer("-m", str(tiny_model), "--temperature", "0", "-n", "3")["text"] == recommended["text"]

    longer = _answer("-m", "tiny-test", "-n", "8")
    assert longer["completion_tokens"] == 8 and longer["text"].startswith(recommended["text"])  # still greedy
    # A temperature given as an option is not the catalog's 0: a seeded draw, not the greedy answer.
    drawn = [_answer("-m", "tiny-test", "-n", "8", "--temperature", "5", "--top-k", "0", "--top-p", "1", "--min-p", "0",
                     "--seed", str(seed))["text"] for seed in (1, 2, 3)]
    assert any(text != longer["text"] for text in drawn)


def test_chat_set_and_show_change_the_settings_mid_conversation(tiny_with_settings, tmp_path):
    saved = tmp_path / "conversation.json"
    script = ("/show\nhello\n/set temperature 0.3\n/set parameter top-k 7\n/set max-tokens 5\n/set seed 42\n"
              f"/show\nagain\n/stats\n/save {saved}\n")
    result = run_edgeinfer("chat", "-m", "tiny-test", input=script)
    assert result.exit_code == 0, result.stderr
    shows = result.stderr.split("temperature ")[1:]
    first, second = (" ".join(block.split()) for block in (shows[0], shows[-1]))
    assert first.startswith("0.0 top-k 5 top-p 0.9 min-p 0.05 repeat-penalty 1.0 repeat-last-n 64 seed random max-tokens 3")
    assert second.startswith("0.3 top-k 7 top-p 0.9 min-p 0.05 repeat-penalty 1.0 repeat-last-n 64 seed 42 max-tokens 5")
    assert "5 generated" in result.stderr  # the second answer had the new cap
    sampling = json.loads(saved.read_text())["sampling"]
    assert (sampling["temperature"], sampling["top_k"], sampling["seed"]) == (0.3, 7, 42)


@pytest.mark.parametrize("line, words", [
    ("/set warmth 1", "unknown setting 'warmth'; the settings are temperature, top-k"),
    ("/set temperature hot", "temperature takes a number, not 'hot'"),
    ("/set top-k 2.5", "top-k takes a whole number, not '2.5'"),
    ("/set top-p 2", "top-p must be in (0, 1]"),
    ("/set max-tokens 0", "max-tokens takes a whole number of at least 1, or none"),
    ("/set temperature", "/set takes a setting and a value"),
])
def test_a_bad_setting_is_one_error_line_and_changes_nothing(tiny_model, edgeinfer_home, line, words):
    result = run_edgeinfer("chat", "-m", tiny_model, "--temperature", "0.5", input=f"{line}\n/show\n")
    assert result.exit_code == 2
    errors = [text for text in result.stderr.splitlines() if text.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], result.stderr
    assert " ".join(result.stderr.split("temperature ")[-1].split()).startswith("0.5 top-k 40")


@pytest.mark.parametrize("table, words", [
    ('temperature = "hot"', "'temperature' must be an integer or a number, not a string"),
    ("top_k = 2.5", "'top_k' must be an integer, not a number"),
    ("top_p = 2", "'top_p' must be in (0, 1], not 2"),
    ("temp = 1", "unknown setting 'temp'"),
    ("max_tokens = 0", "'max_tokens' must be at least 1"),
    ("seed = 1", "unknown setting 'seed'"),
])
def test_a_catalog_setting_that_cannot_be_used_is_named(cli, edgeinfer_home, table, words):
    (edgeinfer_home / "models.toml").write_text(f'[models.foo]\nfile = "a.gguf"\n[models.foo.sampling]\n{table}\n')
    result = cli("list")
    assert result.exit_code == 1
    assert "catalog entry 'foo'" in result.error_line and "sampling" in result.error_line
    assert words in result.error_line


def test_the_packaged_models_carry_their_cards_settings():
    from edgeinfer.catalog import load_catalog

    models = load_catalog().models
    assert models["smollm2-135m-instruct"].sampling.chosen()["temperature"] == 0.2
    assert models["smollm2-135m-instruct"].sampling.repeat_penalty > 1  # (it loops without one)
    assert models["qwen2.5-coder-1.5b-instruct"].sampling.chosen() == {
        "temperature": 0.7, "top_k": 20, "top_p": 0.8, "min_p": 0.0, "repeat_penalty": 1.1}
    assert models["gemma-3-270m"].sampling.top_k == 64
