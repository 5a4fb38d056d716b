"""Tiny Hugging Face model folders for the conversion tests, and a numpy forward pass to check them.

`make_hf_model(folder, "llama")` writes what a hub repository holds: config.json,
model.safetensors (seeded random weights), tokenizer.json (a BPE trained by the
`tokenizers` library on a fixed text: byte-level with the pre-tokenizer of the
family it imitates, or SentencePiece-style with byte fallback for "mistral" and
"gemma3"), tokenizer_config.json with a chat template. Everything is
deterministic: the same arguments write the same bytes.

Sizes are multiples of 256 (hidden 256, feed-forward 512, 4 heads of 64, 2 KV
heads, 2 layers) so that llama.cpp's K-quants apply to every weight matrix.

`reference_logits(folder, tokens)` runs the model the way transformers does
(rotate_half RoPE, GQA by repetition, RMSNorm, SwiGLU; for Gemma 3 its (1 + w)
norms, sandwich norms, GELU, sliding windows and scaled embedding), in float64
numpy, straight from the files. A converted GGUF that llama.cpp runs must give the same logits:
that is what proves the Q/K permutation, the RoPE mode and the norms right.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

HIDDEN, FF, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
HEAD_DIM = HIDDEN // HEADS
CONTEXT = 1024

# The family's pre-tokenizer regex, as in the real tokenizer.json files.
LLAMA3_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
QWEN2_REGEX = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>"]  # SentencePiece's first ids, in this order
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPECIALS = {"llama": LLAMA3_SPECIALS, "qwen2": CHATML_SPECIALS, "qwen3": CHATML_SPECIALS, "mistral": MISTRAL_SPECIALS,
            "gemma3": GEMMA_SPECIALS}
GEMMA_SLIDING_WINDOW = 8

LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{{ message['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %}{{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>{{ 'model' if message['role'] == 'assistant' else 'user' }}\n"
    "{{ message['content'] | trim }}<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. The dog sleeps in the sun, and the fox runs into the forest.
Once upon a time there was a small model that lived on a laptop. It counted tokens and it was fast.
Hello world! Hello there, how are you today? I'm fine, thank you. We'll see what they've done.
Numbers: 1, 12, 123, 1234, 2024-06-01, 3.14159, 1000000 and 42.
def greet(name):\n\treturn f"Hello, {name}!"\n\nfor i in range(10):\n    print(i * i)\n
if (x == 0) { return -1; } else { x += 1; }
Café, naïve, résumé, Zürich, São Paulo, Ærøskøbing. 東京は日本の首都です。 北京欢迎你。 안녕하세요.
Emoji: 😀 🚀 👍🏽 ❤️ and symbols: → ≤ ≥ € £ ©.
""" * 3

# The texts the tokenization test compares on.
TOKENIZATION_PROBES = [
    "Hello world",
    " Hello  world   with   runs of spaces ",
    "The quick brown fox jumps over the lazy dog.",
    "I'm sure they'll say we've DONE it, 'S'",
    "Café naïve résumé Zürich",
    "東京は日本の首都です。北京欢迎你",
    "😀🚀 👍🏽 ❤️ emoji",
    "def f(x):\n\treturn x  *  2\n\n\n    # indented\n",
    "numbers 1 12 123 1234 12345 3.14159",
    "tabs\t\tand\r\nwindows lines\n",
    "",
    " ",
    "\n",
    "unknownwords zyxwvut qqqq",
]


def make_hf_model(folder: Path, arch: str = "llama", *, seed: int = 0, dtype: str = "float32", tied: bool = False,
                  transformers5: bool = False, rope_scaling: dict | None = None, pre: str | None = None,
                  hidden: int = HIDDEN, ff: int = FF, layers: int = LAYERS, heads: int = HEADS,
                  kv_heads: int = KV_HEADS, vocab_merges: int = 600, vocab_size: int | None = None) -> Path:
    """Write a tiny model folder: arch "llama" (Llama 3 style), "qwen2" or "qwen3"; dtype "float32" or "bfloat16".

    vocab_size: rows of the embedding (default: the tokenizer's size, padded as Qwen's configs are).
    """
    folder.mkdir(parents=True, exist_ok=True)
    specials = SPECIALS[arch]
    if arch in ("mistral", "gemma3"):
        tokenizer = build_sentencepiece_style_tokenizer(specials, vocab_merges, dummy_prefix=arch == "mistral")
    else:
        tokenizer = build_tokenizer(pre or ("llama3" if arch == "llama" else "qwen2"), specials, vocab_merges)
    n_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = vocab_size or -(-n_tokens // 64) * 64 + 64
    tokenizer.save(str(folder / "tokenizer.json"))
    config = _config(arch, vocab_size, tied, dtype, transformers5, rope_scaling, specials, tokenizer,
                     hidden, ff, layers, heads, kv_heads)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(_tokenizer_config(arch), indent=2))
    tensors = _weights(config, arch, seed, tied)
    write_safetensors(folder / "model.safetensors", tensors, bf16=dtype == "bfloat16")
    return folder


