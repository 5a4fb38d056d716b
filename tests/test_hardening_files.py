"""Hostile model files, templates and conversations: each is refused in one line, or made harmless.

The files are the tiny model with a count rewritten or a template of an attacker's
choosing; the conversations carry special-token text meant to forge turns, or are
long enough that a quadratic trim would take minutes.
"""

from __future__ import annotations

import struct
import time
from pathlib import Path

import pytest

from conftest import run_edgeinfer


# --- counts in the metadata that the file cannot hold ------------------------------------


def _count_at(path: Path, key: str) -> int:
    """The offset of an array's element count in the tiny model's metadata."""
    import gguf

    field = gguf.GGUFReader(path).fields[key]
    return field.offset + 8 + len(key) + 4 + 4  # key length, key, value type, item type


def _with_count(tiny_model: Path, folder: Path, key: str, count: int) -> Path:
    data = bytearray(tiny_model.read_bytes())
    struct.pack_into("<Q", data, _count_at(tiny_model, key), count)
    path = folder / f"{key}-{count}.gguf"
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("key", ["tokenizer.ggml.token_type", "tokenizer.ggml.tokens", "tokenizer.ggml.merges"])
def test_an_array_declared_with_2_to_the_40_elements_is_refused_within_a_second(tiny_model, tmp_path, edgeinfer_home,
                                                                                 key):
    from edgeinfer.errors import InvalidModelError
    from edgeinfer.ggufinfo import inspect

    path = _with_count(tiny_model, tmp_path, key, 2**40)

    started = time.monotonic()
    with pytest.raises(InvalidModelError, match=key):
        inspect(path)
    assert time.monotonic() - started < 1.0

    done = run_edgeinfer("info", path, timeout=60)
    assert done.exit_code == 6
    assert "more than the" in done.error_line and key in done.error_line


def test_an_array_count_a_little_past_the_end_is_refused_too(tiny_model, tmp_path, edgeinfer_home):
    from edgeinfer.errors import InvalidModelError
    from edgeinfer.ggufinfo import inspect

    left = tiny_model.stat().st_size - _count_at(tiny_model, "tokenizer.ggml.token_type") - 8
    path = _with_count(tiny_model, tmp_path, "tokenizer.ggml.token_type", left // 4 + 1)  # int32 items

    with pytest.raises(InvalidModelError, match="bytes left"):
        inspect(path)
