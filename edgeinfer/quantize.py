"""`edgeinfer quantize`: a Hugging Face model or a GGUF in, a 4- or 8-bit GGUF out, with a quality report."""

#     source (HF folder | hub repository | GGUF)
#       -> unquantized GGUF (convert_hf_to_gguf, skipped for a GGUF source)
#       -> llama.cpp's quantizer, in a child process
#       -> Name-Q4_K_M.gguf, registered in the store
#       -> quality report against the unquantized GGUF (edgeinfer.quality)
#
# Why a child process: `llama_model_quantize` is one blocking C call. Python only
# runs its SIGINT handler between bytecodes, so in-process Ctrl-C would wait for
# the whole quantization; a thread cannot be stopped at all. In a child, the
# parent stays responsive: on Ctrl-C it kills the child and deletes the partial
# file. If the parent itself is killed, the child sees its stdin (its lifeline)
# close, deletes the partial file and exits. Either way nothing ever appears under
# the final name, which is reached only by a rename once the quantizer succeeded.
# The child is a plain `python -c` subprocess rather than multiprocessing's spawn,
# which would re-run the caller's main script. It starts first thing, so that its
# start (about 0.1 s: Python and llama.cpp's C bindings) overlaps the conversion.

from __future__ import annotations

import fnmatch
import math
import os
import re
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgeinfer import config
from edgeinfer.errors import ConversionError, EdgeinferError, Interrupted, ResourceError, UsageError
from edgeinfer.machine import check_threads
from edgeinfer.progress import ProgressReporter, SilentProgress
from edgeinfer.store import Store, check_free_space, sha256_file

if TYPE_CHECKING:
    from edgeinfer.quality import QualityReport

