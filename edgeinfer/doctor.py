"""What edgeinfer can do on this machine: the llama.cpp build, its devices, memory, the store.
Read-only: it loads no model, and asks llama.cpp only for its build and the devices its backends see."""

from __future__ import annotations

import ctypes
import platform
from dataclasses import dataclass, field
from pathlib import Path

from edgeinfer import __version__, machine, threads
from edgeinfer.engine import DEFAULT_CTX
from edgeinfer.errors import EdgeinferError
from edgeinfer.ggufinfo import inspect
from edgeinfer.library import Library

# The features llama.cpp's system info reports, and what each means for a user.
_BACKENDS = {"CUDA": "NVIDIA GPUs", "METAL": "Apple GPUs", "VULKAN": "GPUs through Vulkan",
             "OPENVINO": "Intel CPUs, GPUs and NPUs", "SYCL": "Intel GPUs", "HIP": "AMD GPUs", "BLAS": "BLAS for prompts"}


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    kind: str  # "cpu", "gpu", "igpu", "accel"
    memory_free: int
    memory_total: int


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: str
    size: int
    needs: int | None  # estimated bytes with the default context; None when the file could not be read
    fits: bool | None
    problem: str = ""


@dataclass(frozen=True)
class Report:
    edgeinfer_version: str
    llama_cpp_python_version: str
    system_info: str
    gpu_offload: bool
    backends: list[str]
    devices: list[Device]
    cpu: str
    cpu_flags: list[str]
    physical_cores: int
    usable_cores: int  # the physical cores within a container's CPU quota
    cpu_busy: float  # cores other programs kept busy over the half second doctor looked
    default_threads: int  # what run and chat would start with now (they follow the load from there)
    memory_total: int
    memory_available: int
    python: str
    store: str
    store_size: int
    models: list[LocalModel] = field(default_factory=list)

    def to_json(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def diagnose(lib: Library) -> Report:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode("utf-8", errors="replace").strip()
    return Report(
        edgeinfer_version=__version__,
        llama_cpp_python_version=llama_cpp.__version__,
        system_info=info,
        gpu_offload=bool(llama_cpp.llama_supports_gpu_offload()),
        backends=[f"{name} ({what})" for name, what in _BACKENDS.items() if f"{name} :" in info.upper() or f"{name} =" in info.upper()],
        devices=_devices(llama_cpp),
        cpu=machine.cpu_name(),
        cpu_flags=list(machine.cpu_flags()),
        physical_cores=machine.physical_cores(),
        usable_cores=(usable := machine.usable_cores()),
        cpu_busy=round(busy := machine.others_busy(window=0.5, fresh=0.0), 2),
        default_threads=threads.choose(usable, busy),
        memory_total=machine.total_memory(),
        memory_available=machine.available_memory(),
        python=platform.python_version(),
        store=str(lib.store.root),
        store_size=lib.store.size_on_disk(),
        models=[_local_model(name, entry.path, lib) for name, entry in sorted(lib.store.entries().items())],
    )


def _local_model(name: str, path: Path, lib: Library) -> LocalModel:
    try:
        info = inspect(path, lib.store.inspect_cache)
    except (EdgeinferError, OSError) as exc:
        return LocalModel(name, str(path), path.stat().st_size if path.exists() else 0, None, None, str(exc))
    n_ctx = min(info.context_length or DEFAULT_CTX, DEFAULT_CTX)
    needs = machine.estimate_memory(info, n_ctx)
    return LocalModel(name, str(path), info.file_size, needs, needs <= machine.available_memory())


def _devices(llama_cpp) -> list[Device]:
    """The devices ggml's backends registered (the bindings do not wrap this part of ggml's API)."""
    try:
        lib = llama_cpp.llama_cpp._lib
        lib.ggml_backend_dev_count.restype = ctypes.c_size_t
        lib.ggml_backend_dev_get.restype = ctypes.c_void_p
        lib.ggml_backend_dev_get.argtypes = [ctypes.c_size_t]
        for fn in (lib.ggml_backend_dev_name, lib.ggml_backend_dev_description):
            fn.restype, fn.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
        lib.ggml_backend_dev_type.restype, lib.ggml_backend_dev_type.argtypes = ctypes.c_int, [ctypes.c_void_p]
        lib.ggml_backend_dev_memory.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.POINTER(ctypes.c_size_t)]
    except AttributeError:
        return []
    kinds = {0: "cpu", 1: "gpu", 2: "igpu", 3: "accel"}
    devices = []
    for i in range(lib.ggml_backend_dev_count()):
        dev = lib.ggml_backend_dev_get(i)
        free, total = ctypes.c_size_t(), ctypes.c_size_t()
        lib.ggml_backend_dev_memory(dev, ctypes.byref(free), ctypes.byref(total))
        devices.append(Device(lib.ggml_backend_dev_name(dev).decode(), lib.ggml_backend_dev_description(dev).decode(),
                              kinds.get(lib.ggml_backend_dev_type(dev), "other"), free.value, total.value))
    return devices
