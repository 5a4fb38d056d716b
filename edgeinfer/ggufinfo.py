"""Reading and validating GGUF files with the gguf package, before llama.cpp sees them."""

# llama.cpp's loader trusts the file: a truncated model, an absurd count in the
# header, or a metadata value it only asserts on (a layer or expert count past its
# limits, a token listed twice) can crash the whole process. `validate` proves the
# file is sound with the pure-Python reader first, and raises our own error when it is not.

from __future__ import annotations

import json
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeinfer.errors import InvalidModelError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
# The smallest possible encodings, used to reject counts no file of this size can hold.
_MIN_KV_BYTES = 8 + 1 + 4 + 1  # key length, one key byte, value type, one value byte
_MIN_TENSOR_INFO_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, one name byte, n_dims, one dim, type, offset
_HEADER_BYTES = 4 + 4 + 8 + 8
# Value types of GGUF metadata (gguf.GGUFValueType): the bytes of each fixed-size one, and the two of variable size.
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = 8, 9
_MAX_ARRAY_DEPTH = 4  # llama.cpp reads no nested arrays at all; deeper nesting only serves to exhaust the stack
_MAX_DIMS = 4  # GGML_MAX_DIMS
# Limits llama.cpp asserts on while it reads the metadata (llama-hparams.h): a file past
# them aborts the whole process. 1024 experts is what the llama.cpp bundled with
# llama-cpp-python 0.3.36 allows (measured: 1024 loads, 1025 aborts).
LLAMA_MAX_LAYERS = 512
LLAMA_MAX_EXPERTS = 1024
ROPE_SCALING_TYPES = ("none", "linear", "yarn", "longrope")  # llama_rope_scaling_type_from_string
NO_VOCAB_MODELS = ("none", "no_vocab")  # llama.cpp loads these without a tokenizer, then asserts on first use
# Bytes that can occur in UTF-8 text, so that SentencePiece may have to spell them out as tokens.
_UTF8_BYTES = [b for b in range(0xF5) if b not in (0xC0, 0xC1)]
# Bumped whenever validate() learns a check, so that a verdict cached by an older
# edgeinfer cannot let through a file that the new checks refuse.
CHECKS_VERSION = 3  # (3: entries carry vocab_digest)
CACHE_ENTRY_LIMIT = 1 << 20  # bytes of JSON for one file's metadata in the inspect cache
CACHE_FILE_LIMIT = 16 << 20
# The counts edgeinfer reads: (key, least value, whether a list of per-layer values is allowed).
# A context length of 0 means "unknown" to edgeinfer and to llama.cpp; Mamba and RWKV have 0 heads.
_COUNT_KEYS = (("{arch}.block_count", 1, False), ("{arch}.embedding_length", 1, False), ("{arch}.context_length", 0, False),
               ("{arch}.attention.head_count", 0, True), ("{arch}.attention.head_count_kv", 0, True))


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    file_size: int
    version: int
    architecture: str
    name: str
    parameters: int
    quantization: str
    context_length: int | None
    embedding_length: int | None
    block_count: int | None
    head_count: int | None
    head_count_kv: int | None
    vocab_size: int
    tokenizer_model: str
    tokenizer_pre: str | None
    bos_token_id: int | None
    eos_token_id: int | None
    add_bos_token: bool | None
    chat_template: str | None
    tensor_count: int
    # sha256 of the token strings, in order: two files with the same digest tokenize alike, which the pair
    # check of --draft then need not prove token by token on every run (a second, for 152k tokens).
    vocab_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["path"] = str(self.path)
        data["chat_template"] = self.chat_template is not None
        return data


def validate(path: Path) -> "gguf.GGUFReader":  # noqa: F821 - gguf is imported lazily
    """Return a reader over a GGUF file proven safe to hand to llama.cpp."""
    size = _check_layout(path)
    reader = _open_reader(path)
    _check_tensors(reader, size)
    _check_required_keys(reader)
    arch = field_value(reader, "general.architecture")
    _check_value_types(reader, path.name, arch)
    _check_block_count(reader, path.name, arch)
    _check_experts(reader, path.name, arch)
    _check_rope_scaling(reader, path.name, arch)
    _check_vocabulary(reader, path.name)
    return reader


