"""`edgeinfer serve` as a real process on a loopback port, talked to by the official `openai` and `ollama`
packages (and httpx, for what a well-behaved client never sends).

The model: the tiny target quantized to Q8_0 over a q8_0 KV cache, the pair whose batched rows llama.cpp
computes bit for bit as it computes one sequence alone (docs/batching.md), so an answer given beside
others can be compared with the same request answered alone.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import ollama
import openai
import pytest

from conftest import REPO_ROOT, run_edgeinfer, subprocess_env
from test_speculative import quantize

READY = re.compile(r"serving .* on (http://\S+) ")
QUESTIONS = ["Once upon a time there was a small model", "Hello world! Hello there, how are you today?",
             "def hello(name): return", "The quick brown fox jumps over the lazy dog."]
GREEDY = {"temperature": 0}


class Server:
    """`edgeinfer serve ARGS` in a process of its own, with its stderr collected line by line."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.lines: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "edgeinfer", "serve", "--port", "0", *args], cwd=REPO_ROOT,
            env=subprocess_env({"EDGEINFER_HOME": str(home), **(env or {})}), stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._ready = threading.Event()
        self.url = ""
        threading.Thread(target=self._read, daemon=True).start()
        if not self._ready.wait(120) or not self.url:
            self.process.kill()
            raise AssertionError("the server did not start:\n" + "\n".join(self.lines))

    def _read(self) -> None:
        for line in self.process.stderr:
            self.lines.append(line.rstrip("\n"))
            if found := READY.search(line):
                self.url = found.group(1)
                self._ready.set()
        self._ready.set()

    def openai(self, **kwargs) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=kwargs.pop("api_key", "none"), max_retries=0,
                             **kwargs)

    def ollama(self, **kwargs) -> ollama.Client:
        return ollama.Client(host=self.url, **kwargs)

    def metrics(self) -> dict[str, float]:
        text = httpx.get(self.url + "/metrics").text
        return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, re.M)}

    def stop(self, timeout: float = 60) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def q8(tiny_family, tmp_path_factory) -> Path:
    return quantize(tiny_family.target, tmp_path_factory.mktemp("serve") / "tiny-q8_0.gguf", "LLAMA_FTYPE_MOSTLY_Q8_0")


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("serve-home")


def start(home: Path, model: Path, *args: str, **kwargs) -> Server:
    return Server(home, "-m", str(model), "--cache-type", "q8_0", "--alias", "tiny", *args, **kwargs)


@pytest.fixture(scope="module")
def server(q8, home) -> Iterator[Server]:
    running = start(home, q8, "--parallel", "4", "--ctx-size", "1024")
    yield running
    try:
        assert running.stop() == 0
    finally:
        running.kill()


def wait_for(condition, what: str, seconds: float = 30):
    """Poll until `condition()` is true (a deadline only against hanging: nothing is timed)."""
    deadline = time.monotonic() + seconds
    while not (value := condition()):
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)
    return value


def chat(client: openai.OpenAI, question: str, **kwargs):
    return client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": question}],
                                          **{"max_tokens": 24, **GREEDY, **kwargs})


def streamed_chat(client: openai.OpenAI, question: str, **kwargs) -> tuple[str, list]:
    chunks = list(chat(client, question, stream=True, **kwargs))
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks


# --- the OpenAI API -------------------------------------------------------------------------


def test_the_model_is_listed_under_its_name_and_aliases(server, q8):
    assert [m.id for m in server.openai().models.list()] == [q8.stem, "tiny"]


def test_a_chat_answer_streamed_is_the_answer_given_whole(server):
    client = server.openai()
    whole = chat(client, QUESTIONS[0])
    text, chunks = streamed_chat(client, QUESTIONS[0], stream_options={"include_usage": True})
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert text == whole.choices[0].message.content and text
    assert whole.choices[0].finish_reason == chunks[-2].choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 24 and whole.usage.prompt_tokens > 5
    streamed = chunks[-1].usage
    assert chunks[-1].choices == [] and (streamed.prompt_tokens, streamed.completion_tokens, streamed.total_tokens) \
        == (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)
    # (the same question again: its prompt, all but the last token, was kept in the cache by the first)
    assert streamed.prompt_tokens_details.cached_tokens == whole.usage.prompt_tokens - 1


