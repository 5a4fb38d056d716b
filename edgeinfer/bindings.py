"""llama.cpp's C API (llama-cpp-python's `llama_cpp.llama_cpp`), loaded without the package's high-level half."""

# `import llama_cpp.llama_cpp` runs the package's __init__ first, and that imports the
# high-level `Llama` with its chat formats, numpy and jinja2 (about 0.2 s of a one-shot
# `edgeinfer run`), none of which edgeinfer uses. So the package module is created
# from its own spec but not executed; its ctypes submodules load under it as usual.
# It is not left half-made for anyone else in the process: the first attribute it
# lacks (`llama_cpp.Llama`, `__version__`) runs the real __init__ into it, so code that
# imports llama_cpp after edgeinfer sees the whole package. Should the layout change (no
# `llama_cpp.llama_cpp`), the whole package is imported instead: slower, never wrong.

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType


def c_api() -> ModuleType:
    """The module of llama.cpp's C functions and structs (`llama_decode`, `llama_batch`, ...)."""
    loaded = sys.modules.get("llama_cpp.llama_cpp")
    if loaded is not None:
        return loaded
    if "llama_cpp" not in sys.modules:
        _register_package()
    try:
        import llama_cpp.llama_cpp as c

        return c
    except ImportError:
        _forget_package()
        import llama_cpp  # (the whole package re-exports the C API)

        return llama_cpp


def _register_package() -> None:
    """Put an unexecuted llama_cpp package module in sys.modules, completed on first need."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return  # not installed as a package: the import that follows says so
    package = importlib.util.module_from_spec(spec)

    def complete(name: str) -> object:
        # PEP 562: called for an attribute the module lacks, so only until the real __init__ has run.
        del package.__getattr__
        spec.loader.exec_module(package)
        try:
            return package.__dict__[name]
        except KeyError:
            raise AttributeError(f"module 'llama_cpp' has no attribute {name!r}") from None

    package.__getattr__ = complete
    sys.modules["llama_cpp"] = package


def _forget_package() -> None:
    for name in [n for n in sys.modules if n == "llama_cpp" or n.startswith("llama_cpp.")]:
        del sys.modules[name]
