"""Given a tiny Hugging Face model, when I run `edgeinfer quantize`, I get a working 4- or 8-bit GGUF in the store and a quality report.

The quantizer is llama.cpp's own; the models are generated (tests/hfmodels.py);
nothing is mocked. Failures must leave one line on stderr, a non-zero exit code
and no file under the final name.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, run_edgeinfer, subprocess_env
from hfmodels import copy_model, make_hf_model

from edgeinfer.imatrix import read_imatrix
from edgeinfer.quantize import quantize
from edgeinfer.store import Store


@pytest.fixture(scope="session")
def hf_model(tmp_path_factory) -> Path:
    return make_hf_model(tmp_path_factory.mktemp("hf") / "TinyLlama", "llama")


@pytest.fixture(scope="session")
def quantized(hf_model, tmp_path_factory):
    """Q8_0 and Q4_K_M of the same model, through the library, with their quality reports."""
    store = Store(tmp_path_factory.mktemp("home"))
    return {q: quantize(hf_model, qtype=q, store=store, threads=1) for q in ("Q8_0", "Q4_K_M")}


def stored_files(home: Path) -> list[str]:
    """Everything under the store's models folder, hidden files included."""
    models = home / "models"
    return sorted(str(p.relative_to(models)) for p in models.rglob("*") if p.is_file()) if models.exists() else []


# --- the library ----------------------------------------------------------------------


def test_quantized_models_load_and_generate(quantized):
    import llama_cpp

    for result in quantized.values():
        model = llama_cpp.Llama(str(result.path), n_ctx=64, n_threads=1, verbose=False)
        out = model.create_completion("The quick brown", max_tokens=8, temperature=0)
        assert out["usage"]["completion_tokens"] == 8


def test_q8_0_is_much_closer_to_the_source_than_q4_k_m(quantized):
    q8, q4 = quantized["Q8_0"].quality, quantized["Q4_K_M"].quality
    assert q8.tokens == q4.tokens >= 256
    assert q8.ppl_source == pytest.approx(q4.ppl_source)  # the same unquantized reference
    assert 0 < q8.mean_kld < q4.mean_kld / 5
    assert q8.top1_agreement > q4.top1_agreement
    assert abs(q8.delta_ppl) < abs(q4.delta_ppl)


def test_outputs_are_named_like_the_hub_and_registered(quantized):
    q4 = quantized["Q4_K_M"]
    assert q4.name == "TinyLlama-Q4_K_M" and q4.path.name == "TinyLlama-Q4_K_M.gguf"
    assert 4.5 < q4.bits_per_weight < 6 and 8.4 < quantized["Q8_0"].bits_per_weight < 8.6
    assert q4.output_size == q4.path.stat().st_size < quantized["Q8_0"].output_size < q4.input_size
    entry = Store(q4.path.parents[2]).get("TinyLlama-Q4_K_M")
    assert entry is not None and entry.path == q4.path and entry.quantization == "Q4_K_M"
    assert entry.source.startswith("quantize:")


