#!/usr/bin/env python3
"""What edgeinfer's token loop costs over llama.cpp itself, and how fast chat answers.

1. Generation tok/s and time to first token of edgeinfer's engine (the loop behind
   `edgeinfer run`) against two baselines on the same model file and threads:
   - `ctypes loop`: the leanest loop llama-cpp-python allows (llama_decode of one
     token, numpy argmax over llama_get_logits_ith), i.e. llama.cpp's own cost;
   - `Llama.generate`: llama-cpp-python's high-level greedy generator.
   Repetitions are interleaved (A B C, B C A, ...) so that machine noise hits all
   alike; medians and ratios are reported. Greedy, same prompt, fresh KV cache.
2. Chat time to first token at turn 1 and turn 10 of a conversation (default
   model), the KV cache reused across turns as `edgeinfer chat` does.
3. With --whole-process: what a user waits for, start-up included. `edgeinfer run
   -n N` as a whole process against the five-line llama-cpp-python script a user
   would write instead (`Llama(model_path, n_ctx, n_threads, verbose=False)`, one
   greedy chat completion of the same prompt), interleaved, medians of wall time
   and peak RSS, and `edgeinfer --help`. Goal: `run -n 1` within 1.15x the script.

Usage:
    python scripts/bench_generation.py --model smollm2-135m-instruct --model qwen2.5-coder-1.5b-instruct
    python scripts/bench_generation.py --reps 3 --tokens 64          # quicker
    python scripts/bench_generation.py --whole-process --model smollm2-135m-instruct --reps 10
Models are catalog names (pulled if missing) or .gguf paths.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from edgeinfer import machine
from edgeinfer.chat import ChatSession, Conversation
from edgeinfer.engine import LoadOptions, generate, load
from edgeinfer.library import Library, locate
from edgeinfer.sampling import SamplingParams
from edgeinfer.template import chat_tokens

PROMPT = "Write a Python function that parses an ISO 8601 date string and returns a datetime, with error handling and a docstring."
GREEDY = SamplingParams(temperature=0)
CHAT_QUESTIONS = [
    "What is a hash map?", "How does it handle collisions?", "What is the load factor?", "When should it resize?",
    "What does resizing cost?", "Compare it with a binary search tree.", "Which is better for range queries?",
    "What about memory use?", "Give a one-line summary.", "And one more tip?",
]


def edgeinfer_run(model, prompt_tokens: list[int], n: int) -> tuple[float, float, int]:
    model.truncate(0)
    result = generate(model, prompt_tokens, GREEDY, max_tokens=n)
    return result.generation_tokens_per_second, result.time_to_first_token, result.completion_tokens


def ctypes_loop(ctx_state, prompt_tokens: list[int], n: int) -> tuple[float, float, int]:
    """llama_decode + argmax, nothing else: the floor any Python loop over llama.cpp can reach."""
    import llama_cpp

    llm = ctx_state
    llama_cpp.llama_memory_seq_rm(llama_cpp.llama_get_memory(llm.ctx), 0, 0, -1)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model))
    batch = llama_cpp.llama_batch_init(max(len(prompt_tokens), 1), 0, 1)
    try:
        start = time.perf_counter()
        _fill(batch, prompt_tokens, 0)
        llama_cpp.llama_decode(llm.ctx, batch)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, len(prompt_tokens) - 1), shape=(n_vocab,))
        token = int(np.argmax(logits))
        first = time.perf_counter()
        pos = len(prompt_tokens)
        for _ in range(n - 1):
            _fill(batch, [token], pos)
            llama_cpp.llama_decode(llm.ctx, batch)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, 0), shape=(n_vocab,))
            token = int(np.argmax(logits))
            pos += 1
        end = time.perf_counter()
    finally:
        llama_cpp.llama_batch_free(batch)
    return (n - 1) / (end - first), first - start, n


def _fill(batch, tokens: list[int], pos0: int) -> None:
    for i, t in enumerate(tokens):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, pos0 + i, 1
        batch.seq_id[i][0] = 0
        batch.logits[i] = i == len(tokens) - 1
    batch.n_tokens = len(tokens)


def llama_generate(llm, prompt_tokens: list[int], n: int) -> tuple[float, float, int]:
    llm.reset()
    start = time.perf_counter()
    first = None
    count = 0
    for _token in llm.generate(prompt_tokens, temp=0.0, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter()
        if count >= n:
            break
    end = time.perf_counter()
    return (count - 1) / (end - first), first - start, count


class RawContext:
    """A bare llama.cpp model and context, created the way edgeinfer creates its own."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        import llama_cpp

        llama_cpp.llama_log_set(_SILENT, ctypes.c_void_p(0))
        mp = llama_cpp.llama_model_default_params()
        mp.n_gpu_layers = 0
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), mp)
        cp = llama_cpp.llama_context_default_params()
        cp.n_ctx, cp.n_batch, cp.n_ubatch = n_ctx, 512, 512
        cp.n_threads = cp.n_threads_batch = threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, cp)


