"""`edgeinfer chat` driven like a person at a real terminal (pexpect), and through a pipe."""

from __future__ import annotations

import json
import sys

import pexpect
import pytest

from conftest import run_edgeinfer, subprocess_env

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
    child.sendcontrol("c")  # Ctrl-C at an empty prompt leaves
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
    assert result.exit_code == 0
    assert "not a saved edgeinfer conversation" in result.stderr
    assert result.stdout.strip()  # the next message was still answered


def test_save_and_load_without_a_file_say_what_they_need_and_a_load_names_another_model(tiny_model, edgeinfer_home,
                                                                                        tmp_path):
    saved = tmp_path / "other.json"
    saved.write_text(json.dumps({"version": 1, "model": "some-other-model", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}))
    result = run_edgeinfer("chat", "-m", tiny_model, "-n", "4", input=f"/save\n/load\n/load {saved}\nhi\n")
    assert result.exit_code == 0
    assert "/save needs a file" in result.stderr and "/load needs a file" in result.stderr
    assert "loaded 2 messages" in result.stderr
    assert f"saved with some-other-model; continuing with {tiny_model}" in result.stderr
    assert result.stdout.strip()


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
        evaluated, decode = [], model.decode
        model.decode = lambda tokens, **kw: (evaluated.append(len(tokens)), decode(tokens, **kw))[1]
        first = session.ask("Tell me about the sea and the ships that sail on it.").result.prompt_tokens
        evaluated.clear()
        second = session.ask("And the sky?").result.prompt_tokens
        assert evaluated[0] < second - first  # the new turn's tokens (and what the answer's retokenising changed)


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