def test_a_stream_without_include_usage_has_no_usage_chunk(server):
    _, chunks = streamed_chat(server.openai(), QUESTIONS[1])
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage is None


def test_completions_whole_and_streamed(server):
    client = server.openai()
    whole = client.completions.create(model="tiny", prompt="def hello(name):", max_tokens=16, **GREEDY)
    streamed = list(client.completions.create(model="tiny", prompt="def hello(name):", max_tokens=16, stream=True,
                                              **GREEDY))
    assert whole.object == "text_completion" and whole.usage.completion_tokens == 16
    assert "".join(c.choices[0].text for c in streamed) == whole.choices[0].text
    assert streamed[-1].choices[0].finish_reason == "length"


def test_a_stop_string_ends_the_answer_before_it(server):
    client = server.openai()
    text = chat(client, QUESTIONS[2], max_tokens=40).choices[0].message.content
    stop = text[len(text) // 2:len(text) // 2 + 3]
    stopped = chat(client, QUESTIONS[2], max_tokens=40, stop=[stop])
    assert stopped.choices[0].message.content == text[:text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_sampled_answer(server):
    client = server.openai()
    first, again = (chat(client, QUESTIONS[3], temperature=1.0, seed=7, max_tokens=32) for _ in range(2))
    assert first.choices[0].message.content == again.choices[0].message.content


def test_several_clients_at_once_each_get_their_own_answer(server):
    client = server.openai()
    alone = {q: chat(client, q, max_tokens=48).choices[0].message.content for q in QUESTIONS}
    together: dict[str, str] = {}

    def ask(question: str) -> None:
        together[question] = streamed_chat(server.openai(), question, max_tokens=48)[0]

    threads = [threading.Thread(target=ask, args=(q,)) for q in QUESTIONS * 2]  # (8 clients, 4 sequences)
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert together == alone
    assert len(set(alone.values())) == len(QUESTIONS)


# --- the Ollama API -------------------------------------------------------------------------


def test_ollama_tags_and_version(server, q8):
    client = server.ollama()
    assert [m.model for m in client.list().models] == [q8.stem, "tiny"]
    assert httpx.get(server.url + "/api/version").json()["version"]
    assert httpx.get(server.url + "/").text == "edgeinfer is running"


def test_ollama_chat_streamed_and_whole_give_the_openai_answer(server):
    expected = chat(server.openai(), QUESTIONS[0], max_tokens=16).choices[0].message.content
    client, messages = server.ollama(), [{"role": "user", "content": QUESTIONS[0]}]
    options = {"temperature": 0, "num_predict": 16}
    whole = client.chat(model="tiny", messages=messages, options=options, stream=False)
    parts = list(client.chat(model="tiny", messages=messages, options=options, stream=True))
    assert whole.message.content == "".join(p.message.content for p in parts) == expected
    assert whole.done and whole.done_reason == "length" and whole.eval_count == 16 and whole.prompt_eval_count > 5
    assert whole.total_duration >= whole.eval_duration > 0 and parts[-1].done and not parts[0].done


def test_ollama_generate_streamed_and_whole(server):
    client = server.ollama()
    whole = client.generate(model="tiny:latest", prompt="def hello(name):", raw=True,
                            options={"temperature": 0, "num_predict": 12, "seed": 1})
    parts = list(client.generate(model="tiny", prompt="def hello(name):", raw=True, stream=True,
                                 options={"temperature": 0, "num_predict": 12}))
    assert whole.response == "".join(p.response for p in parts) and whole.eval_count == 12
    assert parts[-1].done and parts[-1].prompt_eval_count == whole.prompt_eval_count


# --- errors ----------------------------------------------------------------------------------


def post(server: Server, path: str, content: bytes | str, **kwargs) -> httpx.Response:
    return httpx.post(server.url + path, content=content, headers={"Content-Type": "application/json"}, **kwargs)


def test_an_unknown_model_is_404_and_never_loaded(server, tmp_path):
    with pytest.raises(openai.NotFoundError) as found:
        server.openai().chat.completions.create(model=str(tmp_path / "other.gguf"),
                                                messages=[{"role": "user", "content": "hi"}])
    assert found.value.body["code"] == "model_not_found"
    with pytest.raises(ollama.ResponseError) as refused:
        server.ollama().chat(model="llama3", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 404 and "not served here" in refused.value.error


@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", "{not json", 400, None),
    ("/v1/chat/completions", "[1, 2]", 400, None),
    ("/v1/chat/completions", '{"messages": "hi"}', 400, "messages"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}', 400,
     "temperature"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}', 400, "max_tokens"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "n": 2}', 400, "n"),
    ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, None),
    ("/v1/chat/completions",
     '{"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_schema"}}', 400,
     "response_format"),
    ("/v1/completions", '{"prompt": ["a", "b"]}', 400, "prompt"),
    ("/v1/nothing", "{}", 404, None),
])
def test_a_bad_request_gets_its_status_and_an_openai_error(server, path, body, status, param):
    answer = post(server, path, body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert error["message"] and error["param"] == param and "Traceback" not in answer.text
    assert server.openai().models.list().data  # (and the server answers the next request)


def test_ollama_errors_are_its_own_shape(server):
    answer = post(server, "/api/chat", '{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], '
                                       '"options": {"temperature": "warm"}}')
    assert answer.status_code == 400 and answer.json() == {"error": "options.temperature must be a number"}
    answer = post(server, "/api/generate", '{"model": "tiny", "prompt": "hi", "format": "yaml"}')
    assert answer.status_code == 400 and "format" in answer.json()["error"]


def test_a_body_over_16_mib_is_refused_before_it_is_read(server):
    big = b'{"prompt": "' + b"a" * (16 << 20) + b'"}'
    answer = post(server, "/v1/completions", big)
    assert answer.status_code == 413 and "16 MiB" in answer.json()["error"]["message"]

    def chunks():  # (no Content-Length: refused as it comes)
        for _ in range(17):
            yield b"a" * (1 << 20)

    assert post(server, "/api/generate", chunks()).status_code == 413
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}