def _silent(level, text, user):
    pass


def bench_model(name: str, path: Path, reps: int, n: int, threads: int) -> dict:
    from llama_cpp import Llama

    ours = load(path, LoadOptions(n_ctx=1024, n_threads=threads))
    prompt_tokens = chat_tokens(ours, [{"role": "user", "content": PROMPT}])
    raw = RawContext(path, 1024, threads)
    llm = Llama(model_path=str(path), n_ctx=1024, n_threads=threads, n_threads_batch=threads, flash_attn=True, verbose=False)
    variants = {"edgeinfer": lambda: edgeinfer_run(ours, prompt_tokens, n),
                "ctypes loop": lambda: ctypes_loop(raw, prompt_tokens, n),
                "Llama.generate": lambda: llama_generate(llm, prompt_tokens, n)}
    for fn in variants.values():  # warm-up: page the weights in
        fn()
    samples = {k: [] for k in variants}
    names = list(variants)
    for rep in range(reps):
        for k in names[rep % len(names):] + names[: rep % len(names)]:
            samples[k].append(variants[k]())
    ours.close()
    llm.close()
    row = {"model": name, "prompt_tokens": len(prompt_tokens), "new_tokens": n}
    for k, runs in samples.items():
        row[k] = {"tok_s": statistics.median(r[0] for r in runs), "ttft_ms": 1000 * statistics.median(r[1] for r in runs),
                  "tokens": statistics.median(r[2] for r in runs)}
    for base in ("ctypes loop", "Llama.generate"):
        row[f"speed vs {base}"] = row["edgeinfer"]["tok_s"] / row[base]["tok_s"]
        row[f"ttft vs {base}"] = row["edgeinfer"]["ttft_ms"] / row[base]["ttft_ms"]
    return row


def bench_chat(path: Path, reps: int, threads: int, answer_tokens: int) -> dict:
    turn1, turn10 = [], []
    for _ in range(reps):
        model = load(path, LoadOptions(n_ctx=4096, n_threads=threads))
        session = ChatSession(model, Conversation("bench", GREEDY), max_tokens=answer_tokens)
        ttfts = [session.ask(q).result.time_to_first_token for q in CHAT_QUESTIONS]
        turn1.append(ttfts[0] * 1000)
        turn10.append(ttfts[9] * 1000)
        model.close()
    t1, t10 = statistics.median(turn1), statistics.median(turn10)
    return {"turn1_ttft_ms": t1, "turn10_ttft_ms": t10, "turn10_over_turn1": t10 / t1, "answer_tokens": answer_tokens,
            "turn1_all_ms": turn1, "turn10_all_ms": turn10}


# --- whole processes --------------------------------------------------------------------------

BARE_SCRIPT = """
import sys
from llama_cpp import Llama
path, n, threads, n_ctx, prompt = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False)
out = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=n, temperature=0)
print(out["choices"][0]["message"]["content"])
"""


def timed_process(cmd: list[str]) -> tuple[float, int, float]:
    """Wall seconds, peak RSS (MiB) and CPU seconds (user + system, steadier on a busy machine) of one
    whole process, its output discarded."""
    import os
    import subprocess

    # As an installed package has them: the warm-up writes the .pyc files that an editable checkout under
    # PYTHONDONTWRITEBYTECODE would otherwise compile again on every run (~0.1 s of edgeinfer's start-up).
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({proc.returncode}): {proc.stderr.read().decode()[-400:]}")
    proc.stderr.close()
    return wall, usage.ru_maxrss // 1024, usage.ru_utime + usage.ru_stime  # (Linux gives the RSS in KiB)


