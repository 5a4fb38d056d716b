"""`edgeinfer chat` driven like a person at a real terminal (pexpect), and through a pipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pexpect
import pytest

from conftest import REPO_ROOT, Run, run_edgeinfer, subprocess_env

# A fresh prompt: prompt_toolkit switches bracketed paste on, then draws ">>>" (the ">>>" it
# redraws when a line is accepted comes without that switch, so it is not mistaken for a new prompt).
PROMPT = r"\x1b\[\?2004h(?:\x1b\[[0-9;?]*[A-Za-z])*>>>"


def _spawn(tiny_model, *options: str) -> pexpect.spawn:
    # PROMPT_TOOLKIT_NO_CPR: the pseudo-terminal does not answer cursor-position queries.
    env = subprocess_env({"PROMPT_TOOLKIT_NO_CPR": "1", "TERM": "xterm", "COLUMNS": "200"})
    child = pexpect.spawn(sys.executable, ["-m", "edgeinfer", "chat", "-m", str(tiny_model), "--temperature", "0", *options],
                          env=env, encoding="utf-8", timeout=60, dimensions=(40, 200))
    child.expect(PROMPT)
    return child


def _answer_started(child: pexpect.spawn) -> None:
    """Wait until the model is answering: the prompt has let go of the terminal, and words arrive."""
    child.expect_exact("\x1b[?2004l")  # prompt_toolkit switches bracketed paste off when a line is accepted
    child.expect(r"\w+\W+\w+")


def _say(child: pexpect.spawn, text: str) -> str:
    """Type a line, wait for the next prompt; returns what the terminal showed in between."""
    child.sendline(text)
    child.expect(PROMPT)
    return child.before


def test_two_turns_a_slash_command_save_load_and_exit(tiny_model, edgeinfer_home, tmp_path):
    child = _spawn(tiny_model, "-n", "12")
    first = _say(child, "hello there")
    assert len(first.replace("hello there", "").strip()) > 0  # an answer was streamed
    assert "system message set" in _say(child, "/system answer briefly")
    _say(child, "and a second question")
    assert "prompt tokens" in _say(child, "/stats")
    saved = tmp_path / "conversation.json"
    assert "saved to" in _say(child, f"/save {saved}")
    assert "conversation cleared" in _say(child, "/reset")
    assert "loaded 4 messages" in _say(child, f"/load {saved}")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0

    data = json.loads(saved.read_text())
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["messages"][0]["content"] == "hello there"
    assert data["system"] == "answer briefly"
    assert data["sampling"]["temperature"] == 0
    assert "hello there" in (edgeinfer_home / "chat_history").read_text()  # input history kept across sessions


def test_ctrl_c_stops_the_answer_and_the_conversation_goes_on(tiny_model, edgeinfer_home):
    # No --max-tokens and a large context: the tiny model would talk for thousands of tokens.
    child = _spawn(tiny_model, "-c", "4096")
    child.sendline("tell me everything")
    _answer_started(child)
    child.sendintr()
    child.expect_exact("[answer stopped]")
    child.expect(PROMPT)
    assert "finish: interrupted" in _say(child, "/stats")
    child.sendline("one more thing")
    _answer_started(child)
    child.sendintr()
    child.expect_exact("[answer stopped]")
    child.expect(PROMPT)
    # With a conversation to lose, Ctrl-C at the empty prompt (perhaps a second press meant for the answer)
    # says how to leave; the next one leaves.
    child.sendcontrol("c")
    child.expect_exact("Ctrl-C again, Ctrl-D or /exit leaves")
    child.expect(PROMPT)
    child.sendcontrol("c")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_ctrl_d_leaves(tiny_model, edgeinfer_home):
    child = _spawn(tiny_model)
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_conversation_that_outgrows_the_context_drops_old_turns(tiny_model, edgeinfer_home):
    lines = "".join(f"message number {i} with a few more words in it\n" for i in range(8)) + "/stats\n"
    result = run_edgeinfer("chat", "-m", tiny_model, "--temperature", "0", "-c", "256", "-n", "60", input=lines)
    assert result.exit_code == 0, result.stderr
    assert "oldest messages were dropped" in result.stderr
    assert "Traceback" not in result.stderr


def test_load_of_a_file_that_is_not_a_conversation_is_an_error_not_an_exit(tiny_model, edgeinfer_home, tmp_path):
    bogus = tmp_path / "bogus.json"
    bogus.write_text("[1, 2, 3]")
    result = run_edgeinfer("chat", "-m", tiny_model, "-n", "4", input=f"/load {bogus}\nhi\n")
    assert result.exit_code == 2  # piped: the failed command's code, once the input is all answered
    assert "not a saved edgeinfer conversation" in result.stderr
    assert result.stdout.strip()  # the next message was still answered


def test_save_and_load_without_a_file_say_what_they_need_and_a_load_names_another_model(tiny_model, edgeinfer_home,
                                                                                        tmp_path):
    saved = tmp_path / "other.json"
    saved.write_text(json.dumps({"version": 1, "model": "some-other-model", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    result = run_edgeinfer("chat", "-m", tiny_model, "-n", "4", input=f"/save\n/load\n/load {saved}\nhi\n")
    assert result.exit_code == 2
    assert "error: /save needs a file" in result.stderr and "error: /load needs a file" in result.stderr
    assert "loaded 2 messages" in result.stderr
    assert f"saved with some-other-model; continuing with {tiny_model}" in result.stderr
    assert result.stdout.strip()


def _chat_bytes(tiny_model, data: bytes, *options: str) -> Run:
    """`edgeinfer chat` with bytes piped in (run_edgeinfer pipes text, which cannot hold bytes that are not UTF-8)."""
    done = subprocess.run([sys.executable, "-m", "edgeinfer", "chat", "-m", str(tiny_model), *options], input=data,
                          env=subprocess_env(), cwd=REPO_ROOT, capture_output=True, timeout=120)
    return Run(done.returncode, done.stdout.decode("utf-8", "replace"), done.stderr.decode("utf-8", "replace"))


def _errors(result: Run) -> list[str]:
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def _saved_messages(path) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in json.loads(path.read_text())["messages"]]


def test_saving_where_no_file_can_be_is_one_line_and_the_conversation_goes_on(tiny_model, edgeinfer_home, tmp_path):
    folder, note, kept = tmp_path / "a-folder", tmp_path / "note.txt", tmp_path / "kept.json"
    folder.mkdir()
    note.write_text("a file, not a folder")
    places = [folder, note / "it.json", note / "under" / "it.json", "/proc/it.json", "~no-such-user-here/it.json"]
    script = "hi\n" + "".join(f"/save {place}\n" for place in places) + f"hello\n/save {kept}\n"
    result = run_edgeinfer("chat", "-m", tiny_model, "--temperature", "0", "-n", "4", input=script)
    assert _errors(result) == [
        f"error: cannot save to {folder}: Is a directory",
        f"error: cannot save to {note / 'it.json'}: {note} is not a folder",
        f"error: cannot save to {note / 'under' / 'it.json'}: Not a directory",
        *[line for line in _errors(result) if line.startswith("error: cannot save to /proc/it.json: ")][:1],
        "error: ~no-such-user-here names no user's home folder",
    ]
    assert len(_errors(result)) == len(places)
    assert f"saved to {kept}" in result.stderr
    assert [role for role, _ in _saved_messages(kept)] == ["user", "assistant", "user", "assistant"]
    assert _saved_messages(kept)[0] == ("user", "hi") and _saved_messages(kept)[2] == ("user", "hello")
    assert result.exit_code == 2  # piped: the first failure's exit code (a usage error), so a script can tell


def test_a_piped_line_that_is_not_utf8_is_skipped_and_the_next_one_answered(tiny_model, edgeinfer_home, tmp_path):
    kept = tmp_path / "kept.json"
    result = _chat_bytes(tiny_model, b"caf\xe9\n/system \xff\xfe\nhello\n/save " + bytes(kept) + b"\n", "-n", "4")
    assert _errors(result) == ["error: input line 1 is not UTF-8 text (byte 0xe9 at offset 3); it was skipped",
                               "error: input line 2 is not UTF-8 text (byte 0xff at offset 8); it was skipped"]
    assert result.stdout.strip()  # "hello" was answered
    saved = json.loads(kept.read_text())
    assert saved["system"] is None and [m["content"] for m in saved["messages"]][:1] == ["hello"]
    assert result.exit_code == 2


def test_a_line_that_is_not_utf8_at_the_terminal_is_refused_and_the_chat_goes_on(tiny_model, edgeinfer_home):
    child = _spawn(tiny_model, "-n", "4")
    os.write(child.child_fd, b"caf\xe9\r")  # (prompt_toolkit hands such bytes on as lone surrogates)
    child.expect(PROMPT)
    assert "the line is not UTF-8 text; it was not sent" in child.before
    assert "no answer yet" in _say(child, "/stats")
    _say(child, "hello")
    assert "prompt tokens" in _say(child, "/stats")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0  # at a terminal a failed line is told, and that is all


def test_load_refuses_a_file_the_next_message_could_not_use_and_keeps_the_conversation(tiny_model, edgeinfer_home,
                                                                                       tmp_path):
    turn = {"role": "user", "content": "hi"}
    bad = {
        "null-content": {"messages": [{"role": "user", "content": None}]},
        "int-role": {"messages": [{"role": 5, "content": "hi"}]},
        "system-role": {"messages": [{"role": "system", "content": "hi"}]},
        "surrogate": {"messages": [{"role": "user", "content": "caf\udce9"}]},
        "int-system": {"system": 5, "messages": [turn]},
        "int-model": {"model": 5, "messages": [turn]},
        "negative-seed": {"sampling": {"seed": -2}, "messages": [turn]},
        "float-top-k": {"sampling": {"top_k": 1.5, "temperature": 0.8}, "messages": [turn]},
        "string-top-p": {"sampling": {"top_p": "x"}, "messages": [turn]},
        "messages-string": {"messages": "abc"},
    }
    for name, content in bad.items():
        (tmp_path / f"{name}.json").write_text(json.dumps({"version": 1, **content}))
    fifo = tmp_path / "a-pipe"
    os.mkfifo(fifo)  # (read, it would wait for a writer forever)
    kept = tmp_path / "kept.json"
    script = "hi\n" + "".join(f"/load {tmp_path / name}.json\n" for name in bad) + f"/load {fifo}\nhello\n/save {kept}\n"
    result = run_edgeinfer("chat", "-m", tiny_model, "--temperature", "0", "-n", "4", input=script, timeout=60)
    errors = _errors(result)
    assert [line.split(" is not a saved")[0] for line in errors[:-1]] == [f"error: {tmp_path / name}.json" for name in bad]
    assert "message 1 has content null, not text" in errors[0] and "message 1 has role 5" in errors[1]
    assert errors[-1] == f"error: cannot read {fifo}: not a regular file"
    assert [content for _, content in _saved_messages(kept)][::2] == ["hi", "hello"]  # the conversation went on
    assert json.loads(kept.read_text())["sampling"]["temperature"] == 0  # and kept its own settings
    assert result.exit_code == 2


def test_a_message_too_long_fails_alone_and_sets_the_exit_code_of_a_piped_chat(tiny_model, edgeinfer_home, tmp_path):
    kept = tmp_path / "kept.json"
    script = "hello\n" + "word " * 3000 + f"\nhello again\n/save {kept}\n"
    result = run_edgeinfer("chat", "-m", tiny_model, "-n", "4", "-c", "128", input=script)
    errors = _errors(result)
    assert len(errors) == 1 and "the context holds 128" in errors[0]
    # The conversation before it is kept whole (the oldest turns made room in vain, and came back).
    assert [content for _, content in _saved_messages(kept)][::2] == ["hello", "hello again"]
    assert result.exit_code == 10  # the failed message's code: a script piping its chat can tell


def test_file_names_with_square_brackets_are_printed_as_given(tiny_model, edgeinfer_home, tmp_path):
    folder = tmp_path / "[b]notes[" / "]"  # (rich would print "[b]notes[/]" as a bold "notes")
    folder.mkdir(parents=True)
    saved, missing = folder / "c.json", folder / "[" / "]gone.json"
    result = run_edgeinfer("chat", "-m", tiny_model, "-n", "4", input=f"hi\n/save {saved}\n/load {saved}\n/load {missing}\n")
    assert f"saved to {saved}" in result.stderr
    assert f"loaded 2 messages from {saved}" in result.stderr
    assert _errors(result) == [f"error: cannot read {missing}: No such file or directory"]


@pytest.mark.parametrize("model", ["no-such-model"])
def test_chat_with_an_unknown_model_is_one_clear_line(model, cli, edgeinfer_home):
    result = cli("chat", "-m", model)
    assert result.exit_code == 3
    assert "unknown model" in result.error_line


def test_each_turn_reads_only_what_the_cache_does_not_hold(tiny_model):
    """Turn N evaluates its new tokens, not the whole conversation again (the KV cache is kept between turns)."""
    from edgeinfer.chat import ChatSession, Conversation
    from edgeinfer.engine import LoadOptions, load
    from edgeinfer.sampling import SamplingParams

    with load(tiny_model, LoadOptions(n_ctx=1024, n_threads=2)) as model:
        session = ChatSession(model, Conversation(model="tiny", sampling=SamplingParams(temperature=0)), max_tokens=8)
        first = session.ask("Tell me about the sea and the ships that sail on it.").result
        assert first.cached_tokens == 0
        second = session.ask("And the sky?").result
        read = second.prompt_tokens - second.cached_tokens
        # the new turn's tokens (and what the answer's retokenising changed), not the first turn's again
        assert 0 < read < second.prompt_tokens - first.prompt_tokens
        assert model.held(0) == len(model.cached) == second.prompt_tokens + second.completion_tokens - 1


def test_a_conversation_that_outgrows_the_context_drops_old_turns_and_keeps_the_system_message(tiny_model):
    from edgeinfer.chat import ChatSession, Conversation
    from edgeinfer.engine import LoadOptions, load
    from edgeinfer.sampling import SamplingParams

    with load(tiny_model, LoadOptions(n_ctx=128, n_threads=2)) as model:
        conversation = Conversation(model="tiny", sampling=SamplingParams(temperature=0), system="Be brief.")
        session = ChatSession(model, conversation, max_tokens=8)
        dropped = sum(session.ask(f"Message number {i}: tell me a story about the sea.").dropped_turns for i in range(8))
        assert dropped > 0
        assert conversation.messages()[0] == {"role": "system", "content": "Be brief."}
        assert conversation.turns[-2]["content"].startswith("Message number 7")