DEFAULT_TYPE = "Q4_K_M"
# llama.h's enum llama_ftype, written out so that choosing a type needs no llama_cpp import (a quarter
# second); tests check it against llama_cpp's constants. MXFP4_MOE is left out: it is for MoE models only.
LLAMA_FTYPES = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7, "Q2_K": 10, "Q2_K_S": 21, "Q3_K_S": 11, "Q3_K_M": 12,
    "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18, "IQ1_S": 24, "IQ1_M": 31,
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29, "IQ3_XXS": 23, "IQ3_XS": 22, "IQ3_S": 26, "IQ3_M": 27,
    "IQ4_NL": 25, "IQ4_XS": 30, "TQ1_0": 36, "TQ2_0": 37, "NVFP4": 39, "Q1_0": 40, "Q2_0": 41,
    "F16": 1, "BF16": 32, "F32": 0,
}
TYPE_FOR_BITS = {4: "Q4_K_M", 8: "Q8_0"}
_ALIASES = {"Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M", "Q3_K": "Q3_K_M"}
# llama.cpp refuses these without an importance matrix.
_NEEDS_IMATRIX = {"IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "Q2_K_S"}
# Bits per weight of a quantized tensor, rather more than less, only to check free disk space before starting.
_BITS_ESTIMATE = {"F32": 32, "F16": 16, "BF16": 16, "Q8_0": 8.5, "Q6_K": 6.6, "Q5_K_M": 5.7, "Q5_K_S": 5.6, "Q5_0": 5.5,
                  "Q5_1": 6, "Q4_K_M": 4.9, "Q4_K_S": 4.6, "Q4_0": 4.5, "Q4_1": 5}
_HF_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json", "generation_config.json", "chat_template.jinja", "chat_template.json")
_PRECISION_SUFFIX = re.compile(r"[-_.](f32|f16|bf16|fp16|fp32|q\d\w*|iq\d\w*)$", re.IGNORECASE)
_HUB_REPO = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class QuantizeResult:
    name: str  # the store name: `edgeinfer run NAME`
    path: Path
    qtype: str
    source: str
    input_size: int  # bytes of the source weights
    output_size: int
    parameters: int
    bits_per_weight: float  # of the quantized tensors' data
    seconds_convert: float
    seconds_quantize: float
    seconds_eval: float
    quality: QualityReport | None
    warnings: tuple[str, ...] = ()
    source_type: str = ""  # a GGUF source's type (F16, Q4_K_M, ...); "" for a Hugging Face model

    @property
    def seconds_total(self) -> float:
        return self.seconds_convert + self.seconds_quantize + self.seconds_eval

    @property
    def reference(self) -> str:
        """What the quality report measures against, in words: a quantized source is no unquantized model."""
        if self.source_type and self.source_type.lower() not in _UNQUANTIZED:
            return f"the source model ({self.source_type})"
        return "the unquantized model" + (f" ({self.source_type})" if self.source_type else "")

    def to_json(self) -> dict:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        data["path"] = str(self.path)
        data["seconds_total"] = self.seconds_total
        data["quality"] = self.quality.to_json() if self.quality else None
        data["warnings"] = list(self.warnings)
        return data


@dataclass(frozen=True)
class _QuantizerReport:
    """What llama.cpp's quantizer said about its work (read from its log)."""

    parameters: int
    bits_per_weight: float | None  # of the tensor data, as llama.cpp counts it
    requantized: tuple[str, ...]  # the quantized types the input already had


@dataclass(frozen=True)
class _Source:
    kind: str  # "hf" or "gguf"
    path: Path  # the model folder, or the .gguf file
    label: str  # recorded in the store: where it came from
    name: str  # the model's name, for the output's
    size: int
    download: Path | None = None  # a hub download's staging folder: removed once the output is whole
    qtype: str = ""  # a GGUF's type, as its metadata names it


def quantize(
    source: str | Path,
    *,
    qtype: str = DEFAULT_TYPE,
    output: Path | None = None,
    imatrix: Path | None = None,
    threads: int | None = None,
    force: bool = False,
    evaluate: bool = True,
    store: Store | None = None,
    progress: ProgressReporter | None = None,
) -> QuantizeResult:
    """Quantize a model with llama.cpp's own quantizer and register the result in the store.

    source: a Hugging Face model folder (config.json, *.safetensors, tokenizer.json),
    a hub repository ("owner/name" or "owner/name@revision"), or a GGUF file.
    qtype: any llama.cpp type (Q4_K_M, Q8_0, Q5_K_M, Q6_K, ...).
    output: the file (or folder) to write; by default Name-QTYPE.gguf in the store.
    imatrix: an importance matrix from llama-imatrix (GGUF or legacy .dat).
    force: replace an existing output. evaluate: compute the quality report.
    """
    progress = progress or SilentProgress()
    store = store or Store(config.edgeinfer_home())
    qtype, ftype = _check_options(qtype, imatrix, threads)
    src = _locate_source(source, store, progress)
    name = f"{src.name}-{qtype}"
    final = _output_path(output, store, name)
    _check_writable(final)
    if final.exists() and src.path.is_file() and final.samefile(src.path):
        raise UsageError(f"the output {final} is the source itself; write the quantized model elsewhere")
    # One quantization to an output at a time: two would share its partial file. The second one waits,
    # then finds the output there (or, with --force, replaces it).
    waiting = f"another edgeinfer is writing {final}; waiting for it to finish"
    with store.exclusive(f"quantize:{final}", on_wait=lambda: progress.note(waiting)):
        if final.exists() and not force:
            raise UsageError(f"{final} already exists; pass --force to replace it")
        work = final.parent / f".{final.name}.work"
        partial = final.with_name(f".{final.name}.incomplete")
        shutil.rmtree(work, ignore_errors=True)  # left by a run that was killed while converting
        try:
            with _Quantizer(orphaned=work) as quantizer:  # llama.cpp loads in the child while the input is prepared
                unquantized, seconds_convert, warnings = _unquantized_gguf(src, work, final, qtype, progress)
                started = time.perf_counter()
                report = quantizer.run(unquantized, partial, ftype, threads, imatrix, progress)
                seconds_quantize = time.perf_counter() - started
            # Hashed before its rename, and recorded before it, so that the output appears registered or not at all.
            model = store.place(name, partial, final, sha256=sha256_file(partial), source=f"quantize:{src.label}",
                                quantization=qtype)
            if src.download is not None:  # (kept after a failure, so that the next attempt resumes it)
                shutil.rmtree(src.download, ignore_errors=True)
            started = time.perf_counter()
            quality = _evaluate(unquantized, final, threads, progress, store, name) if evaluate else None
            seconds_eval = time.perf_counter() - started
        finally:
            partial.unlink(missing_ok=True)
            shutil.rmtree(work, ignore_errors=True)
            store.drop_empty_folders(final.parent)  # the store folder made for an output that never came
    if report.requantized:
        warnings += (f"{src.path.name} was already quantized ({', '.join(report.requantized)}); requantizing loses more "
                     "quality than quantizing from F16/BF16",)
    if model.size > src.size:  # (Q8_0 from Q4_K_M: more bytes, none of the lost quality back)
        warnings += (f"the {qtype} output is larger than its source{f' ({src.qtype})' if src.qtype else ''}, "
                     f"{model.size / src.size:.2f} times its size; more bits bring none of the lost quality back",)
    return QuantizeResult(
        name=model.name, path=final, qtype=qtype, source=src.label, input_size=src.size, output_size=model.size,
        parameters=report.parameters, bits_per_weight=report.bits_per_weight or 8 * model.size / report.parameters,
        seconds_convert=seconds_convert, seconds_quantize=seconds_quantize, seconds_eval=seconds_eval, quality=quality,
        warnings=warnings, source_type=src.qtype,
    )


def _check_options(qtype: str, imatrix: Path | None, threads: int | None) -> tuple[str, int]:
    """The type's name and llama.cpp's id, once the options are known to work together (before any work)."""
    check_threads(threads)
    qtype, ftype = resolve_type(qtype)
    if qtype in _NEEDS_IMATRIX and imatrix is None:
        raise UsageError(f"llama.cpp quantizes to {qtype} only with an importance matrix; pass --imatrix FILE")
    if imatrix is not None:
        from edgeinfer.imatrix import read_imatrix

        read_imatrix(Path(imatrix))  # refuse a bad file now, before a long conversion
    return qtype, ftype


def resolve_type(qtype: str) -> tuple[str, int]:
    """A llama.cpp quantization type's canonical name and its llama_ftype number."""
    name = _ALIASES.get(qtype.upper(), qtype.upper())
    if name not in LLAMA_FTYPES:
        raise UsageError(f"unknown quantization type {qtype!r}; choose one of {', '.join(known_types())}")
    return name, LLAMA_FTYPES[name]


def known_types() -> list[str]:
    return list(LLAMA_FTYPES)


def type_for(bits: int | None, qtype: str | None) -> str:
    """What `--bits` and `--type` ask for together (the CLI's rule: --type wins, --bits picks a default)."""
    if qtype is not None:
        return qtype
    if bits is None:
        return DEFAULT_TYPE
    if bits not in TYPE_FOR_BITS:
        raise UsageError(f"--bits must be 4 or 8 (got {bits}); use --type for other llama.cpp types")
    return TYPE_FOR_BITS[bits]


# --- the source ---------------------------------------------------------------------


def _locate_source(source: str | Path, store: Store, progress: ProgressReporter) -> _Source:
    """A folder or file on disk; a hub repository of safetensors (OWNER/NAME[@REVISION]); or, as everywhere
    else, a model reference (a catalog or store name, OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf), pulled if
    missing: its GGUF is requantized."""
    from edgeinfer.references import strip_hub_prefix

    if not str(source).strip():
        raise UsageError("empty source: give a model folder, a hub repository, a .gguf file or a model reference")
    path = Path(source).expanduser()
    try:
        kind = "dir" if path.is_dir() else "file" if path.is_file() else None
    except OSError as exc:  # (a folder on the way that may not be read)
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if kind == "dir":
        return _hf_folder(path, label=str(path.resolve()))
    if kind == "file" and path.suffix.lower() != ".gguf":
        raise UsageError(f"{path} is neither a Hugging Face model folder nor a .gguf file")
    if kind == "file":
        return _gguf(path, str(path.resolve()), store)
    if str(source).startswith((".", "/", "~")):
        raise UsageError(f"no such folder or file: {path}")
    match = _HUB_REPO.match(strip_hub_prefix(str(source)))
    if match is not None and not str(source).lower().endswith(".gguf"):  # (dir/missing.gguf is a path)
        folder = _download_hub_model(match["repo"], match["rev"] or "main", store, progress)
        src = _hf_folder(folder, label=f"hf:{match['repo']}@{match['rev'] or 'main'}", name=match["repo"].split("/")[1])
        return replace(src, download=folder)
    return _gguf(_located(str(source), store, progress), str(source), store)


def _located(ref: str, store: Store, progress: ProgressReporter) -> Path:
    from edgeinfer.library import Library, locate

    return locate(Library.open(store.root), ref, progress=progress)


def _gguf(path: Path, label: str, store: Store) -> _Source:
    """A GGUF source, checked with the gguf reader before llama.cpp's quantizer reads it (the verdict is
    remembered, as for every model: a file in the store was checked when it was pulled)."""
    from edgeinfer.ggufinfo import inspect

    info = inspect(path, store.inspect_cache)
    return _Source("gguf", path, label, _PRECISION_SUFFIX.sub("", path.stem), path.stat().st_size,
                   qtype=info.quantization)


def _hf_folder(folder: Path, label: str, name: str | None = None) -> _Source:
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder} has no config.json; is it a Hugging Face model folder?")
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    return _Source("hf", folder, label, name or folder.resolve().name, size)


