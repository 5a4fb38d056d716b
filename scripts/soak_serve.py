#!/usr/bin/env python3
"""A soak of `edgeinfer serve` (not a test; loopback only, bounded in count and time).

--clients clients (default 32) each send --requests requests (default 8), streamed or whole, Ollama or
OpenAI, at once against one server: a quarter of the streams hang up after a few chunks, a tenth of the
requests are malformed (bad JSON, a wrong type, an unknown model). Afterwards: the server still answers,
no sequence is active or waiting and no KV cell is held (/metrics), its resident memory grew by at most
5% from after a warm-up, and no answer was a 5xx other than 503 (a full queue). Prints the counts.

    .venv/bin/python scripts/soak_serve.py --model /tmp/benchhome/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
MALFORMED = [("/v1/chat/completions", b"{not json"),
             ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}'),
             ("/api/chat", b'{"model": "elsewhere", "messages": [{"role": "user", "content": "hi"}]}'),
             ("/v1/completions", b'{"prompt": 42}')]


def rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+) kB", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    return {name: float(value) for name, value in re.findall(r"^(\S+) (\S+)$", text, re.M)}


def client(url: str, number: int, requests: int, max_tokens: int, counts: collections.Counter, lock) -> None:
    rng = random.Random(number)
    for i in range(requests):
        kind = rng.random()
        try:
            if kind < 0.1:  # malformed
                path, body = rng.choice(MALFORMED)
                status = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"},
                                    timeout=120).status_code
                outcome = f"malformed {status}"
            elif kind < 0.35:  # a stream that hangs up after a few chunks
                body = {"model": "m", "messages": [{"role": "user", "content": f"Tell a story number {i}."}],
                        "max_tokens": 400, "stream": True}
                with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as answer:
                    status = answer.status_code
                    for n, _ in enumerate(answer.iter_lines()):
                        if n >= 3:
                            break
                outcome = f"hung up {status}"
            elif kind < 0.7:
                body = {"model": "m", "messages": [{"role": "user", "content": f"Say something about {i}."}],
                        "max_tokens": max_tokens, "stream": rng.random() < 0.5}
                status = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).status_code
                outcome = f"openai {status}"
            else:
                body = {"model": "m", "prompt": f"Count to {i}.", "options": {"num_predict": max_tokens},
                        "stream": rng.random() < 0.5}
                status = httpx.post(url + "/api/generate", json=body, timeout=300).status_code
                outcome = f"ollama {status}"
        except httpx.HTTPError as exc:
            outcome = f"client error {type(exc).__name__}"
        with lock:
            counts[outcome] += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--queue", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=600, help="the soak is stopped after this long")
    parser.add_argument("--draft", help="serve --draft REF: a request alone speculates (its rounds soaked too)")
    args = parser.parse_args()
    url = "http://127.0.0.1:18311"
    log = open("/tmp/soak_serve.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "edgeinfer", "serve", "-m", args.model, "--port", "18311",
                               "--parallel", str(args.parallel), "--queue", str(args.queue), "--alias", "m",
                               "--ctx-size", "1024", *(["--draft", args.draft] if args.draft else [])],
                              stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    try:
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        for _ in range(2):  # (a warm-up: the memory baseline is taken after it)
            httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        before = rss_mib(server.pid)
        counts: collections.Counter = collections.Counter()
        lock = threading.Lock()
        threads = [threading.Thread(target=client, args=(url, n, args.requests, args.max_tokens, counts, lock),
                                    daemon=True) for n in range(args.clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, args.seconds - (time.perf_counter() - start)))
        seconds = time.perf_counter() - start
        deadline = time.monotonic() + 60  # (hung-up streams are cancelled at the next step)
        while (m := metrics(url))["edgeinfer_sequences_active"] and time.monotonic() < deadline:
            time.sleep(0.2)
        after = rss_mib(server.pid)
        still = httpx.post(url + "/v1/chat/completions", timeout=120,
                           json={"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
        cancelled = m.get('edgeinfer_answers_total{reason="cancelled"}', 0)
        bad = {k: v for k, v in counts.items() if re.search(r" 5\d\d$", k) and not k.endswith(" 503")}
        print(f"{sum(counts.values())} requests in {seconds:.0f} s: " + ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
        print(f"afterwards: next request {still.status_code}; active {m['edgeinfer_sequences_active']:.0f}, "
              f"waiting {m['edgeinfer_sequences_waiting']:.0f}, KV cells held {m['edgeinfer_kv_cells_used']:.0f}; "
              f"cancelled answers {cancelled:.0f}")
        print(f"memory: {before:.0f} MiB after the warm-up, {after:.0f} MiB after ({100 * (after / before - 1):+.1f}%)")
        print(f"5xx other than 503: {sum(bad.values())} {bad or ''}")
        ok = (still.status_code == 200 and not bad and m["edgeinfer_kv_cells_used"] == 0
              and m["edgeinfer_sequences_active"] == 0 and after <= before * 1.05)
        print("PASS" if ok else "FAIL")
    finally:
        server.terminate()
        server.wait(60)
        log.close()


if __name__ == "__main__":
    main()
