"""Benchmark `edgeinfer quantize` on a generated ~100M-parameter model (not a timed test).

    .venv/bin/python scripts/bench_quantize.py [--reps 5] [--threads N] [--type Q4_K_M]

What it measures, each in a fresh child process (so that memory and imports are
the child's own):
- conversion HF safetensors (BF16) -> GGUF (BF16): wall time and peak RSS, set
  beside the size of the largest tensor and of the whole model. The child's RSS
  at rest (Python, numpy, gguf imported) is measured too and shown apart;
- quantization of that GGUF: edgeinfer's `quantize()` (child process, store
  registration and sha256 included) against one direct `llama_model_quantize`
  call timed around the C call alone, interleaved (the order alternates each
  repetition), medians and their ratio, in wall time and in CPU time;
- the same on a 1.5M-parameter model, where the difference is edgeinfer's fixed
  cost alone.
The CPU model and the load average are printed beside the figures: on a shared
machine the load says how much to trust them.
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
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

# ~101M parameters: 12 layers of hidden 768 (12 heads of 64, 4 KV heads), feed-forward 2048, vocab 16384, untied head.
SHAPE = dict(arch="llama", dtype="bfloat16", hidden=768, ff=2048, heads=12, kv_heads=4, layers=12, vocab_size=16384)

# Peak RSS from VmHWM: unlike getrusage's ru_maxrss, it starts afresh at exec, not at the parent's peak.
_CONVERT = """
import json, re, sys, time
from pathlib import Path
from edgeinfer.convert import convert_hf_to_gguf
def hwm():
    return int(re.search(r"VmHWM:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1])
rest = hwm()
t = time.perf_counter()
if sys.argv[3] == "convert":
    convert_hf_to_gguf(Path(sys.argv[1]), Path(sys.argv[2]))
print(json.dumps({"seconds": time.perf_counter() - t, "rest_kib": rest, "peak_kib": hwm()}))
"""

# CPU seconds (user + system, all threads, and for edgeinfer its quantizer child too) are reported beside
# wall time: on a shared machine, wall time also measures the neighbours.
_DIRECT = """
import ctypes, json, resource, sys, time
import llama_cpp
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
quiet = llama_cpp.llama_log_callback(lambda *a: None)  # kept referenced: llama.cpp calls it later
llama_cpp.llama_log_set(quiet, ctypes.c_void_p(0))
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + sys.argv[3])
params.nthread = int(sys.argv[4])
t, c = time.perf_counter(), cpu()
status = llama_cpp.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), ctypes.byref(params))
assert status == 0
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c}))
"""

_EDGEINFER = """
import json, resource, sys, time
from pathlib import Path
from edgeinfer.quantize import quantize
from edgeinfer.store import Store
def cpu():
    return sum(r.ru_utime + r.ru_stime for r in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)))
t, c = time.perf_counter(), cpu()
quantize(sys.argv[1], qtype=sys.argv[3], output=Path(sys.argv[2]), threads=int(sys.argv[4]) or None,
         force=True, evaluate=False, store=Store(Path(sys.argv[5])))
print(json.dumps({"seconds": time.perf_counter() - t, "cpu": cpu() - c}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="quantizer threads for both (0: all cores)")
    parser.add_argument("--type", default="Q4_K_M")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-quantize-") as tmp:
        work = Path(tmp)
        folder = generate(work / "Bench100M")
        gguf_path = work / "Bench100M-BF16.gguf"
        conversion(folder, gguf_path, args.reps)
        quantization(gguf_path, work, args)
        fixed_cost(work, args.reps)
    print(machine().split(" | ")[-1].replace("load", "load at the end"))


def machine() -> str:
    from edgeinfer.machine import cpu_name, physical_cores

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"CPU: {cpu_name()} | {physical_cores()} physical cores, {os.cpu_count()} logical | load {load}"


def generate(folder: Path) -> Path:
    from hfmodels import make_hf_model
    from edgeinfer.convert.weights import index_weights

    started = time.perf_counter()
    make_hf_model(folder, **SHAPE)
    entries = index_weights(folder).values()
    params = sum(e.n_elements for e in entries)
    largest = max(entries, key=lambda e: e.nbytes)
    print(f"model: {params / 1e6:.1f}M parameters, BF16 safetensors {mib(sum(e.nbytes for e in entries))}; "
          f"largest tensor {largest.name} {largest.shape}: {mib(largest.nbytes)} as BF16, {mib(largest.nbytes * 2)} as F32 "
          f"(generated in {time.perf_counter() - started:.1f} s)")
    return folder


def conversion(folder: Path, output: Path, reps: int) -> None:
    rest = child(_CONVERT, folder, output, "rest")
    runs = [child(_CONVERT, folder, output, "convert") for _ in range(reps)]
    seconds = statistics.median(r["seconds"] for r in runs)
    peak = max(r["peak_kib"] for r in runs) * 1024
    at_rest = rest["peak_kib"] * 1024
    print(f"conversion HF BF16 -> GGUF BF16: median {seconds:.2f} s over {reps} runs ({mib(output.stat().st_size)} written); "
          f"peak RSS {mib(peak)}, of which {mib(at_rest)} is the interpreter with numpy and gguf at rest; "
          f"conversion's own: {mib(peak - at_rest)}")


def quantization(source: Path, work: Path, args) -> None:
    runs: dict[str, list[dict]] = {"llama_model_quantize": [], "edgeinfer quantize()": []}
    for rep in range(args.reps):
        order = [("llama_model_quantize", _DIRECT), ("edgeinfer quantize()", _EDGEINFER)]
        for label, code in order if rep % 2 == 0 else reversed(order):
            out = work / f"out-{args.type}.gguf"
            out.unlink(missing_ok=True)
            runs[label].append(child(code, source, out, args.type, args.threads, work / "home"))
    for label, results in runs.items():
        walls = ", ".join(f"{r['seconds']:.2f}" for r in results)
        print(f"quantization {args.type} ({label}): median wall {median(results, 'seconds'):.2f} s [{walls}], "
              f"median CPU {median(results, 'cpu'):.2f} s")
    direct, ours = runs.values()
    for key, what in (("seconds", "wall"), ("cpu", "CPU")):
        ratio = median(ours, key) / median(direct, key)
        print(f"edgeinfer / direct ({what}): {ratio:.3f} (overhead {100 * (ratio - 1):+.1f}%, "
              f"{median(ours, key) - median(direct, key):+.2f} s)")


def fixed_cost(work: Path, reps: int) -> None:
    """The same comparison on a 1.5M-parameter model, where quantizing costs almost nothing: edgeinfer's fixed cost."""
    from hfmodels import make_hf_model
    from edgeinfer.convert import convert_hf_to_gguf

    tiny = convert_hf_to_gguf(make_hf_model(work / "Tiny", "llama"), work / "Tiny-F32.gguf").path
    direct, ours = [], []
    for rep in range(reps * 2):
        for results, code in ((direct, _DIRECT), (ours, _EDGEINFER))[:: 1 if rep % 2 == 0 else -1]:
            (work / "tiny-out.gguf").unlink(missing_ok=True)
            results.append(child(code, tiny, work / "tiny-out.gguf", "Q4_K_M", 1, work / "home"))
    print(f"fixed cost (1.5M-parameter model, 1 thread, {reps * 2} runs each): edgeinfer "
          f"{median(ours, 'seconds') - median(direct, 'seconds'):+.2f} s wall, "
          f"{median(ours, 'cpu') - median(direct, 'cpu'):+.2f} s CPU over the direct call")


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def child(code: str, *argv) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"benchmark child failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


if __name__ == "__main__":
    main()
