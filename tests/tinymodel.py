"""Tiny, deterministic llama-architecture GGUF models for tests.

A test that needs "a model" should not download one: `make_tiny_model` writes a
few-megabyte GGUF that llama.cpp loads, tokenizes with and generates from, in a
fraction of a second. Everything is derived from fixed text and seeded numpy, so
the same arguments give the same bytes on every machine.

The shape: llama architecture, hidden size 256, 4 attention heads of 64, 2 KV
heads, feed-forward 512, 2 layers, context 512. Every weight matrix has rows of
256 or 512 values, so every llama.cpp quantization type (Q4_K_M, Q8_0, ...)
applies to every tensor.

The vocabulary is a GPT-2 style byte-level BPE: token id b (0..255) is byte b,
then a few hundred merges learned from a fixed English text, then the ChatML
special tokens <|endoftext|> (bos, padding), <|im_start|>, <|im_end|> (eos, eot).
The tokenizer does not depend on the seed, so `make_tiny_model(p, seed=1)` is an
unrelated model with the same vocabulary as `make_tiny_model(p, seed=0)` (a valid
but poor speculative draft); `perturb=` gives a close relative that agrees with
its base most of the time; `n_merges=` changes the vocabulary itself.

Why the generation is not degenerate: hidden dimension 0 is a constant "bias
channel" (every token embeds 1.0 there and no layer writes to it), and only the
special tokens read it in the output matrix. Their logits are therefore a fixed
offset, `special_logit`, times a positive factor, while ordinary tokens get
random logits with a spread of a few units. The default offset keeps
<|im_end|> and friends far below the best ordinary token, so greedy generation
runs to max_tokens; a large positive offset (`eos_first=True`) makes a model
that stops at once. A second constant channel, lit only by tokens that end a
word, raises the tokens that begin with a space or newline: random weights
otherwise settle into loops like "ombombomb", and the text comes out as words.
"""

from __future__ import annotations

import re
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

