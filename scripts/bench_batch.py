#!/usr/bin/env python3
"""Batched generation on real models (not a test): aggregate speed against llama.cpp's own, and `run --batch`.

1. For each model and B in --parallel: edgeinfer's aggregate generation speed with B sequences in one
   context (B copies of a short prompt, greedy, --tg tokens each), against llama.cpp's
   `llama-batched-bench` on the same file and threads (with --llama-cpp DIR), interleaved, medians.
   S_TG is B * TG / t_TG, as llama-batched-bench reports it: generated tokens over the time after the
   prompts were read.
2. The physics: v(B), the cost of one pass of B tokens relative to one token (one sequence, logits at
   every row, as a verification pass), and the ideal aggregate speed-up B / v(B), with the share of it
   that edgeinfer reached; beside it v(B) as `run --batch` measures it for its default --parallel (B
   sequences' one token each: batchcost.measure), and the default it would choose. --costs-only: just these.
3. `edgeinfer run --batch` of --jobs prompts against as many sequential `edgeinfer run` processes, wall
   time, with how many answers are identical and peak memory of each.

    .venv/bin/python scripts/bench_batch.py --model qwen2.5-coder-0.5b-instruct --llama-cpp LLAMA_CPP_BUILD/bin
    .venv/bin/python scripts/bench_batch.py --model qwen2.5-coder-1.5b-instruct --model q8.gguf --jobs 0
    .venv/bin/python scripts/bench_batch.py --model qwen2.5-coder-1.5b-instruct --costs-only --reps 3
Models are references as everywhere in edgeinfer (catalog names, pulled when missing, or .gguf paths).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeinfer import batchcost, machine  # noqa: E402
from edgeinfer.bench import aggregate_generation  # noqa: E402
from edgeinfer.engine import LoadOptions, load  # noqa: E402
from edgeinfer.library import Library, locate  # noqa: E402

EDGEINFER = Path(sys.executable).with_name("edgeinfer")
QUESTIONS = [
    "Write a Python function that reverses a linked list.", "Explain what a mutex is in two sentences.",
    "Write a SQL query that counts orders per customer.", "What does the HTTP status code 409 mean?",
    "Write a bash loop that renames *.txt files to *.md.", "Give three uses of a Bloom filter.",
    "Write a Python generator that yields Fibonacci numbers.", "What is the difference between a process and a thread?",
]


def ours(path: Path, batch: int, args) -> float:
    """S_TG of B sequences of one prompt in one context (`edgeinfer bench --parallel` measures the same)."""
    return aggregate_generation(path, LoadOptions(n_ctx=args.pp + args.tg + 8, n_threads=args.threads), batch,
                                args.pp, args.tg)[0]


def llama_batched_bench(folder: Path, path: Path, batch: int, args) -> float:
    tool = folder / "llama-batched-bench"
    out = subprocess.run([str(tool), "-m", str(path), "-c", str(batch * (args.pp + args.tg + 8)), "-b", "2048",
                          "-ub", "512", "-npp", str(args.pp), "-ntg", str(args.tg), "-npl", str(batch),
                          "-t", str(args.threads), "--output-format", "jsonl"], capture_output=True, text=True, check=True)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    return float(rows[-1]["speed_tg"])


def pass_costs(path: Path, sizes: list[int], args) -> dict[int, float]:
    """v(B): one pass of B tokens (one sequence, logits at every row) over one token, medians of 5."""
    with load(path, LoadOptions(n_ctx=256, n_threads=args.threads)) as model:
        model.prefill(list(range(100, 132)))
        times = {}
        for b in [1, *sizes]:
            samples = []
            for _ in range(6):
                start = time.perf_counter()
                model.decode(list(range(200, 200 + b)), all_logits=True)
                samples.append(time.perf_counter() - start)
                model.truncate(32)
            times[b] = statistics.median(samples[1:])
    return {b: times[b] / times[1] for b in sizes}


def row_costs(path: Path, sizes: list[int], args) -> list[dict[int, float]]:
    """v(B) as `run --batch` measures it (B sequences, one token each), --reps times, on one loaded context."""
    with load(path, LoadOptions(n_ctx=256, n_threads=args.threads, n_seq=max(sizes))) as model:
        return [batchcost.measure(model, sizes).ratios for _ in range(args.reps)]


def whole_runs(model: str, args) -> dict:
    """`run --batch` of the jobs against as many sequential `run`s: wall time, identical answers, peak RSS."""
    prompts = [QUESTIONS[i % len(QUESTIONS)] + ("" if i < len(QUESTIONS) else f" (variant {i})") for i in range(args.jobs)]
    common = ["-m", model, "--temperature", "0", "-n", str(args.jobs_tokens), *(["-t", str(args.threads)])]
    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "prompts.jsonl"
        file.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(prompts)))
        batch_s, batch_rss, out = _timed([str(EDGEINFER), "run", *common, "--batch", str(file)])
        answers = {row["id"]: row["text"] for row in map(json.loads, out.splitlines())}
        start, single, rss = time.perf_counter(), {}, 0
        for i, p in enumerate(prompts):
            _, peak, text = _timed([str(EDGEINFER), "run", *common, "--json", p])
            single[str(i)], rss = json.loads(text)["text"], max(rss, peak)
        sequential_s = time.perf_counter() - start
    same = sum(answers.get(k) == v for k, v in single.items())
    return {"jobs": args.jobs, "tokens": args.jobs_tokens, "batch_s": batch_s, "sequential_s": sequential_s,
            "speedup": sequential_s / batch_s, "identical": same, "peak_rss_batch_mib": batch_rss,
            "peak_rss_single_mib": rss}


def _timed(command: list[str]) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (MiB, by GNU time) and stdout of one process."""
    with tempfile.NamedTemporaryFile("r") as peak:
        start = time.perf_counter()
        done = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", peak.name, *command], capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            raise SystemExit(f"{' '.join(command[:4])} ... failed: {done.stderr.strip()[-300:]}")
        return wall, int(peak.read().split()[-1]) // 1024, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="model reference (repeatable; default: the 0.5B)")
    parser.add_argument("--parallel", default="1,2,4,8", help="batch sizes B")
    parser.add_argument("--pp", type=int, default=32, help="prompt tokens of each sequence")
    parser.add_argument("--tg", type=int, default=64, help="generated tokens of each sequence")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=machine.usable_cores())
    parser.add_argument("--llama-cpp", type=Path, default=None, metavar="DIR",
                        help="folder of llama.cpp's llama-batched-bench, built from the llama.cpp llama-cpp-python vendors")
    parser.add_argument("--jobs", type=int, default=32, help="prompts for the run --batch comparison (0: skip it)")
    parser.add_argument("--jobs-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--costs-only", action="store_true", help="only v(B), both ways, and the default --parallel")
    args = parser.parse_args()
    sizes = [int(b) for b in args.parallel.split(",")]
    lib = Library.open()
    report = {"cpu": machine.cpu_name(), "flags": machine.cpu_flags(), "threads": args.threads, "pp": args.pp,
              "tg": args.tg, "reps": args.reps, "models": []}
    for ref in args.model or ["qwen2.5-coder-0.5b-instruct"]:
        path = locate(lib, ref, pull_missing=True)
        measured = row_costs(path, sizes, args)
        rows_v = {b: statistics.median(m[b] for m in measured) for b in sizes}
        default = batchcost.choose_parallel(batchcost.StepCosts(rows_v, 0.0), max(sizes))
        print(f"  {path.name}: v(B) of B sequences' rows, each of {args.reps} measurements: "
              f"{[{b: round(v, 2) for b, v in m.items()} for m in measured]}; default --parallel {default}", flush=True)
        if args.costs_only:
            report["models"].append({"model": ref, "path": str(path), "v_rows": rows_v, "default_parallel": default,
                                     "measurements": measured})
            continue
        speeds: dict[str, dict[int, list[float]]] = {"edgeinfer": {b: [] for b in sizes}, "llama-batched-bench": {b: [] for b in sizes}}
        for rep in range(args.reps):
            for b in sizes if rep % 2 == 0 else sizes[::-1]:
                sides = ["edgeinfer", "llama-batched-bench"] if args.llama_cpp else ["edgeinfer"]
                for side in sides if (rep + b) % 2 == 0 else sides[::-1]:
                    s = ours(path, b, args) if side == "edgeinfer" else llama_batched_bench(args.llama_cpp, path, b, args)
                    speeds[side][b].append(s)
                    print(f"  {path.name} B={b} rep {rep} {side:20s} S_TG {s:7.2f} tok/s", flush=True)
        v = pass_costs(path, sizes, args)
        rows = []
        for b in sizes:
            row = {"B": b, "edgeinfer_s_tg": statistics.median(speeds["edgeinfer"][b]), "v": round(v[b], 2),
                   "ideal_speedup": round(b / v[b], 2), "v_rows": round(rows_v[b], 2)}
            row["speedup"] = row["edgeinfer_s_tg"] / statistics.median(speeds["edgeinfer"][1]) if 1 in sizes else None
            row["share_of_ideal"] = row["speedup"] / row["ideal_speedup"] if row["speedup"] else None
            if args.llama_cpp:
                row["llama_s_tg"] = statistics.median(speeds["llama-batched-bench"][b])
                row["vs_llama"] = row["edgeinfer_s_tg"] / row["llama_s_tg"]
            rows.append(row)
        entry = {"model": ref, "path": str(path), "rows": rows, "default_parallel": default}
        if args.jobs:
            entry["run_batch"] = whole_runs(ref, args)
        report["models"].append(entry)
        print_model(entry)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


