"""How much a quantized model lost: perplexity, KL divergence and top-1 agreement against its source.

Both models read the same text (edgeinfer/data/eval.txt by default: prose, a
letter, questions, Python and SQL) through llama.cpp, side by side, in chunks: a
chunk is decoded by the source, then by the quantized model, the two next-token
distributions are compared at every position, and the logits are dropped before
the next chunk. Memory therefore stays at the two models plus one chunk of logits
per model, whatever the vocabulary size, and no text is tokenized twice.

- perplexity: exp of the mean negative log-likelihood of each next token;
- mean KL divergence: of the quantized model's next-token distribution from the
  source's, KL(P_source || P_quantized), averaged over positions (0 is identical);
- top-1 agreement: how often both models rank the same token first.
"""

from __future__ import annotations

import ctypes
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgeinfer.errors import GenerationError, InvalidModelError
from edgeinfer.progress import ProgressReporter, SilentProgress

DEFAULT_MAX_TOKENS = 512
_CHUNK = 128


@dataclass(frozen=True)
class QualityReport:
    tokens: int  # next-token predictions compared
    ppl_source: float
    ppl_quantized: float
    mean_kld: float
    top1_agreement: float  # 0..1

    @property
    def delta_ppl(self) -> float:
        return self.ppl_quantized - self.ppl_source

    def to_json(self) -> dict:
        return {**asdict(self), "delta_ppl": self.delta_ppl}


def evaluation_text() -> str:
    """The short evaluation text shipped with edgeinfer."""
    return resources.files("edgeinfer").joinpath("data/eval.txt").read_text(encoding="utf-8")


def compare(source: Path, quantized: Path, *, text: str | None = None, max_tokens: int = DEFAULT_MAX_TOKENS,
            threads: int | None = None, progress: ProgressReporter | None = None) -> QualityReport:
    """Score `quantized` against `source` (same vocabulary) on `text` (default: the shipped evaluation text)."""
    from edgeinfer.machine import physical_cores

    progress = progress or SilentProgress()
    threads = threads or physical_cores()
    with _Model(source, max_tokens, threads) as ref:
        tokens = ref.tokenize(text if text is not None else evaluation_text())[: min(max_tokens, ref.n_ctx_train)]
        if len(tokens) < 2:
            raise GenerationError("the evaluation text is too short to score")
        with _Model(quantized, max_tokens, threads) as cand:
            if cand.n_vocab != ref.n_vocab:
                raise InvalidModelError(f"{quantized.name} has {cand.n_vocab} tokens, its source {ref.n_vocab}")
            return _score(ref, cand, tokens, progress)


def _score(ref: "_Model", cand: "_Model", tokens: list[int], progress: ProgressReporter) -> QualityReport:
    nll_ref = nll_cand = kld = 0.0
    agree = 0
    progress.start("evaluating quality", len(tokens) - 1)
    for start in range(0, len(tokens) - 1, _CHUNK):
        chunk = tokens[start : start + _CHUNK]
        targets = np.array(tokens[start + 1 : start + 1 + len(chunk)])
        scored = len(targets)  # the last chunk's final position has nothing to predict
        log_p = _log_softmax(ref.decode(chunk, start)[:scored])
        log_q = _log_softmax(cand.decode(chunk, start)[:scored])
        rows = np.arange(scored)
        nll_ref -= float(log_p[rows, targets].sum())
        nll_cand -= float(log_q[rows, targets].sum())
        kld += float((np.exp(log_p) * (log_p - log_q)).sum())
        agree += int((log_p.argmax(axis=1) == log_q.argmax(axis=1)).sum())
        progress.advance(scored)
    n = len(tokens) - 1
    return QualityReport(n, float(np.exp(nll_ref / n)), float(np.exp(nll_cand / n)), max(kld / n, 0.0), agree / n)


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class _Model:
    """A model and a context through llama.cpp's C API, asking for logits at every position."""

    def __init__(self, path: Path, n_ctx: int, threads: int) -> None:
        self.path, self.n_ctx, self.threads = path, n_ctx, threads

    def __enter__(self) -> "_Model":
        import llama_cpp

        from edgeinfer.engine import _init_backend, load_model_file

        _init_backend(False)  # llama.cpp's log stays off stderr, as in `run`
        self._lib = llama_cpp
        self.model = load_model_file(self.path, llama_cpp.llama_model_default_params())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = _CHUNK
        params.n_threads = params.n_threads_batch = self.threads
        params.no_perf = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise GenerationError(f"llama.cpp could not create a context for {self.path.name}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model) or self.n_ctx
        self.batch = llama_cpp.llama_batch_init(_CHUNK, 0, 1)
        return self

    def __exit__(self, *exc) -> None:
        self._lib.llama_batch_free(self.batch)
        self._lib.llama_free(self.ctx)
        self._lib.llama_model_free(self.model)

    def tokenize(self, text: str) -> list[int]:
        """The text as the model reads it, with a BOS token if the model wants one."""
        data = text.encode("utf-8")
        buffer = (self._lib.llama_token * (len(data) + 8))()
        add_bos = self._lib.llama_vocab_get_add_bos(self.vocab)
        n = self._lib.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), add_bos, False)
        if n < 0:
            raise GenerationError("the evaluation text could not be tokenized")
        return list(buffer[:n])

    def decode(self, chunk: list[int], start: int) -> np.ndarray:
        """Logits (len(chunk), n_vocab) for tokens at positions start, start+1, ..., continuing the cache."""
        batch = self.batch
        batch.n_tokens = len(chunk)
        for i, token in enumerate(chunk):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1  # every position: perplexity and KL need them all
        if self._lib.llama_decode(self.ctx, batch) != 0:
            raise GenerationError(f"llama.cpp failed to evaluate {self.path.name}")
        pointer = self._lib.llama_get_logits(self.ctx)
        return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(len(chunk), self.n_vocab)).copy()
