"""`edgeinfer info FILE`: a sound GGUF is described, a broken one is refused in one line.

The broken files are the tiny model cut short or with header fields rewritten.
Each is inspected by a real `python -m edgeinfer` process, so a crash (a signal)
or a traceback cannot hide: every one must exit 6 with a single line on stderr.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conftest import run_edgeinfer


# --- a sound model -----------------------------------------------------------------


def test_info_describes_the_tiny_model(cli, tiny_model, edgeinfer_home):
    code, out, err = cli("info", tiny_model)

    assert code == 0, err
    assert err == ""
    for words in ("llama", "559", "512", "gpt2", "F32", "1,467,136"):
        assert words in out


def test_info_json_is_machine_readable(cli, tiny_model, edgeinfer_home):
    code, out, _ = cli("info", tiny_model, "--json")

    assert code == 0
    info = json.loads(out)
    assert info["architecture"] == "llama"
    assert info["vocab_size"] == 559
    assert info["context_length"] == 512
    assert info["embedding_length"] == 256
    assert info["block_count"] == 2
    assert (info["head_count"], info["head_count_kv"]) == (4, 2)
    assert info["eos_token_id"] == 558 and info["bos_token_id"] == 556
    assert info["chat_template"] is True
    assert info["file_size"] == tiny_model.stat().st_size


def test_info_of_an_f16_model_names_its_type(cli, tmp_path, edgeinfer_home):
    from tinymodel import make_tiny_model

    path = make_tiny_model(tmp_path / "tiny-f16.gguf", f16=True)

    code, out, _ = cli("info", path, "--json")

    assert code == 0
    assert json.loads(out)["quantization"] == "F16"


def test_info_of_a_missing_file_exits_3(cli, tmp_path, edgeinfer_home):
    result = cli("info", tmp_path / "nowhere.gguf")

    assert result.exit_code == 3
    assert "nowhere.gguf" in result.error_line


# --- broken files ---------------------------------------------------------------------


def _layout(data: bytes, path: Path) -> dict[str, int]:
    """Offsets inside the tiny model, read once with the gguf package."""
    import gguf

    reader = gguf.GGUFReader(path)
    tokens = reader.fields["tokenizer.ggml.tokens"]
    first = reader.tensors[0]
    info_start = first.field.offset
    name_len = len(first.name.encode())
    dims_at = info_start + 8 + name_len + 4
    return {
        "n_tensors": len(reader.tensors),
        "n_kv": len(reader.fields) - 3,  # the reader adds GGUF.version, .tensor_count, .kv_count
        "tokens_count_at": tokens.offset + 8 + len("tokenizer.ggml.tokens") + 4 + 4,
        "tensor_infos_at": info_start,
        "first_dims_at": dims_at,
        "first_type_at": dims_at + 8 * len(first.shape),
        "first_offset_at": dims_at + 8 * len(first.shape) + 4,
        "data_at": reader.data_offset,
        "size": len(data),
    }


def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


BROKEN = {
    "empty file": lambda b, at: b"",
    "cut in the header": lambda b, at: b[:10],
    "cut in the metadata": lambda b, at: b[:300],
    "cut in the token list": lambda b, at: b[: at["tokens_count_at"] + 2000],
    "cut in the tensor infos": lambda b, at: b[: at["tensor_infos_at"] + 30],
    "cut before the tensor data": lambda b, at: b[: at["data_at"]],
    "cut in the tensor data": lambda b, at: b[: at["size"] // 2],
    "last byte missing": lambda b, at: b[:-1],
    "bad magic": lambda b, at: b"GGML" + b[4:],
    "text file": lambda b, at: b"this is not a model\n" * 200,
    "version 1": lambda b, at: _put(b, 4, "<I", 1),
    "version 4": lambda b, at: _put(b, 4, "<I", 4),
    "version 2**32-1": lambda b, at: _put(b, 4, "<I", 2**32 - 1),
    "absurd tensor count": lambda b, at: _put(b, 8, "<Q", 2**62),
    "absurd key count": lambda b, at: _put(b, 16, "<Q", 2**40),
    "key count a little too high": lambda b, at: _put(b, 16, "<Q", at["n_kv"] + 3),
    "tensor count one too high": lambda b, at: _put(b, 8, "<Q", at["n_tensors"] + 1),
    "absurd key length": lambda b, at: _put(b, 24, "<Q", 2**60),
    "unknown value type": lambda b, at: _put(b, 24 + 8 + len("general.architecture"), "<I", 99),
    "absurd token array length": lambda b, at: _put(b, at["tokens_count_at"], "<Q", 2**40),
    "tensor data offset past the end": lambda b, at: _put(b, at["first_offset_at"], "<Q", 2**40),
    "absurd tensor dimension": lambda b, at: _put(b, at["first_dims_at"], "<Q", 2**40),
    "unknown tensor type": lambda b, at: _put(b, at["first_type_at"], "<I", 999),
}


@pytest.fixture(scope="module")
def broken_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    data = tiny_model.read_bytes()
    layout = _layout(data, tiny_model)
    folder = tmp_path_factory.mktemp("broken")
    files = {}
    for i, (case, make) in enumerate(BROKEN.items()):
        path = folder / f"broken-{i:02d}.gguf"
        path.write_bytes(make(data, layout))
        files[case] = path
    return files


@pytest.mark.parametrize("case", list(BROKEN))
def test_a_broken_gguf_is_refused_in_one_line(broken_files, edgeinfer_home, case):
    path = broken_files[case]

    done = run_edgeinfer("info", path)

    assert done.exit_code == 6, f"{case}: exit {done.exit_code}\n{done.stderr}"
    assert done.stdout == ""
    line = done.error_line  # exactly one line, no traceback
    assert line.startswith("error:")


def test_a_broken_gguf_is_refused_with_json_too(broken_files, edgeinfer_home):
    done = run_edgeinfer("info", broken_files["cut in the tensor data"], "--json")

    assert done.exit_code == 6
    assert done.stdout == ""
    assert "truncated" in done.error_line or "past the end" in done.error_line


def write_gguf(path: Path, *, with_tensor: bool) -> Path:
    """A GGUF with layer metadata but no tokenizer, with or without one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(256)
    if with_tensor:
        writer.add_tensor("token_embd.weight", np.zeros((4, 256), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize(("with_tensor", "words"), [(True, "tokenizer"), (False, "tensors")])
def test_a_gguf_lacking_what_llama_cpp_needs_is_refused(tmp_path, edgeinfer_home, with_tensor, words):
    path = write_gguf(tmp_path / "incomplete.gguf", with_tensor=with_tensor)

    done = run_edgeinfer("info", path)

    assert done.exit_code == 6
    assert words in done.error_line


def test_a_file_changed_after_a_first_look_is_examined_again(cli, tiny_model, tmp_path, edgeinfer_home):
    copy = tmp_path / "changing.gguf"
    copy.write_bytes(tiny_model.read_bytes())
    assert cli("info", copy).exit_code == 0

    copy.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 2])
    result = cli("info", copy)

    assert result.exit_code == 6
    assert result.error_line


