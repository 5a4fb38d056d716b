"""Gemma 3 (text, Gemma3ForCausalLM: 270M and 1B): llama.cpp's "gemma3" architecture."""

# What differs from the Llama layout, and how llama.cpp expects it:
# - every RMS norm multiplies by (1 + weight), so 1 is added to each norm here;
# - four norms per layer (before and after attention, before and after the MLP),
#   and an RMS norm over each head of Q and K;
# - the embedding is scaled by sqrt(hidden) and the output head is tied to it:
#   llama.cpp does both itself;
# - five sliding-window layers for one global one. llama.cpp hard-codes that
#   pattern, the sliding layers' RoPE base (10000) and the attention scale
#   (1/sqrt(head_dim), 1/sqrt(hidden/heads) for the 27B), so a config that asks
#   for anything else is refused rather than converted into a different model.

from __future__ import annotations

import numpy as np

from edgeinfer.convert import HFConfig, check_rope_scaling, decoder_tensors, write_decoder_hparams
from edgeinfer.errors import ConversionError

GGUF_ARCH = "gemma3"
_PATTERN = 6  # llama.cpp: every 6th layer is global, the others slide
_LOCAL_ROPE_BASE = 10000.0
_NORMS = ("pre_feedforward_layernorm", "post_feedforward_layernorm")


def expected_tensors(cfg: HFConfig) -> dict[str, tuple[int, ...]]:
    check_rope_scaling(cfg, ("linear",))
    _check_llama_cpp_agrees(cfg)
    return decoder_tensors(cfg, qk_norm=True, extra_norms=_NORMS)


def write_hparams(writer, cfg: HFConfig) -> None:
    write_decoder_hparams(writer, cfg)
    writer.add_sliding_window(int(cfg.raw["sliding_window"]))


def transform(name: str, data: np.ndarray, cfg: HFConfig) -> np.ndarray:
    if name.endswith("norm.weight"):
        return data + 1.0  # Gemma's RMS norm scales by (1 + w); llama.cpp's by w
    return data


def _check_llama_cpp_agrees(cfg: HFConfig) -> None:
    raw = cfg.raw
    layer_types = raw.get("layer_types") or [
        "full_attention" if (i + 1) % int(raw.get("sliding_window_pattern", _PATTERN)) == 0 else "sliding_attention"
        for i in range(cfg.num_layers)
    ]
    expected = ["full_attention" if (i + 1) % _PATTERN == 0 else "sliding_attention" for i in range(cfg.num_layers)]
    if list(layer_types) != expected:
        raise ConversionError("this Gemma 3 alternates sliding and global attention differently from the 5:1 llama.cpp assumes")
    local = (raw.get("rope_parameters") or {}).get("sliding_attention", {}).get("rope_theta") or raw.get("rope_local_base_freq")
    if float(local or _LOCAL_ROPE_BASE) != _LOCAL_ROPE_BASE:
        raise ConversionError(f"this Gemma 3's sliding layers use RoPE base {local}; llama.cpp assumes {_LOCAL_ROPE_BASE:g}")
    scale_dim = cfg.hidden_size // cfg.num_heads if cfg.num_layers == 62 else cfg.head_dim
    if float(raw.get("query_pre_attn_scalar") or scale_dim) != scale_dim:
        raise ConversionError(f"this Gemma 3 scales attention by query_pre_attn_scalar={raw['query_pre_attn_scalar']}; "
                              f"llama.cpp would use {scale_dim}")
    if raw.get("final_logit_softcapping") or raw.get("attn_logit_softcapping"):
        raise ConversionError("logit soft-capping is not supported for Gemma 3")
    if raw.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConversionError(f"Gemma 3 with activation {raw['hidden_activation']} is not supported")
