#!/usr/bin/env python3
"""`edgeinfer serve` against llama.cpp's `llama-server` (not a test): N concurrent streaming clients.

For each N in --clients, both servers are started on the same GGUF with N sequences (`--parallel N`;
llama-server `-np N`, continuous batching, the same context per sequence and the same threads), and rounds
alternate between them (interleaved, the first of each pair alternating). In a round N clients each send
one streamed /v1/chat/completions request at once (their own question, new in every round, greedy,
--max-tokens). Reported per
server and N, medians over the rounds: aggregate output tok/s (tokens of all clients over the round's wall
time), time to first token p50 and p99, per-request tok/s p50 (tokens after the first over the time after
the first), end-to-end p50 and p99, failures, peak memory (the server process' VmHWM); and the ratios
edgeinfer / llama-server.

    .venv/bin/python scripts/bench_serve.py --model /tmp/benchhome/models/.../qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --llama-server LLAMA_CPP/build/bin/llama-server --clients 1,2,4,8 --rounds 3

With --draft REF a third server runs, `edgeinfer serve --draft REF` (a request alone speculates), and with
--llama-draft PATH llama-server gets that draft model (`-md PATH`); --prompts edits asks for code edits,
which quote their code (where speculation pays), in place of questions:

    .venv/bin/python scripts/bench_serve.py --model …1.5b….gguf --llama-server … --clients 1,2 \\
        --draft qwen2.5-coder-0.5b-instruct --llama-draft …0.5b….gguf --prompts edits --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from bench_speculative import EDITS  # noqa: E402 (code edits that quote their code)

QUESTIONS = [
    "Write a Python function that reverses a linked list.", "Explain what a mutex is, with an example.",
    "Write a SQL query that counts orders per customer.", "What does the HTTP status code 409 mean?",
    "Write a bash loop that renames *.txt files to *.md.", "Give three uses of a Bloom filter.",
    "Write a Python generator that yields Fibonacci numbers.", "What is the difference between a process and a thread?",
]


class Process:
    def __init__(self, name: str, command: list[str], url: str, env: dict | None = None) -> None:
        self.name, self.url = name, url
        try:
            httpx.get(url + "/health", timeout=2)
        except httpx.HTTPError:
            pass  # (nothing there: the port is ours)
        else:
            raise SystemExit(f"something already answers on {url} (a server left from an earlier run?)")
        self.log = open(f"/tmp/bench_serve_{name}.log", "w")
        self.popen = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      env={**os.environ, **(env or {})}, cwd=REPO)
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if self.popen.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{name} did not start: see /tmp/bench_serve_{name}.log")
            time.sleep(0.2)

    def peak_mib(self) -> float:
        text = Path(f"/proc/{self.popen.pid}/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+) kB", text).group(1)) / 1024

    def stop(self) -> None:
        self.popen.terminate()
        try:
            self.popen.wait(30)
        except subprocess.TimeoutExpired:
            self.popen.kill()
        self.log.close()


def one_request(url: str, question: str, max_tokens: int, out: dict) -> None:
    """A streamed chat completion; its times (from the send) and token count into `out`."""
    body = {"model": "m", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    start, first, tokens = time.perf_counter(), None, 0
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as answer:
            if answer.status_code != 200:
                out["error"] = f"status {answer.status_code}"
                return
            for line in answer.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    tokens = data["usage"]["completion_tokens"]
                choices = data.get("choices") or []
                if first is None and choices and choices[0].get("delta", {}).get("content"):
                    first = time.perf_counter()
    except httpx.HTTPError as exc:
        out["error"] = repr(exc)
        return
    end = time.perf_counter()
    first = first or end
    out.update(ttft=first - start, e2e=end - start, tokens=tokens,
               speed=(tokens - 1) / (end - first) if tokens > 1 and end > first else 0.0)


def round_of(url: str, clients: int, max_tokens: int, tag: str, prompts: list[str] = QUESTIONS) -> dict:
    """N clients at once; `tag` starts each question, so that no server answers from a prompt it cached in
    an earlier round (llama-server keeps a slot's prompt: the same question again reads one token)."""
    outs = [{} for _ in range(clients)]
    threads = [threading.Thread(target=one_request, args=(url, f"({tag}.{i}) {prompts[i % len(prompts)]}",
                                                          max_tokens, outs[i]))
               for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    good = [o for o in outs if "error" not in o]
    return {"aggregate": sum(o["tokens"] for o in good) / wall, "ttft": [o["ttft"] for o in good],
            "e2e": [o["e2e"] for o in good], "speed": [o["speed"] for o in good], "tokens": [o["tokens"] for o in good],
            "failures": len(outs) - len(good)}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


def start_servers(args, n: int) -> list[Process]:
    """edgeinfer, edgeinfer --draft (with --draft), then llama-server (with -md, given --llama-draft)."""
    def ours(name: str, port: int, *more: str) -> Process:
        return Process(name, [sys.executable, "-m", "edgeinfer", "serve", "-m", args.model, "--port", str(port),
                              "--parallel", str(n), "--ctx-size", str(args.ctx), "--threads", str(args.threads),
                              "--alias", "m", *more], f"http://127.0.0.1:{port}", env={"PYTHONPATH": str(REPO)})

    drafting = ["-md", args.llama_draft] if args.llama_draft else []  # (its own defaults for the rest)
    starts = [lambda: ours("edgeinfer", 18301)]
    if args.draft:
        starts.append(lambda: ours("edgeinfer-draft", 18303, "--draft", args.draft))
    starts.append(lambda: Process("llama-server", [args.llama_server, "-m", args.model, "--port", "18302", "-np", str(n),
                                                   "-c", str(args.ctx * n), "-t", str(args.threads), "-tb",
                                                   str(args.threads), "-cb", "--no-webui", "-a", "m", *drafting],
                                  "http://127.0.0.1:18302"))
    servers = []
    try:
        for begin in starts:
            servers.append(begin())
    except BaseException:  # (one failed to start: the others must not outlive the script on their ports)
        for server in servers:
            server.stop()
        raise
    return servers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a .gguf path (both servers load the same file)")
    parser.add_argument("--llama-server", required=True)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--ctx", type=int, default=2048, help="context per sequence")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--draft", help="also edgeinfer serve --draft REF (a model reference or path, or ngram)")
    parser.add_argument("--llama-draft", help="a draft .gguf for llama-server (-md)")
    parser.add_argument("--prompts", choices=("questions", "edits"), default="questions")
    args = parser.parse_args()
    prompts = EDITS if args.prompts == "edits" else QUESTIONS
    rows = []
    for n in map(int, args.clients.split(",")):
        servers = start_servers(args, n)
        try:
            for server in servers:  # (a warm-up round each: first-call costs out of the figures)
                round_of(server.url, n, 32, "warm-up", prompts)
            results = {s.name: [] for s in servers}
            for r in range(args.rounds):
                for server in (servers if r % 2 == 0 else servers[::-1]):
                    results[server.name].append(round_of(server.url, n, args.max_tokens, f"{n}.{r}", prompts))
            for server in servers:
                rounds = results[server.name]
                every = lambda key: [v for one in rounds for v in one[key]]  # noqa: E731
                rows.append({"N": n, "server": server.name,
                             "aggregate_tok_s": statistics.median(one["aggregate"] for one in rounds),
                             "ttft_p50_ms": 1000 * percentile(every("ttft"), 0.5),
                             "ttft_p99_ms": 1000 * percentile(every("ttft"), 0.99),
                             "request_tok_s_p50": percentile(every("speed"), 0.5),
                             "e2e_p50_s": percentile(every("e2e"), 0.5), "e2e_p99_s": percentile(every("e2e"), 0.99),
                             "failures": sum(one["failures"] for one in rounds), "peak_mib": server.peak_mib(),
                             "tokens": sum(every("tokens"))})
        finally:
            for server in servers:
                server.stop()
        print(json.dumps(rows[-len(servers):]), file=sys.stderr, flush=True)
    print("| N | server | aggregate tok/s | TTFT p50 / p99 ms | request tok/s p50 | e2e p50 / p99 s | failures | "
          "peak MiB | tokens |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['N']} | {row['server']} | {row['aggregate_tok_s']:.1f} | {row['ttft_p50_ms']:.0f} / "
              f"{row['ttft_p99_ms']:.0f} | {row['request_tok_s_p50']:.1f} | {row['e2e_p50_s']:.2f} / "
              f"{row['e2e_p99_s']:.2f} | {row['failures']} | {row['peak_mib']:.0f} | {row['tokens']} |")
    print("\nratios to llama-server:")
    for ours in rows:
        theirs = next(row for row in rows if row["N"] == ours["N"] and row["server"] == "llama-server")
        if ours is not theirs:
            print(f"  N={ours['N']} {ours['server']}: aggregate {ours['aggregate_tok_s'] / theirs['aggregate_tok_s']:.2f}x, "
                  f"TTFT p50 {ours['ttft_p50_ms'] / theirs['ttft_p50_ms']:.2f}x, "
                  f"peak memory {ours['peak_mib'] - theirs['peak_mib']:+.0f} MiB")


if __name__ == "__main__":
    main()
