"""The edgeinfer command line: parse, call one library function, render with rich.

No logic lives here. Errors from the library (EdgeinferError) become one line on
stderr and the error's exit code; a traceback is shown only with --debug.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table
from rich.text import Text
from typer.core import TyperGroup
from typer.exceptions import TyperException

from edgeinfer import __version__
from edgeinfer.errors import EdgeinferError
from edgeinfer.render import TextConsole, print_error, visible

# Strings print as text, never as markup: names come from GGUF files and hub listings (render.TextConsole).
stdout = TextConsole(soft_wrap=True)
stderr = TextConsole(stderr=True, soft_wrap=True)
_state = {"debug": False}
PIPE_CLOSED = 141  # what a shell reports for a process that SIGPIPE ended, as it ends C tools


class _ErrorsToMessages(TyperGroup):
    """Turns our exceptions into one stderr line and an exit code, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeinferError as exc:
            if _state["debug"]:
                stderr.print_exception()
            print_error(stderr, str(exc))
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None
        except (typer.Exit, typer.Abort, TyperException):
            raise
        except BrokenPipeError:  # the reader went away (`edgeinfer run ... | head`): stop, quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # (or Python's exit flush fails again)
            raise typer.Exit(PIPE_CLOSED) from None
        except Exception as exc:  # a bug, or an OSError the library did not foresee: one line all the same
            if _state["debug"]:
                stderr.print_exception()
            where = f": {exc.filename}" if isinstance(exc, OSError) and exc.filename else ""
            what = f"{exc.strerror}{where}" if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
            print_error(stderr, f"{what} (unexpected: --debug shows where)")
            raise typer.Exit(1) from None

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Click's own errors (a value that is not a number, an unknown option or command, a missing
        argument) as one line too, where Typer would draw a boxed panel under the usage text."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except TyperException as exc:  # (the base of Typer's click exceptions)
            if type(exc).__name__ != "NoArgsIsHelpError":  # (that one has printed the help already)
                ctx = getattr(exc, "ctx", None)
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                print_error(stderr, exc.format_message() + hint)
            sys.exit(getattr(exc, "exit_code", 2))
        except typer.Abort:
            stderr.print("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_ErrorsToMessages,
    help="Run quantized language models on this machine, through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        stdout.print(f"edgeinfer {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


def _library():
    from edgeinfer.library import Library

    return Library.open()


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- models ----------------------------------------------------------------------


@app.command()
def pull(ref: Annotated[Optional[str], typer.Argument(help="Catalog name, OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf (default: the catalog's default model).")] = None) -> None:
    """Download a model into the local store, verified by sha256."""
    from edgeinfer.library import pull as pull_model
    from edgeinfer.render import transfer_progress

    with transfer_progress(stderr) as progress:
        result = pull_model(_library(), ref, progress)
    verb = "already present" if result.already_present else "pulled"
    stdout.print(f"{visible(result.model.name)}: {verb} ({_size(result.model.size)}) {visible(str(result.model.path))}")


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The catalog's models and everything in the local store."""
    from edgeinfer.library import list_models

    rows = list_models(_library())
    if as_json:
        _print_json([{**row.__dict__, "path": str(row.path) if row.path else None} for row in rows])
        return
    table = Table(box=None)
    table.add_column("name", no_wrap=True)
    table.add_column("quant", no_wrap=True)
    table.add_column("size", no_wrap=True, justify="right")
    table.add_column("present", no_wrap=True)
    table.add_column("path / description")
    for row in rows:
        # A path cut short is no path: it folds; a description may be cut.
        where = Text(visible(str(row.path)), overflow="fold") if row.present else \
            Text(visible(row.description), overflow="ellipsis", no_wrap=True)
        present = ("yes" if row.registered else "unregistered") if row.present else "-"
        table.add_row(visible(row.name), visible(row.quantization), _size(row.size), present, where)
    (stdout if stdout.is_terminal else TextConsole(width=1000)).print(table)  # a pipe: whole lines


@app.command()
def info(
    ref: Annotated[Optional[str], typer.Argument(help="A model in the store or a local .gguf file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """GGUF metadata of a model: architecture, parameters, quantization, context, tokenizer."""
    from edgeinfer.ggufinfo import inspect
    from edgeinfer.library import model_path_for_info

    lib = _library()
    meta = inspect(model_path_for_info(lib, ref), lib.store.inspect_cache)
    if as_json:
        _print_json(meta.to_json())
        return
    table = Table(show_header=False, box=None)
    for key, value in meta.to_json().items():
        if key == "parameters":
            value = f"{value:,}"
        elif key == "file_size":
            value = f"{_size(value)} ({value:,} bytes)"
        table.add_row(key.replace("_", " "), visible(str(value)))
    stdout.print(table)


@app.command()
def rm(ref: Annotated[str, typer.Argument(help="A model in the store.")]) -> None:
    """Remove a model from the local store."""
    from edgeinfer.library import remove

    entry = remove(_library(), ref)
    gone = "; its file was already gone" if entry.file_was_missing else ""
    stdout.print(f"removed {visible(entry.name)} ({_size(entry.size)}){gone}")


# --- generation -------------------------------------------------------------------


def _utf8(value: Any) -> Any:
    """A text option or argument (or a list of them) as given, if it is UTF-8: Python passes argv's other
    bytes on as lone surrogates, which no tokenizer takes."""
    from edgeinfer.chat import is_text

    if any(text is not None and not is_text(text) for text in (value if isinstance(value, list) else [value])):
        raise typer.BadParameter("not UTF-8 text")
    return value

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", help="Model reference (default: the catalog's default model).")]
TemperatureOpt = Annotated[float, typer.Option("--temperature", "--temp", help="Sampling temperature; 0 is greedy.")]
TopKOpt = Annotated[int, typer.Option("--top-k", help="Keep the k most likely tokens (0: all).")]
TopPOpt = Annotated[float, typer.Option("--top-p", help="Keep the smallest set of tokens whose probability reaches p.")]
MinPOpt = Annotated[float, typer.Option("--min-p", help="Drop tokens less likely than min-p times the most likely.")]
RepeatPenaltyOpt = Annotated[float, typer.Option("--repeat-penalty", help="Penalty for tokens among the last 64 (1: off).")]
SeedOpt = Annotated[Optional[int], typer.Option("--seed", help="Random seed: the same seed gives the same output (-1: random).")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", "-n", help="Stop after this many tokens.")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", callback=_utf8, help="Stop when this text appears (repeatable).")]
CtxOpt = Annotated[Optional[int], typer.Option("--ctx-size", "-c", help="Context window in tokens (default: the model's, at most 4096).")]
ThreadsOpt = Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads, obeyed as given (default: the cores other programs leave free, followed while generating).")]
GpuLayersOpt = Annotated[Optional[int], typer.Option("--gpu-layers", "-ngl", help="Layers to offload, -1 for all (default: all on a GPU build, 0 on CPU).")]
CacheTypeOpt = Annotated[str, typer.Option("--cache-type", help="The KV cache's type: f16, bf16 or q8_0 (half the memory). On a CPU, --draft stays exact past 256 tokens of context only with bf16 or q8_0.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", callback=_utf8, help="System message.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", help="Show llama.cpp's own log on stderr.")]
DraftOpt = Annotated[Optional[str], typer.Option("--draft", help="Speculative decoding: a draft model reference, 'auto' (the catalog's draft for the model) or 'ngram' (prompt lookup).")]
DraftMaxOpt = Annotated[int, typer.Option("--draft-max", help="Most tokens drafted per round (the length in use adapts below it).")]
DraftMinOpt = Annotated[int, typer.Option("--draft-min", help="Fewest drafted tokens worth a verification.")]
DraftPMinOpt = Annotated[float, typer.Option("--draft-p-min", help="Stop drafting when the draft's probability for its token is below this.")]
DraftThreadsOpt = Annotated[Optional[int], typer.Option("--draft-threads", help="CPU threads for the draft model (default: as --threads).")]
DraftGpuLayersOpt = Annotated[Optional[int], typer.Option("--draft-gpu-layers", help="Draft layers to offload (default: as --gpu-layers).")]
ParseSpecialOpt = Annotated[bool, typer.Option("--parse-special", help="Read special-token text in messages (<|im_end|>) as the tokens it names; by default only the chat template's own markup does.")]
DraftLookupOpt = Annotated[bool, typer.Option("--draft-lookup/--no-draft-lookup", help="With a draft model, also verify copies out of the context where they promise more than the draft.")]


def _sampling(temperature: float, top_k: int, top_p: float, min_p: float, repeat_penalty: float, seed: int | None):
    from edgeinfer.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed)


def _load_options(ctx_size: int | None, threads: int | None, gpu_layers: int | None, verbose: bool,
                  cache_type: str = "f16"):
    from edgeinfer.engine import LoadOptions

    return LoadOptions(n_ctx=ctx_size, n_threads=threads, n_gpu_layers=gpu_layers, verbose=verbose,
                       cache_type=cache_type)


def _draft_options(draft: str | None, draft_max: int, draft_min: int, p_min: float, threads: int | None,
                   gpu_layers: int | None, lookup: bool):
    if draft is None:
        return None
    from edgeinfer.speculative import DraftOptions

    return DraftOptions(ref=draft, draft_max=draft_max, draft_min=draft_min, p_min=p_min,
                        n_threads=threads, n_gpu_layers=gpu_layers, lookup=lookup)


def _read_prompt(prompt: str | None, files: list[Path] | None) -> str:
    """The argument, then stdin when it is piped, then each --file: joined by blank lines."""
    from edgeinfer.errors import UsageError

    parts = [prompt] if prompt else []
    if not sys.stdin.isatty():
        piped = _read_text(sys.stdin.buffer, "stdin")
        if piped.strip():
            parts.append(piped)
    for path in files or []:
        try:
            with path.open("rb") as handle:
                parts.append(f"{path.name}:\n{_read_text(handle, f'--file {path}')}")
        except OSError as exc:
            raise UsageError(f"cannot read --file {path}: {exc.strerror}") from None
    return "\n\n".join(parts)


_TEXT_LIMIT = 16 << 20  # more text than any context holds: a mistake (-f /dev/zero would read forever)


def _read_text(handle, what: str) -> str:
    from edgeinfer.errors import UsageError

    data = handle.read(_TEXT_LIMIT + 1)
    if len(data) > _TEXT_LIMIT:
        raise UsageError(f"{what} holds more than {_TEXT_LIMIT >> 20} MiB of text, more than any context holds")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"{what} is not UTF-8 text") from None


def _stats_line(result) -> str:
    line = (f"{result.prompt_tokens} prompt tokens, {result.completion_tokens} generated; "
            f"first token {result.time_to_first_token * 1000:.0f} ms, prompt {result.prompt_tokens_per_second:.1f} tok/s, "
            f"generation {result.generation_tokens_per_second:.1f} tok/s; finish: {result.finish_reason}")
    from edgeinfer.threads import describe

    shared = describe(result.threads)
    return line + (f"\n{shared}" if shared else "")


@app.command()
def run(
    prompt: Annotated[Optional[str], typer.Argument(callback=_utf8, help="The prompt (joined with stdin when piped).")] = None,
    model: ModelOpt = None,
    file: Annotated[Optional[list[Path]], typer.Option("--file", "-f", help="Add a file's text to the prompt (repeatable).")] = None,
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion: no chat template.")] = False,
    parse_special: ParseSpecialOpt = False,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    stop: StopOpt = None,
    ctx_size: CtxOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    cache_type: CacheTypeOpt = "f16",
    draft: DraftOpt = None,
    draft_max: DraftMaxOpt = 8,
    draft_min: DraftMinOpt = 0,
    draft_p_min: DraftPMinOpt = 0.75,
    draft_threads: DraftThreadsOpt = None,
    draft_gpu_layers: DraftGpuLayersOpt = None,
    draft_lookup: DraftLookupOpt = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings on stderr after the answer.")] = False,
    verbose: VerboseOpt = False,
) -> None:
    """Answer one prompt, streaming the text to stdout."""
    from edgeinfer.api import RunRequest, run as run_prompt
    from edgeinfer.render import describe_stats

    speculate = _draft_options(draft, draft_max, draft_min, draft_p_min, draft_threads, draft_gpu_layers,
                               draft_lookup)
    request = RunRequest(
        prompt=_read_prompt(prompt, file), model=model, system=system, raw=raw, parse_special=parse_special,
        sampling=_sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed),
        max_tokens=max_tokens, stop=tuple(stop or ()), load=_load_options(ctx_size, threads, gpu_layers, verbose, cache_type),
        draft=speculate,
    )
    _pull_with_progress(model, speculate, request.load)
    result = run_prompt(request, on_text=None if as_json else _stream_to_stdout)
    if as_json:
        _print_json({"model": model or _library().catalog.default, **result.to_json()})
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if stats:
        stderr.print(_stats_line(result))
        if result.stats:
            stderr.print(describe_stats(result.stats))
    elif result.stats.get("long_context") and not as_json:
        from edgeinfer.render import print_note

        print_note(stderr, result.stats["long_context"])
    if result.finish_reason == "interrupted":
        raise typer.Exit(130)


@app.command()
def chat(
    model: ModelOpt = None,
    system: SystemOpt = None,
    temperature: TemperatureOpt = 0.8,
    top_k: TopKOpt = 40,
    top_p: TopPOpt = 0.95,
    min_p: MinPOpt = 0.05,
    repeat_penalty: RepeatPenaltyOpt = 1.0,
    seed: SeedOpt = None,
    max_tokens: MaxTokensOpt = None,
    stop: StopOpt = None,
    ctx_size: CtxOpt = None,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    cache_type: CacheTypeOpt = "f16",
    verbose: VerboseOpt = False,
    draft: DraftOpt = None,
    draft_max: DraftMaxOpt = 8,
    draft_min: DraftMinOpt = 0,
    draft_p_min: DraftPMinOpt = 0.75,
    draft_threads: DraftThreadsOpt = None,
    draft_gpu_layers: DraftGpuLayersOpt = None,
    draft_lookup: DraftLookupOpt = True,
    parse_special: ParseSpecialOpt = False,
) -> None:
    """Hold a conversation in the terminal (/help lists the commands)."""
    from edgeinfer import chatui, config
    from edgeinfer.api import check_max_tokens, open_chat

    speculate = _draft_options(draft, draft_max, draft_min, draft_p_min, draft_threads, draft_gpu_layers,
                               draft_lookup)
    sampling, load_options = _sampling(temperature, top_k, top_p, min_p, repeat_penalty, seed), \
        _load_options(ctx_size, threads, gpu_layers, verbose, cache_type)
    check_max_tokens(max_tokens)  # bad options are told before a missing model is pulled
    _pull_with_progress(model, speculate, load_options)
    with open_chat(model, system=system, sampling=sampling, load_options=load_options, max_tokens=max_tokens,
                   stop=tuple(stop or ()), draft=speculate, parse_special=parse_special) as session:
        raise typer.Exit(chatui.loop(session, stderr, config.history_file(), _chat_stats))


def _chat_stats(result) -> str:
    from edgeinfer.render import describe_stats

    return _stats_line(result) + (("\n" + describe_stats(result.stats)) if result.stats else "")


@app.command()
def bench(
    models: Annotated[Optional[list[str]], typer.Argument(help="Model references (default: the catalog's default model).")] = None,
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", help="Prompt tokens for the pp test (0 skips it).")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", help="Generated tokens for the tg test (0 skips it).")] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Repetitions of each test.")] = 3,
    threads: ThreadsOpt = None,
    gpu_layers: GpuLayersOpt = None,
    cache_type: CacheTypeOpt = "f16",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    verbose: VerboseOpt = False,
    draft: DraftOpt = None,
    draft_max: DraftMaxOpt = 8,
    draft_min: DraftMinOpt = 0,
    draft_p_min: DraftPMinOpt = 0.75,
    draft_threads: DraftThreadsOpt = None,
    draft_gpu_layers: DraftGpuLayersOpt = None,
    draft_lookup: DraftLookupOpt = True,
) -> None:
    """Prompt and generation throughput, like llama-bench's pp and tg tests (with --draft: plain against speculative)."""
    from edgeinfer.api import checked_plan
    from edgeinfer.bench import bench as bench_model, bench_speculative
    from edgeinfer.errors import UsageError
    from edgeinfer.library import locate
    from edgeinfer.render import count_progress

    if repetitions < 1 or n_prompt < 0 or n_gen < 0 or n_prompt + n_gen == 0:
        raise UsageError("bench needs --repetitions >= 1 and a positive --n-prompt or --n-gen")
    speculate = _draft_options(draft, draft_max, draft_min, draft_p_min, draft_threads, draft_gpu_layers,
                               draft_lookup)
    lib, results, load_options = _library(), [], _load_options(None, threads, gpu_layers, verbose, cache_type)
    for ref in models or [None]:
        _pull_with_progress(ref, speculate)
        path = locate(lib, ref, pull_missing=False)
        name = ref or lib.catalog.default
        with count_progress(stderr) as progress:
            results += bench_model(name, path, load_options, n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions,
                                   cache_file=lib.store.inspect_cache, progress=progress)
            if speculate is not None and n_gen:
                plan = checked_plan(lib, ref, path, speculate, load_options)
                results += bench_speculative(name, path, load_options, plan, n_gen=n_gen,
                                             repetitions=repetitions, cache_file=lib.store.inspect_cache, progress=progress)
    if as_json:
        _print_json([r.to_json() for r in results])
        return
    table = Table(box=None)
    table.add_column("model", overflow="fold")
    table.add_column("test", no_wrap=True)
    for column in ("tok/s (median)", "± stdev", "first token"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        ttft = f"{r.to_json()['median_time_to_first_token_ms']:.0f} ms" if r.time_to_first_token_ms else ""
        table.add_row(visible(r.model), r.test, f"{r.median:.2f}", f"{r.spread:.2f}", ttft)
    stdout.print(table)


@app.command()
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The llama.cpp build, its devices, memory and cores, the store, and which local models fit."""
    from edgeinfer.doctor import diagnose

    report = diagnose(_library())
    if as_json:
        _print_json(report.to_json())
        return
    table = Table(show_header=False, box=None)
    table.add_row("edgeinfer", f"{report.edgeinfer_version} (llama-cpp-python {report.llama_cpp_python_version}, Python {report.python})")
    table.add_row("llama.cpp", report.system_info)
    table.add_row("GPU offload", "yes" if report.gpu_offload else "no (CPU build)")
    table.add_row("backends", ", ".join(report.backends) or "CPU only")
    for d in report.devices:
        table.add_row(f"device {d.name}", f"{d.description} ({d.kind}), {_size(d.memory_free)} free of {_size(d.memory_total)}")
    table.add_row("CPU", f"{report.cpu}; {report.physical_cores} physical cores; {' '.join(report.cpu_flags)}")
    table.add_row("CPU load", f"other programs keep {report.cpu_busy:.1f} of {report.usable_cores} usable cores busy; "
                              f"run would start with {report.default_threads} thread{'s' if report.default_threads > 1 else ''}")
    table.add_row("memory", f"{_size(report.memory_available)} available of {_size(report.memory_total)}")
    table.add_row("store", f"{report.store} ({_size(report.store_size)})")
    for m in report.models:
        verdict = m.problem or (f"needs ~{_size(m.needs)}: " + ("fits" if m.fits else "does NOT fit in available memory"))
        table.add_row(visible(f"model {m.name}"), visible(f"{_size(m.size)}; {verdict}"))
    stdout.print(table)


def _pull_with_progress(model: str | None, draft=None, load=None) -> None:
    """Bring missing models in with a progress bar, before any text streams (the bar must be gone by then);
    with it, a note if the context asked for is past the model's own."""
    from edgeinfer.engine import check_context
    from edgeinfer.ggufinfo import inspect
    from edgeinfer.library import locate
    from edgeinfer.render import transfer_progress

    lib = _library()
    with transfer_progress(stderr) as progress:
        path = locate(lib, model, pull_missing=True, progress=progress)
        # A context that cannot fit is an error, before the note it would otherwise get.
        if load is not None and load.n_ctx:
            note = check_context(inspect(path, lib.store.inspect_cache), load.n_ctx, load.cache_type)
            if note:
                progress.note(note)
        if draft is not None:
            from edgeinfer.speculative import resolve_draft

            resolve_draft(lib, model, draft, progress)


def _stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command()
def quantize(
    source: Annotated[str, typer.Argument(help="A Hugging Face model folder, a hub repository (OWNER/NAME or OWNER/NAME@REVISION), a .gguf file or a model reference.")],
    bits: Annotated[Optional[int], typer.Option("--bits", help="4 (Q4_K_M, the default) or 8 (Q8_0).")] = None,
    qtype: Annotated[Optional[str], typer.Option("--type", help="Any llama.cpp type: Q4_0, Q4_K_S, Q5_K_M, Q6_K, ... (overrides --bits).")] = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix from llama-imatrix (GGUF or .dat).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: all cores to quantize, physical cores to evaluate).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File or folder to write (default: the store).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the quality report (perplexity, KL divergence).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Quantize a model to 4 or 8 bits with llama.cpp, and report the quality lost."""
    from edgeinfer.quantize import quantize as quantize_model
    from edgeinfer.quantize import type_for
    from edgeinfer.render import count_progress

    with count_progress(stderr) as progress:
        result = quantize_model(source, qtype=type_for(bits, qtype), output=output, imatrix=imatrix, threads=threads,
                                force=force, evaluate=not no_eval, progress=progress)
    for warning in result.warnings:
        stderr.print(Text.assemble(("warning:", "yellow"), " ", visible(warning)))
    if as_json:
        _print_json(result.to_json())
        return
    table = Table(show_header=False, box=None)
    table.add_row("model", visible(f"{result.name} ({result.path})"))
    table.add_row("size", f"{_size(result.input_size)} -> {_size(result.output_size)}, {result.bits_per_weight:.2f} bits per weight")
    table.add_row("time", f"{result.seconds_total:.1f} s (convert {result.seconds_convert:.1f}, quantize {result.seconds_quantize:.1f}, "
                          f"evaluate {result.seconds_eval:.1f})")
    if (q := result.quality) is not None:
        table.add_row("perplexity", f"{q.ppl_source:.3f} -> {q.ppl_quantized:.3f} (delta {q.delta_ppl:+.3f}) over {q.tokens} tokens")
        table.add_row("KL divergence", f"{q.mean_kld:.5f} (mean, from the unquantized model)")
        table.add_row("top-1 agreement", f"{q.top1_agreement:.1%}")
    stdout.print(table)


def main() -> None:
    app()
