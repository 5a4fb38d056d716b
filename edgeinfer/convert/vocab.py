"""A Hugging Face tokenizer.json turned into the vocabulary llama.cpp reads from GGUF metadata."""

# Two tokenizer families are understood, the two llama.cpp implements natively:
#
# - byte-level BPE ("gpt2" in GGUF: Llama 3, SmolLM2, Qwen2/2.5/3, ...). llama.cpp
#   re-implements the pre-tokenizer's split regex itself and picks it by name
#   (`tokenizer.ggml.pre`). llama.cpp's own converter finds that name by hashing
#   the tokenization of a fixed text with `transformers`; we read the
#   pre-tokenizer out of tokenizer.json instead and accept only the ones whose
#   regexes are known to be llama.cpp's, so a model is never written with a
#   pre-tokenizer llama.cpp would silently get wrong.
# - SentencePiece-style BPE with byte fallback ("llama" in GGUF: Mistral 7B,
#   Llama 2, Gemma), read from tokenizer.json without the sentencepiece package.
#   llama.cpp's SPM tokenizer merges the pair whose result scores highest, so each
#   token scores minus the rank of the merge that makes it: the same order the
#   Hugging Face BPE applies its merges in.
#
# Special tokens, add-BOS behaviour and the chat template come from gguf's SpecialVocab,
# which reads tokenizer_config.json, config.json and chat_template.jinja the way
# llama.cpp's converter does.

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from edgeinfer.errors import ConversionError

# Pre-tokenizer regexes exactly as Hugging Face tokenizer.json files spell them.
_LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_BYTELEVEL_REGEX = "bytelevel-gpt2-regex"  # ByteLevel(use_regex=true) splits with GPT-2's regex
_DIGITS = "individual-digits"  # Digits(individual_digits=true)

# The steps of a pre-tokenizer (in order) -> the name llama.cpp gives that pre-tokenizer.
KNOWN_PRE_TOKENIZERS: dict[tuple[str, ...], str] = {
    (_LLAMA3_REGEX,): "llama-bpe",  # Llama 3.x
    (_QWEN2_REGEX,): "qwen2",  # Qwen2, Qwen2.5, Qwen3
    (_DIGITS, _BYTELEVEL_REGEX): "smollm",  # SmolLM, SmolLM2, StarCoder
    (_BYTELEVEL_REGEX,): "gpt-2",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class TokenType:  # gguf.TokenType, without importing gguf at module load
    NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


@dataclass(frozen=True)
class Vocabulary:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece-style)
    pre: str | None  # llama.cpp's pre-tokenizer name, for "gpt2"
    tokens: list[str]
    types: list[int]
    scores: list[float] | None  # for "llama"
    add_space_prefix: bool | None  # for "llama"


def read_vocabulary(folder: Path, n_vocab: int) -> Vocabulary:
    """The vocabulary of `folder`'s tokenizer.json, padded to the `n_vocab` rows of the embedding."""
    tokenizer = _load_tokenizer_json(folder)
    model = tokenizer.get("model") or {}
    if model.get("type") != "BPE":
        raise ConversionError(f"the tokenizer is {model.get('type') or 'of unknown type'}; edgeinfer converts BPE tokenizers only")
    pieces = _pieces_by_id(model, tokenizer.get("added_tokens") or [], n_vocab)
    if model.get("byte_fallback"):
        return _sentencepiece_style(tokenizer, model, pieces, n_vocab)
    return _byte_level(tokenizer, pieces, n_vocab)


