"""Given a Hugging Face model folder, `convert_hf_to_gguf` writes a GGUF that llama.cpp runs exactly like transformers would.

The proof is numerical: llama.cpp's logits for the converted F32 model equal a
float64 numpy forward pass over the original safetensors (tests/hfmodels.py) at
every position. A wrong Q/K permutation, RoPE mode, norm or tied head shows up
there as a difference of whole units, not of 1e-5.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hfmodels import SPECIALS, TOKENIZATION_PROBES, copy_model, make_hf_model, reference_logits

from edgeinfer.convert import convert_hf_to_gguf, supported_architectures
from edgeinfer.errors import ConversionError

PROMPT = b"The quick brown fox 123, naive cafe!\n\tdef f(x): return x"

VARIANTS = {
    "llama": dict(arch="llama"),
    "llama-tied": dict(arch="llama", tied=True),
    "llama-bf16": dict(arch="llama", dtype="bfloat16"),
    "llama3-rope-scaling": dict(arch="llama", transformers5=True, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}),
    "smollm": dict(arch="llama", pre="smollm", tied=True),
    "qwen2": dict(arch="qwen2"),
    "qwen2-tied": dict(arch="qwen2", tied=True, transformers5=True),
    "qwen3": dict(arch="qwen3"),
    "mistral": dict(arch="mistral", dtype="bfloat16"),
    "gemma3": dict(arch="gemma3", tied=True, layers=6),  # five sliding-window layers, then a global one
}


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {name: make_hf_model(root / name, seed=i, **kw) for i, (name, kw) in enumerate(VARIANTS.items())}


@pytest.fixture(scope="session")
def converted(hf_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf")
    return {name: convert_hf_to_gguf(folder, root / f"{name}.gguf", outtype="f32").path for name, folder in hf_models.items()}


def llama(path: Path, **kwargs):
    import llama_cpp

    # An F32 KV cache, so that the comparison measures the conversion and not F16 rounding in the cache.
    return llama_cpp.Llama(str(path), n_ctx=128, n_threads=1, type_k=0, type_v=0, verbose=False, **kwargs)


@pytest.mark.parametrize("variant", VARIANTS)
def test_llama_cpp_logits_match_the_transformers_forward_pass(variant, hf_models, converted):
    model = llama(converted[variant], logits_all=True)
    tokens = model.tokenize(PROMPT, add_bos=False)
    assert len(tokens) >= 12
    model.eval(tokens)
    got = np.array(model.scores[: len(tokens)], dtype=np.float64)
    expected = reference_logits(hf_models[variant], tokens)
    scale = np.abs(expected).max()
    assert scale > 1.0  # logits that actually vary, so the comparison means something
    np.testing.assert_allclose(got, expected, atol=2e-5 * scale, rtol=0)
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()


@pytest.mark.parametrize("variant", ["llama", "smollm", "qwen2", "qwen3", "mistral", "gemma3"])
def test_llama_cpp_tokenizes_like_the_tokenizers_library(variant, hf_models, converted):
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(hf_models[variant] / "tokenizer.json"))
    model = llama(converted[variant], vocab_only=True)
    specials = SPECIALS[VARIANTS[variant]["arch"]]
    probes = TOKENIZATION_PROBES + [f"{specials[-2]}user\nHi there{specials[-1]}\n", f"a{specials[-1]} b {specials[1]}"]
    for text in probes:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert model.tokenize(text.encode(), add_bos=False, special=True) == expected, text
    # BOS exactly when the Hugging Face tokenizer adds one (Llama 3 does, Qwen does not)
    assert model.tokenize(b"Hello") == reference.encode("Hello").ids


def test_the_metadata_carries_special_tokens_template_and_padding(hf_models, converted):
    from edgeinfer.ggufinfo import read_info

    llama3, qwen = read_info(converted["llama"]), read_info(converted["qwen2-tied"])
    assert (llama3.architecture, llama3.tokenizer_model, llama3.tokenizer_pre) == ("llama", "gpt2", "llama-bpe")
    assert (qwen.architecture, qwen.tokenizer_pre) == ("qwen2", "qwen2")
    assert llama3.add_bos_token is True and qwen.add_bos_token is False
    assert "start_header_id" in llama3.chat_template and "<|im_start|>" in qwen.chat_template
    mistral, gemma = read_info(converted["mistral"]), read_info(converted["gemma3"])
    assert (mistral.tokenizer_model, mistral.tokenizer_pre, mistral.add_bos_token) == ("llama", None, True)
    assert (gemma.architecture, gemma.tokenizer_model, gemma.bos_token_id, gemma.eos_token_id) == ("gemma3", "llama", 2, 1)
    tokenizer = json.loads((hf_models["qwen2"] / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    assert qwen.eos_token_id == added["<|im_end|>"]
    config = json.loads((hf_models["qwen2"] / "config.json").read_text())
    assert qwen.vocab_size == config["vocab_size"] > max(added.values()) + 1  # padded with unused tokens


def test_tied_embeddings_write_no_output_tensor(converted):
    import gguf

    def names(path):
        return {t.name for t in gguf.GGUFReader(path).tensors}

    assert "output.weight" in names(converted["llama"])
    assert "output.weight" not in names(converted["llama-tied"])
    assert "rope_freqs.weight" in names(converted["llama3-rope-scaling"])


def test_bf16_weights_stay_bf16_bit_for_bit(hf_models, tmp_path):
    import gguf

    from hfmodels import read_weights

    result = convert_hf_to_gguf(hf_models["llama-bf16"], tmp_path / "bf16.gguf")  # outtype "auto"
    assert result.outtype == "bf16"
    tensors = {t.name: t for t in gguf.GGUFReader(result.path).tensors}
    assert tensors["token_embd.weight"].tensor_type == gguf.GGMLQuantizationType.BF16
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    source = read_weights(hf_models["llama-bf16"])["model.embed_tokens.weight"].astype(np.float32)
    bits = np.asarray(tensors["token_embd.weight"].data).view(np.uint16)  # the reader hands BF16 over as bytes
    written = (bits.astype(np.uint32) << 16).view(np.float32)
    np.testing.assert_array_equal(written.reshape(source.shape), source)
    llama(result.path).eval(llama(result.path).tokenize(b"hello"))  # and llama.cpp runs it


def test_conversion_streams_tensors_instead_of_loading_the_model(tmp_path):
    folder = make_hf_model(tmp_path / "wide", "qwen2", layers=6)
    sizes = [p.stat().st_size for p in folder.glob("*.safetensors")]
    tracemalloc.start()
    try:
        convert_hf_to_gguf(folder, tmp_path / "wide.gguf", outtype="f16")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    largest = 704 * 256 * 4  # the embedding (vocab 704 x 256, F32)
    assert sum(sizes) > 8 * largest
    assert peak < 4 * largest, f"peak {peak} bytes for a {sum(sizes)} byte model"


# --- bad input ----------------------------------------------------------------------


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_files_are_named(hf_models, tmp_path):
    folder = copy_model(hf_models["qwen3"], tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ConversionError, match="no tokenizer.json"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    (folder / "config.json").unlink()
    with pytest.raises(ConversionError, match="no config.json"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


def test_an_unsupported_architecture_lists_the_supported_ones(hf_models, tmp_path):
    folder = copy_model(hf_models["qwen2"], tmp_path / "m")
    edit_config(folder, architectures=["MambaForCausalLM"])
    with pytest.raises(ConversionError) as error:
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    assert "MambaForCausalLM" in str(error.value)
    assert all(name in str(error.value) for name in supported_architectures())


def test_tensors_missing_or_of_the_wrong_shape_are_refused(hf_models, tmp_path):
    from hfmodels import read_weights, write_safetensors

    folder = copy_model(hf_models["llama"], tmp_path / "m")
    weights = {k: v.astype(np.float32) for k, v in read_weights(folder).items()}
    del weights["model.layers.1.mlp.up_proj.weight"]
    write_safetensors(folder / "model.safetensors", weights)
    with pytest.raises(ConversionError, match=r"lacks 1 tensor.*layers\.1\.mlp\.up_proj"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    folder = copy_model(hf_models["llama"], tmp_path / "n")
    edit_config(folder, intermediate_size=768)
    with pytest.raises(ConversionError, match=r"has shape \[\d+, \d+\], but config.json implies \[.*768.*\]"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    assert list(tmp_path.glob("*.gguf")) == [] and list(tmp_path.glob(".*")) == []


def test_a_corrupted_safetensors_header_is_refused(hf_models, tmp_path):
    folder = copy_model(hf_models["llama"], tmp_path / "m")
    data = bytearray((folder / "model.safetensors").read_bytes())
    data[12:20] = b"\x00garbage"
    (folder / "model.safetensors").write_bytes(data)
    with pytest.raises(ConversionError, match="model.safetensors is not a valid safetensors file"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ConversionError, match="header length is impossible"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")


def test_a_truncated_safetensors_file_is_refused(hf_models, tmp_path):
    folder = copy_model(hf_models["llama"], tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="past the end of the file"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")


def test_pickle_checkpoints_are_refused(hf_models, tmp_path):
    folder = copy_model(hf_models["llama"], tmp_path / "m")
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ConversionError, match="pickle"):
        convert_hf_to_gguf(folder, tmp_path / "out.gguf")
