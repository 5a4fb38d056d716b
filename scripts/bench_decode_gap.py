"""Single-sequence decode speed: a bare ctypes loop over a libllama, against llama-batched-bench.

Asks why edgeinfer's B = 1 decode measured 0.93x of llama.cpp's own `llama-batched-bench` S_TG. Times the
same work (32-token prompt, then 64 decodes of one token) several ways, each in its own process,
interleaved round by round (who goes first rotates), and prints the CPU, medians, and two ratios against
the first variant: of the medians, and the median of each round's ratio (steadier on a shared machine):

- a ctypes loop (one token per llama_decode, after a 32-token prompt, as batched-bench does) over
  llama-cpp-python's libllama (`wheel`) or over any other build's folder (`--lib NAME=DIR`, loaded
  through LLAMA_CPP_LIB_PATH), with context settings varied one at a time (`--variant NAME=k:v,...`);
- edgeinfer's batched engine itself (`--edgeinfer`);
- `llama-batched-bench -npp 32 -ntg 64,64,.. -npl 1` itself (`--tools-bin DIR`).

    PYTHONPATH=$PWD /work/main/.venv/bin/python scripts/bench_decode_gap.py \\
        --model /tmp/benchhome/models/qwen2.5-coder-0.5b-instruct/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf \\
        --tools-bin /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin \\
        --lib tools=/tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin --rounds 6

Context keys for --variant: n_ctx, n_ubatch, flash_attn (-1 auto, 0 off, 1 on), kv_unified (0/1),
no_perf (0/1), n_seq (n_seq_max), repack (model use_extra_bufts, 0/1), sample (1: feed back the argmax
of the logits, as greedy decoding does, instead of random tokens), lib (a --lib name).
`--edgeinfer` runs bench.aggregate_generation at B = 1 (greedy, n_ctx = prompt + decode + 8, as
scripts/bench_batch.py loads it). Take the quiet lock while it runs (a 0.5B round is ~30 s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time

N_PROMPT, N_GEN = 32, 64
DEFAULTS = {"n_ctx": 2048, "n_ubatch": 512, "flash_attn": -1, "kv_unified": 0, "no_perf": 1, "n_seq": 1,
            "repack": 1, "sample": 0, "lib": "wheel"}


def cpu_name() -> str:
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f", {os.cpu_count()} logical CPUs"
    return platform.processor()


def worker(model: str, threads: int, reps: int, cfg: dict) -> None:
    """One process: load, then `reps` times clear the cache, read a prompt, decode N_GEN tokens one by one."""
    import llama_cpp.llama_cpp as ll
    import numpy as np

    ll.llama_backend_init()
    mp = ll.llama_model_default_params()
    mp.n_gpu_layers = 0
    mp.use_extra_bufts = bool(cfg["repack"])
    mdl = ll.llama_model_load_from_file(model.encode(), mp)
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = cfg["n_ctx"], cfg["n_ubatch"], cfg["n_ubatch"]
    cp.n_seq_max, cp.kv_unified = cfg["n_seq"], bool(cfg["kv_unified"])
    cp.flash_attn_type, cp.no_perf = cfg["flash_attn"], bool(cfg["no_perf"])
    cp.n_threads = cp.n_threads_batch = threads
    ctx = ll.llama_init_from_model(mdl, cp)
    mem = ll.llama_get_memory(ctx)
    n_vocab = ll.llama_vocab_n_tokens(ll.llama_model_get_vocab(mdl))
    batch = ll.llama_batch_init(max(N_PROMPT, 16), 0, 1)
    rng = random.Random(0)
    next_token = [0]

    def decode(start: int, n: int, last_logits: bool) -> None:
        batch.n_tokens = n
        for i in range(n):
            token = next_token[0] if cfg["sample"] and n == 1 else rng.randrange(n_vocab)
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = token, start + i, 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = last_logits and i == n - 1
        if ll.llama_decode(ctx, batch) != 0:
            raise SystemExit("llama_decode failed")
        ll.llama_synchronize(ctx)
        if cfg["sample"] and last_logits:
            next_token[0] = int(np.argmax(np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

    decode(0, 16, False)  # warm up, as batched-bench does
    speeds = []
    for _ in range(reps):
        ll.llama_memory_clear(mem, False)
        decode(0, N_PROMPT, True)
        t0 = time.perf_counter()
        for i in range(N_GEN):
            decode(N_PROMPT + i, 1, True)
        speeds.append(N_GEN / (time.perf_counter() - t0))
    print(json.dumps({"speeds": speeds, "n_ctx": ll.llama_n_ctx(ctx)}))


def run_ours(args, cfg: dict, libs: dict) -> float:
    env = dict(os.environ)
    if cfg["lib"] != "wheel":
        env["LLAMA_CPP_LIB_PATH"] = libs[cfg["lib"]]
    cmd = [sys.executable, __file__, "--worker", json.dumps(cfg), "--model", args.model,
           "--threads", str(args.threads), "--reps", str(args.reps)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return statistics.median(json.loads(out.strip().splitlines()[-1])["speeds"])


def run_edgeinfer(args) -> float:
    cmd = [sys.executable, __file__, "--worker", "edgeinfer", "--model", args.model,
           "--threads", str(args.threads), "--reps", str(args.reps)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return statistics.median(json.loads(out.strip().splitlines()[-1])["speeds"])


def edgeinfer_worker(model: str, threads: int, reps: int) -> None:
    from pathlib import Path

    from edgeinfer.bench import aggregate_generation
    from edgeinfer.engine import LoadOptions

    options = LoadOptions(n_ctx=N_PROMPT + N_GEN + 8, n_threads=threads)
    speeds = [aggregate_generation(Path(model), options, 1, N_PROMPT, N_GEN)[0] for _ in range(reps)]
    print(json.dumps({"speeds": speeds}))


def run_tools(args) -> float:
    cmd = [os.path.join(args.tools_bin, "llama-batched-bench"), "-m", args.model, "-c", "2048", "-b", "512",
           "-ub", "512", "-npp", str(N_PROMPT), "-ntg", ",".join([str(N_GEN)] * args.reps), "-npl", "1",
           "-t", str(args.threads), "--output-format", "jsonl"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines() if line.startswith('{"n_kv_max"')]
    return statistics.median(r["speed_tg"] for r in rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3, help="timed decodes per process (median taken)")
    p.add_argument("--rounds", type=int, default=6, help="processes per variant, interleaved")
    p.add_argument("--tools-bin", help="folder with llama-batched-bench: adds it as variant 'batched-bench'")
    p.add_argument("--lib", action="append", default=[], help="NAME=DIR of another libllama build")
    p.add_argument("--variant", action="append", default=[], help="NAME=key:value,... over the defaults")
    p.add_argument("--edgeinfer", action="store_true", help="add edgeinfer's batched engine at B = 1")
    p.add_argument("--worker")
    args = p.parse_args()
    if args.worker == "edgeinfer":
        return edgeinfer_worker(args.model, args.threads, args.reps)
    if args.worker:
        return worker(args.model, args.threads, args.reps, json.loads(args.worker))

    libs = dict(item.split("=", 1) for item in args.lib)
    variants = {"wheel": dict(DEFAULTS)}
    variants.update({name: dict(DEFAULTS, lib=name) for name in libs})
    for item in args.variant:
        name, spec = item.split("=", 1)
        overrides = dict(kv.split(":", 1) for kv in spec.split(",") if kv)
        variants[name] = dict(DEFAULTS, **{k: (v if k == "lib" else int(v)) for k, v in overrides.items()})
    names = list(variants) + (["edgeinfer"] if args.edgeinfer else []) + (["batched-bench"] if args.tools_bin else [])
    results: dict[str, list[float]] = {n: [] for n in names}
    print(f"CPU: {cpu_name()}; {args.threads} threads; prompt {N_PROMPT}, decode {N_GEN} tokens; model {args.model}")
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]  # rotate who goes first each round
        for n in order:
            if n == "batched-bench":
                results[n].append(run_tools(args))
            elif n == "edgeinfer":
                results[n].append(run_edgeinfer(args))
            else:
                results[n].append(run_ours(args, variants[n], libs))
        print(f"round {r + 1}: " + "  ".join(f"{n} {results[n][-1]:.2f}" for n in names), flush=True)
    base = statistics.median(results[names[0]])
    # The machine is shared: the median of each round's ratio is steadier than the ratio of the medians.
    print(f"\n{'variant':<16} {'median tok/s':>12} {'vs ' + names[0]:>10} {'per-round':>10}   settings")
    for n in names:
        med = statistics.median(results[n])
        paired = statistics.median(a / b for a, b in zip(results[n], results[names[0]]))
        what = {"batched-bench": "llama-batched-bench -c 2048 -b 512 -ub 512",
                "edgeinfer": f"aggregate_generation B=1, n_ctx {N_PROMPT + N_GEN + 8}"}.get(n, variants.get(n))
        print(f"{n:<16} {med:12.2f} {med / base:10.3f} {paired:10.3f}   {what}")


if __name__ == "__main__":
    main()