def inspect(path: Path, cache_file: Path | None = None) -> GGUFInfo:
    """Validated metadata, remembered per file (device, inode) with its size and mtime, so a second run starts at once.

    The gguf reader walks every vocabulary string in Python (seconds for a
    150k-token vocabulary); a file that has not changed need not be walked again.
    """
    key, stamp = _cache_key(path)
    cache = _load_cache(cache_file)
    hit = cache.get(key)
    if isinstance(hit, dict) and hit.get("stamp") == stamp and hit.get("checks") == CHECKS_VERSION:
        try:
            return GGUFInfo(**{**hit["info"], "path": path})
        except (TypeError, KeyError):
            pass  # a damaged entry costs a second look, nothing more
    info = read_info(path)
    entry = {"stamp": stamp, "checks": CHECKS_VERSION, "info": {**info.to_json(), "chat_template": info.chat_template}}
    # A file whose template or name runs to megabytes is walked again next time rather than
    # kept: every run reads the whole cache, and its entry would be as large as the value.
    if cache_file is not None and len(json.dumps(entry)) <= CACHE_ENTRY_LIMIT:
        from edgeinfer.store import atomic_write_text

        cache[key] = entry
        try:
            atomic_write_text(cache_file, json.dumps(cache))
        except OSError:
            pass  # a read-only home only costs the next run the same walk
    return info


def _cache_key(path: Path) -> tuple[str, list[int]]:
    # Keyed by the file itself (device, inode), not its name: a download checked in the
    # staging folder keeps its entry when it is renamed into the store.
    try:
        st = path.stat()
    except OSError as exc:
        raise InvalidModelError(f"cannot read {path}: {exc.strerror}") from None
    return f"{st.st_dev}:{st.st_ino}", [st.st_size, st.st_mtime_ns]


def _load_cache(cache_file: Path | None) -> dict:
    if cache_file is None or not cache_file.is_file() or cache_file.stat().st_size > CACHE_FILE_LIMIT:
        return {}  # (a cache grown past its limit by an older edgeinfer is replaced by the next write)
    try:
        cache = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}  # a cache is never fatal


def read_info(path: Path) -> GGUFInfo:
    reader = validate(path)
    arch = field_value(reader, "general.architecture")
    tokens = reader.fields["tokenizer.ggml.tokens"]
    return GGUFInfo(
        path=path,
        file_size=path.stat().st_size,
        version=int(field_value(reader, "GGUF.version", 3)),
        architecture=arch,
        name=field_value(reader, "general.name", path.stem),
        parameters=sum(int(t.n_elements) for t in reader.tensors),
        quantization=_quantization_name(reader),
        context_length=field_value(reader, f"{arch}.context_length"),
        embedding_length=field_value(reader, f"{arch}.embedding_length"),
        block_count=field_value(reader, f"{arch}.block_count"),
        head_count=_first_int(field_value(reader, f"{arch}.attention.head_count")),
        head_count_kv=_first_int(field_value(reader, f"{arch}.attention.head_count_kv")),
        vocab_size=len(tokens.data),
        tokenizer_model=field_value(reader, "tokenizer.ggml.model", ""),
        tokenizer_pre=field_value(reader, "tokenizer.ggml.pre"),
        bos_token_id=field_value(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=field_value(reader, "tokenizer.ggml.eos_token_id"),
        add_bos_token=field_value(reader, "tokenizer.ggml.add_bos_token"),
        chat_template=field_value(reader, "tokenizer.chat_template"),
        tensor_count=len(reader.tensors),
        vocab_digest=_digest(tokens),
    )


def _digest(tokens) -> str:
    import hashlib

    digest = hashlib.sha256()
    for i in tokens.data:
        text = tokens.parts[i].tobytes()
        digest.update(len(text).to_bytes(4, "little") + text)  # (length-prefixed: no two lists hash alike by joining)
    return digest.hexdigest()


def field_value(reader: "gguf.GGUFReader", key: str, default: Any = None) -> Any:  # noqa: F821
    """A metadata value as a plain Python value (str, int, float, bool or list)."""
    field = reader.fields.get(key)
    if field is None:
        return default
    try:
        return field.contents()
    except Exception:  # a value the reader cannot decode is as good as absent
        return default


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):  # per-layer head counts: report the first layer's
        return int(value[0]) if value else None
    return value