def test_an_importance_matrix_is_used(hf_model, tmp_path, quantized):
    import gguf

    # An importance matrix in llama-imatrix's GGUF format: per-column sums of squared activations and counts.
    names = [t.name for t in gguf.GGUFReader(quantized["Q8_0"].path).tensors if len(t.shape) == 2 and t.name != "token_embd.weight"]
    writer = gguf.GGUFWriter(tmp_path / "imatrix.gguf", "imatrix")
    writer.add_string("general.type", "imatrix")
    rng = np.random.default_rng(0)
    for name in names:
        columns = 512 if "ffn_down" in name else 256
        writer.add_tensor(f"{name}.in_sum2", (rng.random((1, columns)) * 100).astype(np.float32))
        writer.add_tensor(f"{name}.counts", np.array([[10.0]], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_imatrix(tmp_path / "imatrix.gguf")[names[0]].shape in ((256,), (512,))
    with_matrix = quantize(hf_model, qtype="Q4_K_M", imatrix=tmp_path / "imatrix.gguf", output=tmp_path,
                           store=Store(tmp_path / "home"), evaluate=False, threads=1)
    assert with_matrix.path.read_bytes() != quantized["Q4_K_M"].path.read_bytes()


def test_a_legacy_importance_matrix_is_read(tmp_path):
    values = np.arange(4, dtype=np.float32) * 6
    name = b"blk.0.attn_q.weight"
    data = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 3, 4) + values.tobytes()
    (tmp_path / "imatrix.dat").write_bytes(data)
    np.testing.assert_array_equal(read_imatrix(tmp_path / "imatrix.dat")["blk.0.attn_q.weight"], values / 3)


def test_the_type_table_is_llama_cpps():
    import llama_cpp

    from edgeinfer.quantize import LLAMA_FTYPES

    theirs = {n.removeprefix("LLAMA_FTYPE_MOSTLY_"): getattr(llama_cpp, n) for n in dir(llama_cpp) if n.startswith("LLAMA_FTYPE_MOSTLY_")}
    theirs["F32"] = llama_cpp.LLAMA_FTYPE_ALL_F32
    del theirs["MXFP4_MOE"]
    assert LLAMA_FTYPES == theirs


# --- the command line ---------------------------------------------------------------------


def test_quantize_then_run_by_name(cli, edgeinfer_home, hf_model):
    code, out, err = cli("quantize", hf_model, "--bits", "8", "--threads", "1")
    assert code == 0, err
    for label in ("TinyLlama-Q8_0", "bits per weight", "perplexity", "KL divergence", "top-1 agreement"):
        assert label in out
    assert (edgeinfer_home / "models" / "TinyLlama-Q8_0" / "TinyLlama-Q8_0.gguf").is_file()
    code, out, err = cli("run", "-m", "TinyLlama-Q8_0", "-n", "4", "--temperature", "0", "-t", "1", "Hello")
    assert code == 0, err


def test_json_report_and_no_eval(cli, edgeinfer_home, hf_model, tmp_path):
    code, out, err = cli("quantize", hf_model, "--type", "q5_k_m", "--no-eval", "--json", "-o", tmp_path)
    assert code == 0, err
    report = json.loads(out)
    assert report["qtype"] == "Q5_K_M" and report["quality"] is None
    assert report["path"] == str(tmp_path / "TinyLlama-Q5_K_M.gguf") and Path(report["path"]).is_file()
    assert {"input_size", "output_size", "bits_per_weight", "seconds_quantize", "seconds_total"} <= set(report)


def test_requantizing_warns_but_works(cli, edgeinfer_home, quantized, tmp_path):
    code, out, err = cli("quantize", quantized["Q8_0"].path, "--bits", "4", "--no-eval", "-o", tmp_path)
    assert code == 0, err
    assert "already quantized (Q8_0)" in err
    assert (tmp_path / "TinyLlama-Q4_K_M.gguf").is_file()  # named after the source, without its -Q8_0


def test_an_existing_output_is_kept_unless_forced(cli, edgeinfer_home, hf_model, tmp_path):
    target = tmp_path / "TinyLlama-Q8_0.gguf"
    target.write_bytes(b"precious")
    run = cli("quantize", hf_model, "--bits", "8", "-o", tmp_path, "--no-eval")
    assert run.exit_code == 2 and "already exists" in run.error_line and "--force" in run.error_line
    assert target.read_bytes() == b"precious"
    assert cli("quantize", hf_model, "--bits", "8", "-o", tmp_path, "--no-eval", "--force").exit_code == 0
    assert target.read_bytes()[:4] == b"GGUF"


@pytest.mark.parametrize("damage, code, message", [
    ("no-config", 9, "has no config.json"),
    ("no-tokenizer", 9, "has no tokenizer.json"),
    ("architecture", 9, "architecture GPTNeoXForCausalLM is not supported; edgeinfer converts Gemma3ForCausalLM, LlamaForCausalLM"),
    ("shape", 9, "but config.json implies"),
    ("header", 9, "is not a valid safetensors file"),
    ("pickle", 9, "pickle"),
    ("config-array", 9, "not a model configuration"),
    ("negative-context", 9, "max_position_embeddings must be positive, not -1"),
    ("tokenizer-config", 9, "tokenizer_config.json cannot be read"),
])
def test_bad_models_fail_with_one_line_and_leave_nothing(cli, edgeinfer_home, hf_model, tmp_path, damage, code, message):
    folder = copy_model(hf_model, tmp_path / "Broken")
    config = json.loads((folder / "config.json").read_text())
    if damage == "no-config":
        (folder / "config.json").unlink()
    elif damage == "no-tokenizer":
        (folder / "tokenizer.json").unlink()
    elif damage in ("architecture", "shape"):
        config.update({"architectures": ["GPTNeoXForCausalLM"]} if damage == "architecture" else {"hidden_size": 512})
        (folder / "config.json").write_text(json.dumps(config))
    elif damage == "header":
        with (folder / "model.safetensors").open("r+b") as handle:
            handle.seek(9)
            handle.write(b"\xff\xfe not json")
    elif damage == "pickle":
        (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    elif damage == "config-array":
        (folder / "config.json").write_text(json.dumps([config]))
    elif damage == "negative-context":
        (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": -1}))
    elif damage == "tokenizer-config":
        (folder / "tokenizer_config.json").write_text("{ not json")
    run = cli("quantize", folder)
    assert run.exit_code == code
    assert message in run.error_line
    assert stored_files(edgeinfer_home) == []


@pytest.mark.parametrize("args, message", [
    (["--type", "Q3_X"], "unknown quantization type 'Q3_X'; choose one of"),
    (["--bits", "5"], "--bits must be 4 or 8"),
    (["--type", "IQ2_XXS"], "only with an importance matrix"),
    (["--imatrix", "/nonexistent/imatrix.gguf"], "no importance matrix at"),
])
def test_bad_options_fail_before_any_work(cli, edgeinfer_home, hf_model, args, message):
    run = cli("quantize", hf_model, *args)
    assert run.exit_code == 2 and message in run.error_line
    assert stored_files(edgeinfer_home) == []


@pytest.mark.parametrize("damage, message", [("truncated", "truncated"), ("not-gguf", "not a GGUF file")])
def test_a_broken_gguf_source_is_named_as_such(cli, edgeinfer_home, tiny_model, tmp_path, damage, message):
    broken = tmp_path / "broken.gguf"
    data = tiny_model.read_bytes()
    broken.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"<html>not a model</html>" * 100)
    run = cli("quantize", broken, "--no-eval")
    assert run.exit_code == 6 and message in run.error_line
    assert stored_files(edgeinfer_home) == []


def test_an_output_that_llama_cpp_cannot_load_is_neither_kept_nor_listed(cli, edgeinfer_home, tmp_path):
    from tinymodel import make_tiny_model

    source = make_tiny_model(tmp_path / "headless.gguf", drop=("output_norm.weight",))  # a sound file, no model
    run = cli("quantize", source, "--bits", "8")
    assert run.exit_code == 6 and "output_norm.weight" in run.error_line
    assert stored_files(edgeinfer_home) == [] and cli("list", "--json").stdout.count("headless") == 0


def test_the_source_is_never_its_own_output(cli, edgeinfer_home, tiny_model, tmp_path):
    source = tmp_path / "tiny.gguf"
    source.write_bytes(tiny_model.read_bytes())
    run = cli("quantize", source, "--bits", "8", "--output", source, "--force")
    assert run.exit_code == 2 and "is the source itself" in run.error_line
    assert source.read_bytes() == tiny_model.read_bytes()


def test_a_missing_source_is_a_usage_error(cli, edgeinfer_home, tmp_path):
    run = cli("quantize", tmp_path / "nowhere")
    assert run.exit_code == 2 and "no such folder or file" in run.error_line
    run = cli("quantize", "smollm2-135m-instrct")  # a model reference, as everywhere: with its suggestions
    assert run.exit_code == 3 and "did you mean smollm2-135m-instruct" in run.error_line
    run = cli("quantize", "models/missing.gguf")  # a relative path, not a hub repository named missing.gguf
    assert run.exit_code == 3 and "neither a file on disk nor a hub reference" in run.error_line
    assert cli("quantize", " ").exit_code == 2


def test_an_output_that_cannot_be_written_is_refused_before_any_work(cli, edgeinfer_home, hf_model, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    run = cli("quantize", hf_model, "--output", blocker / "out.gguf")
    assert run.exit_code == 2 and "is not a folder" in run.error_line
    assert stored_files(edgeinfer_home) == []


def test_a_model_in_the_store_is_requantized_by_name(cli, edgeinfer_home, hf_model):
    assert cli("quantize", hf_model, "--bits", "8", "--no-eval").exit_code == 0
    run = cli("quantize", "TinyLlama-Q8_0", "--bits", "4", "--no-eval")  # its name in the store
    assert run.exit_code == 0, run.stderr
    assert "already quantized (Q8_0)" in run.stderr
    assert (edgeinfer_home / "models" / "TinyLlama-Q4_K_M" / "TinyLlama-Q4_K_M.gguf").is_file()


def test_not_enough_disk_space_is_found_before_starting(cli, edgeinfer_home, hf_model, tmp_path):
    folder = copy_model(hf_model, tmp_path / "Huge")
    # A second shard declaring a 2 TiB tensor: a sparse file, so it costs no real disk.
    header = json.dumps({"big": {"dtype": "F32", "shape": [1 << 39], "data_offsets": [0, 1 << 41]}}).encode()
    with (folder / "model-00002.safetensors").open("wb") as handle:
        handle.write(struct.pack("<Q", len(header)) + header)
        handle.truncate(8 + len(header) + (1 << 41))
    run = cli("quantize", folder)
    assert run.exit_code == 7 and "not enough disk space" in run.error_line
    assert stored_files(edgeinfer_home) == []


# --- interruptions ----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def medium_model(tmp_path_factory) -> Path:
    """16M parameters: big enough that quantizing takes a second or so, time to interrupt it."""
    return make_hf_model(tmp_path_factory.mktemp("medium") / "Medium", "llama", hidden=512, ff=2048, heads=8,
                         kv_heads=4, layers=4)


def start_quantizing(medium_model: Path, home: Path) -> tuple[subprocess.Popen, Path]:
    """Start `edgeinfer quantize` as a real process and return once llama.cpp is writing its output."""
    env = subprocess_env({"EDGEINFER_HOME": str(home)})
    process = subprocess.Popen([sys.executable, "-m", "edgeinfer", "quantize", str(medium_model), "--no-eval", "-t", "1"],
                               env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = home / "models" / "Medium-Q4_K_M" / ".Medium-Q4_K_M.gguf.incomplete"
    deadline = time.monotonic() + 60
    while not partial.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the quantizer never started writing"
        time.sleep(0.005)
    return process, partial


def test_ctrl_c_midway_leaves_no_output(medium_model, tmp_path):
    for attempt in range(3):  # on a busy machine the quantizer may finish before Ctrl-C arrives: then try again
        home = tmp_path / f"home{attempt}"
        process, partial = start_quantizing(medium_model, home)
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=60)
        if process.returncode != 0:
            break
    assert process.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert stored_files(home) == []
    assert not partial.exists() and not partial.parent.exists()  # nor the model's folder, left empty


def test_a_quantization_killed_while_converting_leaves_nothing(medium_model, tmp_path):
    home = tmp_path / "home"
    env = subprocess_env({"EDGEINFER_HOME": str(home)})
    process = subprocess.Popen([sys.executable, "-m", "edgeinfer", "quantize", str(medium_model), "--no-eval", "-t", "1"],
                               env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    work = home / "models" / "Medium-Q4_K_M" / ".Medium-Q4_K_M.gguf.work"
    deadline = time.monotonic() + 60
    while not (work.is_dir() and any(work.iterdir())):  # the conversion has begun writing
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "the conversion never started writing"
        time.sleep(0.002)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while stored_files(home) and time.monotonic() < deadline:  # the quantizer, still waiting for its job, cleans up
        time.sleep(0.05)
    assert stored_files(home) == [] and not work.exists()


def test_a_killed_quantization_leaves_no_output(medium_model, tmp_path):
    process, partial = start_quantizing(medium_model, tmp_path / "home")
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=60)
    deadline = time.monotonic() + 30
    while stored_files(tmp_path / "home") and time.monotonic() < deadline:  # the orphaned quantizer cleans up
        time.sleep(0.05)
    assert stored_files(tmp_path / "home") == []
    assert not (tmp_path / "home" / "models" / "Medium-Q4_K_M" / "Medium-Q4_K_M.gguf").exists()


# --- the hub ------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "https://huggingface.co/"])
def test_a_hub_repository_is_fetched_without_its_pickles(hub, edgeinfer_home, hf_model, prefix):
    for file in hf_model.iterdir():
        hub.add_file("someone/TinyHub", file.name, file.read_bytes(), lfs=file.suffix == ".safetensors")
    hub.add_file("someone/TinyHub", "pytorch_model.bin", b"pickle bytes that must never be fetched")
    hub.add_file("someone/TinyHub", "README.md", b"# Tiny", lfs=False)
    run = run_edgeinfer("quantize", f"{prefix}someone/TinyHub", "--bits", "8", "--no-eval", "-t", "1")
    assert run.exit_code == 0, run.stderr
    assert (edgeinfer_home / "models" / "TinyHub-Q8_0" / "TinyHub-Q8_0.gguf").is_file()
    fetched = {r.path.rsplit("/", 1)[-1] for r in hub.gets()}
    assert "model.safetensors" in fetched and "pytorch_model.bin" not in fetched and "README.md" not in fetched
    assert not any((edgeinfer_home / ".partial").rglob("*.safetensors"))  # the download went once the output was whole


def test_hub_weights_that_do_not_match_their_sha256_are_refused(hub, edgeinfer_home, hf_model):
    for file in hf_model.iterdir():
        hub.add_file("someone/TinyHub", file.name, file.read_bytes(), lfs=file.suffix == ".safetensors")
    hub.serve_wrong_bytes("someone/TinyHub", "model.safetensors")
    run = run_edgeinfer("quantize", "someone/TinyHub", "--bits", "8", "--no-eval", "-t", "1")
    assert run.exit_code == 5 and "checksum" in run.error_line
    assert stored_files(edgeinfer_home) == []
