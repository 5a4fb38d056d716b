"""The edgeinfer command line: parse, call one function of `edgeinfer.api`, render with rich. No logic
lives here. Errors from the library (EdgeinferError) become one line on stderr and the error's exit code;
a traceback is shown only with --debug."""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional

import typer
from rich.text import Text
from typer.core import TyperCommand, TyperGroup
from typer.exceptions import TyperException

from edgeinfer import __version__
from edgeinfer.errors import EdgeinferError
from edgeinfer.render import TextConsole, describe_threads, print_error, visible

if TYPE_CHECKING:  # (imported by the commands that use them: `edgeinfer --help` stays instant)
    import click  # (Typer's own copy of it since 0.26: only for the annotations)
    from edgeinfer.api import BatchRequest, ChatRequest, Prepared, RunRequest
    from edgeinfer.batchjob import BatchItem
    from edgeinfer.engine import LoadOptions
    from edgeinfer.grammar import Constraint
    from edgeinfer.library import Library
    from edgeinfer.sampling import SamplingParams
    from edgeinfer.speculative import DraftOptions

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


class _Command(TyperCommand):
    """Help written as Click, git and pip write it, whatever Typer's version: `edgeinfer rm [OPTIONS] MODEL`
    (recent Typers write `{ref}` and `<bool>`), each argument listed under that name."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        arguments = [_argument_name(p, usage=True) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [self.options_metavar, *arguments]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        params = self.get_params(ctx)
        arguments = [(_argument_name(p), p.help) for p in params if p.param_type_name == "argument" and p.help]
        options = [record for p in params if p.param_type_name == "option" and (record := p.get_help_record(ctx))]
        for title, rows in (("Arguments", arguments), ("Options", options)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(param: click.Parameter, usage: bool = False) -> str:
    """MODEL, [MODEL] when it may be left out, MODEL... when it repeats; a metavar is written as given."""
    if param.metavar:
        return param.metavar
    name = param.name.upper() + ("..." if param.nargs != 1 else "")
    return f"[{name}]" if usage and not param.required else name


def _examples(*commands: str) -> str:
    """A command's help epilog: command lines kept as written (Click's \\b), not rewrapped."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {command}" for command in commands)


app = typer.Typer(
    cls=_ErrorsToMessages,
    help="Run quantized language models on this machine, through llama.cpp.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help, Click's: two columns that fit 80 columns (rich's panels left the descriptions 18 wide),
    # no markup to eat `[brackets]` in a description, and no rich.console to import for `--help`.
    rich_markup_mode=None,
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


def _print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def _whole_lines_when_piped() -> TextConsole:
    """stdout, or where it is not a terminal a console too wide to cut or wrap a line: a script or a
    pager gets every path and description whole."""
    return stdout if stdout.is_terminal else TextConsole(width=1 << 16, soft_wrap=True)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# --- models ----------------------------------------------------------------------


@app.command(cls=_Command, epilog=_examples("edgeinfer pull qwen2.5-coder-0.5b-instruct",
                                            "edgeinfer pull bartowski/Qwen2.5-0.5B-Instruct-GGUF:Q4_K_M"))
def pull(ref: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="Catalog name, OWNER/REPO:QUANT, OWNER/REPO/FILE.gguf (default: the catalog's default model).")] = None) -> None:
    """Download a model into the local store, verified by sha256."""
    from edgeinfer import api
    from edgeinfer.render import transfer_progress

    with transfer_progress(stderr) as progress:
        result = api.pull(ref, progress)
    verb = "already present" if result.already_present else "pulled"
    stdout.print(f"{visible(result.model.name)}: {verb} ({_size(result.model.size)}) {visible(str(result.model.path))}")