def _check_layout(path: Path) -> int:
    """Walk the header, the metadata and the tensor infos, checking every count against the bytes left.

    The gguf reader trusts the counts: an array of numbers declared with 2**40 elements
    makes it loop past the end of the file for ever, growing lists as it goes. This walk
    reads nothing but lengths and skips arrays of fixed-size values in one step.
    """
    import mmap

    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(_HEADER_BYTES)
            if len(head) < _HEADER_BYTES or head[:4] != GGUF_MAGIC:
                raise InvalidModelError(f"{path.name} is not a GGUF file (bad magic or too short)")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
                _GGUFLayout(path.name, data, size).walk()
    except (OSError, ValueError) as exc:  # (ValueError: a file mmap cannot map)
        raise InvalidModelError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}") from None
    return size


class _GGUFLayout:
    """A cursor over a GGUF file's header, key/value pairs and tensor infos that refuses any count the file cannot hold."""

    def __init__(self, name: str, data: "mmap.mmap", size: int) -> None:  # noqa: F821
        self.name, self.data, self.size, self.at = name, data, size, 4

    def walk(self) -> None:
        version, n_tensors, n_kv = self._unpack("<IQQ", "the header")
        if version not in SUPPORTED_VERSIONS:
            raise InvalidModelError(f"{self.name} has GGUF version {version}; supported: {', '.join(map(str, SUPPORTED_VERSIONS))}")
        if _HEADER_BYTES + n_kv * _MIN_KV_BYTES + n_tensors * _MIN_TENSOR_INFO_BYTES > self.size:
            raise InvalidModelError(f"{self.name} claims {n_tensors} tensors and {n_kv} keys, more than its "
                                    f"{self.size} bytes can hold (truncated or corrupt)")
        for number in range(n_kv):
            key = self._string(f"metadata key {number + 1}")
            (value_type,) = self._unpack("<I", key)
            self._value(value_type, key, 0)
        for number in range(n_tensors):
            name = self._string(f"tensor info {number + 1}")
            (n_dims,) = self._unpack("<I", name)
            if n_dims > _MAX_DIMS:
                raise InvalidModelError(f"{self.name} gives tensor {name} {n_dims} dimensions; GGUF allows {_MAX_DIMS}")
            self._skip(n_dims * 8 + 4 + 8, n_dims, name)  # dimensions, type, data offset

    def _value(self, value_type: int, key: str, depth: int) -> None:
        if value_type in _SCALAR_BYTES:
            self._skip(_SCALAR_BYTES[value_type], 1, key)
        elif value_type == _STRING:
            self._string(key)
        elif value_type == _ARRAY and depth < _MAX_ARRAY_DEPTH:
            item_type, count = self._unpack("<IQ", key)
            if item_type in _SCALAR_BYTES:  # numbers: one step, however many
                self._skip(count * _SCALAR_BYTES[item_type], count, key)
                return
            self._need(count * (8 if item_type == _STRING else 12), count, key)  # the least a string or an array takes
            for _ in range(count):
                self._value(item_type, key, depth + 1)
        else:
            raise InvalidModelError(f"{self.name} has {key} of unknown value type {value_type} (corrupt, or arrays nested too deep)")

    def _string(self, what: str) -> str:
        (length,) = self._unpack("<Q", what)
        start = self.at
        self._skip(length, length, what)
        return self.data[start:min(start + length, start + 200)].decode("utf-8", "replace")

    def _unpack(self, fmt: str, what: str) -> tuple:
        n = struct.calcsize(fmt)
        self._need(n, 1, what)
        values = struct.unpack_from(fmt, self.data, self.at)
        self.at += n
        return values

    def _skip(self, n: int, count: int, what: str) -> None:
        self._need(n, count, what)
        self.at += n

    def _need(self, n: int, count: int, what: str) -> None:
        left = self.size - self.at
        if n > left:
            raise InvalidModelError(f"{self.name} declares {count} items for {what}, more than the {left} bytes left "
                                    "in the file can hold (truncated or corrupt)")


def _open_reader(path: Path) -> "gguf.GGUFReader":  # noqa: F821
    try:
        return _fast_reader_class()(path, "r")
    except Exception as exc:  # the reader signals corruption with many exception types
        raise InvalidModelError(f"{path.name} is not a valid GGUF file (truncated or corrupt: {type(exc).__name__})") from None


