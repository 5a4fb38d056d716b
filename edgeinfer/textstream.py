"""Token bytes in, printable text out: UTF-8 safe, stop strings honoured."""

# A character may be split across tokens (emoji, CJK) and a stop string across
# pieces, so text is released only when it can no longer change: incomplete UTF-8
# sequences wait in the incremental decoder, and a tail that could still grow into
# a stop string is held back.

from __future__ import annotations

import codecs
from collections.abc import Sequence


def is_text(value: object) -> bool:
    """A str the tokenizer can take: JSON's \\u escapes can write lone surrogates, which UTF-8 cannot."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class TextStream:
    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False
        self.text = ""

    def push(self, piece: bytes) -> str:
        """Feed one token's bytes; returns the text that is now safe to show."""
        if self.stopped:
            return ""
        pending = self._held + self._decoder.decode(piece)
        cut = self._first_stop(pending)
        if cut is not None:
            self.stopped = True
            self._held = ""
            return self._release(pending[:cut])
        hold = self._holdback(pending)
        self._held = pending[len(pending) - hold :] if hold else ""
        return self._release(pending[: len(pending) - hold])

    def flush(self) -> str:
        """The end of generation: release whatever was held back."""
        if self.stopped:
            return ""
        rest = self._held + self._decoder.decode(b"", final=True)
        self._held = ""
        return self._release(rest)

    def _release(self, text: str) -> str:
        self.text += text
        return text

    def _first_stop(self, text: str) -> int | None:
        hits = [i for s in self._stop if (i := text.find(s)) >= 0]
        return min(hits) if hits else None

    def _holdback(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self._stop:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best