@app.command("list", cls=_Command, epilog=_examples("edgeinfer list", "edgeinfer list --json   # with each file's path"))
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The catalog's models and everything in the local store.

    At a terminal a description is cut to fit the width; piped, lines are whole. `info` shows a model's path."""
    from edgeinfer import api

    rows = api.list_models()
    if as_json:
        _print_json([{**row.__dict__, "path": str(row.path) if row.path else None} for row in rows])
        return
    from rich.table import Table

    # One line a model at 80 columns: paths are in `info` and `--json`; a description is cut at a
    # terminal, whole in a pipe. A long name folds rather than push the row off the screen.
    cells = [(visible(row.name), visible(row.quantization), _size(row.size),
              ("yes" if row.registered else "unregistered") if row.present else "-", visible(row.description)) for row in rows]
    console = _whole_lines_when_piped()
    table = Table(box=None, pad_edge=False)
    used = 0
    for k, (header, limit) in enumerate((("name", 40), ("quant", 12), ("size", 10), ("present", 12))):
        width = max([len(header), *(len(c[k]) for c in cells)])
        width = min(width, limit) if console.is_terminal else width  # (at a terminal a longer name folds)
        table.add_column(header, width=width, overflow="fold", justify="right" if header == "size" else "left")
        used += width + 2
    # The description takes what is left, cut: rich would squeeze every column alike.
    table.add_column("description", max_width=max(console.width - used, 12), no_wrap=True, overflow="ellipsis")
    for row in cells:
        table.add_row(*row)
    console.print(table)


@app.command(cls=_Command, epilog=_examples("edgeinfer info smollm2-135m-instruct", "edgeinfer info ./model.gguf --json",
                                            "edgeinfer info qwen2.5-coder-0.5b-instruct --template"))
def info(
    ref: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="A model in the store or a local .gguf file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    template: Annotated[bool, typer.Option("--template", help="Print the model's chat template (its raw text) instead.")] = False,
) -> None:
    """A model's file and GGUF metadata.

    Its path, architecture, parameters, quantization, context and tokenizer, and the sampling settings
    its catalog entry recommends."""
    from edgeinfer import api

    if template:
        text = api.chat_template(ref)
        if as_json:
            _print_json({"chat_template": text})
        else:  # as the file has it, ended by a newline
            sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    meta, recommended = api.info(ref), api.recommended_settings(ref)
    if as_json:
        _print_json({**meta.to_json(), "sampling": recommended})
        return
    from rich.table import Table

    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(no_wrap=True)
    table.add_column(overflow="fold")  # (a path folds at a terminal, never cut short)
    for key, value in meta.to_json().items():
        if key == "parameters":
            value = f"{value:,}"
        elif key == "file_size":
            value = f"{_size(value)} ({value:,} bytes)"
        table.add_row(key.replace("_", " "), visible(str(value)))
    if recommended:  # (a catalog model's: options override them)
        table.add_row("sampling", ", ".join(f"{k.replace('_', '-')} {v}" for k, v in recommended.items()))
    _whole_lines_when_piped().print(table)


@app.command(cls=_Command, epilog=_examples("edgeinfer rm gemma-3-270m"))
def rm(ref: Annotated[str, typer.Argument(metavar="MODEL", help="A model in the store.")]) -> None:
    """Remove a model from the local store."""
    from edgeinfer import api

    entry = api.remove(ref)
    gone = "; its file was already gone" if entry.file_was_missing else ""
    stdout.print(f"removed {visible(entry.name)} ({_size(entry.size)}){gone}")


# --- generation -------------------------------------------------------------------


def _utf8(value: Any) -> Any:
    """A text option or argument (or a list of them) as given, if it is UTF-8: Python passes argv's other
    bytes on as lone surrogates, which no tokenizer takes."""
    from edgeinfer.textstream import is_text  # (not chat: it would load numpy and llama.cpp to parse options)

    if any(text is not None and not is_text(text) for text in (value if isinstance(value, list) else [value])):
        raise typer.BadParameter("not UTF-8 text")
    return value