def _fast_reader_class() -> type:
    """The gguf reader over a plain ndarray view of its memory map.

    Slicing a numpy.memmap goes through Python-level hooks on every access; the
    reader slices once per vocabulary string, so a plain view parses about 3x faster.
    """
    import gguf
    import numpy as np

    class FastReader(gguf.GGUFReader):
        @property
        def data(self):
            return self._data

        @data.setter
        def data(self, value):
            self._data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return FastReader


def _check_tensors(reader: "gguf.GGUFReader", size: int) -> None:  # noqa: F821
    if not reader.tensors:
        raise InvalidModelError("the GGUF file holds no tensors")
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size or tensor.data.nbytes != int(tensor.n_bytes):
            raise InvalidModelError(f"tensor {tensor.name} lies past the end of the file (truncated download?)")


def _check_required_keys(reader: "gguf.GGUFReader") -> None:  # noqa: F821
    arch = field_value(reader, "general.architecture")
    if not isinstance(arch, str) or not arch:
        raise InvalidModelError("the GGUF metadata has no general.architecture")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens", f"{arch}.block_count", f"{arch}.embedding_length"):
        if key not in reader.fields:
            raise InvalidModelError(f"the GGUF metadata lacks {key}")


def _check_value_types(reader: "gguf.GGUFReader", name: str, arch: str) -> None:  # noqa: F821
    """The values edgeinfer computes with must be counts (and the template a string), or it fails later with a traceback."""
    for key, least, per_layer in _COUNT_KEYS:
        key = key.format(arch=arch)
        if key in reader.fields and not _is_count(field_value(reader, key), least, per_layer):
            kind = "a positive integer" if least else "a non-negative integer"
            raise InvalidModelError(f"{name} has {key} = {_shown(reader, key)}, not {kind}")
    key = "tokenizer.chat_template"
    if key in reader.fields and not isinstance(field_value(reader, key), str):
        raise InvalidModelError(f"{name} has {key} = {_shown(reader, key)}, not a string")


def _check_block_count(reader: "gguf.GGUFReader", name: str, arch: str) -> None:  # noqa: F821
    """llama.cpp asserts 1 <= block_count <= LLAMA_MAX_LAYERS and nextn_predict_layers <= block_count (an abort, not an error)."""
    key = f"{arch}.block_count"
    blocks = field_value(reader, key)
    if blocks > LLAMA_MAX_LAYERS:
        raise InvalidModelError(f"{name} has {key} = {blocks}; llama.cpp supports 1 to {LLAMA_MAX_LAYERS} layers")
    nextn = _int_or_zero(field_value(reader, f"{arch}.nextn_predict_layers"))
    if nextn > blocks:
        raise InvalidModelError(f"{name} has {arch}.nextn_predict_layers = {nextn}, more than {key} = {blocks}")
    # Every block llama.cpp will look for must have tensors; the NextN (MTP) layers at the end may be left out.
    # Files whose blocks are named otherwise (T5's enc.blk.N) have no blk.N tensors to count.
    numbers = (t.name.split(".")[1] for t in reader.tensors if t.name.startswith("blk."))
    present = {int(n) for n in numbers if n.isdecimal()}
    missing = sorted(set(range(blocks - nextn)) - present)
    if present and missing:
        raise InvalidModelError(f"{name} has {key} = {blocks} but no tensors for blk.{missing[0]}")


def _check_experts(reader: "gguf.GGUFReader", name: str, arch: str) -> None:  # noqa: F821
    """The expert counts llama.cpp asserts on while reading the metadata (llama-model.cpp, load_hparams)."""
    experts = _int_or_zero(field_value(reader, f"{arch}.expert_count"))
    used_value = field_value(reader, f"{arch}.expert_used_count")  # one count, or one per layer
    used = max(map(_int_or_zero, used_value), default=0) if isinstance(used_value, list) else _int_or_zero(used_value)
    groups = _int_or_zero(field_value(reader, f"{arch}.expert_group_count"))
    groups_used = _int_or_zero(field_value(reader, f"{arch}.expert_group_used_count"))
    if arch in ("hunyuan-dense", "hunyuan_vl") and experts <= 1:
        experts = used = 0  # llama.cpp reads these as dense models
    counts = f"{arch}.expert_count = {experts}"
    if experts > LLAMA_MAX_EXPERTS:
        problem = f"{counts}, more than llama.cpp's {LLAMA_MAX_EXPERTS}"
    elif used > experts or (experts and not used):
        problem = f"{arch}.expert_used_count = {used} with {counts}"
    elif groups and (groups >= experts or experts % groups):
        problem = f"{arch}.expert_group_count = {groups} with {counts}"
    elif groups > 1 and not 0 < groups_used < groups:
        problem = f"{arch}.expert_group_used_count = {groups_used} with {arch}.expert_group_count = {groups}"
    else:
        return
    raise InvalidModelError(f"{name} has {problem}, which makes llama.cpp abort")


