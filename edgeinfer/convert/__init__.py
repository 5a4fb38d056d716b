"""Hugging Face safetensors -> GGUF, without torch: the common pipeline."""

#     config.json -> HFConfig -> family module (llama, qwen2, qwen3, gemma3)
#     *.safetensors headers -> plan: every tensor's GGUF name, shape and type, checked
#     tokenizer.json -> vocabulary (convert/vocab.py)
#     GGUF header, metadata and tensor table written first, then tensors one at a time
#
# Writing the header before the data is what lets tensors stream: each one is
# read, transformed, written and dropped, so memory stays near a few copies of the
# largest tensor however big the model is. The file appears under its final name
# only when complete.
#
# A family module provides:
#     GGUF_ARCH: str                                    llama.cpp's architecture name
#     expected_tensors(cfg) -> {hf_name: shape}         the tensors the model must have
# and, where the defaults do not fit:
#     write_hparams(writer, cfg) -> None                its metadata (default: write_decoder_hparams)
#     transform(hf_name, data, cfg) -> data             layout changes llama.cpp needs (default: none)
#     extra_tensors(cfg) -> {gguf_name: float32 array}  tensors computed from the config (default: none)

from __future__ import annotations

import importlib
import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from edgeinfer.convert import weights as st
from edgeinfer.errors import ConversionError, Interrupted
from edgeinfer.progress import ProgressReporter, SilentProgress
from edgeinfer.store import check_free_space, disk_full_error