ModelOpt = Annotated[Optional[str], typer.Option("--model", "-m", metavar="MODEL", help="Model reference (default: the catalog's default model).")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", metavar="TEXT", callback=_utf8, help="System message (the text itself).")]
SystemFileOpt = Annotated[Optional[Path], typer.Option("--system-file", help="Read the system message from a file (UTF-8).")]
MaxTokensOpt = Annotated[Optional[int], typer.Option("--max-tokens", "-n", help="Stop after this many tokens (default: the model's cap, if its catalog entry sets one).")]
StopOpt = Annotated[Optional[list[str]], typer.Option("--stop", metavar="TEXT", callback=_utf8, help="Stop when this text appears (repeatable).")]
ParseSpecialOpt = Annotated[bool, typer.Option("--parse-special", help="Read special-token text in messages (<|im_end|>) as the tokens it names; by default only the chat template's own markup does.")]


# The options run, chat and bench share, each written once: a builder's parameters are the options, and what
# it returns is what the command receives (see _shared_options).


# Sampling options left out are the model's catalog recommendation (`edgeinfer info` shows it), else llama.cpp's default.
def _sampling(
    temperature: Annotated[Optional[float], typer.Option("--temperature", "--temp", help="Sampling temperature; 0 is greedy (default: the model's, else 0.8).")] = None,
    top_k: Annotated[Optional[int], typer.Option("--top-k", help="Keep the k most likely tokens; 0: all (default: the model's, else 40).")] = None,
    top_p: Annotated[Optional[float], typer.Option("--top-p", help="Keep the smallest set of tokens whose probability reaches p (default: the model's, else 0.95).")] = None,
    min_p: Annotated[Optional[float], typer.Option("--min-p", help="Drop tokens less likely than min-p times the most likely (default: the model's, else 0.05).")] = None,
    repeat_penalty: Annotated[Optional[float], typer.Option("--repeat-penalty", help="Penalty for tokens among the last 64; 1: off (default: the model's, else 1).")] = None,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Random seed: the same seed gives the same output (-1: random).")] = None,
) -> SamplingParams:
    from edgeinfer.sampling import SamplingParams

    return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                          repeat_penalty=repeat_penalty, seed=seed)


def _loading(
    ctx_size: Annotated[Optional[int], typer.Option("--ctx-size", "-c", help="Context window in tokens (default: the model's, at most 4096).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads, obeyed as given (default: the cores other programs leave free, followed while generating).")] = None,
    gpu_layers: Annotated[Optional[int], typer.Option("--gpu-layers", "-ngl", help="Layers to offload, -1 for all (default: all on a GPU build, 0 on CPU).")] = None,
    cache_type: Annotated[str, typer.Option("--cache-type", metavar="TYPE", help="The KV cache's type: auto (f16; with --draft on a CPU, q8_0 or bf16, whichever this machine measured faster: passes stay exact past 256 tokens of context only with those), f16, bf16 or q8_0 (half the memory).")] = "auto",
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show llama.cpp's own log on stderr, and with --stats every speculation figure.")] = False,
) -> LoadOptions:
    from edgeinfer.engine import LoadOptions

    return LoadOptions(n_ctx=ctx_size, n_threads=threads, n_gpu_layers=gpu_layers, verbose=verbose,
                       cache_type=cache_type)


def _drafting(
    draft: Annotated[Optional[str], typer.Option("--draft", metavar="MODEL", help="Speculative decoding: a draft model reference, 'auto' (the catalog's draft for the model) or 'ngram' (prompt lookup).")] = None,
    draft_max: Annotated[int, typer.Option("--draft-max", help="Most tokens drafted per round (the length in use adapts below it).")] = 8,
    draft_min: Annotated[int, typer.Option("--draft-min", help="Fewest drafted tokens worth a verification.")] = 0,
    draft_p_min: Annotated[float, typer.Option("--draft-p-min", help="Stop drafting when the draft's probability for its token is below this.")] = 0.75,
    draft_threads: Annotated[Optional[int], typer.Option("--draft-threads", help="CPU threads for the draft model (default: as --threads).")] = None,
    draft_gpu_layers: Annotated[Optional[int], typer.Option("--draft-gpu-layers", help="Draft layers to offload (default: as --gpu-layers).")] = None,
    draft_lookup: Annotated[bool, typer.Option("--draft-lookup/--no-draft-lookup", help="With a draft model, also verify copies out of the context where they promise more than the draft.")] = True,
) -> DraftOptions | None:
    if draft is None:
        return None
    from edgeinfer.speculative import DraftOptions

    return DraftOptions(ref=draft, draft_max=draft_max, draft_min=draft_min, p_min=draft_p_min,
                        n_threads=draft_threads, n_gpu_layers=draft_gpu_layers, lookup=draft_lookup)


def _structured(
    format: Annotated[Optional[str], typer.Option("--format", metavar="json", help="Answer with a JSON object (any).")] = None,
    json_schema: Annotated[Optional[str], typer.Option("--json-schema", metavar="SCHEMA", help="Answer with JSON that matches this JSON Schema (a file, or the schema inline); checked in full when the answer ends (exit 13 if it fails).")] = None,
    grammar: Annotated[Optional[Path], typer.Option("--grammar", metavar="FILE", help="Answer in the language of this GBNF grammar (llama.cpp's grammar format, start symbol root).")] = None,
) -> Constraint | None:
    from edgeinfer.grammar import from_options

    return from_options(format, json_schema, grammar)


