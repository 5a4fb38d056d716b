"""Importance matrices written by llama.cpp's llama-imatrix, for `edgeinfer quantize --imatrix`."""

# An importance matrix holds, for each weight matrix, the mean squared activation
# of each of its input columns over some calibration text; the quantizer spends its
# precision where those are large. Both of llama-imatrix's formats are read: GGUF
# (`NAME.in_sum2` sums and `NAME.counts`, divided here, per expert) and the legacy
# .dat (values already averaged over `ncall` chunks, divided by it here as llama.cpp
# does). What comes out is what llama_model_quantize takes: name -> float32 values.

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from edgeinfer.errors import UsageError


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Tensor name -> importance of each input column, from either of llama-imatrix's formats."""
    if not path.is_file():
        raise UsageError(f"no importance matrix at {path}")
    with path.open("rb") as handle:
        magic = handle.read(4)
    try:
        entries = _read_gguf_imatrix(path) if magic == b"GGUF" else _read_legacy_imatrix(path)
    except (ValueError, struct.error, UnicodeDecodeError, OSError) as exc:
        raise UsageError(f"{path} is not an importance matrix llama.cpp wrote ({exc})") from None
    if not entries:
        raise UsageError(f"{path} holds no importance data")
    return entries


def _read_gguf_imatrix(path: Path) -> dict[str, np.ndarray]:
    import gguf

    reader = gguf.GGUFReader(path, "r")
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    entries = {}
    for key, sums in tensors.items():
        if not key.endswith(".in_sum2"):
            continue
        name = key.removesuffix(".in_sum2")
        counts = tensors.get(f"{name}.counts")
        if counts is None:
            raise ValueError(f"{name} has sums but no counts")
        counts = counts.reshape(-1)
        sums = sums.reshape(len(counts), -1)
        safe = np.where(counts > 0, counts, 1.0)[:, None]
        entries[name] = np.where(counts[:, None] > 0, sums / safe, 1.0).reshape(-1).astype(np.float32)
    return entries


def _read_legacy_imatrix(path: Path) -> dict[str, np.ndarray]:
    data = path.read_bytes()
    (n_entries,), offset = struct.unpack_from("<i", data, 0), 4
    if not 0 < n_entries < 1_000_000:
        raise ValueError("implausible entry count")
    entries = {}
    for _ in range(n_entries):
        (length,) = struct.unpack_from("<i", data, offset)
        name = data[offset + 4 : offset + 4 + length].decode()
        offset += 4 + length
        ncall, nval = struct.unpack_from("<ii", data, offset)
        offset += 8
        values = np.frombuffer(data, dtype="<f4", count=nval, offset=offset).astype(np.float32)
        offset += 4 * nval
        entries[name] = values / ncall if ncall > 0 else values
    return entries