def _download_hub_model(repo: str, revision: str, store: Store, progress: ProgressReporter) -> Path:
    """The files a conversion needs (never pickles, never other formats), as `pull` fetches a model: into
    the store's staging folder, resumable, the weights verified against the sha256 the hub publishes."""
    from huggingface_hub import HfApi, hf_hub_download

    from edgeinfer.catalog import HubSource
    from edgeinfer.sources import fetch_from_hub, hub_access

    staging = store.staging_dir(f"quantize/{repo}@{revision}")
    with hub_access(repo):
        files = [f for f in HfApi().list_repo_files(repo, revision=revision) if "/" not in f]
        wanted = [f for f in files if any(fnmatch.fnmatch(f, pattern) for pattern in _HF_FILES)]
        if not any(f.endswith(".safetensors") for f in wanted):
            pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
            why = " (only pickle checkpoints, which edgeinfer refuses to load)" if pickles else ""
            raise ConversionError(f"{repo} has no .safetensors weights{why}")
        for file in wanted:
            if file.endswith(".safetensors"):  # large, and stored in LFS, whose ETag is their sha256
                fetch_from_hub(HubSource(repo, file, revision), staging, progress)
            else:  # small text files, kept in git: no sha256 to check them against
                hf_hub_download(repo, file, revision=revision, local_dir=staging)
    return staging


