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
    assert "a tiny test model" in out  # (the path is --json's and info's: list keeps to 80 columns)
    assert row["path"] in cli("info", "tiny-test").stdout  # whole, not cut to the width of a terminal that is not there


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


# --- a user catalog with values of the wrong type (each one crashed a command) --------------------------------


@pytest.mark.parametrize(
    ("toml", "words"),
    [
        ('models = "x"\n', ["'models'", "a table", "a string"]),
        ("[models]\nfoo = 3\n", ["'foo'", "a table", "an integer"]),
        ('[models.foo]\nfile = "a.gguf"\nsources = "abc"\n', ["'foo'", "'sources'", "an array"]),
        ('[models.foo]\nfile = "a.gguf"\nsources = ["abc"]\n', ["'foo'", "source 1", "a table"]),
        ("default = 5\n", ["'default'", "a string", "an integer"]),
        ('[models.foo]\nfile = "a.gguf"\ndraft = 5\n', ["'foo'", "'draft'", "a string"]),
        ('[models.foo]\nfile = "a.gguf"\nsize = "big"\n', ["'foo'", "'size'", "an integer"]),
        ('[models.foo]\nfile = "a.gguf"\nsize = true\n', ["'foo'", "'size'", "an integer", "a boolean"]),
        ('[models.foo]\nfile = "a.gguf"\ndescription = 4\n', ["'foo'", "'description'", "a string"]),
        ('[models.foo]\nfile = "a.gguf"\nquantization = 4\n', ["'foo'", "'quantization'", "a string"]),
        ("[models.foo]\nfile = 5\n", ["'foo'", "'file'", "a string", "an integer"]),
        ('[models.foo]\nfile = "a.gguf"\n[[models.foo.sources]]\nkind = "hf"\nrepo = "a/b"\nfile = "a.gguf"\nsha256 = 5\n',
         ["'foo'", "source 1", "'sha256'", "a string"]),
        ('[models.foo]\nfile = "a.gguf"\n[[models.foo.sources]]\nkind = "pypi"\nsha256 = "' + "0" * 64 + '"\nwheels = [1]\n',
         ["'foo'", "wheel 1", "a table"]),
    ],
    ids=["models-str", "entry-int", "sources-str", "source-str", "default-int", "draft-int", "size-str", "size-bool",
         "description-int", "quantization-int", "file-int", "sha256-int", "wheel-int"],
)
def test_a_user_catalog_value_of_the_wrong_type_is_named_with_what_was_expected(cli, edgeinfer_home, toml, words):
    (edgeinfer_home / "models.toml").write_text(toml)

    for command in (["list"], ["list", "--json"], ["pull", "foo"]):
        result = cli(*command)

        assert result.exit_code == 1, command
        line = result.error_line
        assert "models.toml" in line and "missing" not in line  # (a wrong type was described as missing)
        for word in words:
            assert word in line, (command, line)


def test_every_command_reports_a_damaged_user_catalog_in_one_line(cli, edgeinfer_home):
    (edgeinfer_home / "models.toml").write_text('models = "x"\n')

    for command in (["doctor"], ["run", "hi"], ["info"], ["rm", "foo"]):
        result = cli(*command)

        assert result.exit_code == 1, command
        assert "'models' must be a table" in result.error_line


def test_a_user_catalog_that_is_not_utf8_is_one_line(cli, edgeinfer_home):
    (edgeinfer_home / "models.toml").write_bytes(b'default = "caf\xe9"\n')

    result = cli("list")

    assert result.exit_code == 1
    assert "models.toml" in result.error_line and "not UTF-8" in result.error_line


def test_a_user_catalog_that_cannot_be_read_is_one_line_not_ignored(cli, edgeinfer_home):
    # (Unreadable as root too: a folder where the file should be. Mode 000 fails the same way for other users.)
    (edgeinfer_home / "models.toml").mkdir()

    result = cli("list")

    assert result.exit_code == 1
    assert result.error_line.endswith("models.toml: Is a directory")


def test_a_model_reference_too_long_for_the_file_system_is_one_line(cli, edgeinfer_home):
    # Path.exists() raises for a name the file system refuses, as it does for a folder without permission.
    result = cli("info", "a" * 300 + ".gguf")

    assert result.exit_code == 3
    assert "neither a file on disk nor a hub reference" in result.error_line