def _shared_options(*, without: tuple[str, ...] = (), **groups: Callable[..., Any]) -> Callable:
    """Give a command the options of each group's builder (all but those named in `without`, which keep
    their defaults); the command receives what each builder returns, under the group's name."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        taken = {name: [_evaluated(p, build) for p in inspect.signature(build).parameters.values()
                        if p.name not in without] for name, build in groups.items()}
        own = [_evaluated(p, command) for p in inspect.signature(command).parameters.values() if p.name not in groups]

        @functools.wraps(command)
        def with_groups(**values: Any) -> Any:
            built = {name: groups[name](**{p.name: values.pop(p.name) for p in params}) for name, params in taken.items()}
            return command(**values, **built)

        params = [*own, *(p for params in taken.values() for p in params)]
        with_groups.__signature__ = inspect.Signature(params)  # what Typer reads
        with_groups.__annotations__ = {p.name: p.annotation for p in params}
        return with_groups

    return decorate


def _evaluated(param: inspect.Parameter, owner: Callable[..., Any]) -> inspect.Parameter:
    """A parameter with its annotation evaluated, as `inspect.signature(eval_str=True)` would, one at a time:
    the commands' other annotations name types that this module imports only when a command runs."""
    if not isinstance(param.annotation, str):
        return param
    return param.replace(annotation=eval(param.annotation, owner.__globals__))  # (our own source text)


def _read_prompt(files: list[Path] | None) -> str:
    """The prompt's text beyond the argument: stdin when it is piped, then each --file, joined by blank lines."""
    parts = []
    if not sys.stdin.isatty():
        piped = _read_text(sys.stdin.buffer, "stdin")
        if piped.strip():
            parts.append(piped)
    for path in files or []:
        parts.append(f"{path.name}:\n{_read_file(path, '--file')}")
    return "\n\n".join(parts)


def _read_system(system: str | None, system_file: Path | None) -> str | None:
    """--system's text, or --system-file's (llama.cpp's -sysf): one of them."""
    from edgeinfer.errors import UsageError

    if system is not None and system_file is not None:
        raise UsageError("give the system message once: --system TEXT or --system-file PATH")
    return _read_file(system_file, "--system-file") if system_file is not None else system


def _read_file(path: Path, option: str) -> str:
    from edgeinfer.errors import UsageError

    try:
        with path.open("rb") as handle:
            return _read_text(handle, f"{option} {path}")
    except OSError as exc:
        raise UsageError(f"cannot read {option} {path}: {exc.strerror}") from None


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


def _prepare(request: RunRequest | ChatRequest | BatchRequest, lib: Library | None = None) -> Prepared:
    """The request prepared, with a bar for whatever it pulls (gone before any text streams) and its notes."""
    from edgeinfer import api
    from edgeinfer.render import transfer_progress

    with transfer_progress(stderr) as progress:
        prepared = api.prepare(request, progress, lib=lib)
        for note in prepared.notes:
            progress.note(note)
    return prepared


def _stats_line(result) -> str:
    line = (f"{result.prompt_tokens} prompt tokens, {result.completion_tokens} generated; "
            f"first token {result.time_to_first_token * 1000:.0f} ms, prompt {result.prompt_tokens_per_second:.1f} tok/s, "
            f"generation {result.generation_tokens_per_second:.1f} tok/s; finish: {result.finish_reason}")
    shared = describe_threads(result.threads)
    return line + (f"\n{shared}" if shared else "")


@app.command(cls=_Command, epilog=_examples(
    'edgeinfer run qwen2.5-coder-0.5b-instruct "Write a haiku"',
    'edgeinfer run -m qwen2.5-coder-1.5b-instruct -f main.py "Explain this code"',
    'git diff | edgeinfer run "Write a commit message for this change"',
    'edgeinfer run --batch prompts.jsonl -o answers.jsonl --parallel 4'))