def _output_path(output: Path | None, store: Store, name: str) -> Path:
    if output is None:
        return store.model_path(name, f"{name}.gguf")
    output = Path(output).expanduser()
    if output.is_dir():
        return (output / f"{name}.gguf").resolve()
    if output.suffix.lower() != ".gguf":
        raise UsageError(f"--output {output} should end in .gguf (or name an existing folder)")
    return output.resolve()


def _check_writable(final: Path) -> None:
    """Can the output be written there at all? Asked before minutes of work, not after."""
    folder = final.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"cannot write {final}: {folder} is {'not a folder' if not folder.is_dir() else 'not writable'}")


# --- converting --------------------------------------------------------------------------


def _unquantized_gguf(src: _Source, work: Path, final: Path, qtype: str,
                      progress: ProgressReporter) -> tuple[Path, float, tuple[str, ...]]:
    """The GGUF the quantizer reads: the source itself, or a lossless conversion of it into `work`.

    A GGUF source was checked with the gguf reader when it was located; the quantizer, in its own
    process, reports the tensor types itself.
    """
    if src.kind == "gguf":
        check_free_space(final.parent, estimate_output_size(src.path, qtype))
        return src.path, 0.0, ()
    from edgeinfer.convert import convert_hf_to_gguf

    check_free_space(final.parent, src.size + estimate_output_size(src.path, qtype))
    work.mkdir(parents=True, exist_ok=True)
    result = convert_hf_to_gguf(src.path, work / f"{src.name}.gguf", name=src.name, progress=progress)
    return result.path, result.seconds, result.warnings


