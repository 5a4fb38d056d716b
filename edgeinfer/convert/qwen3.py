"""Qwen3 (dense): llama.cpp's "qwen3" architecture."""

# Like qwen2 (NEOX RoPE, no permutation), without the Q/K/V biases, and with an
# RMS norm over each head of Q and K before RoPE (q_norm, k_norm). Its head_dim is
# set in config.json and need not be hidden_size / heads, so key and value lengths
# are written explicitly.

from __future__ import annotations

from edgeinfer.convert import HFConfig, check_rope_scaling, decoder_tensors

GGUF_ARCH = "qwen3"


def expected_tensors(cfg: HFConfig) -> dict[str, tuple[int, ...]]:
    check_rope_scaling(cfg, ("linear", "yarn"))
    return decoder_tensors(cfg, qk_norm=True)