# --- metadata llama.cpp aborts on -------------------------------------------------------
#
# Each file below is the tiny model with a few metadata values rewritten. The gguf
# reader finds nothing wrong with any of them, but llama.cpp ends the whole process
# on most (a GGML_ASSERT, or an exception nothing catches; found by an audit),
# and edgeinfer itself failed with a traceback on the values of the wrong type.
# `run` is what loads llama.cpp, so that is what is run: a regression shows as a
# signal, not as a quiet pass.


def rewrite_metadata(source: Path, path: Path, values: dict) -> Path:
    """A copy of the model at `source` with metadata `values` ({key: (value, type[, sub_type])}) set or replaced."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(source)
    fields = {f.name: (f.contents(), *f.types) for f in reader.fields.values()
              if not f.name.startswith("GGUF.") and f.name != "general.architecture"}
    writer = gguf.GGUFWriter(str(path), reader.fields["general.architecture"].contents())
    for key, (value, value_type, *sub_type) in {**fields, **values}.items():
        writer.add_key_value(key, value, value_type, sub_type=sub_type[0] if sub_type else None)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.array(tensor.data).reshape([int(n) for n in reversed(tensor.shape)]))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _tokens(edit) -> dict:
    """tokenizer.ggml.tokens of the tiny model, changed in place by `edit(tokens)`."""
    from gguf import GGUFValueType as T
    from tinymodel import build_vocab

    tokens = list(build_vocab().tokens)
    edit(tokens)
    return {"tokenizer.ggml.tokens": (tokens, T.ARRAY, T.STRING)}


def _spm_tokens(tokens: list[str]) -> None:
    tokens[:256] = [f"<0x{b:02X}>" for b in range(256)]  # SentencePiece's byte tokens in place of GPT-2's


def _metadata(**values) -> dict:
    from gguf import GGUFValueType as T

    kinds = {int: T.UINT32, str: T.STRING}
    return {key.replace("__", "."): (value, kinds[type(value)]) for key, value in values.items()}


def _duplicate(tokens: list[str]) -> None:
    tokens[ord("h")] = tokens[ord("i")]


def _empty(tokens: list[str]) -> None:
    tokens[5] = ""  # llama.cpp names it [EMPTY_5]


# case: (metadata written, the key the refusal must name)
ABORTING = {
    "block_count above LLAMA_MAX_LAYERS": (_metadata(llama__block_count=513), "llama.block_count"),
    "block_count 0": (_metadata(llama__block_count=0), "llama.block_count"),
    "block_count past the blocks present": (_metadata(llama__block_count=3), "llama.block_count"),
    "nextn_predict_layers above block_count": (_metadata(llama__nextn_predict_layers=3), "llama.nextn_predict_layers"),
    "expert_used_count without expert_count": (_metadata(llama__expert_used_count=2), "llama.expert_used_count"),
    "expert_count without expert_used_count": (_metadata(llama__expert_count=8), "llama.expert_used_count"),
    "expert_count above LLAMA_MAX_EXPERTS": (_metadata(llama__expert_count=1025, llama__expert_used_count=2),
                                              "llama.expert_count"),
    "expert_group_count as large as expert_count": (
        _metadata(llama__expert_count=8, llama__expert_used_count=2, llama__expert_group_count=8), "llama.expert_group_count"),
    "a token listed twice": (_tokens(_duplicate), "tokenizer.ggml.tokens"),
    "unknown rope scaling type": (_metadata(llama__rope__scaling__type="weird"), "llama.rope.scaling.type"),
    "SentencePiece tokenizer without byte tokens": (_metadata(tokenizer__ggml__model="llama"), "tokenizer.ggml.model"),
    "no tokenizer": (_metadata(tokenizer__ggml__model="none"), "tokenizer.ggml.model"),
    "block_count a string": (_metadata(llama__block_count="two"), "llama.block_count"),
    "embedding_length a string": (_metadata(llama__embedding_length="big"), "llama.embedding_length"),
    "context_length a string": (_metadata(llama__context_length="long"), "llama.context_length"),
    "head_count a string": (_metadata(llama__attention__head_count="four"), "llama.attention.head_count"),
    "chat template a number": (_metadata(tokenizer__chat_template=5), "tokenizer.chat_template"),
}

# Close to the cases above, but llama.cpp loads and runs them: they must not be refused.
SOUND = {
    "rope scaling type yarn": _metadata(llama__rope__scaling__type="yarn"),
    "SentencePiece tokenizer with byte tokens": {**_metadata(tokenizer__ggml__model="llama"), **_tokens(_spm_tokens)},
    "an empty token": _tokens(_empty),
    "context_length 0": _metadata(llama__context_length=0),
}


@pytest.fixture(scope="module")
def rewritten_files(tiny_model, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("rewritten")
    cases = {**{case: values for case, (values, _) in ABORTING.items()}, **SOUND}
    return {case: rewrite_metadata(tiny_model, folder / f"rewritten-{i:02d}.gguf", values)
            for i, (case, values) in enumerate(cases.items())}


@pytest.mark.parametrize("case", list(ABORTING))
def test_metadata_llama_cpp_aborts_on_is_refused_before_it_loads(rewritten_files, edgeinfer_home, case):
    path = rewritten_files[case]

    done = run_edgeinfer("run", "-m", path, "-n", "2", "hi")

    assert done.exit_code == 6, f"{case}: exit {done.exit_code}\n{done.stderr}"
    line = done.error_line  # one line: no traceback, no llama.cpp assertion
    assert path.name in line and ABORTING[case][1] in line, line


@pytest.mark.parametrize("case", list(SOUND))
def test_metadata_llama_cpp_runs_with_is_accepted(rewritten_files, edgeinfer_home, case):
    done = run_edgeinfer("run", "-m", rewritten_files[case], "-n", "2", "--temperature", "0", "hi")

    assert done.exit_code == 0, f"{case}: exit {done.exit_code}\n{done.stderr}"


def test_expert_count_at_llama_cpp_limit_passes_validation(tiny_model, tmp_path, edgeinfer_home):
    path = rewrite_metadata(tiny_model, tmp_path / "experts.gguf", _metadata(llama__expert_count=1024, llama__expert_used_count=2))

    assert run_edgeinfer("info", path).exit_code == 0


def test_a_verdict_cached_before_these_checks_is_not_trusted(cli, rewritten_files, tiny_model, edgeinfer_home):
    from edgeinfer.ggufinfo import _cache_key

    assert cli("info", tiny_model).exit_code == 0  # a cache entry, as an older edgeinfer wrote it...
    cache_file = edgeinfer_home / "gguf-metadata-cache.json"
    cache = json.loads(cache_file.read_text())
    (entry,) = cache.values()
    bad = rewritten_files["a token listed twice"]
    key, stamp = _cache_key(bad)
    cache[key] = {"stamp": stamp, "info": entry["info"]}  # ...for a file it had found sound, without "checks"
    cache_file.write_text(json.dumps(cache))

    result = cli("info", bad)

    assert result.exit_code == 6
    assert "tokenizer.ggml.tokens" in result.error_line


@pytest.mark.parametrize("damage", ["[1, 2]", '{"x": 5}', "null"])
def test_a_damaged_metadata_cache_costs_a_second_look_and_nothing_else(cli, tiny_model, edgeinfer_home, damage):
    assert cli("info", tiny_model).exit_code == 0  # remembered
    cache = edgeinfer_home / "gguf-metadata-cache.json"
    data = json.loads(cache.read_text())
    cache.write_text(damage if damage != "null" else json.dumps({k: {**v, "info": None} for k, v in data.items()}))
    code, out, err = cli("info", tiny_model)
    assert code == 0 and "llama" in out and err == ""