@_shared_options(sampling=_sampling, structured=_structured, load=_loading, draft=_drafting)
def run(
    prompt: Annotated[Optional[list[str]], typer.Argument(metavar="[MODEL] PROMPT", callback=_utf8, help="The prompt, after a model reference if you like (edgeinfer run MODEL PROMPT); joined with stdin when piped.")] = None,
    model: ModelOpt = None,
    file: Annotated[Optional[list[Path]], typer.Option("--file", "-f", help="Add a file's text to the prompt (repeatable).")] = None,
    system: SystemOpt = None,
    system_file: SystemFileOpt = None,
    raw: Annotated[bool, typer.Option("--raw", help="Plain completion: no chat template.")] = False,
    parse_special: ParseSpecialOpt = False,
    max_tokens: MaxTokensOpt = None,
    stop: StopOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of streaming.")] = False,
    stats: Annotated[bool, typer.Option("--stats", help="Print timings on stderr after the answer (with --batch: the batch's sum, with --json as JSON).")] = False,
    batch: Annotated[Optional[str], typer.Option("--batch", metavar="FILE", help="Answer each request of a JSON Lines file ('-': stdin), several at once: a line holds an id and a prompt or messages; the answers are JSON Lines.")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="With --batch: append the answers to this file; a rerun skips the ids answered there.")] = None,
    unordered: Annotated[bool, typer.Option("--unordered", help="With --batch: write each answer when it is complete, not in the file's order.")] = False,
    parallel: Annotated[Optional[int], typer.Option("--parallel", "-np", help="With --batch: sequences at once (default: the fewest within 5% of the best speed measured here, as many as fit in memory, at most 8 on a CPU).")] = None,
    *, sampling: SamplingParams, structured: Constraint | None, load: LoadOptions, draft: DraftOptions | None,
) -> None:
    """Answer a prompt, streaming the text; or a JSONL file (--batch)."""
    from edgeinfer import api
    from edgeinfer.render import describe_stats, print_note

    lib = api.Library.open()  # (one look at the catalog and the store, for the arguments and the request)
    if batch is not None or output is not None or unordered or parallel is not None:
        model, text = api.model_and_prompt(prompt or [], model, more_text=True, lib=lib)
        _refuse_beside_batch(batch, PROMPT=text, **{"--file": file, "--json without --stats": as_json and not stats})
        return _run_batch(batch, output, unordered, lib, api.BatchRequest(
            model=model, system=_read_system(system, system_file), raw=raw, parse_special=parse_special,
            sampling=sampling, max_tokens=max_tokens, stop=tuple(stop or ()), load=load, parallel=parallel,
            draft=draft, constraint=structured), stats=("json" if as_json else "text") if stats else None)
    more = _read_prompt(file)  # (first: a lone MODEL argument is the model when the prompt comes from here)
    model, prompt = api.model_and_prompt(prompt or [], model, more_text=bool(more.strip()), lib=lib)
    prepared = _prepare(api.RunRequest(
        prompt="\n\n".join(filter(None, [prompt, more])), model=model, system=_read_system(system, system_file),
        raw=raw, parse_special=parse_special,
        sampling=sampling, max_tokens=max_tokens, stop=tuple(stop or ()), load=load, draft=draft,
        constraint=structured), lib)
    result = api.run(prepared, on_text=None if as_json else _stream_to_stdout)
    if as_json:
        _print_json({"model": prepared.name, **result.to_json()})
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if stats:
        stderr.print(_stats_line(result))
        if result.stats:
            stderr.print(describe_stats(result.stats, detailed=load.verbose))
    elif result.stats.get("long_context") and not as_json:
        print_note(stderr, result.stats["long_context"])
    if result.finish_reason == "interrupted":
        raise typer.Exit(130)
    if result.schema_valid is False:
        from edgeinfer.errors import SchemaMismatchError

        raise SchemaMismatchError(result.schema_error)


def _refuse_beside_batch(batch: str | None, **given: Any) -> None:
    from edgeinfer.errors import UsageError

    if batch is None:
        raise UsageError("--output, --unordered and --parallel go with --batch FILE")
    for name, value in given.items():
        if value:
            raise UsageError(f"{name} does not go with --batch: the prompts come from the file, the answers are JSON Lines")