def copy_model(source: Path, target: Path) -> Path:
    """A copy of a model folder, for a test to damage."""
    target.mkdir()
    for file in source.iterdir():
        (target / file.name).write_bytes(file.read_bytes())
    return target


def build_tokenizer(pre: str, specials: list[str], merges: int):
    """A byte-level BPE with the pre-tokenizer of Llama 3 ("llama3"), Qwen2 ("qwen2") or SmolLM ("smollm")."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=pre == "llama3"))
    if pre == "smollm":
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    else:
        regex = LLAMA3_REGEX if pre == "llama3" else QWEN2_REGEX
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre == "qwen2":
        tokenizer.normalizer = normalizers.NFC()
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=256 + merges, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tokenizer.train_from_iterator([_TRAINING_TEXT], trainer=trainer)
    tokenizer.add_special_tokens(specials)
    if pre == "llama3":
        bos = specials[0]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def build_sentencepiece_style_tokenizer(specials: list[str], merges: int, *, dummy_prefix: bool):
    """What transformers makes of a SentencePiece model: BPE over "▁"-joined text, bytes as <0xXX> fallback tokens.

    Mistral/Llama 2 style (dummy_prefix: a "▁" before the text) or Gemma style (none).
    Special tokens come first, then the 256 byte tokens, then the learned pieces.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    learner = Tokenizer(models.BPE())
    learner.normalizer = normalizers.Replace(" ", "\u2581")
    learner.train_from_iterator([_TRAINING_TEXT.replace("😀", "").replace("🚀", "")], trainer=trainers.BpeTrainer(
        vocab_size=200 + merges, show_progress=False))
    learned = json.loads(learner.to_str())["model"]
    vocab = {token: i for i, token in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(learned["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    merge_pairs = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    unk = "<unk>"
    tokenizer = Tokenizer(models.BPE(vocab, merge_pairs, unk_token=unk, byte_fallback=True, fuse_unk=True))
    steps = [normalizers.Prepend("\u2581")] if dummy_prefix else []
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "\u2581")])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
                                          + ([decoders.Strip(" ", 1, 0)] if dummy_prefix else []))
    tokenizer.add_special_tokens([t for t in specials if t != unk])
    bos = "<s>" if dummy_prefix else "<bos>"
    from tokenizers import processors

    tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                             special_tokens=[(bos, vocab[bos])])
    return tokenizer


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], *, bf16: bool = False) -> None:
    """safetensors.numpy.save_file, or by hand for BF16 (numpy has no bfloat16: the top 16 bits of each F32)."""
    if not bf16:
        from safetensors.numpy import save_file

        save_file(tensors, str(path))
        return
    header, blobs, offset = {}, [], 0
    for name, array in tensors.items():
        bits = (np.ascontiguousarray(array, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)  # truncation
        blob = bits.tobytes()
        header[name] = {"dtype": "BF16", "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of the folder as float64, BF16 widened."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            data = raw[8 + n + begin:8 + n + end]
            if info["dtype"] == "BF16":
                array = (np.frombuffer(data, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                array = np.frombuffer(data, {"F32": np.float32, "F16": np.float16}[info["dtype"]])
            out[name] = array.reshape(info["shape"]).astype(np.float64)
    return out


def reference_logits(folder: Path, tokens: list[int]) -> np.ndarray:
    """The transformers forward pass of the folder's model over `tokens`, in float64: (len(tokens), vocab)."""
    cfg = json.loads((folder / "config.json").read_text())
    w = read_weights(folder)
    n, n_heads, n_kv = len(tokens), cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
    gemma = cfg["model_type"] == "gemma3_text"
    eps = cfg["rms_norm_eps"]

    def norm(x, name):  # Gemma's RMS norm scales by (1 + w)
        return _rms_norm(x, w[name] + 1 if gemma else w[name], eps)

    rope = _rope_tables(cfg, head_dim, n)
    x = w["model.embed_tokens.weight"][tokens] * (np.sqrt(cfg["hidden_size"]) if gemma else 1)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sliding = gemma and (i + 1) % 6 != 0  # Gemma 3: five sliding-window layers, then a global one
        cos, sin = _rope_tables(cfg, head_dim, n, theta=cfg["rope_local_base_freq"], scaled=False) if sliding else rope
        h = norm(x, p + "input_layernorm.weight")
        q = _linear(h, w, p + "self_attn.q_proj").reshape(n, n_heads, head_dim)
        k = _linear(h, w, p + "self_attn.k_proj").reshape(n, n_kv, head_dim)
        v = _linear(h, w, p + "self_attn.v_proj").reshape(n, n_kv, head_dim)
        if p + "self_attn.q_norm.weight" in w:  # Qwen3, Gemma 3: RMS norm over each head before RoPE
            q, k = norm(q, p + "self_attn.q_norm.weight"), norm(k, p + "self_attn.k_norm.weight")
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        scale = cfg.get("query_pre_attn_scalar", head_dim) ** -0.5
        window = cfg["sliding_window"] if sliding else None
        attention = _attention(q, k, v, n_heads // n_kv, scale, window).reshape(n, n_heads * head_dim)
        out = _linear(attention, w, p + "self_attn.o_proj")
        if gemma:  # sandwich norms around attention and MLP
            x = x + norm(out, p + "post_attention_layernorm.weight")
            h = norm(x, p + "pre_feedforward_layernorm.weight")
        else:
            x = x + out
            h = norm(x, p + "post_attention_layernorm.weight")
        gate, up = _linear(h, w, p + "mlp.gate_proj"), _linear(h, w, p + "mlp.up_proj")
        act = 0.5 * gate * (1 + np.tanh(np.sqrt(2 / np.pi) * (gate + 0.044715 * gate**3))) if gemma else gate / (1 + np.exp(-gate))
        out = _linear(act * up, w, p + "mlp.down_proj")
        x = x + (norm(out, p + "post_feedforward_layernorm.weight") if gemma else out)
    x = norm(x, "model.norm.weight")
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


# --- internals ----------------------------------------------------------------------


def _config(arch, vocab_size, tied, dtype, transformers5, rope_scaling, specials, tokenizer,
            hidden, ff, layers, heads, kv_heads) -> dict:
    classes = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "mistral": "MistralForCausalLM", "gemma3": "Gemma3ForCausalLM"}
    config = {
        "architectures": [classes[arch]],
        "model_type": "gemma3_text" if arch == "gemma3" else arch,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": ff,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "max_position_embeddings": CONTEXT,
        "rms_norm_eps": 1e-5 if arch in ("llama", "mistral") else 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "bos_token_id": tokenizer.token_to_id({"mistral": "<s>", "gemma3": "<bos>"}.get(arch, specials[0])),
        "eos_token_id": tokenizer.token_to_id({"mistral": "</s>", "gemma3": "<eos>"}.get(arch, specials[-1])),
    }
    if arch in ("qwen3", "gemma3"):
        config["head_dim"] = hidden // heads
    if arch == "gemma3":
        del config["hidden_act"]
        config.update(hidden_activation="gelu_pytorch_tanh", sliding_window=GEMMA_SLIDING_WINDOW, sliding_window_pattern=6,
                      rope_local_base_freq=10000.0, query_pre_attn_scalar=hidden // heads, final_logit_softcapping=None,
                      attn_logit_softcapping=None, pad_token_id=0)
    theta = 500000.0 if arch == "llama" else 10000.0 if arch == "mistral" else 1000000.0
    if transformers5:  # transformers 5 moved these under rope_parameters and renamed torch_dtype
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": theta, **(rope_scaling or {})}
        config["dtype"] = dtype
    else:
        config["rope_theta"] = theta
        config["rope_scaling"] = rope_scaling
        config["torch_dtype"] = dtype
    return config


def _tokenizer_config(arch: str) -> dict:
    if arch == "llama":
        return {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "chat_template": LLAMA3_TEMPLATE,
                "model_max_length": CONTEXT, "tokenizer_class": "PreTrainedTokenizerFast"}
    if arch == "mistral":
        return {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
                "chat_template": MISTRAL_TEMPLATE, "model_max_length": CONTEXT, "tokenizer_class": "LlamaTokenizer"}
    if arch == "gemma3":
        return {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>", "add_bos_token": True,
                "add_eos_token": False, "chat_template": GEMMA_TEMPLATE, "model_max_length": CONTEXT,
                "tokenizer_class": "GemmaTokenizer"}
    return {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "add_bos_token": False,
            "chat_template": CHATML_TEMPLATE, "model_max_length": CONTEXT, "tokenizer_class": "Qwen2Tokenizer"}


def _weights(config: dict, arch: str, seed: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    h, ff, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    n_heads, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    hd = config.get("head_dim") or h // n_heads

    def matrix(rows, cols):  # scaled so activations stay O(1) and logits spread over a few units
        return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

    def norm(n):  # Gemma stores w for a (1 + w) scale
        return ((0.0 if arch == "gemma3" else 1.0) + 0.2 * rng.standard_normal(n)).astype(np.float32)

    def bias(n):
        return (0.2 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, h)).astype(np.float32)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(h)
        w[p + "self_attn.q_proj.weight"] = matrix(n_heads * hd, h)
        w[p + "self_attn.k_proj.weight"] = matrix(n_kv * hd, h)
        w[p + "self_attn.v_proj.weight"] = matrix(n_kv * hd, h)
        if arch == "qwen2":
            w[p + "self_attn.q_proj.bias"] = bias(n_heads * hd)
            w[p + "self_attn.k_proj.bias"] = bias(n_kv * hd)
            w[p + "self_attn.v_proj.bias"] = bias(n_kv * hd)
        if arch in ("qwen3", "gemma3"):
            w[p + "self_attn.q_norm.weight"] = norm(hd)
            w[p + "self_attn.k_norm.weight"] = norm(hd)
        w[p + "self_attn.o_proj.weight"] = matrix(h, n_heads * hd)
        w[p + "post_attention_layernorm.weight"] = norm(h)
        if arch == "gemma3":
            w[p + "pre_feedforward_layernorm.weight"] = norm(h)
            w[p + "post_feedforward_layernorm.weight"] = norm(h)
        w[p + "mlp.gate_proj.weight"] = matrix(ff, h)
        w[p + "mlp.up_proj.weight"] = matrix(ff, h)
        w[p + "mlp.down_proj.weight"] = matrix(h, ff)
    w["model.norm.weight"] = norm(h)
    if not tied:
        w["lm_head.weight"] = matrix(vocab, h) * 4
    return w


def _rope_tables(cfg: dict, head_dim: int, n: int, theta: float | None = None, scaled: bool = True) -> tuple[np.ndarray, np.ndarray]:
    rope = cfg.get("rope_parameters") or {}
    theta = theta or cfg.get("rope_theta") or rope.get("rope_theta")
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    scaling = (cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)) if scaled else None
    if scaling and scaling["rope_type"] == "llama3":  # transformers' _compute_llama3_parameters
        factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
        old = scaling["original_max_position_embeddings"]
        wavelen = 2 * np.pi / inv_freq
        scaled = np.where(wavelen > old / low, inv_freq / factor, inv_freq)
        smooth = (old / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old / high) & ~(wavelen > old / low)
        inv_freq = np.where(medium, smoothed, scaled)
    elif scaling and scaling["rope_type"] == "linear":
        inv_freq = inv_freq / scaling["factor"]
    angles = np.outer(np.arange(n), inv_freq)
    angles = np.concatenate([angles, angles], axis=-1)[:, None, :]  # (n, 1, head_dim)
    return np.cos(angles), np.sin(angles)


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)  # rotate_half
    return x * cos + rotated * sin


def _attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, group: int, scale: float, window: int | None) -> np.ndarray:
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)  # head i reads KV head i // group
    scores = np.einsum("qhd,khd->hqk", q, k) * scale
    distance = np.arange(q.shape[0])[:, None] - np.arange(q.shape[0])[None, :]
    allowed = (distance >= 0) & (distance < window if window else True)
    scores = np.where(allowed, scores, -np.inf)
    scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
    scores /= scores.sum(axis=-1, keepdims=True)
    return np.einsum("hqk,khd->qhd", scores, v)


def _rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def _linear(x: np.ndarray, w: dict[str, np.ndarray], name: str) -> np.ndarray:
    y = x @ w[name + ".weight"].T
    return y + w[name + ".bias"] if name + ".bias" in w else y
