"""The store under concurrent processes, crashes, full disks and hostile hubs.

Given two edgeinfers writing one model, a disk that fills at the wrong moment, or a
hub that sends too much or too slowly, the store ends up holding verified,
registered files or nothing, and each failure is one line with its exit code.
Everything is real: the CLI in subprocesses, huggingface_hub against the stand-in
hub, llama.cpp's quantizer, and small tmpfs disks (mounted as root, as CI runs;
only a non-root run skips them).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO_ROOT, run_edgeinfer, subprocess_env
from hfmodels import make_hf_model
from test_pull import wait_for

from edgeinfer.quantize import estimate_output_size, quantize
from edgeinfer.store import Store

REPO = "acme/tiny-GGUF"
FILE = "tiny-Q4_K_M.gguf"
NAME = f"hf.co/{REPO}/{FILE}"


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def start_edgeinfer(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "edgeinfer", *map(str, args)], cwd=REPO_ROOT, env=subprocess_env(env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(process: subprocess.Popen) -> tuple[int, str, str]:
    out, err = process.communicate(timeout=180)
    return process.returncode, out, err


def manifest(home: Path) -> dict:
    return json.loads((home / "manifest.json").read_text())["models"]


def pull_again_and_find(payload: bytes, home: Path) -> None:
    """Once the fault is gone, a pull succeeds and the store holds the hub's file."""
    again = run_edgeinfer("pull", f"{REPO}/{FILE}")
    assert again.exit_code == 0, again.stderr
    assert sha256(Path(manifest(home)[NAME]["path"]).read_bytes()) == sha256(payload)