def _run_batch(source: str, output: Path | None, unordered: bool, lib: Library, request: BatchRequest,
               stats: str | None = None) -> None:
    """`run --batch`: a file of requests answered as JSON Lines, to stdout or appended to --output; with
    `stats` ("text" or "json") the batch's summary on stderr at the end."""
    from edgeinfer import api, batchjob
    from edgeinfer.errors import RequestsFailed
    from edgeinfer.render import batch_progress, print_note

    items = _read_batch(source)
    summary = api.BatchSummary()
    with batchjob.open_results(output, sys.stdout) as out:
        todo = [item for item in items if out.wants(item)]
        if len(todo) < len(items):
            print_note(stderr, f"{len(items) - len(todo)} of {len(items)} requests are answered in {output} already")
        if not todo:
            return
        prepared = _prepare(request, lib)
        try:
            with batch_progress(stderr, len(todo)) as done:
                for result in api.run_batch(prepared, todo, ordered=not unordered, on_done=done, summary=summary,
                                            on_note=lambda line: print_note(stderr, line)):
                    out.write(result)
        finally:
            if stats:
                _print_batch_stats(summary, stats)
    if out.failed:
        raise RequestsFailed(f"{out.failed} of {out.written} requests failed; their lines say why")
    if out.invalid:
        from edgeinfer.errors import SchemaMismatchError

        raise SchemaMismatchError(f"{out.invalid} of {out.written} answers do not match their schema; "
                                  "their lines say why (schema_error)")


def _print_batch_stats(summary, form: str) -> None:
    if form == "json":
        sys.stderr.write(json.dumps(summary.to_json()) + "\n")
        return
    s = summary
    first = (f"first token {s.median_first_token * 1000:.0f} ms median, {s.p90_first_token * 1000:.0f} ms p90"
             if s.first_tokens else "no first token")
    stderr.print(f"{s.jobs} requests ({s.failed} failed); {s.prompt_tokens} prompt tokens ({s.prompt_read} read, "
                 f"{s.prompt_tokens - s.prompt_read} given by a shared prefix), {s.generated} generated in "
                 f"{s.seconds:.1f} s: {s.tokens_per_second:.1f} tok/s together; {first}; {s.steps} steps, "
                 f"{s.parallel} sequence{'s' * (s.parallel != 1)} at once ({s.how})", markup=False, highlight=False)


def _read_batch(source: str) -> list[BatchItem]:
    from edgeinfer import batchjob
    from edgeinfer.errors import UsageError

    if source == "-":
        return batchjob.read_items(sys.stdin.buffer, "stdin")
    try:
        with open(source, "rb") as handle:
            return batchjob.read_items(handle, f"--batch {source}")
    except OSError as exc:
        raise UsageError(f"cannot read --batch {source}: {exc.strerror}") from None


def _stream_to_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


@app.command(cls=_Command, epilog=_examples("edgeinfer chat qwen2.5-coder-1.5b-instruct",
                                            'edgeinfer chat -m smollm2-135m-instruct --system "Answer briefly"'))
@_shared_options(sampling=_sampling, structured=_structured, load=_loading, draft=_drafting)
def chat(
    ref: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="The model (as -m; default: the catalog's default model).")] = None,
    model: ModelOpt = None,
    system: SystemOpt = None,
    system_file: SystemFileOpt = None,
    max_tokens: MaxTokensOpt = None,
    stop: StopOpt = None,
    parse_special: ParseSpecialOpt = False,
    *, sampling: SamplingParams, structured: Constraint | None, load: LoadOptions, draft: DraftOptions | None,
) -> None:
    """Hold a conversation in the terminal (/help lists the commands)."""
    from edgeinfer import api, chatui, config

    prepared = _prepare(api.ChatRequest(model=api.one_model(ref, model), system=_read_system(system, system_file),
                                        sampling=sampling, max_tokens=max_tokens,
                                        stop=tuple(stop or ()), load=load, draft=draft, parse_special=parse_special,
                                        constraint=structured))
    with api.open_chat(prepared) as session:
        raise typer.Exit(chatui.loop(session, stderr, config.history_file(), _chat_stats))


def _chat_stats(result) -> str:
    from edgeinfer.render import describe_stats

    return _stats_line(result) + (("\n" + describe_stats(result.stats, detailed=True)) if result.stats else "")


@app.command(cls=_Command, epilog=_examples("edgeinfer serve qwen2.5-coder-1.5b-instruct",
                                            "edgeinfer serve -m smollm2-135m-instruct --port 11434 --parallel 4",
                                            "edgeinfer serve --host 0.0.0.0 --api-key \"$KEY\" --alias gpt-4o-mini",
                                            "edgeinfer serve qwen2.5-coder-1.5b-instruct --draft auto"))