def bench_processes(path: Path, reps: int, counts: list[int], threads: int, n_ctx: int) -> dict:
    edgeinfer = str(Path(sys.executable).with_name("edgeinfer"))
    commands = {"--help": {"edgeinfer --help": [edgeinfer, "--help"]}}
    for n in counts:
        commands[f"-n {n}"] = {
            "edgeinfer run": [edgeinfer, "run", "-m", str(path), "-n", str(n), "--temp", "0", "-t", str(threads),
                              "-c", str(n_ctx), PROMPT],
            "llama-cpp-python script": [sys.executable, "-c", BARE_SCRIPT, str(path), str(n), str(threads), str(n_ctx), PROMPT],
        }
    rows = {}
    for test, variants in commands.items():
        for cmd in variants.values():  # warm-up: the weights and the Python files in the page cache
            timed_process(cmd)
        samples = {k: [] for k in variants}
        names = list(variants)
        for rep in range(reps):
            for k in names[rep % len(names):] + names[: rep % len(names)]:
                samples[k].append(timed_process(variants[k]))
        rows[test] = {k: {"wall_s": statistics.median(s[0] for s in runs), "peak_rss_mib": statistics.median(s[1] for s in runs),
                          "cpu_s": statistics.median(s[2] for s in runs), "all_wall_s": [round(s[0], 4) for s in runs]}
                      for k, runs in samples.items()}
        if "llama-cpp-python script" in rows[test]:
            ours, bare = rows[test]["edgeinfer run"], rows[test]["llama-cpp-python script"]
            rows[test]["wall_ratio"] = ours["wall_s"] / bare["wall_s"]
    return rows


def report_processes(name: str, rows: dict) -> None:
    print(f"\n{name}: whole processes, {PROMPT[:40]!r}...")
    for test, row in rows.items():
        for k, v in row.items():
            if isinstance(v, dict):
                print(f"  {test:8s} {k:24s} {v['wall_s']:7.3f} s  (CPU {v['cpu_s']:6.3f} s)  peak RSS {v['peak_rss_mib']:5.0f} MiB")
        if "wall_ratio" in row:
            goal = "  (goal for -n 1: <= 1.15x)" if test == "-n 1" else ""
            print(f"  {test:8s} edgeinfer / script: {row['wall_ratio']:.3f}x wall time{goal}")
    sys.stdout.flush()


_SILENT = None


def main() -> None:
    global _SILENT
    import llama_cpp

    _SILENT = llama_cpp.llama_log_callback(_silent)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="model to measure (repeatable)")
    parser.add_argument("--chat-model", default=None, help="model for the chat test (default: the catalog's default)")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--chat-answer-tokens", type=int, default=48)
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--whole-process", action="store_true",
                        help="time `edgeinfer run -n N` and a bare llama-cpp-python script as whole processes")
    parser.add_argument("--process-tokens", type=int, action="append",
                        help="N of the whole-process runs (repeatable; default 1 and 96)")
    parser.add_argument("--ctx", type=int, default=4096, help="context of the whole-process runs")
    args = parser.parse_args()
    lib = Library.open()
    models = args.model or [lib.catalog.default]
    if args.whole_process:
        print(f"CPU: {machine.cpu_name()}; threads {args.threads}; context {args.ctx}; greedy; "
              f"{args.reps} interleaved repetitions after a warm-up, medians", flush=True)
        results = {name: bench_processes(locate(lib, name), args.reps, args.process_tokens or [1, 96], args.threads, args.ctx)
                   for name in models}
        for name, rows in results.items():
            report_processes(name, rows)
        if args.json:
            args.json.write_text(json.dumps({"cpu": machine.cpu_name(), "threads": args.threads, "processes": results}, indent=2))
        return

    print(f"CPU: {machine.cpu_name()} ({' '.join(machine.cpu_flags())}); threads {args.threads}; greedy; "
          f"{args.reps} interleaved repetitions, medians", flush=True)
    rows = []
    for name in models:
        row = bench_model(name, locate(lib, name), args.reps, args.tokens, args.threads)
        rows.append(row)
        print(f"\n{name}: prompt {row['prompt_tokens']} tokens, {args.tokens} new tokens")
        for k in ("edgeinfer", "ctypes loop", "Llama.generate"):
            print(f"  {k:15s} {row[k]['tok_s']:8.2f} tok/s   first token {row[k]['ttft_ms']:7.1f} ms")
        for base in ("ctypes loop", "Llama.generate"):
            print(f"  edgeinfer / {base}: generation {row[f'speed vs {base}']:.3f}x, first token {row[f'ttft vs {base}']:.3f}x")
        sys.stdout.flush()
    chat = bench_chat(locate(lib, args.chat_model), args.reps, args.threads, args.chat_answer_tokens)
    print(f"\nchat ({args.chat_model or lib.catalog.default}, answers of up to {args.chat_answer_tokens} tokens): "
          f"first token at turn 1 {chat['turn1_ttft_ms']:.0f} ms, at turn 10 {chat['turn10_ttft_ms']:.0f} ms "
          f"({chat['turn10_over_turn1']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"cpu": machine.cpu_name(), "models": rows, "chat": chat}, indent=2))


if __name__ == "__main__":
    main()
