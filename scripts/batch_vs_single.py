"""Do llama.cpp's batch and one-token passes give the same logits for a model (not a test)?

Speculative decoding verifies drafts in a batch; it is exact only if a batch scores
each position exactly as one-token decoding would (`run --draft` measures which pass
sizes do, and verifies no longer ones). This prints the largest logit difference
between a 4-token pass and one-token steps, with llama.cpp's weight repacking on (as
`run` loads a model) and off, and a one-token step's time.

    .venv/bin/python scripts/batch_vs_single.py qwen2.5-coder-1.5b-instruct [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edgeinfer import machine  # noqa: E402
from edgeinfer.engine import LoadOptions, load  # noqa: E402
from edgeinfer.library import Library, locate  # noqa: E402

TEXT = "def merge(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n" * 3


def measure(path: Path, repack: bool, threads: int, n: int = 4, reps: int = 16) -> tuple[float, float]:
    with load(path, LoadOptions(n_ctx=1024, n_threads=threads, repack=repack)) as model:
        tokens = model.tokenize(TEXT, add_special=False)
        model.prefill(tokens[:-n])
        base = len(model.cached)
        singles = np.stack([model.decode([t])[0].copy() for t in tokens[-n:]])
        model.truncate(base)
        batch = model.decode(tokens[-n:], all_logits=True).copy()
        model.truncate(base)
        start = time.perf_counter()
        for t in tokens[-n:] * (reps // n):
            model.decode([t])
        step = (time.perf_counter() - start) / reps
        return float(np.abs(batch - singles).max()), step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="+", help="model references")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    lib = Library.open()
    print(f"CPU: {machine.cpu_name()} ({' '.join(machine.cpu_flags())}); threads {args.threads}")
    for ref in args.model:
        path = locate(lib, ref)
        for repack in (True, False):
            diff, step = measure(path, repack, args.threads)
            print(f"{ref}: repack {'on ' if repack else 'off'}  max |batch - one-token| logit {diff:.4f}  "
                  f"one-token step {step * 1000:.1f} ms")


if __name__ == "__main__":
    main()
