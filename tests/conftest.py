"""Shared fixtures: tiny models, an isolated edgeinfer home, and two ways to run the CLI.

- `cli(...)` runs the Typer app in this process (fast; for commands that do not
  touch the network: huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, at
  import, so anything involving the hub goes through a subprocess instead).
- `run_edgeinfer(...)` runs `python -m edgeinfer` as a real process, so a crash
  shows up as a signal exit code and the environment is read afresh.
"""

from __future__ import annotations

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


def run_edgeinfer(*args: str | os.PathLike, env: dict[str, str] | None = None, timeout: float = 120,
                  input: str | None = None) -> Run:
    """Run `python -m edgeinfer ARGS...` as a real process, with os.environ plus `env`.

    The timeout only keeps a hung test from hanging the suite; nothing is timed.
    """
    full_env = {**os.environ, **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), full_env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "edgeinfer", *map(str, args)], env=full_env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=timeout, input=input)
    return Run(done.returncode, done.stdout, done.stderr)


@pytest.fixture
def edgeinfer_process():
    """The subprocess runner as a fixture, for tests that prefer fixtures to imports."""
    return run_edgeinfer
