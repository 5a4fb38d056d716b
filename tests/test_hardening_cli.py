"""Hostile names, paths, signals and environments at the command line: each is told in one line, or shown as text.

Names come from GGUF metadata and hub listings, which an attacker writes; `/save` paths may be links
or devices; a terminal may be closed under the chat; HOME may be missing or empty.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
from pathlib import Path

import pexpect
import pytest

from conftest import run_edgeinfer, subprocess_env

# A name with a closing markup tag, a window-title OSC and an OSC 8 link: each would act on a terminal.
HOSTILE_NAME = "evil [/bold] \x1b]0;PWNED\x07 \x1b]8;;http://example.invalid/\x1b\\click\x1b]8;;\x1b\\ :smile:"


# --- names from files and the network are printed as text ---------------------------------------


def _hostile_model(folder: Path) -> Path:
    from tinymodel import make_tiny_model

    return make_tiny_model(folder / "hostile.gguf", name=HOSTILE_NAME)


def test_info_shows_a_name_with_markup_and_escape_sequences_as_visible_text(tmp_path, edgeinfer_home):
    done = run_edgeinfer("info", _hostile_model(tmp_path), env={"COLUMNS": "400"})

    assert done.exit_code == 0, done.stderr
    assert "\x1b" not in done.stdout and "\x07" not in done.stdout
    assert "evil [/bold] \\x1b]0;PWNED\\x07 \\x1b]8;;http://example.invalid/\\x1b\\click" in done.stdout
    assert ":smile:" in done.stdout  # (rich would have drawn an emoji)


def test_a_hub_file_named_with_markup_and_escapes_is_pulled_and_listed_as_text(hub, tiny_model, edgeinfer_home):
    hub.add_file("acme/tiny-GGUF", "[/bold]\x1b]0;PWNED\x07-Q4_K_M.gguf", tiny_model.read_bytes())

    pulled = run_edgeinfer("pull", "acme/tiny-GGUF:Q4_K_M")
    listed = run_edgeinfer("list")

    assert pulled.exit_code == 0, pulled.stderr
    assert listed.exit_code == 0, listed.stderr
    for done in (pulled, listed):
        assert "\x1b" not in done.stdout + done.stderr and "\x07" not in done.stdout + done.stderr
        assert "hf.co/acme/tiny-GGUF/[/bold]\\x1b]0;PWNED\\x07-Q4_K_M.gguf" in done.stdout


def test_an_error_quoting_a_hostile_name_is_one_line_with_the_escapes_visible(tmp_path, edgeinfer_home):
    done = run_edgeinfer("run", "-m", tmp_path / "[/bold]\x1b]0;PWNED\x07\n.gguf", "hi")

    assert done.exit_code == 3
    assert "[/bold]\\x1b]0;PWNED\\x07\\n.gguf" in done.error_line
    assert "\x1b" not in done.stderr


# --- /save replaces only a regular file -----------------------------------------------------------


def test_save_refuses_a_symlink_and_a_named_pipe_and_replaces_a_regular_file_whole(tiny_model, edgeinfer_home,
                                                                                   tmp_path):
    target, link, fifo, regular = tmp_path / "target.txt", tmp_path / "link.json", tmp_path / "fifo", tmp_path / "it.json"
    target.write_text("someone else's file\n")
    link.symlink_to(target)
    os.mkfifo(fifo)
    regular.write_text("an old save\n")

    done = run_edgeinfer("chat", "-m", tiny_model, "--temperature", "0", "-n", "4",
                         input=f"hi\n/save {link}\n/save {fifo}\n/save {regular}\n")

    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot save to {link}: it is a symbolic link, not a regular file; nothing was written",
                      f"error: cannot save to {fifo}: it is a named pipe, not a regular file; nothing was written"]
    assert done.exit_code == 2
    assert link.is_symlink() and target.read_text() == "someone else's file\n"
    assert fifo.is_fifo()
    assert [m["content"] for m in json.loads(regular.read_text())["messages"]][:1] == ["hi"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edgeinfer-home", "fifo", "it.json", "link.json", "target.txt"]


# --- SIGTERM and SIGHUP at the chat prompt leave the terminal as Ctrl-D does ---------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_a_signal_at_the_chat_prompt_leaves_echo_and_line_editing_on(tiny_model, edgeinfer_home, signum):
    # dash repairs nothing: what the chat leaves is what stty sees after it.
    shell = shutil.which("dash") or "sh"
    script = f"{sys.executable} -m edgeinfer chat -m {tiny_model}; echo exit=$?; stty -a"
    env = subprocess_env({"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "COLUMNS": "200"})
    child = pexpect.spawn(shell, ["-c", script], env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect(">>>")
    chat_pid = int(Path(f"/proc/{child.pid}/task/{child.pid}/children").read_text().split()[0])

    os.kill(chat_pid, signum)
    child.expect(r"exit=(\d+)")
    code = int(child.match.group(1))
    child.expect(pexpect.EOF)
    settings = child.before.split()

    assert code == 128 + signum
    assert {"echo", "icanon", "isig", "iexten"} <= set(settings), child.before
    assert "Traceback" not in child.before


# --- deliberate errors (and one non-error) instead of unexpected ones -------------------------------------


def test_a_temperature_too_small_to_divide_by_is_greedy(tiny_model, edgeinfer_home):
    greedy = run_edgeinfer("run", "-m", tiny_model, "--temperature", "0", "-n", "12", "hello")
    tiny = run_edgeinfer("run", "-m", tiny_model, "--temperature", "1e-310", "-n", "12", "--seed", "1", "hello")
    small = run_edgeinfer("run", "-m", tiny_model, "--temperature", "1e-300", "-n", "12", "--seed", "1", "hello")

    assert greedy.exit_code == tiny.exit_code == small.exit_code == 0, tiny.stderr + small.stderr
    assert greedy.stdout.strip() and tiny.stdout == greedy.stdout and small.stdout == greedy.stdout
    assert "Warning" not in tiny.stderr + small.stderr


def _run_bytes(*args: str | bytes | os.PathLike, env: dict[str, str | None] | None = None):
    """`edgeinfer ARGS...` with arguments that may be bytes (argv that is not UTF-8)."""
    import subprocess

    from conftest import REPO_ROOT, Run

    done = subprocess.run([sys.executable, "-m", "edgeinfer", *args], env=subprocess_env(env), cwd=REPO_ROOT,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    return Run(done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))


@pytest.mark.parametrize("args, named", [
    (["run", b"caf\xe9"], "'[MODEL] PROMPT'"),
    (["run", "--system", b"\xff", "hi"], "'--system'"),
    (["run", "--stop", "a", "--stop", b"\xff", "hi"], "'--stop'"),
    (["chat", "--system", b"caf\xe9"], "'--system'"),
], ids=["prompt", "run-system", "stop", "chat-system"])
def test_an_argument_that_is_not_utf8_is_a_usage_error(tiny_model, edgeinfer_home, args, named):
    done = _run_bytes(args[0], "-m", tiny_model, "-n", "4", *args[1:])

    assert done.exit_code == 2
    assert named in done.error_line and "not UTF-8 text" in done.error_line


@pytest.mark.parametrize("env, message", [
    ({"EDGEINFER_HOME": "~nosuchuser"}, "EDGEINFER_HOME is ~nosuchuser: ~nosuchuser names no user's home folder"),
    ({"EDGEINFER_HOME": None, "XDG_DATA_HOME": "~nosuchuser/share"},
     "XDG_DATA_HOME is ~nosuchuser/share: ~nosuchuser names no user's home folder"),
    ({"EDGEINFER_HOME": None, "HOME": ""}, "HOME is empty; set HOME, or EDGEINFER_HOME to the folder for edgeinfer's store"),
    ({"EDGEINFER_HOME": "~/store", "HOME": ""}, "EDGEINFER_HOME is ~/store: HOME is empty; set HOME, or EDGEINFER_HOME"),
], ids=["no-such-user", "xdg-no-such-user", "empty-home", "tilde-with-empty-home"])
def test_a_home_that_names_no_folder_is_a_usage_error(edgeinfer_home, env, message):
    for command in (["list"], ["pull"], ["chat", "-m", "x"]):
        done = run_edgeinfer(*command, env=env)
        assert done.exit_code == 2, (command, done.stderr)
        assert done.error_line.startswith(f"error: {message}"), command
    assert not Path("/.local/share/edgeinfer").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="becoming a user without a password entry needs root")
def test_no_home_and_no_password_entry_is_a_usage_error(edgeinfer_home):
    import subprocess

    # Imported first: the user it becomes may not read this Python's own files.
    script = ("import os, pwd\nfrom edgeinfer import config, errors\nos.setuid(54321)\n"
              "try:\n    config.edgeinfer_home()\nexcept errors.UsageError as exc:\n    print(exc.exit_code, exc)\n")
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env({"HOME": None, "EDGEINFER_HOME": None}),
                          capture_output=True, text=True, timeout=60)

    assert done.stdout == ("2 HOME is not set and this user has no home folder in the password database; "
                           "set HOME, or EDGEINFER_HOME to the folder for edgeinfer's store\n"), done.stderr


def test_a_models_folder_that_is_a_symlink_loop_is_a_usage_error(tiny_model, edgeinfer_home):
    (edgeinfer_home / "models").symlink_to("models")
    for command in (["run", "-m", "smollm2-135m-instruct", "hi"], ["pull", "smollm2-135m-instruct"],
                    ["quantize", "smollm2-135m-instruct", "--bits", "8"]):
        done = run_edgeinfer(*command)
        assert done.exit_code == 2, (command, done.stderr)
        assert "runs into a loop of symbolic links; mend the store's folders" in done.error_line, command
    assert run_edgeinfer("list").exit_code == 0
