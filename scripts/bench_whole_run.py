#!/usr/bin/env python3
"""`edgeinfer run --draft` against plain `edgeinfer run`, timed as whole processes: what a user waits for.

Start-up, loading the target, loading the draft and its reading of the prompt, any one-time measurement and
the answer all count. For each prompt a plain run and a --draft run, in alternating order (ABBA), repeated;
the figure per prompt is the median of plain wall time / --draft wall time (above 1: --draft was faster).
The first pairs run on a cost book that knows nothing (`speculation-costs.json` is set aside and restored
afterwards): a user's first --draft runs on this machine are part of the figure, and reported on their own.
Goal (issue 27): >= 0.97 on every prompt, first runs included.

    .venv/bin/python scripts/bench_whole_run.py --target /tmp/models/q8.gguf --draft qwen2.5-coder-0.5b-instruct
    .venv/bin/python scripts/bench_whole_run.py --target qwen2.5-coder-1.5b-instruct --draft auto --reps 2
    .venv/bin/python scripts/bench_whole_run.py --target /tmp/models/q8.gguf --draft ngram --edits 4 --learned
Models are references as everywhere in edgeinfer; EDGEINFER_HOME (or --home) must hold them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_speculative import CODING, EDITS  # noqa: E402 (the same prompts as the in-process benchmark)
from edgeinfer import machine  # noqa: E402

EDGEINFER = Path(sys.executable).with_name("edgeinfer")


def whole_run(target: str, prompt: str, args, draft: str | None) -> dict:
    """One `edgeinfer run` as a process: its wall time and, for --draft, what it said on stderr."""
    command = [str(EDGEINFER), "run", "-m", target, "--temperature", "0", "-n", str(args.max_tokens), "--json",
               *(["-t", str(args.threads)] if args.threads else []), *(["--draft", draft] if draft else []), prompt]
    start = time.perf_counter()
    # (as an installed package runs: its modules compiled once, not on every start)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    done = subprocess.run(command, capture_output=True, text=True, env={**env, "EDGEINFER_HOME": str(args.home)})
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command[:6])} ... failed: {done.stderr.strip()}")
    out = json.loads(done.stdout)
    spec = out.get("speculative", {})
    return {"wall_s": wall, "tokens": out["completion_tokens"], "cache_type": out.get("cache_type"),
            "drafter": spec.get("drafter"), "speedup_in_loop": spec.get("speedup"), "said": done.stderr.strip(),
            "text": out["text"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="qwen2.5-coder-1.5b-instruct")
    parser.add_argument("--draft", default="auto", help="as run --draft: auto, ngram or a model reference")
    parser.add_argument("--prompts", type=int, default=4, help="coding prompts (at most 8)")
    parser.add_argument("--edits", type=int, default=0, help="code-edit prompts (at most 4)")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--reps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="default: run's own choice")
    parser.add_argument("--home", type=Path, default=Path(os.environ.get("EDGEINFER_HOME", Path.home() / ".edgeinfer")))
    parser.add_argument("--learned", action="store_true",
                        help="before timing, two untimed --draft runs of 128 tokens learn this machine's costs (both "
                             "cache types): the figure of a user's later runs")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    prompts = [("code", p) for p in CODING[: args.prompts]] + [("edit", p) for p in EDITS[: args.edits]]
    book = args.home / "speculation-costs.json"
    kept = book.with_suffix(".json.bench-kept")
    if book.exists():
        shutil.move(book, kept)  # the first --draft runs start from nothing, as on a new machine
    rows = []
    try:
        if args.learned:
            for kind, prompt in prompts[:2]:
                whole_run(args.target, prompt, argparse.Namespace(**{**vars(args), "max_tokens": 128}), args.draft)
        for rep in range(args.reps):
            for i, (kind, prompt) in enumerate(prompts):
                order = ("plain", "draft") if (rep + i) % 2 == 0 else ("draft", "plain")
                done = {m: whole_run(args.target, prompt, args, args.draft if m == "draft" else None) for m in order}
                row = {"rep": rep, "prompt": i, "kind": kind, "first": len(rows) < 2 and not args.learned,
                       "plain": done["plain"],
                       "draft": done["draft"], "ratio": done["plain"]["wall_s"] / done["draft"]["wall_s"],
                       "same_answer": done["plain"]["text"] == done["draft"]["text"]}
                rows.append(row)
                d = done["draft"]
                print(f"rep {rep} prompt {i} ({kind}) plain {done['plain']['wall_s']:6.2f} s  draft {d['wall_s']:6.2f} s"
                      f"  ratio {row['ratio']:.3f}  {d['drafter']} {d['cache_type']}"
                      f"{'  [' + d['said'].splitlines()[0][:90] + ']' if d['said'] else ''}", flush=True)
    finally:
        if kept.exists():
            shutil.move(kept, book)
    per_prompt = {i: statistics.median(r["ratio"] for r in rows if r["prompt"] == i) for i in range(len(prompts))}
    report = {"cpu": machine.cpu_name(), "flags": machine.cpu_flags(), "target": args.target, "draft": args.draft,
              "learned_first": args.learned,
              "max_tokens": args.max_tokens, "reps": args.reps, "threads": args.threads,
              "median_ratio": statistics.median(r["ratio"] for r in rows),
              "per_prompt_median_ratio": per_prompt, "worst_prompt": min(per_prompt.values()),
              "first_runs": [round(r["ratio"], 3) for r in rows if r["first"]],
              "plain_median_s": statistics.median(r["plain"]["wall_s"] for r in rows),
              "draft_median_s": statistics.median(r["draft"]["wall_s"] for r in rows), "rows": rows}
    print(f"\n{report['cpu']}: {args.target} --draft {args.draft}, -n {args.max_tokens}, {len(prompts)} prompts x "
          f"{args.reps}: median plain/draft {report['median_ratio']:.3f}, worst prompt {report['worst_prompt']:.3f}, "
          f"first runs {report['first_runs']}, plain {report['plain_median_s']:.2f} s, "
          f"draft {report['draft_median_s']:.2f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
