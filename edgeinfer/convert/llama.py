"""Llama, Llama 3.x, SmolLM/SmolLM2, Mistral (dense): llama.cpp's "llama" architecture."""

# Two things differ from the Hugging Face checkpoint:
#
# - Q and K rows are permuted. Hugging Face's Llama rotates the two halves of each
#   head (`rotate_half`); llama.cpp's "llama" RoPE rotates adjacent pairs. Reordering
#   each head's rows from [x0..x(d/2-1), x(d/2)..x(d-1)] to [x0, x(d/2), x1, ...]
#   makes the pair rotation compute exactly what the half rotation did, and the
#   attention scores are unchanged because Q and K get the same order.
# - Llama 3.1+ long-context RoPE ("llama3" rope_type) becomes a `rope_freqs` tensor
#   of per-frequency divisors, which llama.cpp applies to its RoPE frequencies.

from __future__ import annotations

import math

import numpy as np

from edgeinfer.convert import HFConfig, check_rope_scaling, decoder_tensors

GGUF_ARCH = "llama"


def expected_tensors(cfg: HFConfig) -> dict[str, tuple[int, ...]]:
    check_rope_scaling(cfg, ("linear", "yarn", "llama3"))
    bias = bool(cfg.raw.get("attention_bias"))
    return decoder_tensors(cfg, qkv_bias=bias, o_bias=bias)


def transform(name: str, data: np.ndarray, cfg: HFConfig) -> np.ndarray:
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_for_pair_rope(data, cfg.num_heads)
    if name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_for_pair_rope(data, cfg.num_kv_heads)
    return data


def permute_for_pair_rope(data: np.ndarray, n_heads: int) -> np.ndarray:
    """Within each head, interleave the rows of the first half with those of the second."""
    head_dim = data.shape[0] // n_heads
    return data.reshape(n_heads, 2, head_dim // 2, *data.shape[1:]).swapaxes(1, 2).reshape(data.shape)


def extra_tensors(cfg: HFConfig) -> dict[str, np.ndarray]:
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") != "llama3":
        return {}
    return {"rope_freqs.weight": llama3_rope_factors(cfg, scaling)}


def llama3_rope_factors(cfg: HFConfig, scaling: dict) -> np.ndarray:
    """Divisors of the RoPE frequencies: 1 for short wavelengths, `factor` for long ones, smooth between."""
    dim = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor = float(scaling.get("factor", 8.0))
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings") or cfg.raw.get("original_max_position_embeddings") or 8192)
    factors = []
    for freq in freqs:
        wavelength = 2 * math.pi / freq
        if wavelength < old_context / high:
            factors.append(1.0)
        elif wavelength > old_context / low:
            factors.append(factor)
        else:
            smooth = (old_context / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)
