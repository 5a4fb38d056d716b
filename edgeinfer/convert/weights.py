"""Hugging Face weights, read one tensor at a time from .safetensors files."""

# The safetensors format is a little-endian u64 header length, a JSON header
# (name -> dtype, shape, byte range) and the raw bytes. The header is checked
# here against the file's size before any tensor is trusted. Data is read with
# plain file reads into a fresh buffer per tensor, instead of through the safetensors
# library's memory map, for two reasons: numpy has no bfloat16, so BF16 tensors
# must arrive as raw bytes anyway; and pages of a long-lived map stay resident, so
# converting a model would look (and, under memory pressure, be) as large as the
# model. A tensor read this way is freed as soon as it is written out.

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeinfer.errors import ConversionError

# safetensors dtype -> numpy dtype of the raw bytes (BF16 travels as uint16 and is widened on demand)
_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64,
           "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # safetensors' name: "BF16", "F16", "F32", ...
    shape: tuple[int, ...]
    file: Path
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def index_weights(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of a model folder, by name, from the headers of its .safetensors files."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(
                f"{folder} holds only pickle checkpoints ({', '.join(pickles[:3])}); edgeinfer refuses them because "
                "loading a pickle can run arbitrary code. Convert them to .safetensors first"
            )
        raise ConversionError(f"{folder} has no .safetensors weights")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        for entry in read_header(file):
            if entry.name in entries:
                raise ConversionError(f"tensor {entry.name} appears in both {entries[entry.name].file.name} and {file.name}")
            entries[entry.name] = entry
    _check_index(folder, entries)
    return entries


def read_header(file: Path) -> list[TensorEntry]:
    """The tensors a .safetensors file declares, checked against the file's size."""
    try:
        size = file.stat().st_size
        with file.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise _corrupt(file, "shorter than its header")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > _MAX_HEADER or 8 + header_len > size:
                raise _corrupt(file, "its header length is impossible")
            header = json.loads(handle.read(header_len))
    except OSError as exc:
        raise ConversionError(f"cannot read {file}: {exc.strerror}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _corrupt(file, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(file, "its header is not a JSON object")
    data_start = 8 + header_len
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        entries.append(_entry(file, name, info, data_start, size))
    return sorted(entries, key=lambda e: e.offset)


def read_tensor(entry: TensorEntry) -> np.ndarray:
    """One tensor as numpy, in its stored dtype (BF16 as its raw uint16 bits)."""
    buffer = bytearray(entry.nbytes)
    with entry.file.open("rb") as handle:
        handle.seek(entry.offset)
        if handle.readinto(buffer) != entry.nbytes:
            raise _corrupt(entry.file, f"it ends inside tensor {entry.name}")
    return np.frombuffer(buffer, dtype=_DTYPES[entry.dtype]).reshape(entry.shape)


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """BF16 is the top half of an F32: shifting the bits back up is exact."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even to BF16, returned as raw uint16 bits (NaN stays NaN)."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def as_float32(entry: TensorEntry, data: np.ndarray) -> np.ndarray:
    if entry.dtype == "BF16":
        return bf16_to_f32(data)
    return data.astype(np.float32, copy=False)


def _entry(file: Path, name: str, info: object, data_start: int, size: int) -> TensorEntry:
    if not isinstance(info, dict) or info.get("dtype") not in _DTYPES:
        dtype = info.get("dtype") if isinstance(info, dict) else None
        raise _corrupt(file, f"tensor {name} has an unknown dtype {dtype!r}")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise _corrupt(file, f"tensor {name} has an invalid shape")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
        raise _corrupt(file, f"tensor {name} has invalid data offsets")
    begin, end = offsets
    expected = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[info["dtype"]]).itemsize
    if not 0 <= begin <= end or end - begin != expected:
        raise _corrupt(file, f"tensor {name}'s byte range does not match its shape")
    if data_start + end > size:
        raise _corrupt(file, f"tensor {name} lies past the end of the file (truncated download?)")
    return TensorEntry(name, info["dtype"], tuple(shape), file, data_start + begin, end - begin)


def _check_index(folder: Path, entries: dict[str, TensorEntry]) -> None:
    """A sharded checkpoint's index names every tensor; a missing shard must not go unnoticed."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, json.JSONDecodeError, AttributeError):
        raise ConversionError(f"{index} is not a valid safetensors index") from None
    missing = sorted(set(weight_map) - set(entries))
    if missing:
        shards = sorted({weight_map[name] for name in missing})
        raise ConversionError(f"{len(missing)} tensors listed in {index.name} are in no file; missing shard(s): {', '.join(shards[:3])}")


def _corrupt(file: Path, why: str) -> ConversionError:
    return ConversionError(f"{file.name} is not a valid safetensors file: {why}")