def _check_rope_scaling(reader: "gguf.GGUFReader", name: str, arch: str) -> None:  # noqa: F821
    """An unknown RoPE scaling type is an assertion in llama.cpp (an abort), not an error it reports."""
    key = f"{arch}.rope.scaling.type"
    value = field_value(reader, key)
    if isinstance(value, str) and value not in ROPE_SCALING_TYPES:
        raise InvalidModelError(f"{name} has {key} = {value!r}; llama.cpp knows {', '.join(ROPE_SCALING_TYPES)}")


def _check_vocabulary(reader: "gguf.GGUFReader", name: str) -> None:  # noqa: F821
    """A vocabulary llama.cpp loads but aborts on: no tokenizer, a token listed twice, SentencePiece without byte tokens."""
    import gguf

    model = field_value(reader, "tokenizer.ggml.model")
    if model in NO_VOCAB_MODELS:
        raise InvalidModelError(f"{name} has tokenizer.ggml.model = {model!r}: no tokenizer, so llama.cpp cannot read a prompt")
    field = reader.fields["tokenizer.ggml.tokens"]
    if field.types != [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING]:
        return  # llama.cpp refuses other types with an error of its own
    # Compared as bytes, as llama.cpp does, over the strings the reader has already split out;
    # llama.cpp renames an empty token after its id.
    tokens = [field.parts[i].tobytes() or b"[EMPTY_%d]" % n for n, i in enumerate(field.data)]
    words = set(tokens)
    if len(words) != len(tokens):
        raise InvalidModelError(f"{name} lists the token {_first_repeated(tokens)!r} twice in tokenizer.ggml.tokens, which makes llama.cpp abort")
    if model == "llama":
        # SentencePiece spells a character it has no token for in byte tokens <0xNN>, else the byte itself.
        missing = [b for b in _UTF8_BYTES if b"<0x%02X>" % b not in words and bytes([b]) not in words]
        if missing:
            raise InvalidModelError(f"{name} has tokenizer.ggml.model = 'llama' without the byte token <0x{missing[0]:02X}> in "
                                    "tokenizer.ggml.tokens, which makes llama.cpp abort on text it must spell in bytes")


def _first_repeated(tokens: list[bytes]) -> str:
    seen = set()
    for word in tokens:
        if word in seen:
            return word.decode("utf-8", "replace")
        seen.add(word)
    return ""


def _is_count(value: Any, least: int, per_layer: bool = False) -> bool:
    """An integer (not a bool) of at least `least`, or where per-layer values are allowed, a list of them."""
    if per_layer and isinstance(value, list):
        return all(_is_count(v, least) for v in value)
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _int_or_zero(value: Any) -> int:
    # A count of the wrong type is llama.cpp's own clean error ("wrong type"); absent means 0, as in llama.cpp.
    return value if _is_count(value, 0) else 0


def _shown(reader: "gguf.GGUFReader", key: str) -> str:  # noqa: F821
    value = field_value(reader, key)
    text = repr(value) if value is not None else "(undecodable)"
    return text if len(text) <= 40 else text[:37] + "..."


def _quantization_name(reader: "gguf.GGUFReader") -> str:  # noqa: F821
    import gguf

    file_type = field_value(reader, "general.file_type")
    if file_type is not None:
        try:
            return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            pass
    # No file type recorded: name the type most of the weights are stored in.
    counts = Counter()
    for tensor in reader.tensors:
        counts[tensor.tensor_type.name] += int(tensor.n_elements)
    return counts.most_common(1)[0][0] if counts else "unknown"