def _evaluate(unquantized: Path, final: Path, threads: int | None, progress: ProgressReporter, store: Store,
              name: str) -> QualityReport:
    from edgeinfer.quality import compare

    try:
        return compare(unquantized, final, threads=threads, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted(f"quality evaluation interrupted; the quantized model is complete at {final}") from None
    except EdgeinferError:
        store.remove(name)  # an output that llama.cpp cannot load is no model: neither kept nor listed
        final.unlink(missing_ok=True)
        raise


def estimate_output_size(source: Path, qtype: str) -> int:
    """About how many bytes quantizing `source` (a GGUF file, or a Hugging Face model folder) to `qtype` writes,
    rather more than less: it is asked for before starting, so that a full disk is found then."""
    if source.is_dir():
        tensors, other = _hf_tensors(source), sum(p.stat().st_size for p in source.glob("tokenizer*.json"))
    else:
        tensors, other = _gguf_tensors(source)
    has_output = any(name in _OUTPUT_NAMES for name, _ in tensors)
    bits = 0.0
    for name, shape in tensors:
        tensor_bits = _bits_per_weight(shape, qtype)
        if name in _OUTPUT_NAMES or (not has_output and name in _EMBEDDING_NAMES):
            tensor_bits = max(tensor_bits, _BITS_ESTIMATE["Q6_K"])  # llama.cpp keeps the output at Q6_K or better
        bits += math.prod(shape) * tensor_bits
    return int(bits / 8 * 1.05) + other + (1 << 20)


def _bits_per_weight(shape: tuple[int, ...], qtype: str) -> float:
    """What one weight of a tensor (shape with its rows first, as ggml orders it) costs in the output."""
    if len(shape) < 2:
        return 32  # norms and biases stay F32
    bits = _BITS_ESTIMATE.get(qtype, 8.5)
    if shape[0] % 32:
        return max(bits, 16)  # rows that fit no block: llama.cpp falls back to F16
    if shape[0] % 256 and ("_K" in qtype or qtype.startswith(("IQ", "TQ"))):
        return max(bits, 8.5)  # rows that fit no 256-block: a 32-block type instead, Q8_0 at worst
    return bits


def _gguf_tensors(path: Path) -> tuple[list[tuple[str, tuple[int, ...]]], int]:
    """The tensors of a GGUF file (name, shape rows first), and the bytes of everything else in it."""
    from edgeinfer.ggufinfo import validate

    reader = validate(path)
    tensors = [(t.name, tuple(int(d) for d in t.shape)) for t in reader.tensors]
    return tensors, path.stat().st_size - sum(int(t.n_bytes) for t in reader.tensors)


def _hf_tensors(folder: Path) -> list[tuple[str, tuple[int, ...]]]:
    """The tensors of a Hugging Face checkpoint, shapes reversed into ggml's order (rows first)."""
    from edgeinfer.convert.weights import index_weights

    return [(name, tuple(reversed(entry.shape))) for name, entry in index_weights(folder).items()]


_OUTPUT_NAMES = {"output.weight", "lm_head.weight"}
_EMBEDDING_NAMES = {"token_embd.weight", "model.embed_tokens.weight"}
_FULL_DISK = 16 << 20  # free bytes left when a write failed: below this, the disk was full


# --- quantizing, in a child process -------------------------------------------------------

_TENSOR_LINE = re.compile(r"\[\s*(\d+)/\s*(\d+)\]\s+\S+\s+- \[([\d,\s]+)\], type =\s*(\w+)")
_SIZE_LINE = re.compile(r"quant size\s*=.*\(([\d.]+) BPW\)")
_UNQUANTIZED = {"f32", "f16", "bf16"}


class _Quantizer:
    """llama.cpp's quantizer in a child process, started early so that importing llama.cpp overlaps other work.

    The child's stdin carries one job (a JSON line) and then stays open as its
    lifeline: it closes when this process ends, however it ends. Its stdout carries
    progress and its report as JSON lines. It runs in its own session, so a
    terminal's Ctrl-C reaches only this process, which then kills it.
    """

    def __init__(self, orphaned: Path | None = None) -> None:
        self.orphaned = orphaned  # a working folder the child deletes too if this process dies before it
        self.error: str | None = None  # what llama.cpp logged as an error, if it failed

    def __enter__(self) -> "_Quantizer":
        import subprocess
        import sys
        import tempfile

        self.stderr = tempfile.TemporaryFile()
        here = str(Path(__file__).resolve().parent.parent)  # this edgeinfer, wherever it was imported from
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
               "GGML_NO_BACKTRACE": "1"}  # an abort prints one line, not a debugger's backtrace
        self.process = subprocess.Popen(
            [sys.executable, "-c", "from edgeinfer.quantize import _child_main; _child_main()", str(self.orphaned or "")],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, start_new_session=True, env=env,
        )
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.process.stdin.close()
        self.process.stdout.close()
        self.stderr.close()

    def run(self, source: Path, partial: Path, ftype: int, threads: int | None, imatrix: Path | None,
            progress: ProgressReporter) -> _QuantizerReport:
        """Quantize `source` into `partial` (a temporary name beside the output, which the caller renames)."""
        import json

        partial.parent.mkdir(parents=True, exist_ok=True)
        job = {"source": str(source), "partial": str(partial), "ftype": ftype, "threads": threads or 0,
               "imatrix": str(imatrix) if imatrix else None}
        try:
            try:
                self.process.stdin.write(json.dumps(job).encode() + b"\n")
                self.process.stdin.flush()
            except BrokenPipeError:
                pass  # the child died at start; its stderr says why
            report = self._follow(progress)
            if self.process.wait() != 0 or report is None:
                raise self._failure(source, partial.parent, report)
            return report
        except KeyboardInterrupt:
            raise Interrupted("quantization interrupted; no output was written") from None
        finally:
            if self.process.poll() is None:
                self.process.kill()

    def _follow(self, progress: ProgressReporter) -> _QuantizerReport | None:
        """Relay the child's progress; returns its report, or None if it failed."""
        import json

        started = False
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:  # not ours: what a crashing llama.cpp printed; the exit code tells
                continue
            if "tensor" in message:
                if not started:
                    progress.start("quantizing", message["of"], completed=message["tensor"] - 1)
                    started = True
                progress.advance(1)
            elif "error" in message:
                self.error = message["error"]
                return None
            elif "report" in message:
                return _QuantizerReport(**message["report"])
        return None

    def _failure(self, source: Path, folder: Path, report: _QuantizerReport | None) -> EdgeinferError:
        from edgeinfer.ggufinfo import validate

        validate(source)  # a broken file: say what is wrong with it, rather than how llama.cpp failed on it
        # llama.cpp reports a full disk as "basic_ios::clear: iostream error", with no errno to tell.
        if shutil.disk_usage(folder).free < _FULL_DISK:
            return ResourceError(f"the disk holding {folder} filled up while quantizing; free some space and try again")
        if self.error:
            return EdgeinferError(f"llama.cpp's quantizer failed: {self.error}")
        self.stderr.seek(0)
        last = self.stderr.read().decode("utf-8", "replace").strip().splitlines()[-1:]
        return EdgeinferError(f"llama.cpp's quantizer failed: {last[0] if last else f'exit code {self.process.returncode}'}")