def write_vocabulary(writer, vocab: Vocabulary, folder: Path) -> None:
    """Tokens, types, merges, special ids, add-BOS/EOS and the chat template, into a GGUFWriter."""
    import gguf

    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    try:
        special = gguf.SpecialVocab(folder, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    except (OSError, ValueError, TypeError, AttributeError) as exc:  # (json's errors are ValueErrors)
        raise ConversionError(f"{folder}'s tokenizer_config.json cannot be read: {exc}") from None
    # Hugging Face adds a BOS only when the tokenizer says so; llama.cpp's default for a
    # missing key depends on the pre-tokenizer, so the answer is always written down.
    special.add_special_token.setdefault("bos", False)
    special.add_special_token.setdefault("eos", False)
    special.add_to_gguf(writer, quiet=True)


def detect_pre_tokenizer(tokenizer: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json."""
    steps = _pre_tokenizer_steps(tokenizer.get("pre_tokenizer"))
    name = KNOWN_PRE_TOKENIZERS.get(steps)
    if name is None:
        known = ", ".join(sorted(KNOWN_PRE_TOKENIZERS.values()))
        raise ConversionError(
            f"the tokenizer's pre-tokenizer ({_describe_steps(steps)}) is not one edgeinfer knows llama.cpp to "
            f"reproduce (known: {known}); converting it would tokenize text differently from the original"
        )
    normalizer = tokenizer.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ConversionError(f"the tokenizer normalizes text with {normalizer.get('type')}, which llama.cpp's BPE tokenizer does not do")
    return name


# --- byte-level BPE -----------------------------------------------------------------


def _byte_level(tokenizer: dict, pieces: dict[int, tuple[str, int]], n_vocab: int) -> Vocabulary:
    pre = detect_pre_tokenizer(tokenizer)
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = pieces.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(kind)
    return Vocabulary("gpt2", pre, tokens, types, None, None)


def _pre_tokenizer_steps(pre: dict | None) -> tuple[str, ...]:
    if pre is None:
        return ()
    kind = pre.get("type")
    if kind == "Sequence":
        return tuple(step for sub in pre.get("pretokenizers", []) for step in _pre_tokenizer_steps(sub))
    if kind == "Split" and pre.get("behavior") == "Isolated" and not pre.get("invert"):
        pattern = pre.get("pattern") or {}
        return (pattern["Regex"],) if "Regex" in pattern else (f"Split({pattern.get('String')!r})",)
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            return ("ByteLevel(add_prefix_space=true)",)
        return (_BYTELEVEL_REGEX,) if pre.get("use_regex", True) else ()
    if kind == "Digits":
        return (_DIGITS,) if pre.get("individual_digits") else ("Digits(individual_digits=false)",)
    return (f"{kind}",)


def _describe_steps(steps: tuple[str, ...]) -> str:
    return " then ".join(s if len(s) < 40 else s[:37] + "..." for s in steps) or "none"


# --- SentencePiece-style BPE with byte fallback ---------------------------------------


def _sentencepiece_style(tokenizer: dict, model: dict, pieces: dict[int, tuple[str, int]], n_vocab: int) -> Vocabulary:
    ranks = _merge_ranks(model.get("merges") or [])
    unk = model.get("unk_token")
    tokens, types, scores = [], [], []
    for i in range(n_vocab):
        text, kind = pieces.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        if kind == TokenType.NORMAL and _BYTE_TOKEN.fullmatch(text):
            kind = TokenType.BYTE
        elif kind == TokenType.CONTROL and text == unk:
            kind = TokenType.UNKNOWN
        elif kind == TokenType.USER_DEFINED:
            text = text.replace("\u2581", " ")  # llama.cpp matches user-defined tokens against raw text
        tokens.append(text)
        types.append(kind)
        scores.append(-float(ranks[text]) if text in ranks else (0.0 if kind == TokenType.NORMAL else -1000.0))
    return Vocabulary("llama", None, tokens, types, scores, _adds_space_prefix(tokenizer))


def _merge_ranks(merges: list) -> dict[str, int]:
    """The rank of the first merge that produces each token."""
    ranks: dict[str, int] = {}
    for rank, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        ranks.setdefault(left + right, rank)
    return ranks


def _adds_space_prefix(tokenizer: dict) -> bool:
    """Whether the tokenizer puts a "▁" in front of the text, as SentencePiece's add_dummy_prefix does."""
    def steps(node: dict | None, key: str) -> list[dict]:
        if not node:
            return []
        return (node.get(key) or []) if node.get("type") == "Sequence" else [node]

    for step in steps(tokenizer.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            return True
    for step in steps(tokenizer.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Metaspace":
            return step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never") != "never"
    return False


# --- shared ----------------------------------------------------------------------------


def _load_tokenizer_json(folder: Path) -> dict:
    path = folder / "tokenizer.json"
    if not path.is_file():
        hint = " (only a SentencePiece tokenizer.model is present; edgeinfer needs tokenizer.json)" if (folder / "tokenizer.model").is_file() else ""
        raise ConversionError(f"{folder} has no tokenizer.json{hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConversionError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} is not a tokenizer (not a JSON object)")
    return data


def _pieces_by_id(model: dict, added: list[dict], n_vocab: int) -> dict[int, tuple[str, int]]:
    """id -> (text, type) for the base vocabulary and the added tokens."""
    pieces = {int(i): (text, TokenType.NORMAL) for text, i in (model.get("vocab") or {}).items()}
    for token in added:
        content = token.get("content", "")
        special = token.get("special") or _looks_special(content)
        pieces[int(token["id"])] = (content, TokenType.CONTROL if special else TokenType.USER_DEFINED)
    too_high = [i for i in pieces if i >= n_vocab]
    if too_high:
        raise ConversionError(
            f"the tokenizer has token ids up to {max(too_high)} but the model's embedding has only {n_vocab} rows"
        )
    return pieces


def _looks_special(text: str) -> bool:
    # Some models leave control tokens unmarked; llama.cpp's converter treats these as control too.
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<\uff5c") and text.endswith("\uff5c>"))
        or (text.startswith("<unused") and text.endswith(">"))
        or (text.startswith("<start_of_") and text.endswith(">"))
        or (text.startswith("<end_of_") and text.endswith(">"))
    )