def test_a_prompt_longer_than_the_context_is_400_naming_both(server):
    answer = post(server, "/v1/completions", json.dumps({"prompt": "hello " * 1500}))
    assert answer.status_code == 400
    assert re.search(r"the prompt is \d+ tokens, the context holds 1024", answer.json()["error"]["message"])


def test_the_next_turn_of_a_conversation_reads_only_its_new_tokens(server):
    client = server.openai()
    turn = [{"role": "user", "content": "Tell me a story about a lighthouse keeper and the sea."}]
    first = client.chat.completions.create(model="tiny", messages=turn, max_tokens=12, **GREEDY)
    turn += [{"role": "assistant", "content": first.choices[0].message.content},
             {"role": "user", "content": "And then?"}]
    second = client.chat.completions.create(model="tiny", messages=turn, max_tokens=12, **GREEDY)
    cached = second.usage.prompt_tokens_details.cached_tokens
    # (its cells were kept where the first turn's answer ended: only the new turn is read)
    assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens


# --- structured output --------------------------------------------------------------------------

VERDICT = {"type": "object", "properties": {"answer": {"enum": ["yes", "no", "maybe"]},
                                            "score": {"type": "integer", "minimum": 0}},
           "required": ["answer", "score"], "additionalProperties": False}


def test_openai_parse_with_a_pydantic_model_gives_an_instance_of_it(server):
    from typing import Literal

    from pydantic import BaseModel

    class Verdict(BaseModel):
        answer: Literal["yes", "no", "maybe"]
        score: int

    completion = server.openai().chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "Is the sky blue? Answer in JSON."}],
        response_format=Verdict, max_tokens=200, **GREEDY)
    parsed = completion.choices[0].message.parsed  # (the client validated it against the model)
    assert isinstance(parsed, Verdict) and completion.choices[0].finish_reason == "stop"