# Hugging Face `architectures` entry -> family module under edgeinfer.convert
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
}
OUTTYPES = ("auto", "f32", "f16", "bf16")
# Tensors a checkpoint may carry that llama.cpp recomputes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass(frozen=True)
class HFConfig:
    """The parts of config.json a conversion needs, read the same from transformers 4 and 5 files."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    head_dim_explicit: bool  # config.json names head_dim (it may differ from hidden/heads)
    context_length: int
    rms_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # with "rope_type" always set; None for plain RoPE
    tie_word_embeddings: bool | None  # None: config.json does not say
    dtype: str | None
    raw: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class ConversionResult:
    path: Path
    architecture: str  # llama.cpp's name
    tensors: int
    parameters: int
    outtype: str  # "f32", "f16" or "bf16" (of the 2-D weights)
    size: int
    seconds: float
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Planned:
    gguf_name: str
    shape: tuple[int, ...]  # numpy order
    out_type: str  # "f32", "f16" or "bf16"
    source: st.TensorEntry | None  # None for a tensor computed from the config
    computed: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * (4 if self.out_type == "f32" else 2)


def supported_architectures() -> list[str]:
    return sorted(FAMILIES)


def read_config(folder: Path) -> HFConfig:
    """Parse config.json; transformers 5 moved rope_theta/rope_scaling into rope_parameters and torch_dtype to dtype."""
    path = folder / "config.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} is not a model configuration (not a JSON object)")
    architecture = (raw.get("architectures") or [None])[0]
    if architecture not in FAMILIES:
        raise ConversionError(
            f"architecture {architecture or raw.get('model_type') or 'unknown'} is not supported; "
            f"edgeinfer converts {', '.join(supported_architectures())}"
        )
    try:
        return _parse_config(architecture, raw)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        raise ConversionError(f"{path} lacks or garbles a value the conversion needs ({exc})") from None


def convert_hf_to_gguf(
    folder: Path,
    output: Path,
    *,
    outtype: str = "auto",
    name: str | None = None,
    progress: ProgressReporter | None = None,
) -> ConversionResult:
    """Convert a Hugging Face model folder into one unquantized GGUF file.

    outtype: the type of the 2-D weights: "auto" keeps the checkpoint's (BF16, F16 or
    F32, so nothing is lost), or "f32", "f16", "bf16". Norms and other 1-D tensors are
    always F32, as llama.cpp expects. name: general.name (default: the folder's name).
    The file appears at `output` only when complete. Oddities worth telling the user
    (from the gguf package: a missing merges list, say) come back in `warnings`.
    """
    progress = progress or SilentProgress()
    started = time.perf_counter()
    folder = Path(folder)
    if outtype not in OUTTYPES:
        raise ConversionError(f"unknown outtype {outtype!r}; choose one of {', '.join(OUTTYPES)}")
    cfg = read_config(folder)
    family = _family(cfg)
    notes: list[str] = []
    plan = _plan(cfg, family, st.index_weights(folder), outtype)
    from edgeinfer.convert.vocab import read_vocabulary

    vocab = read_vocabulary(folder, cfg.vocab_size)
    total = sum(t.nbytes for t in plan)
    check_free_space(output.parent, total + (1 << 20))
    partial = output.with_name(f".{output.name}.incomplete")
    try:
        with _gguf_warnings_to(notes):
            _write(partial, cfg, family, plan, vocab, folder, name or folder.resolve().name, progress)
        os.replace(partial, output)
    except BaseException as exc:
        partial.unlink(missing_ok=True)  # a file appears whole or not at all
        if isinstance(exc, KeyboardInterrupt):
            raise Interrupted("conversion interrupted; nothing was written") from None
        if isinstance(exc, OSError):
            raise disk_full_error(exc, output.parent) or ConversionError(f"cannot write {output}: {exc}") from None
        raise
    return ConversionResult(
        path=output,
        architecture=family.GGUF_ARCH,
        tensors=len(plan),
        parameters=sum(int(np.prod(t.shape, dtype=np.int64)) for t in plan),
        outtype=_weights_type(plan),
        size=output.stat().st_size,
        seconds=time.perf_counter() - started,
        warnings=tuple(notes),
    )


# --- helpers shared by the family modules ------------------------------------------------


def decoder_tensors(cfg: HFConfig, *, qkv_bias: bool = False, o_bias: bool = False, qk_norm: bool = False,
                    extra_norms: tuple[str, ...] = ()) -> dict[str, tuple[int, ...]]:
    """The tensors of a Llama-like decoder (the layout Llama, Mistral, Qwen and Gemma share)."""
    h, hd, ff = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h), "model.norm.weight": (h,)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (ff, h),
            p + "mlp.up_proj.weight": (ff, h),
            p + "mlp.down_proj.weight": (h, ff),
        })
        if qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,), p + "self_attn.v_proj.bias": (kv,)})
        if o_bias:
            shapes[p + "self_attn.o_proj.bias"] = (h,)
        if qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        for norm in extra_norms:
            shapes[p + norm + ".weight"] = (h,)
    return shapes


def write_decoder_hparams(writer, cfg: HFConfig) -> None:
    """The metadata every Llama-like decoder needs; a family adds its own after this."""
    import gguf

    writer.add_context_length(cfg.context_length)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.head_dim_explicit:
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
        writer.add_rope_scaling_orig_ctx_len(int(scaling.get("original_max_position_embeddings", cfg.context_length)))


def check_rope_scaling(cfg: HFConfig, supported: tuple[str, ...]) -> None:
    kind = (cfg.rope_scaling or {}).get("rope_type")
    if kind is not None and kind not in supported:
        raise ConversionError(f"RoPE scaling {kind!r} is not supported for {cfg.architecture} (supported: {', '.join(supported) or 'none'})")


# --- internals -----------------------------------------------------------------------------


def _parse_config(architecture: str, raw: dict[str, Any]) -> HFConfig:
    hidden = int(raw["hidden_size"])
    heads = int(raw["num_attention_heads"])
    rope_parameters = raw.get("rope_parameters") or {}
    if "full_attention" in rope_parameters:  # transformers 5, models with several attention kinds
        rope_parameters = rope_parameters["full_attention"]
    scaling = raw.get("rope_scaling") or rope_parameters or None
    if scaling is not None:
        scaling = dict(scaling)
        scaling["rope_type"] = scaling.get("rope_type") or scaling.get("type") or "default"
        if scaling["rope_type"] == "default":
            scaling = None
    config = HFConfig(
        architecture=architecture,
        vocab_size=int(raw["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(raw["intermediate_size"]),
        num_layers=int(raw["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        head_dim_explicit=raw.get("head_dim") is not None,
        context_length=int(raw.get("max_position_embeddings") or 4096),
        rms_eps=float(raw.get("rms_norm_eps") or 1e-6),
        rope_theta=float(raw.get("rope_theta") or rope_parameters.get("rope_theta") or 10000.0),
        rope_scaling=scaling,
        tie_word_embeddings=raw.get("tie_word_embeddings"),
        dtype=raw.get("dtype") or raw.get("torch_dtype"),
        raw=raw,
    )
    sizes = {"vocab_size": config.vocab_size, "hidden_size": hidden, "intermediate_size": config.intermediate_size,
             "num_hidden_layers": config.num_layers, "num_attention_heads": heads,
             "num_key_value_heads": config.num_kv_heads, "head_dim": config.head_dim,
             "max_position_embeddings": config.context_length}
    for key, value in sizes.items():
        if value <= 0:  # a GGUF stores them unsigned: a negative one is an error deep in the writer
            raise ValueError(f"{key} must be positive, not {value}")
    return config


def _family(cfg: HFConfig) -> ModuleType:
    return importlib.import_module(f"edgeinfer.convert.{FAMILIES[cfg.architecture]}")


def _plan(cfg: HFConfig, family: ModuleType, tensors: dict[str, st.TensorEntry], outtype: str) -> list[_Planned]:
    """Check the checkpoint against what config.json promises; name and type every tensor."""
    import gguf

    expected = family.expected_tensors(cfg)
    if "lm_head.weight" in tensors:
        if cfg.tie_word_embeddings:
            del tensors["lm_head.weight"]  # a copy of the embedding, saved anyway by some exporters
        else:
            expected["lm_head.weight"] = (cfg.vocab_size, cfg.hidden_size)
    missing = [n for n in expected if n not in tensors]
    if missing:
        raise ConversionError(f"the checkpoint lacks {len(missing)} tensor(s) config.json calls for: {', '.join(missing[:4])}")
    unexpected = [n for n in tensors if n not in expected and not n.endswith(_IGNORED_SUFFIXES)]
    if unexpected:
        raise ConversionError(f"the checkpoint has tensor(s) a {cfg.architecture} should not have: {', '.join(unexpected[:4])}")
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[family.GGUF_ARCH.upper()], cfg.num_layers)
    extra = getattr(family, "extra_tensors", lambda cfg: {})(cfg)
    plan = [_Planned(n, a.shape, "f32", None, a) for n, a in extra.items()]
    for entry in sorted((tensors[n] for n in expected), key=lambda e: (e.file.name, e.offset)):
        if entry.shape != expected[entry.name]:
            raise ConversionError(f"tensor {entry.name} has shape {list(entry.shape)}, but config.json implies {list(expected[entry.name])}")
        if entry.dtype not in ("F32", "F16", "BF16"):
            raise ConversionError(f"tensor {entry.name} is {entry.dtype}; edgeinfer converts F32, F16 and BF16 checkpoints")
        gguf_name = names.get_name(entry.name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ConversionError(f"no GGUF name is known for tensor {entry.name}")
        plan.append(_Planned(gguf_name, entry.shape, _out_type(entry, outtype), entry))
    return plan


def _out_type(entry: st.TensorEntry, outtype: str) -> str:
    if len(entry.shape) < 2:
        return "f32"  # llama.cpp computes norms and biases in F32
    if outtype == "auto":
        return {"BF16": "bf16", "F16": "f16"}.get(entry.dtype, "f32")
    return outtype


def _weights_type(plan: list[_Planned]) -> str:
    types = {t.out_type for t in plan if len(t.shape) >= 2}
    return types.pop() if len(types) == 1 else "mixed"


def _file_type(plan: list[_Planned]) -> int:
    import gguf

    return {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16}.get(_weights_type(plan), gguf.LlamaFileType.ALL_F32)


def _write(path: Path, cfg: HFConfig, family: ModuleType, plan: list[_Planned], vocab, folder: Path, name: str,
           progress: ProgressReporter) -> None:
    import gguf

    from edgeinfer.convert.vocab import write_vocabulary

    writer = gguf.GGUFWriter(path, family.GGUF_ARCH)
    try:
        writer.add_name(name)
        writer.add_file_type(_file_type(plan))
        getattr(family, "write_hparams", write_decoder_hparams)(writer, cfg)
        write_vocabulary(writer, vocab, folder)
        raw_types = {"f32": gguf.GGMLQuantizationType.F32, "f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16}
        numpy_types = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}
        for t in plan:
            writer.add_tensor_info(t.gguf_name, t.shape, np.dtype(numpy_types[t.out_type]), t.nbytes, raw_dtype=raw_types[t.out_type])
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        progress.start(f"converting {name}", len(plan))
        for t in plan:
            writer.write_tensor_data(_tensor_data(t, cfg, family))
            progress.advance(1)
    finally:
        writer.close()


def _tensor_data(t: _Planned, cfg: HFConfig, family: ModuleType) -> np.ndarray:
    """Read, transform and cast one tensor; the only place a tensor's data is held."""
    if t.source is None:
        return np.ascontiguousarray(t.computed, dtype=np.float32)
    data = st.read_tensor(t.source)
    stored = {"BF16": "bf16", "F16": "f16", "F32": "f32"}[t.source.dtype]
    if stored != t.out_type:
        data = st.as_float32(t.source, data)
    if hasattr(family, "transform"):
        data = family.transform(t.source.name, data, cfg)
    if data.dtype == np.uint16:  # raw BF16 bits left as they were
        return np.ascontiguousarray(data)
    if t.out_type == "bf16":
        return st.f32_to_bf16(data)
    return np.ascontiguousarray(data, dtype=np.float16 if t.out_type == "f16" else np.float32)


@contextmanager
def _gguf_warnings_to(notes: list[str]) -> Iterator[None]:
    """The gguf package reports oddities (a missing merges list, a bad template) through logging: keep them as notes."""
    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            message = record.getMessage()
            # Its guesses about pair templates (sentence-pair encoding) do not concern generation.
            if "TemplateProcessing<pair>" not in message:
                notes.append(f"gguf: {message}")

    logger = logging.getLogger("gguf")
    handler = Collect(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
