"""The tiny model generator keeps its promises to the other tests: llama.cpp loads it,
tokenizes ASCII both ways, generates past 20 tokens greedily, and the family
members share (or do not share) the vocabulary as documented."""

from __future__ import annotations

import ctypes
import hashlib

import pytest

from tinymodel import build_vocab, make_tiny_model


@pytest.fixture(scope="module")
def llm(tiny_model):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(tiny_model), n_ctx=512, verbose=False)


@pytest.mark.parametrize("text", ["Hello world! How are you today?", "def f(x):\n\treturn x * 2  # 42", "The quick brown fox"])
def test_ascii_text_round_trips_through_the_tokenizer(llm, text):
    tokens = llm.tokenize(text.encode(), add_bos=False, special=False)

    assert llm.detokenize(tokens).decode() == text
    assert len(tokens) < len(text)  # the merges do something


def test_chatml_markers_are_single_special_tokens(llm):
    vocab = build_vocab()
    tokens = llm.tokenize(b"<|im_start|>user\nhi<|im_end|>", add_bos=False, special=True)

    assert tokens[0] == vocab.im_start_id and tokens[-1] == vocab.eos_id
    assert llm.token_eos() == vocab.eos_id
    assert "<|im_start|>" in llm.metadata["tokenizer.chat_template"]


def test_greedy_generation_runs_20_tokens_of_printable_text(llm):
    out = llm("The quick brown fox", max_tokens=20, temperature=0.0)

    choice = out["choices"][0]
    assert choice["finish_reason"] == "length"
    assert out["usage"]["completion_tokens"] == 20
    assert all(ch == "\n" or " " <= ch <= "~" for ch in choice["text"])


def test_an_eos_first_model_stops_at_once(tmp_path):
    import llama_cpp

    path = make_tiny_model(tmp_path / "eos.gguf", eos_first=True)
    out = llama_cpp.Llama(model_path=str(path), verbose=False)("Hello", max_tokens=20, temperature=0.0)

    assert out["choices"][0]["finish_reason"] == "stop"
    assert out["usage"]["completion_tokens"] == 0


def test_the_same_arguments_give_the_same_bytes(tiny_model, tmp_path):
    again = make_tiny_model(tmp_path / "again.gguf")

    assert hashlib.sha256(again.read_bytes()).digest() == hashlib.sha256(tiny_model.read_bytes()).digest()


def test_the_family_shares_a_vocabulary_except_other_vocab(tiny_family):
    import gguf

    def tokens(path):
        field = gguf.GGUFReader(path).fields["tokenizer.ggml.tokens"]
        return [bytes(field.parts[i]) for i in field.data]

    target = tokens(tiny_family.target)
    assert tokens(tiny_family.close_draft) == target
    assert tokens(tiny_family.small_draft) == target
    assert tokens(tiny_family.unrelated) == target
    assert tokens(tiny_family.other_vocab) != target
    assert tiny_family.unrelated.read_bytes() != tiny_family.target.read_bytes()


@pytest.mark.parametrize("ftype", ["LLAMA_FTYPE_MOSTLY_Q4_K_M", "LLAMA_FTYPE_MOSTLY_Q8_0"])
def test_every_tensor_quantizes_and_the_result_generates(tiny_model, tmp_path, ftype):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype)
    out = tmp_path / "quantized.gguf"

    assert llama_cpp.llama_model_quantize(str(tiny_model).encode(), str(out).encode(), ctypes.byref(params)) == 0
    result = llama_cpp.Llama(model_path=str(out), verbose=False)("The quick brown fox", max_tokens=20, temperature=0.0)
    assert result["usage"]["completion_tokens"] == 20


@pytest.mark.parametrize("prompt", ["tell me everything", "Hello", "x"])
def test_greedy_text_comes_out_as_words_not_one_loop(llm, prompt):
    text = llm.create_chat_completion([{"role": "user", "content": prompt}], max_tokens=60, temperature=0.0)["choices"][0]["message"]["content"]

    assert len(text.split()) >= 15, text