def test_ollama_format_with_a_schema_gives_an_answer_that_validates(server):
    import jsonschema

    for stream in (False, True):
        reply = server.ollama().chat(model="tiny", messages=[{"role": "user", "content": "Is it raining?"}],
                                     format=VERDICT, options={"temperature": 0, "num_predict": 200}, stream=stream)
        text = reply.message.content if not stream else "".join(part.message.content for part in reply)
        jsonschema.validate(json.loads(text), VERDICT)


# --- the engine behind -----------------------------------------------------------------------


def test_a_client_that_goes_away_mid_stream_frees_its_sequence(server):
    before = server.metrics().get('edgeinfer_answers_total{reason="cancelled"}', 0)
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5000, "stream": True}  # (to the context)
    with httpx.stream("POST", server.url + "/v1/completions", json=body) as answer:
        lines = answer.iter_lines()
        assert [next(lines) for _ in range(6)]
        assert server.metrics()["edgeinfer_sequences_active"] == 1
    wait_for(lambda: server.metrics().get('edgeinfer_answers_total{reason="cancelled"}', 0) == before + 1,
             "the sequence is cancelled")
    metrics = server.metrics()
    assert metrics["edgeinfer_sequences_active"] == metrics["edgeinfer_kv_cells_used"] == 0
    assert metrics["edgeinfer_sequences_waiting"] == 0


def test_metrics_count_requests_tokens_and_latency(server):
    before = server.metrics()
    answer = chat(server.openai(), QUESTIONS[1], max_tokens=10)
    after = server.metrics()
    key = 'edgeinfer_requests_total{endpoint="/v1/chat/completions",status="200"}'
    assert after[key] == before.get(key, 0) + 1
    assert after["edgeinfer_generated_tokens_total"] - before["edgeinfer_generated_tokens_total"] == 10
    assert after["edgeinfer_prompt_tokens_total"] - before["edgeinfer_prompt_tokens_total"] == answer.usage.prompt_tokens
    assert after["edgeinfer_time_to_first_token_seconds_count"] == before["edgeinfer_time_to_first_token_seconds_count"] + 1
    assert any(re.match(r"POST /v1/chat/completions 200 \d+\+10 tokens length", line) for line in server.lines)


# --- servers of their own ----------------------------------------------------------------------


def test_an_api_key_is_required_and_compared(q8, home):
    keyed = start(home, q8, "--parallel", "1", "--ctx-size", "256", env={"EDGEINFER_API_KEY": "sesame"})
    try:
        assert chat(keyed.openai(api_key="sesame"), "hi", max_tokens=4).usage.completion_tokens == 4
        with pytest.raises(openai.AuthenticationError):
            chat(keyed.openai(api_key="sesame2"), "hi")
        with pytest.raises(ollama.ResponseError) as refused:
            keyed.ollama().list()
        assert refused.value.status_code == 401
        assert keyed.ollama(headers={"Authorization": "Bearer sesame"}).list().models
        assert httpx.get(keyed.url + "/health").status_code == 200  # (health answers anyone)
        assert httpx.get(keyed.url + "/metrics").status_code == 401
        assert keyed.stop() == 0
    finally:
        keyed.kill()


@contextlib.contextmanager
def streaming(server: Server, max_tokens: int) -> Iterator[Iterator[str]]:
    """A streamed completion under way: its lines, the first one already read."""
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=120) as answer:
        lines = answer.iter_lines()
        assert next(lines).startswith("data: ")
        yield lines


