"""Qwen2 and Qwen2.5: llama.cpp's "qwen2" architecture."""

# Unlike "llama", llama.cpp runs qwen2 with NEOX-style RoPE, which rotates the two
# halves of each head just as Hugging Face's `rotate_half` does, so Q and K are
# written as they are, with no row permutation. Q, K and V carry biases.

from __future__ import annotations

from edgeinfer.convert import HFConfig, check_rope_scaling, decoder_tensors

GGUF_ARCH = "qwen2"


def expected_tensors(cfg: HFConfig) -> dict[str, tuple[int, ...]]:
    check_rope_scaling(cfg, ("linear", "yarn"))
    return decoder_tensors(cfg, qkv_bias=True)