N_EMBD = 256
N_HEAD = 4
HEAD_DIM = N_EMBD // N_HEAD
N_FF = 512
WORD_BONUS = 3.0

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# The fixed text the merges are learned from. Changing it changes every tiny model.
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox
runs into the forest. Once upon a time there was a small model that lived on a laptop.
It could not think very well, but it could count tokens, and it was always fast.
Hello world! Hello there, how are you today? I am fine, thank you. What is your name?
My name is Tiny. I like to write code: def hello(name): return "Hello, " + name
for i in range(10): print(i * i)  # squares of the numbers from 0 to 9
The user asked a question and the assistant gave an answer. The system said: be brief.
Models are downloaded, verified, quantized and then they generate text one token at a time.
A token is a piece of a word. Some words are common, like the, and, of, to, in, is, it.
Other words are rare. The tokenizer merges pairs of bytes that appear often together.
Numbers like 123, 2024, 3.14 and 42 appear in text too, as do symbols: + - * / = < > ( ) [ ] { }.
In the morning the birds sing; in the evening the stars shine over the quiet town.
She said that the weather would be good tomorrow, so they planned a walk by the river.
""" * 3

_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d| ?[A-Za-z]+| ?[0-9]+| ?[^\sA-Za-z0-9]+|\s+(?!\S)|\s+")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (e.g. space -> 'Ġ')."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


@dataclass(frozen=True)
class TinyVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    bos_id: int
    eos_id: int
    eot_id: int
    pad_id: int
    im_start_id: int

    @property
    def size(self) -> int:
        return len(self.tokens)


def build_vocab(n_merges: int = 300) -> TinyVocab:
    """Byte tokens, then `n_merges` learned merges (most frequent pair first, ties by text), then specials."""
    byte_char = bytes_to_unicode()
    words = Counter(
        tuple(byte_char[b] for b in piece.encode("utf-8")) for piece in _WORD.findall(_TRAINING_TEXT)
    )
    tokens = [byte_char[b] for b in range(256)]
    known = set(tokens)
    merges: list[str] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            raise ValueError(f"the training text supports only {len(merges)} merges")
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merged = best[0] + best[1]
        merges.append(f"{best[0]} {best[1]}")
        if merged not in known:
            known.add(merged)
            tokens.append(merged)
        words = Counter({_merge_word(word, best, merged): count for word, count in words.items()})
    n_normal = len(tokens)
    tokens.extend(SPECIAL_TOKENS)
    types = [1] * n_normal + [3] * len(SPECIAL_TOKENS)  # 1 = normal, 3 = control
    index = {t: i for i, t in enumerate(tokens)}
    return TinyVocab(
        tokens=tokens,
        token_types=types,
        merges=merges,
        bos_id=index["<|endoftext|>"],
        eos_id=index["<|im_end|>"],
        eot_id=index["<|im_end|>"],
        pad_id=index["<|endoftext|>"],
        im_start_id=index["<|im_start|>"],
    )


def _merge_word(word: tuple[str, ...], pair: tuple[str, str], merged: str) -> tuple[str, ...]:
    out: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(merged)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def make_tiny_model(
    path: Path,
    *,
    seed: int = 0,
    n_layers: int = 2,
    ctx: int = 512,
    n_kv_heads: int = 2,
    n_merges: int = 300,
    perturb: float = 0.0,
    special_logit: float = -30.0,
    eos_first: bool = False,
    ascii_only: bool = True,
    add_bos: bool = False,
    f16: bool = False,
    name: str | None = None,
    chat_template: str | None = CHATML_TEMPLATE,
    drop: tuple[str, ...] = (),
) -> Path:
    """Write a tiny llama GGUF to `path` and return the path.

    seed: the weights. Same tokenizer for every seed, so two seeds give two
        unrelated models that share a vocabulary.
    n_layers: transformer blocks. Each tensor has its own seeded generator, so a
        1-layer model shares its embedding, first block and output with the
        2-layer model of the same seed.
    perturb: add seeded noise of this relative size to the seed's weights: a
        close relative of the base model (0.1 agrees often, 1.0 rarely).
    n_merges: how many BPE merges; a different number is a different vocabulary.
    special_logit: offset of the special tokens' logits against the ordinary
        ones (whose spread is a few units); very negative means never chosen.
    eos_first: shorthand for a large positive special_logit (with <|im_end|> the
        highest): a model whose first generated token is the end of turn.
    ascii_only: never generate the byte tokens of control characters (other
        than newline) or of non-ASCII bytes, so generated text is printable
        ASCII; False lets stray UTF-8 bytes through (for tests of decoding).
    f16: store the matrices as F16 instead of F32 (norms stay F32).
    drop: tensors to leave out (a model llama.cpp refuses to load, though the file itself is sound).
    """
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(n_merges)
    tensors = _weights(vocab, seed=seed, n_layers=n_layers, n_kv_heads=n_kv_heads, perturb=perturb,
                       special_logit=60.0 if eos_first else special_logit, ascii_only=ascii_only)

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name or f"tiny-llama-s{seed}-l{n_layers}")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16 if f16 else gguf.LlamaFileType.ALL_F32))
    writer.add_vocab_size(vocab.size)
    writer.add_context_length(ctx)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(n_layers)
    writer.add_feed_forward_length(N_FF)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(n_kv_heads)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    writer.add_bos_token_id(vocab.bos_id)
    writer.add_eos_token_id(vocab.eos_id)
    writer.add_eot_token_id(vocab.eot_id)
    writer.add_pad_token_id(vocab.pad_id)
    writer.add_add_bos_token(add_bos)
    if chat_template is not None:
        writer.add_chat_template(chat_template)

    for tensor_name, array in tensors.items():
        if tensor_name in drop:
            continue
        if f16 and array.ndim == 2:
            array = array.astype(np.float16)
        writer.add_tensor(tensor_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _weights(vocab: TinyVocab, *, seed: int, n_layers: int, n_kv_heads: int, perturb: float,
             special_logit: float, ascii_only: bool) -> dict[str, np.ndarray]:
    n_vocab = vocab.size
    kv = n_kv_heads * HEAD_DIM
    specials = np.array([i for i, t in enumerate(vocab.token_types) if t == 3])
    # Byte tokens are ids 0..255; these are the ones that are not printable ASCII (or a newline).
    unprintable = np.array([b for b in range(256) if (b < 32 and b != 10) or b >= 127])

    def normal(name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
        # One generator per tensor (and per seed), so models of different depth share what they can.
        base = np.random.default_rng([seed, zlib.crc32(name.encode())]).standard_normal(shape)
        if perturb:
            base += perturb * np.random.default_rng([seed, 1_000_003, zlib.crc32(name.encode())]).standard_normal(shape)
        return (base * std).astype(np.float32)

    # Tokens that end a word: they, and only they, light the word channel (dimension 1).
    space_chars = ("\u0120", "\u010a")  # how byte-level BPE writes a space and a newline
    word_end = np.array([t == 1 and not vocab.tokens[i].startswith(space_chars) for i, t in enumerate(vocab.token_types)])
    starts_word = np.array([t == 1 and vocab.tokens[i].startswith(space_chars) for i, t in enumerate(vocab.token_types)])

    out: dict[str, np.ndarray] = {}
    embd = normal("token_embd.weight", (n_vocab, N_EMBD), 1.0)
    embd[:, 0] = 1.0  # the bias channel
    embd[:, 1] = np.where(word_end, 1.0, 0.0)  # the word channel
    out["token_embd.weight"] = embd
    for i in range(n_layers):
        p = f"blk.{i}."
        out[p + "attn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        out[p + "attn_q.weight"] = normal(p + "attn_q.weight", (N_EMBD, N_EMBD), 1.0 / np.sqrt(N_EMBD))
        out[p + "attn_k.weight"] = normal(p + "attn_k.weight", (kv, N_EMBD), 1.0 / np.sqrt(N_EMBD))
        out[p + "attn_v.weight"] = normal(p + "attn_v.weight", (kv, N_EMBD), 1.0 / np.sqrt(N_EMBD))
        wo = normal(p + "attn_output.weight", (N_EMBD, N_EMBD), 0.5 / np.sqrt(N_EMBD))
        wo[:2, :] = 0.0  # no block writes to the bias or word channel
        out[p + "attn_output.weight"] = wo
        out[p + "ffn_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
        out[p + "ffn_gate.weight"] = normal(p + "ffn_gate.weight", (N_FF, N_EMBD), 1.0 / np.sqrt(N_EMBD))
        out[p + "ffn_up.weight"] = normal(p + "ffn_up.weight", (N_FF, N_EMBD), 1.0 / np.sqrt(N_EMBD))
        down = normal(p + "ffn_down.weight", (N_EMBD, N_FF), 0.5 / np.sqrt(N_FF))
        down[:2, :] = 0.0
        out[p + "ffn_down.weight"] = down
    out["output_norm.weight"] = np.ones(N_EMBD, dtype=np.float32)
    head = normal("output.weight", (n_vocab, N_EMBD), 3.0 / np.sqrt(N_EMBD))
    head[:, 0] = 0.0  # ordinary tokens ignore the bias channel...
    head[specials, :] = 0.0  # ...and the special tokens read nothing else
    head[specials, 0] = special_logit
    head[vocab.eos_id, 0] += 1.0  # so that with a positive offset the end of turn wins
    head[:, 1] = np.where(starts_word, WORD_BONUS, 0.0)  # after a word's end, a space is likelier
    if ascii_only:
        head[unprintable, :] = 0.0
        head[unprintable, 0] = -abs(special_logit) - 30.0
    out["output.weight"] = head
    return out


@dataclass(frozen=True)
class TinyFamily:
    """Models that relate to each other the way real draft/target pairs do (or do not)."""

    target: Path  # 2 layers, the seed's weights
    close_draft: Path  # the target plus a little noise: same vocabulary, same greedy token ~85% of the time
    small_draft: Path  # 1 layer of the target's weights: same vocabulary, agrees ~65% of the time
    unrelated: Path  # 2 layers, the next seed: same vocabulary, (almost) never agrees
    other_vocab: Path  # a different vocabulary (more merges): not a valid draft for the target


def make_tiny_model_family(folder: Path, *, seed: int = 0) -> TinyFamily:
    folder = Path(folder)
    return TinyFamily(
        target=make_tiny_model(folder / "tiny-target.gguf", seed=seed),
        close_draft=make_tiny_model(folder / "tiny-close-draft.gguf", seed=seed, perturb=0.05),
        small_draft=make_tiny_model(folder / "tiny-small-draft.gguf", seed=seed, n_layers=1),
        unrelated=make_tiny_model(folder / "tiny-unrelated.gguf", seed=seed + 1),
        other_vocab=make_tiny_model(folder / "tiny-other-vocab.gguf", seed=seed, n_merges=350),
    )


if __name__ == "__main__":
    import sys

    print(make_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny.gguf")))