# --- a damaged manifest --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b'{"models": []}', "'models' is a JSON array"),
        (b"[1]", "holds a JSON array"),
        (b'{"models": {"x": "abc"}}', "the entry 'x' is a JSON string"),
        (b'{"models": {"x": {"name": "x", "path": "/tmp/x.gguf", "foo": 1}}}', "unknown field 'foo'"),
        (b'{"models": {"x": {"name": "x"}}}', "the entry 'x' has no 'path'"),
        (b'{"models": {"x": {"name": "x", "path": 5, "sha256": "a", "size": 1, "source": "s"}}}', "'path' of 5"),
        (b'{"models": {"x": {"name": "x", "path": "/tmp/x", "sha256": "a", "size": "1", "source": "s"}}}', "'size' of '1'"),
        (b'{"models": {"caf\xe9": 1}}', "not UTF-8"),
    ],
    ids=["models-array", "array", "entry-str", "unknown-field", "missing-field", "path-int", "size-str", "latin1"],
)
def test_a_damaged_manifest_is_one_line_for_every_command_that_reads_it(cli, edgeinfer_home, content, words):
    manifest = edgeinfer_home / "manifest.json"
    manifest.write_bytes(content)

    for command in (["list"], ["rm", "x"], ["info", "x"]):
        result = cli(*command)

        assert result.exit_code == 1, command
        assert str(manifest) in result.error_line and words in result.error_line
    assert manifest.read_bytes() == content  # nothing rewritten, nothing lost


def test_a_manifest_that_cannot_be_read_is_one_line_not_an_empty_store(cli, edgeinfer_home):
    (edgeinfer_home / "manifest.json").mkdir()  # (unreadable as root too; mode 000 fails the same way for others)

    result = cli("list")

    assert result.exit_code == 1
    assert "manifest.json is unreadable: Is a directory" in result.error_line


# --- a store that cannot be written ------------------------------------------------------------------------------


def test_pull_into_a_home_that_is_a_file_is_one_line(cli, tmp_path, edgeinfer_home, monkeypatch):
    home = tmp_path / "home-file"
    home.write_text("not a folder")
    monkeypatch.setenv("EDGEINFER_HOME", str(home))

    result = cli("pull", "smollm2-135m-instruct")  # (refused before any download starts)

    assert result.exit_code == 1
    assert result.error_line == f"error: cannot write to the model store at {home}: {home} is a file, not a folder"
    assert home.read_text() == "not a folder"


def test_rm_in_a_store_whose_lock_cannot_be_taken_is_one_line_and_removes_nothing(cli, tmp_path, edgeinfer_home):
    from edgeinfer.library import Library

    mine = tmp_path / "Mine-Q8_0.gguf"
    mine.write_bytes(b"GGUF-ish bytes")
    Library.open().store.register("Mine-Q8_0", mine, sha256="0" * 64, source="quantize")
    lock = edgeinfer_home / ".manifest.lock"
    lock.unlink()
    lock.mkdir()  # the lock cannot be opened (as root too); a read-only store fails here the same way

    result = cli("rm", "Mine-Q8_0")

    assert result.exit_code == 1
    assert result.error_line.startswith(f"error: cannot write to the model store at {edgeinfer_home}")
    assert "Mine-Q8_0" in rows(cli) and mine.exists()


# --- an entry whose file was deleted --------------------------------------------------------------------------


def test_an_entry_whose_file_was_deleted_is_named_and_can_be_removed(cli, tmp_path, edgeinfer_home):
    from edgeinfer.library import Library

    gone = tmp_path / "gone.gguf"
    gone.write_bytes(b"GGUF-ish bytes")
    Library.open().store.register("gone", gone, sha256="0" * 64, source="quantize")
    gone.unlink()
    assert rows(cli)["gone"]["present"] is False

    result = cli("info", "gone")
    assert result.exit_code == 3
    assert result.error_line == f"error: the file of gone is gone ({gone}); `edgeinfer rm gone` forgets it"

    code, out, err = cli("rm", "gone")
    assert code == 0, err
    assert out.startswith("removed gone") and "its file was already gone" in out
    assert "gone" not in rows(cli)


def test_rm_of_a_pulled_model_whose_file_was_deleted_forgets_it(cli, tiny_in_store):
    Path(rows(cli)["tiny-test"]["path"]).unlink()

    code, out, err = cli("rm", "tiny-test")

    assert code == 0, err
    assert out.startswith("removed tiny-test")
    assert "tiny-test" not in json.loads((tiny_in_store / "manifest.json").read_text())["models"]


# --- an empty reference -------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["pull", ""], ["rm", ""], ["info", ""], ["run", "-m", "", "hi"]], ids=" ".join)
def test_an_empty_model_reference_is_a_usage_error_not_the_default_model(cli, edgeinfer_home, command):
    # A default that cannot be pulled here: had "" meant it, the command would fail another way.
    (edgeinfer_home / "models.toml").write_text('default = "nowhere"\n\n[models.nowhere]\nfile = "nowhere.gguf"\n')

    result = cli(*command)

    assert result.exit_code == 2
    assert result.error_line == "error: empty model reference"


def test_an_error_naming_bracketed_text_keeps_it(cli, edgeinfer_home):
    result = cli("run", "-m", "[b]odd[/b]-name", "hi")
    assert result.exit_code == 3 and "[b]odd[/b]-name" in result.error_line
