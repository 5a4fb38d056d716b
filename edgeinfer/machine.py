"""Facts about this machine that decide how a model is run: cores, memory, CPU, GPU offload."""

# Also the memory estimate (weights plus KV cache) that lets `run` and `chat` stop
# with a clear message instead of swapping or being killed.

from __future__ import annotations

import functools
import os
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.errors import ResourceError, UsageError
from edgeinfer.ggufinfo import GGUFInfo

MAX_THREADS = 512  # ggml's own limit; far beyond it, OpenMP fails to start threads and llama.cpp crashes
# The KV cache types --cache-type offers: ggml's type id, and bytes per value (q8_0: 34 bytes per 32).
KV_CACHE_TYPES = {"f16": (1, 2.0), "bf16": (30, 2.0), "q8_0": (8, 34 / 32)}
_COMPUTE_OVERHEAD = 64 * 2**20  # compute buffers, a generous allowance for small contexts


def check_threads(threads: int | None, option: str = "--threads") -> None:
    """Refuse a thread count llama.cpp would crash on, naming the option that gave it (None: the default)."""
    if threads is not None and not 1 <= threads <= MAX_THREADS:
        raise UsageError(f"{option} must be between 1 and {MAX_THREADS}")


def physical_cores() -> int:
    """Physical cores this process may use: llama.cpp gains nothing from hyper-threads."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cores = set()
    try:
        text = Path("/proc/cpuinfo").read_text()
        for block in text.split("\n\n"):
            phys = re.search(r"^physical id\s*:\s*(\d+)", block, re.M)
            core = re.search(r"^core id\s*:\s*(\d+)", block, re.M)
            if core:
                cores.add((phys.group(1) if phys else "0", core.group(1)))
    except OSError:
        pass
    return max(1, min(usable, len(cores) or usable))


def usable_cores() -> int:
    """The cores llama.cpp may keep busy: the physical cores, within a container's CPU quota (cgroup v2 or v1)."""
    cores = physical_cores()
    quota = cpu_quota()
    return max(1, min(cores, int(quota + 0.5))) if quota else cores


def cpu_quota() -> float | None:
    """The cores' worth of CPU time a cgroup grants this process per period, if it is limited."""
    for path, parse in (("/sys/fs/cgroup/cpu.max", lambda t: t.split()),
                        ("/sys/fs/cgroup/cpu/cpu.cfs_quota_us", None)):
        try:
            if parse:
                quota, period = parse(Path(path).read_text())
            else:
                quota = Path(path).read_text().strip()
                period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
            if quota not in ("max", "-1") and int(period) > 0:
                return int(quota) / int(period)
        except (OSError, ValueError):
            continue
    return None


@dataclass(frozen=True)
class CpuSample:
    """What the CPUs and this process had done by one moment: the other programs' share follows from two."""

    wall: float  # seconds (monotonic)
    busy: float  # seconds of CPU time all programs had used, all cores together (0 where unknown)
    own: float  # seconds of CPU time this process had used

    def others_since(self, earlier: "CpuSample") -> float:
        """Cores kept busy by other programs between `earlier` and this sample (0 if it cannot tell)."""
        wall = self.wall - earlier.wall
        if wall <= 0 or not self.busy:
            return 0.0
        return max(0.0, ((self.busy - earlier.busy) - (self.own - earlier.own)) / wall)


def cpu_sample() -> CpuSample:
    """/proc/stat's busy time (all but idle and iowait) and this process's own; Linux only (elsewhere 0)."""
    busy = 0.0
    try:
        with open("/proc/stat", "rb") as f:
            fields = f.readline().split()[1:]
        ticks = [int(x) for x in fields[:8]]
        # All but idle and iowait (steal, a hypervisor's other guests, counts: that core is gone).
        busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    times = os.times()
    return CpuSample(time.monotonic(), busy, times.user + times.system)


_last_sample = [cpu_sample()]  # the process's start: a load's window begins here or at the last look


def others_busy(window: float = 0.1, fresh: float = 5.0) -> float:
    """Cores other programs kept busy over the last `window` seconds or more: since the last look (the
    process's start, at first), or over a new window when that was long ago (`fresh` seconds)."""
    earlier = _last_sample[0]
    if time.monotonic() - earlier.wall > fresh:
        earlier = cpu_sample()
    rest = window - (time.monotonic() - earlier.wall)
    if rest > 0:
        time.sleep(rest)
    now = _last_sample[0] = cpu_sample()
    return now.others_since(earlier)


@functools.cache  # /proc/cpuinfo does not change under a running process
def cpu_name() -> str:
    try:
        match = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if match:
            return match.group(1).strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def cpu_flags() -> tuple[str, ...]:
    """The SIMD features that matter to llama.cpp's CPU kernels."""
    try:
        match = re.search(r"^flags\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
    except OSError:
        return ()
    flags = set(match.group(1).split()) if match else set()
    wanted = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")
    return tuple(f for f in wanted if f in flags)


def total_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory() -> int:
    """Memory a new model can take without swapping (MemAvailable where the kernel tells it)."""
    try:
        match = re.search(r"^MemAvailable:\s*(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return total_memory()


def kv_cache_bytes(info: GGUFInfo, n_ctx: int, cache_type: str = "f16") -> int:
    layers = info.block_count or 0
    heads = info.head_count or 1
    kv_heads = info.head_count_kv or heads
    head_dim = (info.embedding_length or 0) // heads
    return int(2 * layers * n_ctx * kv_heads * head_dim * KV_CACHE_TYPES[cache_type][1])


def estimate_memory(info: GGUFInfo, n_ctx: int, cache_type: str = "f16") -> int:
    """Weights (the file, memory-mapped) plus the KV cache for `n_ctx` tokens plus compute buffers."""
    return info.file_size + kv_cache_bytes(info, n_ctx, cache_type) + _COMPUTE_OVERHEAD


def check_fits(info: GGUFInfo, n_ctx: int, cache_type: str = "f16", n_seq: int = 1, n_cells: int | None = None) -> None:
    """Refuse a context that would not fit: n_ctx tokens for each of n_seq sequences (or n_cells in all)."""
    cells = n_cells or n_ctx * n_seq
    need, free = estimate_memory(info, cells, cache_type), available_memory()
    if need > free:
        what = f"a {n_ctx}-token context" if n_seq == 1 else f"{n_seq} sequences of {n_ctx} tokens"
        fewer = " or a smaller --parallel" if n_seq > 1 else ""
        raise ResourceError(
            f"{info.path.name} with {what} needs about {need / 2**30:.1f} GiB, "
            f"only {free / 2**30:.1f} GiB is available; try a smaller --ctx-size{fewer} or a smaller quantization"
        )


def most_sequences(info: GGUFInfo, n_ctx: int, cache_type: str, most: int) -> int:
    """The most sequences of n_ctx tokens, up to `most`, whose KV cache fits in the memory available now
    (at least 1: check_fits says why not even one does)."""
    free = available_memory()
    n = most
    while n > 1 and estimate_memory(info, n * n_ctx, cache_type) > free:
        n -= 1
    return n