@_shared_options(sampling=_sampling, load=_loading, draft=_drafting)
def serve(
    ref: Annotated[Optional[str], typer.Argument(metavar="[MODEL]", help="The model (as -m; default: the catalog's default model).")] = None,
    model: ModelOpt = None,
    host: Annotated[str, typer.Option("--host", metavar="ADDRESS", help="Address to listen on (another than loopback is reachable from other machines).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", metavar="PORT", help="Port to listen on (0: any free one).")] = 8080,
    parallel: Annotated[Optional[int], typer.Option("--parallel", "-np", metavar="N", help="Requests answered at once, in one context (default: the fewest within 5% of the best speed run --batch measured here, else as many as fit in memory, at most 8 on a CPU).")] = None,
    queue: Annotated[Optional[int], typer.Option("--queue", metavar="N", help="Requests that may wait beyond those (default 64); more are answered 503 with Retry-After.")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", help="Require 'Authorization: Bearer KEY' on every endpoint but /health (default: $EDGEINFER_API_KEY).")] = None,
    cors: Annotated[Optional[list[str]], typer.Option("--cors", metavar="ORIGIN", help="Let a web page from this origin call the API (repeatable).")] = None,
    alias: Annotated[Optional[list[str]], typer.Option("--alias", metavar="NAME", help="Another name the model answers to (repeatable).")] = None,
    grace: Annotated[Optional[float], typer.Option("--grace", metavar="SECONDS", help="Seconds the answers under way may take to finish at Ctrl-C or SIGTERM (default 10).")] = None,
    max_tokens: MaxTokensOpt = None,
    *, sampling: SamplingParams, load: LoadOptions, draft: DraftOptions | None,
) -> None:
    """Serve the OpenAI and Ollama APIs over HTTP.

    Several requests are answered at once, in one context; with --draft, a request that is answered alone
    speculates. docs/serve.md explains it."""
    from edgeinfer import api, config, serve as server
    from edgeinfer.render import transfer_progress

    given = {name: value for name, value in (("queue", queue), ("grace", grace)) if value is not None}
    options = server.ServeOptions(host=host, port=port, api_key=api_key or config.api_key(), cors=tuple(cors or ()),
                                  aliases=tuple(alias or ()), **given)  # (the defaults are ServeOptions')
    with transfer_progress(stderr) as progress:
        prepared = server.prepare(api.one_model(ref, model), parallel=parallel, sampling=sampling,
                                  max_tokens=max_tokens, load=load, draft=draft, progress=progress)
        for note in (*prepared.notes, *options.warnings()):
            progress.note(note)
    server.serve(prepared, options, log=_log_line)


def _log_line(line: str) -> None:
    sys.stderr.write(visible(line) + "\n")
    sys.stderr.flush()


@app.command(cls=_Command, epilog=_examples("edgeinfer bench smollm2-135m-instruct qwen2.5-coder-0.5b-instruct",
                                            "edgeinfer bench qwen2.5-coder-1.5b-instruct --draft auto -n 64",
                                            "edgeinfer bench qwen2.5-coder-0.5b-instruct --parallel 1,2,4,8 -p 32 -n 64"))
@_shared_options(structured=_structured, load=_loading, draft=_drafting, without=("ctx_size",))
def bench(
    models: Annotated[Optional[list[str]], typer.Argument(metavar="[MODEL]...", help="Model references (default: the catalog's default model).")] = None,
    n_prompt: Annotated[int, typer.Option("--n-prompt", "-p", help="Prompt tokens for the pp test (0 skips it).")] = 512,
    n_gen: Annotated[int, typer.Option("--n-gen", "-n", help="Generated tokens for the tg test (0 skips it).")] = 128,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Repetitions of each test.")] = 3,
    parallel: Annotated[Optional[str], typer.Option("--parallel", "-npl", metavar="B,B,...", help="Sequences at once, e.g. 1,2,4,8: llama-batched-bench's aggregate generation speed (S_TG) for each, in place of pp and tg.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    *, structured: Constraint | None, load: LoadOptions, draft: DraftOptions | None,
) -> None:
    """Prompt and generation throughput, as llama-bench measures them.

    Its pp and tg tests; with --draft, plain decoding against speculative; with --format, --json-schema or
    --grammar, free generation against constrained."""
    from edgeinfer import api
    from edgeinfer.render import count_progress, transfer_progress

    request = api.BenchRequest(models=tuple(models or [None]), n_prompt=n_prompt, n_gen=n_gen,
                               repetitions=repetitions, load=load, draft=draft, parallel=_sizes(parallel),
                               constraint=structured)
    with transfer_progress(stderr) as progress:
        prepared = api.prepare_bench(request, progress)
    with count_progress(stderr) as progress:
        results = api.bench(prepared, progress)
    if as_json:
        _print_json([r.to_json() for r in results])
        return
    from rich.table import Table

    table = Table(box=None)
    table.add_column("model", overflow="fold")
    table.add_column("test", no_wrap=True)
    for column in ("tok/s (median)", "± stdev", "first token"):
        table.add_column(column, justify="right", no_wrap=True)
    for r in results:
        ttft = f"{r.to_json()['median_time_to_first_token_ms']:.0f} ms" if r.time_to_first_token_ms else ""
        table.add_row(visible(r.model), r.test, f"{r.median:.2f}", f"{r.spread:.2f}", ttft)
    stdout.print(table)


def _sizes(text: str | None) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",")) if text else ()
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a list of sizes such as 1,2,4,8", param_hint="--parallel") from None


@app.command(cls=_Command, epilog=_examples("edgeinfer doctor", "edgeinfer doctor --json"))
def doctor(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """What this machine offers llama.cpp, and which models fit.

    The llama.cpp build and its devices, memory and cores, the store, and whether each local model fits in memory."""
    from edgeinfer import api

    report = api.doctor()
    if as_json:
        _print_json(report.to_json())
        return
    from rich.table import Table

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


@app.command(cls=_Command, epilog=_examples("edgeinfer quantize Qwen/Qwen2.5-0.5B-Instruct",
                                            "edgeinfer quantize ./my-model --bits 8 -o my-model-q8_0.gguf"))
def quantize(
    source: Annotated[str, typer.Argument(help="A Hugging Face model folder, a hub repository (OWNER/NAME or OWNER/NAME@REVISION), a .gguf file or a model reference.")],
    bits: Annotated[Optional[int], typer.Option("--bits", help="4 (Q4_K_M, the default) or 8 (Q8_0).")] = None,
    qtype: Annotated[Optional[str], typer.Option("--type", metavar="TYPE", help="Any llama.cpp type: Q4_0, Q4_K_S, Q5_K_M, Q6_K, ... (overrides --bits).")] = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="Importance matrix from llama-imatrix (GGUF or .dat).")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", help="CPU threads (default: all cores to quantize, physical cores to evaluate).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="File or folder to write (default: the store).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output.")] = False,
    no_eval: Annotated[bool, typer.Option("--no-eval", help="Skip the quality report (perplexity, KL divergence).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Quantize a model to 4 or 8 bits, and report the quality lost.

    With llama.cpp's quantizer; the report compares the result with its source (perplexity, KL divergence)."""
    from edgeinfer import api
    from edgeinfer.render import count_progress

    with count_progress(stderr) as progress:
        result = api.quantize(source, bits=bits, qtype=qtype, output=output, imatrix=imatrix, threads=threads,
                              force=force, evaluate=not no_eval, progress=progress)
    for warning in result.warnings:
        stderr.print(Text.assemble(("warning:", "yellow"), " ", visible(warning)))
    if as_json:
        _print_json(result.to_json())
        return
    from rich.table import Table

    table = Table(show_header=False, box=None)
    table.add_row("model", visible(f"{result.name} ({result.path})"))
    table.add_row("size", f"{_size(result.input_size)} -> {_size(result.output_size)}, {result.bits_per_weight:.2f} bits per weight")
    table.add_row("time", f"{result.seconds_total:.1f} s (convert {result.seconds_convert:.1f}, quantize {result.seconds_quantize:.1f}, "
                          f"evaluate {result.seconds_eval:.1f})")
    if (q := result.quality) is not None:
        table.add_row("perplexity", f"{q.ppl_source:.3f} -> {q.ppl_quantized:.3f} (delta {q.delta_ppl:+.3f}) over {q.tokens} tokens")
        table.add_row("KL divergence", f"{q.mean_kld:.5f} (mean, from {result.reference})")
        table.add_row("top-1 agreement", f"{q.top1_agreement:.1%}")
    stdout.print(table)


def main() -> None:
    app()
