"""The store and the reference parser, through their Python API (what the CLI is a shell over)."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path

import pytest

from edgeinfer.catalog import check_relative_name, load_catalog
from edgeinfer.references import CatalogRef, HubFileRef, HubQuantRef, LocalRef, NameRef, parse_reference
from edgeinfer.errors import ChecksumError, EdgeinferError, ModelNotFoundError, UsageError
from edgeinfer.sources import matching_quant_files, quant_of
from edgeinfer.store import Store, check_free_space, sha256_file, verify_sha256

# --- file names ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["model.gguf", "sub/model-Q4_K_M.gguf", "a.b/c..d.gguf"])
def test_a_plain_relative_name_is_accepted(name):
    assert check_relative_name(name) == name


@pytest.mark.parametrize("name", ["", "../model.gguf", "a/../../model.gguf", "/etc/passwd", "a\\..\\b.gguf", "a\x00.gguf", ".."])
def test_a_name_that_could_leave_its_folder_is_refused(name):
    with pytest.raises(UsageError) as caught:
        check_relative_name(name)
    assert caught.value.exit_code == 2
    assert "unsafe" in str(caught.value)


def test_the_store_never_places_a_file_outside_itself(tmp_path):
    store = Store(tmp_path / "home")

    inside = store.model_path("hf.co/acme/repo", "model.gguf")

    assert inside.is_relative_to((tmp_path / "home" / "models").resolve())
    for key, name in [("../outside", "model.gguf"), ("ok", "../../model.gguf"), ("ok", "/tmp/model.gguf")]:
        with pytest.raises(EdgeinferError):
            store.model_path(key, name)


# --- placing, listing, removing ---------------------------------------------------------


def staged_file(folder: Path, content: bytes = b"GGUF tiny") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "staged.bin"
    path.write_bytes(content)
    return path


def test_a_placed_file_is_in_the_manifest_under_its_final_name(tmp_path):
    store = Store(tmp_path / "home")
    staged = staged_file(tmp_path / "staging")
    final = store.model_path("tiny", "tiny.gguf")

    entry = store.place("tiny", staged, final, sha256=sha256_file(staged), source="test", quantization="F32")

    assert not staged.exists() and final.read_bytes() == b"GGUF tiny"
    assert store.get("tiny") == entry
    manifest = json.loads(store.manifest_path.read_text())
    assert manifest["version"] == 1
    assert manifest["models"]["tiny"]["path"] == str(final)
    assert manifest["models"]["tiny"]["size"] == len(b"GGUF tiny")
    # The manifest is replaced whole: no temporary files are left beside it.
    assert sorted(p.name for p in store.root.iterdir() if p.name.startswith(".manifest.json")) == []


def test_an_entry_whose_file_vanished_is_not_present(tmp_path):
    store = Store(tmp_path / "home")
    staged = staged_file(tmp_path / "staging")
    final = store.model_path("tiny", "tiny.gguf")
    store.place("tiny", staged, final, sha256=sha256_file(staged), source="test")

    final.unlink()

    assert store.get("tiny") is None
    assert "tiny" in store.entries()


def test_removing_a_model_deletes_its_file_and_empty_folders(tmp_path):
    store = Store(tmp_path / "home")
    staged = staged_file(tmp_path / "staging")
    final = store.model_path("hf.co/acme/repo/tiny.gguf", "tiny.gguf")
    store.place("hf.co/acme/repo/tiny.gguf", staged, final, sha256=sha256_file(staged), source="test")

    removed = store.remove("hf.co/acme/repo/tiny.gguf")

    assert removed is not None and not final.exists()
    assert store.entries() == {}
    assert store.models_dir.is_dir() and list(store.models_dir.iterdir()) == []
    assert store.remove("hf.co/acme/repo/tiny.gguf") is None


def test_a_corrupt_manifest_is_reported_not_crashed_on(tmp_path):
    store = Store(tmp_path / "home")
    store.root.mkdir()
    store.manifest_path.write_text("{ not json")

    with pytest.raises(EdgeinferError) as caught:
        store.entries()
    assert "manifest" in str(caught.value)


def _register_many(root: str, prefix: str, count: int) -> None:
    store = Store(Path(root))
    for i in range(count):
        path = Path(root) / "files" / f"{prefix}-{i}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
        store.register(f"{prefix}-{i}", path, sha256="0" * 64, source="test")


def test_concurrent_writers_lose_no_entry(tmp_path):
    root = tmp_path / "home"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_register_many, args=(str(root), f"w{k}", 10)) for k in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()

    assert all(worker.exitcode == 0 for worker in workers)
    assert len(Store(root).entries()) == 40


def test_a_folder_that_cannot_be_made_is_one_clear_error(tmp_path):
    blocker = tmp_path / "binary.bin"
    blocker.write_bytes(b"a file where a folder should be")

    with pytest.raises(EdgeinferError) as caught:
        check_free_space(blocker / "out", 1)  # (what pull, quantize and convert call before they write)

    assert str(caught.value) == f"cannot write to {blocker / 'out'}: {blocker} is a file, not a folder"
    assert caught.value.exit_code == 1


# --- checksums -----------------------------------------------------------------------------


def test_a_file_with_the_wrong_sha256_is_deleted(tmp_path):
    path = staged_file(tmp_path)

    with pytest.raises(ChecksumError) as caught:
        verify_sha256(path, "0" * 64)

    assert caught.value.exit_code == 5
    assert "checksum mismatch" in str(caught.value)
    assert not path.exists()


def test_a_file_with_the_right_sha256_is_kept(tmp_path):
    path = staged_file(tmp_path)
    digest = sha256_file(path)

    assert verify_sha256(path, digest.upper()) == digest
    assert path.exists()


# --- references -----------------------------------------------------------------------------


@pytest.fixture
def catalog():
    return load_catalog(None)


def test_the_packaged_catalog_knows_the_four_models(catalog):
    assert catalog.default == "smollm2-135m-instruct"
    assert set(catalog.models) == {"smollm2-135m-instruct", "gemma-3-270m", "qwen2.5-coder-0.5b-instruct",
                                   "qwen2.5-coder-1.5b-instruct"}
    assert catalog.models["qwen2.5-coder-1.5b-instruct"].draft == "qwen2.5-coder-0.5b-instruct"
    for spec in catalog.models.values():
        assert spec.sources and all(len(s.sha256 or "0" * 64) == 64 for s in spec.sources)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("acme/repo:Q4_K_M", HubQuantRef("acme/repo", "Q4_K_M")),
        ("hf.co/acme/repo:Q8_0", HubQuantRef("acme/repo", "Q8_0")),
        ("https://huggingface.co/acme/repo:q4_0", HubQuantRef("acme/repo", "q4_0")),
        ("acme/repo/model-Q4_K_M.gguf", HubFileRef("acme/repo", "model-Q4_K_M.gguf")),
        ("hf.co/acme/repo/sub/model.gguf", HubFileRef("acme/repo", "sub/model.gguf")),
        ("my-model", NameRef("my-model")),
        ("./model.gguf", LocalRef(Path("./model.gguf"))),
        ("/models/model.gguf", LocalRef(Path("/models/model.gguf"))),
    ],
)
def test_references_are_read_as_the_user_meant(catalog, text, expected):
    assert parse_reference(text, catalog) == expected


def test_a_catalog_name_is_a_catalog_reference(catalog):
    parsed = parse_reference("gemma-3-270m", catalog)

    assert isinstance(parsed, CatalogRef) and parsed.spec.architecture == "gemma3"


@pytest.mark.parametrize("text", ["acme/repo/README.md", "a/b/c"])
def test_a_path_like_reference_that_is_nothing_is_refused(catalog, text):
    with pytest.raises(ModelNotFoundError):
        parse_reference(text, catalog)


@pytest.mark.parametrize(
    ("name", "quant"),
    [
        ("Model-Q4_K_M.gguf", "Q4_K_M"),
        ("model.q8_0.gguf", "Q8_0"),
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "Q4_1"),
        ("qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", "Q4_K_M"),
        ("model-f16.gguf", "F16"),
        ("model-IQ2_XS.gguf", "IQ2_XS"),
        ("README.md", None),
    ],
)
def test_the_quantization_is_read_from_a_hub_file_name(name, quant):
    assert quant_of(name) == quant


def test_a_single_file_is_preferred_to_a_split_one():
    files = ["m-Q4_K_M-00001-of-00002.gguf", "m-Q4_K_M-00002-of-00002.gguf", "m-Q4_K_M.gguf", "m-Q8_0.gguf", "README.md"]

    assert matching_quant_files(files, "q4_k_m")[0] == "m-Q4_K_M.gguf"
    assert matching_quant_files(files, "Q2_K") == []


def test_rm_of_a_model_registered_outside_the_store_forgets_it_but_keeps_the_file(tmp_path, edgeinfer_home, cli):
    from edgeinfer.library import Library
    from edgeinfer.store import sha256_file

    mine = tmp_path / "elsewhere" / "Mine-Q8_0.gguf"
    mine.parent.mkdir()
    mine.write_bytes(b"GGUF-ish bytes the user keeps")
    Library.open().store.register("Mine-Q8_0", mine, sha256=sha256_file(mine), source="quantize")

    result = cli("rm", "Mine-Q8_0")

    assert result.exit_code == 0
    assert mine.exists()
    assert "Mine-Q8_0" not in Library.open().store.entries()
