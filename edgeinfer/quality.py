"""How much a quantized model lost: perplexity, KL divergence and top-1 agreement against its source."""

# Both models read the same text (edgeinfer/data/eval.txt by default: prose, a
# letter, questions, Python and SQL) through llama.cpp, side by side, in chunks: a
# chunk is decoded by the source, then by the quantized model, the two next-token
# distributions are compared at every position, and the logits are dropped before
# the next chunk. Memory therefore stays at the two models plus one chunk of logits
# per model, whatever the vocabulary size, and no text is tokenized twice.
#
# - perplexity: exp of the mean negative log-likelihood of each next token;
# - mean KL divergence: of the quantized model's next-token distribution from the
#   source's, KL(P_source || P_quantized), averaged over positions (0 is identical);
# - top-1 agreement: how often both models rank the same token first.

from __future__ import annotations

from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgeinfer.engine import Model
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
    from edgeinfer.engine import LoadOptions, load

    progress = progress or SilentProgress()
    # Logits at every position of a chunk; llama.cpp's log stays off stderr, as in `run`.
    options = LoadOptions(n_ctx=max_tokens, n_threads=threads, n_batch=_CHUNK)
    with load(source, options) as ref:
        trained = ref.info.context_length or max_tokens
        text = text if text is not None else evaluation_text()
        tokens = ref.tokenize(text, parse_special=False)[: min(max_tokens, trained)]
        if len(tokens) < 2:
            raise GenerationError("the evaluation text is too short to score")
        with load(quantized, options) as cand:
            if cand.n_vocab != ref.n_vocab:
                raise InvalidModelError(f"{quantized.name} has {cand.n_vocab} tokens, its source {ref.n_vocab}")
            return _score(ref, cand, tokens, progress)


def _score(ref: Model, cand: Model, tokens: list[int], progress: ProgressReporter) -> QualityReport:
    nll_ref = nll_cand = kld = 0.0
    agree = 0
    progress.start("evaluating quality", len(tokens) - 1)
    for start in range(0, len(tokens) - 1, _CHUNK):
        chunk = tokens[start : start + _CHUNK]
        targets = np.array(tokens[start + 1 : start + 1 + len(chunk)])
        scored = len(targets)  # the last chunk's final position has nothing to predict
        log_p = _log_softmax(ref.decode(chunk, all_logits=True)[:scored])
        log_q = _log_softmax(cand.decode(chunk, all_logits=True)[:scored])
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
