#!/usr/bin/env python3
"""Generation speed when another program shares the CPU, and what the cost book learns from it.

Each measurement is one whole `edgeinfer run --json` process (greedy, --tokens), so the
default's thread choice at load is part of what is measured. Three conditions:
  idle  nothing else runs (beyond what the machine already does: check the load average);
  hog   one busy-loop process runs throughout;
  flap  a process busy for 2 s, idle for 2 s, over and over.
In each, the configurations run interleaved (the order rotates every repetition) and
medians are reported, with ratios to the best fixed thread count of the same condition:
  default        edgeinfer's choice (no --threads);
  -t N           each fixed thread count from 1 to the usable cores;
  -t N spin=S    -t N with OpenMP's barrier spin count set (GOMP_SPINCOUNT, --spin; 0 is
                 OMP_WAIT_POLICY=PASSIVE); -t <usable cores> alone is edgeinfer's default before
                 threads.py (the "today's default" of the issue);
  llama-bench    llama.cpp's own tool with its default threads (--llama-cpp DIR), where given.

--draft-target T --draft D adds the cost book check: with a fresh store, a plain run and a
`--draft auto` run idle (the fresh book's speed-up); with another fresh store, a --draft run
under the hog first, then the same pair idle. The two idle speed-ups should agree.

Usage:
    python scripts/bench_shared_cpu.py --model smol.gguf --model coder-1.5b-q4_k_m.gguf --reps 3
    python scripts/bench_shared_cpu.py --model smol.gguf --spin 300000,10000,1000,0   # the spin sweep
    python scripts/bench_shared_cpu.py --model smol.gguf --llama-cpp ~/llama.cpp/build/bin
    python scripts/bench_shared_cpu.py --draft-target q8.gguf --draft coder-0.5b.gguf --conditions idle
Models are .gguf paths or catalog names (resolved in the store, pulled if missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PROMPT = "Write a Python function that parses an ISO 8601 date string and returns a datetime, with error handling."


def busy_loop(seconds_on: float, seconds_off: float, limit: float) -> subprocess.Popen:
    """A child that keeps one core busy (flapping on and off if seconds_off > 0), ending by itself after limit."""
    code = ("import time\nend = time.time() + %r\nwhile time.time() < end:\n"
            "    t = time.time() + %r\n    while time.time() < t: pass\n    time.sleep(%r)\n") % (
        limit, seconds_on, seconds_off)
    return subprocess.Popen([sys.executable, "-c", code])


@contextmanager
def condition(name: str, limit: float = 3600.0):
    hog = {"idle": None, "hog": (limit, 0.0), "flap": (2.0, 2.0)}[name]
    child = busy_loop(hog[0], hog[1], limit) if hog else None
    try:
        if child:
            time.sleep(0.5)  # the load is there before the run starts, as it would be for a user
        yield
    finally:
        if child:
            child.kill()
            child.wait()


def edgeinfer_run(model: str, tokens: int, extra: list[str], env: dict, home: Path) -> dict:
    cmd = [sys.executable, "-m", "edgeinfer", "run", "-m", model, "-n", str(tokens), "--temperature", "0",
           "--json", "--stats", *extra, PROMPT]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**env, "EDGEINFER_HOME": str(home)}, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {out.stderr.strip()[-400:]}")
    data = json.loads(out.stdout)
    return {"tok_s": data["generation_tokens_per_second"], "total_s": data["total_s"],
            "threads": data.get("threads"), "speculative": data.get("speculative")}


def llama_bench(folder: Path, model: str, tokens: int, env: dict) -> dict:
    cmd = [str(folder / "llama-bench"), "-m", model, "-p", "0", "-n", str(tokens), "-r", "1", "-o", "json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"llama-bench failed: {out.stderr.strip()[-400:]}")
    return {"tok_s": json.loads(out.stdout)[0]["avg_ts"]}


def configurations(args, usable: int) -> dict[str, tuple[list[str], dict]]:
    """name -> (extra run options, environment changes)."""
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    configs = {"default": ([], base)}
    for n in range(1, usable + 1):
        configs[f"-t {n}"] = ([ "-t", str(n)], base)
    for spin in args.spin:
        configs[f"-t {usable} spin={spin}"] = (["-t", str(usable)], {**base, "GOMP_SPINCOUNT": spin})
    return configs


def bench_model(model: str, args, usable: int, home: Path) -> dict:
    configs = configurations(args, usable)
    names = list(configs) + (["llama-bench"] if args.llama_cpp else [])
    results: dict = {}
    for cond in args.conditions:
        samples: dict[str, list[dict]] = {n: [] for n in names}
        with condition(cond):
            for rep in range(args.reps):
                order = names[rep % len(names):] + names[:rep % len(names)]
                for name in order:
                    if name == "llama-bench":
                        samples[name].append(llama_bench(args.llama_cpp, model, args.tokens, configs["default"][1]))
                    else:
                        extra, env = configs[name]
                        samples[name].append(edgeinfer_run(model, args.tokens, extra, env, home))
        medians = {n: statistics.median(s["tok_s"] for s in samples[n]) for n in names}
        best_fixed = max(medians[f"-t {n}"] for n in range(1, usable + 1))
        results[cond] = {n: {"tok_s": round(medians[n], 2), "vs_best_fixed": round(medians[n] / best_fixed, 3),
                             "runs": [round(s["tok_s"], 1) for s in samples[n]],
                             "threads": [s.get("threads") for s in samples[n]] if n == "default" else None}
                         for n in names}
        line = "  ".join(f"{n}: {medians[n]:.1f} ({medians[n] / best_fixed:.2f}x)" for n in names)
        print(f"{Path(model).name} {cond}: {line}", flush=True)
    return results


def bench_cost_book(args, work: Path) -> dict:
    """The speed-up of --draft auto idle with a fresh cost book, against idle after a contended first run."""
    extra = ["--draft", args.draft]

    def speedup(home: Path) -> tuple[float, dict]:
        plain = edgeinfer_run(args.draft_target, args.tokens, [], dict(os.environ), home)
        spec = edgeinfer_run(args.draft_target, args.tokens, extra, dict(os.environ), home)
        return spec["tok_s"] / plain["tok_s"], spec["speculative"]

    out = {"fresh": [], "after_contended": []}
    for rep in range(args.reps):
        fresh, contended = work / f"fresh{rep}", work / f"contended{rep}"
        for home in (fresh, contended):
            home.mkdir()
        with condition("hog"):
            edgeinfer_run(args.draft_target, args.tokens, extra, dict(os.environ), contended)
        for label, home in (("fresh", fresh), ("after_contended", contended))[:: 1 if rep % 2 == 0 else -1]:
            ratio, stats = speedup(home)
            out[label].append(round(ratio, 3))
            print(f"cost book {label}: {ratio:.3f}x ({stats and stats.get('drafter')}, "
                  f"{stats and stats.get('skipped') or ''})", flush=True)
    out["median_fresh"] = statistics.median(out["fresh"])
    out["median_after_contended"] = statistics.median(out["after_contended"])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", default=[], help=".gguf path or catalog name (repeatable)")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--conditions", default="idle,hog,flap")
    parser.add_argument("--spin", default="", help="GOMP_SPINCOUNT values to compare at the most threads, e.g. "
                        "300000,10000,1000,0 (libgomp's default is 300000)")
    parser.add_argument("--llama-cpp", type=Path, help="folder with llama.cpp's llama-bench (not built here)")
    parser.add_argument("--draft-target", help="target for the cost book check (the issue: the Q8_0 1.5B)")
    parser.add_argument("--draft", default="auto", help="--draft value for the cost book check")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    args.conditions = args.conditions.split(",")
    args.spin = [s for s in args.spin.split(",") if s]

    from edgeinfer import machine

    usable = machine.usable_cores()
    report = {"cpu": f"{machine.cpu_name()} {' '.join(machine.cpu_flags())}", "usable_cores": usable,
              "tokens": args.tokens, "reps": args.reps, "date": time.strftime("%Y-%m-%d"), "models": {}}
    print(f"CPU: {report['cpu']}; usable cores {usable}; load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        home = Path(os.environ.get("EDGEINFER_HOME", work / "home"))
        for model in args.model:
            report["models"][model] = bench_model(model, args, usable, home)
        if args.draft_target:
            report["cost_book"] = bench_cost_book(args, work)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