def _child_main() -> None:
    """The quantizer's process: one llama_model_quantize call, progress on stdout, watching its parent."""
    import ctypes
    import json
    import sys
    import threading

    orphaned = sys.argv[1] if len(sys.argv) > 1 and sys.argv[1] else None  # the parent's working folder
    from edgeinfer.bindings import c_api

    llama_cpp = c_api()  # (without llama_cpp's Llama, jinja2 and chat formats: a quarter second)
    line = sys.stdin.buffer.readline()
    if not line:  # the parent ended before sending a job (done with an error, or killed while converting)
        if orphaned:
            shutil.rmtree(orphaned, ignore_errors=True)
        os._exit(0)
    job = json.loads(line)
    partial = Path(job["partial"])

    def watch_parent() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the parent is gone (or done)
        partial.unlink(missing_ok=True)  # a partial file must not outlive it
        if orphaned:
            shutil.rmtree(orphaned, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch_parent, daemon=True).start()
    errors: list[str] = []
    parameters, input_types, bits_per_weight = 0, set(), None

    def send(message: dict) -> None:
        sys.stdout.write(json.dumps(message) + "\n")
        sys.stdout.flush()

    @llama_cpp.llama_log_callback
    def on_log(level: int, text: bytes, user_data) -> None:
        nonlocal parameters, bits_per_weight
        line = text.decode("utf-8", "replace")
        if (m := _TENSOR_LINE.match(line)) is not None:
            parameters += math.prod(int(d) for d in m[3].split(","))
            input_types.add(m[4])
            send({"tensor": int(m[1]), "of": int(m[2])})
        elif (m := _SIZE_LINE.search(line)) is not None:
            bits_per_weight = float(m[1])
        elif level == 4:  # GGML_LOG_LEVEL_ERROR
            errors.append(line.strip())

    llama_cpp.llama_log_set(on_log, ctypes.c_void_p(0))
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = job["ftype"]
    params.nthread = job["threads"]
    params.allow_requantize = True  # reported back, and turned into a warning by the parent
    if job["imatrix"]:
        from edgeinfer.imatrix import read_imatrix

        params.imatrix, keep_alive = _imatrix_array(llama_cpp, read_imatrix(Path(job["imatrix"])))  # noqa: F841
    status = llama_cpp.llama_model_quantize(job["source"].encode(), str(partial).encode(), ctypes.byref(params))
    if status != 0:
        send({"error": "; ".join(e for e in errors if e) or f"status {status}"})
    else:
        requantized = sorted(t.upper() for t in input_types - _UNQUANTIZED)
        send({"report": {"parameters": parameters, "bits_per_weight": bits_per_weight, "requantized": requantized}})
    os._exit(0 if status == 0 else 1)  # no interpreter teardown: the watcher must not fire


def _imatrix_array(llama_cpp, importance: dict):
    """A NULL-terminated C array of llama_model_imatrix_data, and the objects that must outlive it."""
    import ctypes

    import numpy as np

    entries = (llama_cpp.llama_model_imatrix_data * (len(importance) + 1))()
    keep = []
    for i, (name, values) in enumerate(importance.items()):
        array = np.ascontiguousarray(values, dtype=np.float32)
        encoded = name.encode()
        keep += [array, encoded]
        entries[i].name = encoded
        entries[i].data = array.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        entries[i].size = array.size
    return ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data)), (entries, keep)
