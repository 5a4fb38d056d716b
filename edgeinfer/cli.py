"""The edgeinfer command line: parse, call one library function, render with rich.

No logic lives here. Errors from the library (EdgeinferError) become one line on
stderr and the error's exit code; a traceback is shown only with --debug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from edgeinfer import __version__
from edgeinfer.errors import EdgeinferError

stdout = Console(highlight=False, soft_wrap=True)
stderr = Console(stderr=True, highlight=False, soft_wrap=True)
_state = {"debug": False}


class _ErrorsToMessages(TyperGroup):
    """Turns our exceptions into one stderr line and an exit code, for every command."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except EdgeinferError as exc:
            if _state["debug"]:
                stderr.print_exception()
            stderr.print(f"[bold red]error:[/] {exc}", markup=True, highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            stderr.print("interrupted")
            raise typer.Exit(130) from None


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
    from edgeinfer.models import Library

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
    from edgeinfer.models import pull as pull_model
    from edgeinfer.render import transfer_progress

    with transfer_progress(stderr) as progress:
        result = pull_model(_library(), ref, progress)
    verb = "already present" if result.already_present else "pulled"
    stdout.print(f"{result.model.name}: {verb} ({_size(result.model.size)}) {result.model.path}")


@app.command("list")
def list_(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """The catalog's models and everything in the local store."""
    from edgeinfer.models import list_models

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
        where = str(row.path) if row.present else row.description
        table.add_row(row.name, row.quantization, _size(row.size), "yes" if row.present else "-", where)
    stdout.print(table)


@app.command()
def info(
    ref: Annotated[Optional[str], typer.Argument(help="A model in the store or a local .gguf file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """GGUF metadata of a model: architecture, parameters, quantization, context, tokenizer."""
    from edgeinfer.ggufinfo import inspect
    from edgeinfer.models import model_path_for_info

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
        table.add_row(key.replace("_", " "), str(value))
    stdout.print(table)


@app.command()
def rm(ref: Annotated[str, typer.Argument(help="A model in the store.")]) -> None:
    """Remove a model from the local store."""
    from edgeinfer.models import remove

    entry = remove(_library(), ref)
    stdout.print(f"removed {entry.name} ({_size(entry.size)})")


def main() -> None:
    app()
