"""`edgeinfer chat` at a real terminal (pexpect), where a person presses Ctrl-C twice to stop an answer,
types the next question before the answer ends, and reads answers in a narrow window."""

from __future__ import annotations

import json
import re
import sys
import time

import pexpect

from conftest import subprocess_env

# A fresh prompt (as in test_chat.py): bracketed paste switched on, then ">>>".
PROMPT = r"\x1b\[\?2004h(?:\x1b\[[0-9;?]*[A-Za-z])*>>>"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


def _spawn(tiny_model, *options: str, columns: int = 200) -> pexpect.spawn:
    env = subprocess_env({"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "COLUMNS": str(columns)})
    # No --max-tokens and a large context: the tiny model talks until it is stopped.
    child = pexpect.spawn(sys.executable, ["-m", "edgeinfer", "chat", "-m", str(tiny_model), "--temperature", "0",
                                           "-c", "4096", *options],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, columns))
    child.expect(PROMPT)
    return child


def _ask_and_wait_for_words(child: pexpect.spawn, text: str) -> None:
    child.sendline(text)
    child.expect_exact("\x1b[?2004l")  # the prompt let go of the terminal
    child.expect(r"\w+\W+\w+")


def _leave_and_read(child: pexpect.spawn, saved) -> list[dict]:
    child.sendline(f"/save {saved}")
    child.expect_exact("saved to")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0
    return json.loads(saved.read_text())["messages"]


def test_two_quick_ctrl_c_stop_the_answer_and_the_conversation_goes_on(tiny_model, edgeinfer_home, tmp_path):
    child = _spawn(tiny_model)
    _ask_and_wait_for_words(child, "tell me everything")
    child.sendintr()
    time.sleep(0.3)  # (a person's second press: after the answer stopped, or while it stops)
    child.sendintr()
    child.expect_exact("[answer stopped]")
    child.sendline("/stats")
    child.expect("finish: interrupted")
    child.expect(PROMPT)
    _ask_and_wait_for_words(child, "and then?")
    child.sendintr()
    child.expect_exact("[answer stopped]")
    child.expect(PROMPT)

    messages = _leave_and_read(child, tmp_path / "kept.json")
    assert [m["content"] for m in messages if m["role"] == "user"] == ["tell me everything", "and then?"]


def test_keys_typed_during_an_answer_are_not_in_it_and_wait_for_the_next_prompt(tiny_model, edgeinfer_home,
                                                                                tmp_path):
    child = _spawn(tiny_model)
    _ask_and_wait_for_words(child, "tell me everything")
    child.send("what about the sky")  # typed while the model answers, no Enter yet
    child.sendintr()
    child.expect_exact("[answer stopped]")
    assert "what about the sky" not in child.before  # not echoed into the answer
    child.expect(PROMPT)
    child.expect_exact("what about the sky")  # but waiting at the prompt, to be sent or edited
    _ask_and_wait_for_words(child, "")
    child.sendintr()
    child.expect(PROMPT)

    messages = _leave_and_read(child, tmp_path / "kept.json")
    assert [m["content"] for m in messages if m["role"] == "user"] == ["tell me everything", "what about the sky"]
    assert "what about the sky" not in messages[1]["content"]


def test_answers_wrap_at_spaces_in_a_narrow_terminal(tiny_model, edgeinfer_home, tmp_path):
    columns = 30
    child = _spawn(tiny_model, "-n", "80", columns=columns)
    child.sendline("tell me about the sea")
    child.expect_exact("\x1b[?2004l")
    child.expect(PROMPT)
    shown = [ANSI.sub("", line) for line in child.before.splitlines()]
    messages = _leave_and_read(child, tmp_path / "kept.json")

    answer = messages[1]["content"]
    assert len(answer.split()) > 5  # (enough words to wrap)
    assert all(len(line) <= columns for line in shown), shown
    # Each word that fits on a line is shown whole on one.
    for word in answer.split():
        if len(word) < columns:
            assert any(word in line for line in shown), (word, shown)