def files_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a folder on a tmpfs of `size` bytes: a real disk that fills."""
    mounted = []

    if os.geteuid() != 0:  # the one real reason: CI and the developers' machines run as root, and mount there
        pytest.skip("mounting a tmpfs needs root")

    def mount(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                              capture_output=True, text=True)
        if done.returncode != 0:  # as root this is a broken test machine, not a reason to pass
            pytest.fail(f"cannot mount a tmpfs as root: {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def big_payload(tiny_model) -> bytes:
    """The tiny model and 24 MiB after it: long enough to be caught mid-download."""
    return tiny_model.read_bytes() + os.urandom(24 * 2**20)


# --- 1. two pulls of one model ----------------------------------------------------------


def test_a_second_pull_waits_for_the_first_and_finds_the_model_present(hub, big_payload, edgeinfer_home):
    hub.add_file(REPO, FILE, big_payload)
    pause = hub.pause_at(REPO, FILE, offset=20 * 2**20)
    first = start_edgeinfer("pull", f"{REPO}:Q4_K_M")
    try:
        assert pause.reached.wait(timeout=120), "the first download never got that far"
        second = start_edgeinfer("pull", f"{REPO}:Q4_K_M")
        # The second has listed the repository and is at the model's lock (it asks the hub nothing more there).
        assert wait_for(lambda: len([r for r in hub.requests if "/tree/" in r.path]) == 2)
        time.sleep(1.0)
        assert second.poll() is None
    finally:
        pause.release.set()
    (code1, out1, err1), (code2, out2, err2) = finish(first), finish(second)

    assert (code1, code2) == (0, 0), err1 + err2
    assert "pulled" in out1 and "already present" in out2
    assert "waiting for it to finish" in err2
    stored = Path(manifest(edgeinfer_home)[NAME]["path"])
    assert sha256(stored.read_bytes()) == sha256(big_payload)
    assert manifest(edgeinfer_home)[NAME]["size"] == len(big_payload) == stored.stat().st_size
    assert len(hub.gets()) == 1  # one download, not two


def test_a_pull_waiting_for_one_that_dies_resumes_its_download(hub, big_payload, edgeinfer_home):
    hub.add_file(REPO, FILE, big_payload)
    pause = hub.pause_at(REPO, FILE, offset=20 * 2**20)
    first = start_edgeinfer("pull", f"{REPO}:Q4_K_M")
    second = None
    try:
        assert pause.reached.wait(timeout=120)
        assert wait_for(lambda: sum(p.stat().st_size for p in edgeinfer_home.rglob("*.incomplete")) > 0)
        second = start_edgeinfer("pull", f"{REPO}:Q4_K_M")
        assert wait_for(lambda: len([r for r in hub.requests if "/tree/" in r.path]) == 2)
        time.sleep(1.0)
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=60)
    finally:
        pause.release.set()
    code, out, err = finish(second)

    assert code == 0, err
    assert "pulled" in out
    stored = Path(manifest(edgeinfer_home)[NAME]["path"])
    assert sha256(stored.read_bytes()) == sha256(big_payload)
    resumed = hub.gets()[-1].range
    assert resumed is not None and resumed.startswith("bytes=") and resumed != "bytes=0-"


# --- 2. two quantizes to one output ------------------------------------------------------


@pytest.fixture(scope="module")
def medium_hf_model(tmp_path_factory) -> Path:
    """16M parameters: quantizing it takes a second or two."""
    return make_hf_model(tmp_path_factory.mktemp("medium") / "Medium", "llama", hidden=512, ff=2048, heads=8,
                         kv_heads=4, layers=4)


def test_two_quantizes_to_one_output_take_turns_and_the_manifest_describes_the_file(medium_hf_model, edgeinfer_home):
    args = ("quantize", medium_hf_model, "--type", "Q8_0", "--no-eval", "-t", "1", "--force")
    processes = [start_edgeinfer(*args), start_edgeinfer(*args)]
    results = [finish(p) for p in processes]

    assert [code for code, _, _ in results] == [0, 0], [err for _, _, err in results]
    assert sum("waiting for it to finish" in err for _, _, err in results) == 1
    entry = manifest(edgeinfer_home)["Medium-Q8_0"]
    stored = Path(entry["path"])
    assert sha256(stored.read_bytes()) == entry["sha256"] and stored.stat().st_size == entry["size"]
    assert [p.name for p in files_under(edgeinfer_home / "models")] == ["Medium-Q8_0.gguf"]


# --- 3. crashes and full disks between placing and registering ---------------------------


def test_files_in_models_that_the_manifest_lacks_are_listed_and_removable(cli, tiny_model, edgeinfer_home):
    left = edgeinfer_home / "models" / "Lost-Q8_0" / "Lost-Q8_0.gguf"
    hub_left = edgeinfer_home / "models" / "hf.co" / REPO / FILE
    for path in (left, hub_left):
        path.parent.mkdir(parents=True)
        shutil.copyfile(tiny_model, path)

    listed = {row["name"]: row for row in json.loads(cli("list", "--json").stdout)}

    assert listed["Lost-Q8_0"]["present"] and listed["Lost-Q8_0"]["path"] == str(left)
    assert "not in the manifest" in listed["Lost-Q8_0"]["description"]
    assert listed[NAME]["present"] and listed[NAME]["size"] == tiny_model.stat().st_size
    assert cli("rm", "Lost-Q8_0").exit_code == 0
    assert cli("rm", f"{REPO}:Q4_K_M").exit_code == 0
    assert files_under(edgeinfer_home / "models") == [] and not (edgeinfer_home / "models" / "hf.co").exists()


def test_a_disk_that_fills_before_a_pull_is_registered_leaves_no_file_unregistered(hub, tiny_model, small_disk,
                                                                                 monkeypatch):
    payload = tiny_model.read_bytes()
    home = small_disk(len(payload) + 4 * 2**20)
    monkeypatch.setenv("EDGEINFER_HOME", str(home))
    (home / "models" / "hf.co" / REPO).mkdir(parents=True)  # (so that only the manifest write can fail)
    hub.add_file(REPO, FILE, payload)
    offset = (len(payload) // 65536 - 1) * 65536  # (the stand-in hub pauses between its 64 KiB chunks)
    pause = hub.pause_at(REPO, FILE, offset=offset)
    process = start_edgeinfer("pull", f"{REPO}/{FILE}")
    try:
        assert pause.reached.wait(timeout=120)
        assert wait_for(lambda: sum(p.stat().st_size for p in home.rglob("*.incomplete")) >= offset - 65536)
        time.sleep(0.5)
        partial = next(home.rglob("*.incomplete"))
        # Fill the disk so that exactly the rest of the download fits, and nothing after it.
        pages_left = -(-len(payload) // 4096) - -(-partial.stat().st_size // 4096)
        filler = shutil.disk_usage(home).free - pages_left * 4096
        with (home / "filler").open("wb") as handle:
            handle.write(bytes(filler))
    finally:
        pause.release.set()
    code, out, err = finish(process)

    assert code == 7, err
    assert "full" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert files_under(home / "models") == []  # no file the manifest does not know
    (home / "filler").unlink()
    pull_again_and_find(payload, home)


# --- 4. hubs that send too much or too slowly ----------------------------------------------


def test_a_body_longer_than_announced_stops_at_the_announced_size(hub, tiny_model, edgeinfer_home):
    payload = tiny_model.read_bytes()
    hub.add_file(REPO, FILE, payload)
    hub.serve_endlessly(REPO, FILE)

    done = run_edgeinfer("pull", f"{REPO}/{FILE}", timeout=60)

    assert done.exit_code == 4
    assert f"more than the {len(payload):,} bytes it announced" in done.error_line
    partials = list(edgeinfer_home.rglob("*.incomplete"))
    assert [p.stat().st_size for p in partials] == [len(payload)]  # never larger than announced
    assert files_under(edgeinfer_home / "models") == []
    hub._endless.clear()
    pull_again_and_find(payload, edgeinfer_home)


def test_a_hub_too_slow_for_too_long_fails_with_exit_4_and_is_resumed_later(hub, tiny_model, edgeinfer_home):
    payload = tiny_model.read_bytes()
    hub.add_file(REPO, FILE, payload)
    hub.trickle(REPO, FILE, every=0.2)

    # HF_HUB_DOWNLOAD_TIMEOUT (huggingface_hub's read timeout) sets the window: 6 of them, here 6 s.
    started = time.monotonic()
    done = run_edgeinfer("pull", f"{REPO}/{FILE}", env={"HF_HUB_DOWNLOAD_TIMEOUT": "1"}, timeout=60)

    assert done.exit_code == 4
    assert "stalled" in done.error_line and "pull again to resume" in done.error_line
    assert time.monotonic() - started < 30
    kept = sum(p.stat().st_size for p in edgeinfer_home.rglob("*.incomplete"))
    assert kept > 0
    hub._trickles.clear()
    pull_again_and_find(payload, edgeinfer_home)
    assert hub.gets()[-1].range == f"bytes={kept}-"


def test_a_pull_that_would_leave_the_disk_full_is_refused(hub, tiny_model, small_disk, monkeypatch):
    payload = tiny_model.read_bytes()
    home = small_disk(len(payload) + 128 * 1024)  # room for the file, but not for the margin beside it
    monkeypatch.setenv("EDGEINFER_HOME", str(home))
    hub.add_file(REPO, FILE, payload)

    done = run_edgeinfer("pull", f"{REPO}/{FILE}")

    assert done.exit_code == 7
    assert "not enough disk space" in done.error_line and "to spare" in done.error_line
    assert files_under(home / "models") == [] and hub.gets() == []


# --- 5. the quantizer's output size ---------------------------------------------------------


def test_the_output_size_is_estimated_from_the_tensor_types(tiny_model, tmp_path):
    store = Store(tmp_path / "home")
    q4 = quantize(tiny_model, qtype="Q4_K_M", store=store, threads=1, evaluate=False)
    for qtype in ("Q8_0", "F16", "F32"):  # requantized: the output grows
        out = quantize(q4.path, qtype=qtype, output=tmp_path / f"out-{qtype}.gguf", store=store, threads=1,
                       evaluate=False)
        estimate = estimate_output_size(q4.path, qtype)
        assert out.output_size <= estimate <= 1.3 * out.output_size + (2 << 20), (qtype, out.output_size, estimate)


@pytest.fixture(scope="module")
def medium_q4(medium_hf_model, tmp_path_factory) -> Path:
    home = tmp_path_factory.mktemp("q4-home")
    return quantize(medium_hf_model, qtype="Q4_K_M", store=Store(home), threads=1, evaluate=False).path


def test_a_quantization_that_cannot_fit_on_the_disk_is_exit_7_in_one_line(medium_q4, small_disk, edgeinfer_home):
    # The F32 output is about 6x the Q4_K_M source: an estimate from the source's size alone would let it start.
    disk = small_disk(medium_q4.stat().st_size + 24 * 2**20)

    done = run_edgeinfer("quantize", medium_q4, "--type", "F32", "--no-eval", "-t", "1", "-o", disk / "out.gguf")

    assert done.exit_code == 7
    assert "disk" in done.error_line
    assert files_under(disk) == []