def test_a_full_queue_answers_503_with_retry_after_and_sigterm_lets_the_answer_finish(q8, home):
    # (an answer long enough to be under way while the client below is refused, however slow it is to start)
    busy = start(home, q8, "--parallel", "1", "--queue", "0", "--ctx-size", "4096", "--grace", "60")
    try:
        with streaming(busy, 3000) as lines:
            with pytest.raises(openai.InternalServerError) as full:
                chat(busy.openai(), "hi")
            assert full.value.status_code == 503 and full.value.response.headers["Retry-After"] == "1"
            busy.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert busy.process.wait(60) == 0
    finally:
        busy.kill()


def test_an_answer_still_under_way_when_the_grace_is_over_ends_with_a_503_error_event(q8, home):
    busy = start(home, q8, "--parallel", "1", "--ctx-size", "4096", "--grace", "0")
    try:
        with streaming(busy, 4000) as lines:
            busy.process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        error = json.loads(rest[-1][6:])["error"]
        assert error["code"] == "shutting_down" and "stopped before the answer was complete" in error["message"]
        assert busy.process.wait(60) == 0
    finally:
        busy.kill()


def test_a_port_in_use_is_one_line_before_the_model_loads(q8, home, server):
    port = server.url.rsplit(":", 1)[1]
    taken = run_edgeinfer("serve", "-m", q8, "--port", port, env={"EDGEINFER_HOME": str(home)})
    assert taken.exit_code == 2 and f"cannot listen on 127.0.0.1:{port}" in taken.error_line


# --- --draft: a request answered alone speculates -------------------------------------------


@pytest.mark.parametrize("draft", ["ngram", "close"])
def test_with_draft_a_request_alone_speculates_and_every_answer_is_the_plain_one(server, q8, home, tiny_family,
                                                                                 draft):
    """Greedy answers are the plain server's, alone (speculative rounds) as beside others (plain batched
    steps), and /metrics counts the drafts verified and accepted."""
    if draft == "close":  # (a draft model that agrees with the target most of the time)
        draft = str(tiny_family.close_draft)
    repeating = "Hello world! Hello world! Hello world! Hello world!"  # (prompt lookup finds copies in it)
    questions = [repeating, *QUESTIONS]
    plain = {q: chat(server.openai(), q, max_tokens=48).choices[0].message.content for q in questions}
    fast = start(home, q8, "--parallel", "2", "--ctx-size", "1024", "--draft", draft)
    try:
        client = fast.openai()
        alone = {q: streamed_chat(client, q, max_tokens=48)[0] for q in questions}
        assert alone == plain
        counts = fast.metrics()
        assert counts["edgeinfer_speculative_rounds_total"] > 0
        assert 0 < counts["edgeinfer_speculative_accepted_tokens_total"] <= counts["edgeinfer_speculative_drafted_tokens_total"]

        together: dict[str, str] = {}

        def ask(question: str) -> None:
            together[question] = chat(fast.openai(), question, max_tokens=48).choices[0].message.content

        threads = [threading.Thread(target=ask, args=(q,)) for q in questions]  # (5 clients, 2 sequences)
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert together == plain
        assert wait_for(lambda: fast.metrics()["edgeinfer_sequences_active"] == 0 or None, "the batch emptied")
        assert fast.stop() == 0
    finally:
        fast.kill()


def test_a_draft_that_cannot_pair_is_refused_before_the_server_listens(q8, home, tiny_family):
    refused = run_edgeinfer("serve", "-m", q8, "--draft", str(tiny_family.other_vocab), env={"EDGEINFER_HOME": str(home)})
    assert refused.exit_code != 0 and "cannot pair with" in refused.error_line


def test_a_host_beyond_loopback_without_a_key_is_warned_about():
    from edgeinfer.serve import ServeOptions

    assert ServeOptions(host="0.0.0.0").warnings() and ServeOptions(host="::1").warnings() == []
    assert ServeOptions(host="0.0.0.0", api_key="k").warnings() == [] and ServeOptions().warnings() == []