def print_model(entry: dict) -> None:
    print(f"\n{entry['model']}:")
    print(f"  (run --batch's default --parallel here: {entry['default_parallel']})")
    print("  B   S_TG ours  llama-b-b   ours/llama   v(B)  B/v(B)  speed-up  share of ideal  v(B) of B rows")
    for r in entry["rows"]:
        llama = f"{r['llama_s_tg']:9.2f}  {r['vs_llama']:10.3f}x" if "llama_s_tg" in r else f"{'-':>9}  {'-':>11}"
        share = f"{r['share_of_ideal']:.0%}" if r["share_of_ideal"] else "-"
        print(f"  {r['B']:<3} {r['edgeinfer_s_tg']:9.2f}  {llama}  {r['v']:5.2f}  {r['ideal_speedup']:6.2f}  "
              f"{(r['speedup'] or 0):7.2f}x  {share:>8}  {r['v_rows']:14.2f}")
    if "run_batch" in entry:
        rb = entry["run_batch"]
        print(f"  run --batch of {rb['jobs']} prompts ({rb['tokens']} tokens): {rb['batch_s']:.1f} s against "
              f"{rb['sequential_s']:.1f} s for sequential runs: {rb['speedup']:.2f}x; identical answers "
              f"{rb['identical']}/{rb['jobs']}; peak RSS {rb['peak_rss_batch_mib']} MiB (one run: {rb['peak_rss_single_mib']} MiB)")


if __name__ == "__main__":
    main()
