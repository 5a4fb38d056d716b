"""Wheels built by the tests themselves, and the environment that points the real pip at them.

A wheel is a zip with a `.dist-info` folder (METADATA, WHEEL, RECORD); pip
downloads it from a folder given as PIP_FIND_LINKS with PIP_NO_INDEX set, which
is how the tests exercise edgeinfer's PyPI mirror without the network.
"""

from __future__ import annotations

import base64
import hashlib
import zipfile
from pathlib import Path


def build_wheel(folder: Path, name: str, version: str, members: dict[str, bytes]) -> Path:
    """Write `name==version` as a pure-Python wheel holding `members` (path in the wheel -> bytes)."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = name.replace("-", "_")
    info = f"{dist}-{version}.dist-info"
    files = {
        **members,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: edgeinfer-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},sha256={_record_hash(data)},{len(data)}" for path, data in files.items()]
    record.append(f"{info}/RECORD,,")
    files[f"{info}/RECORD"] = ("\n".join(record) + "\n").encode()
    wheel = folder / f"{dist}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        for path, data in files.items():
            archive.writestr(path, data)
    return wheel


def _record_hash(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def split_into_wheels(folder: Path, project: str, version: str, data: bytes, parts: int) -> list[dict[str, str]]:
    """Cut `data` into `parts` wheels `project-part1..N`; returns the catalog's `wheels` entries, in order."""
    size = -(-len(data) // parts)
    entries = []
    for k in range(1, parts + 1):
        name = f"{project}-part{k}"
        member = f"{name.replace('-', '_')}/data/part{k:02d}.bin"
        build_wheel(folder, name, version, {member: data[(k - 1) * size : k * size]})
        entries.append({"requirement": f"{name}=={version}", "member": member})
    return entries


def pip_env(find_links: Path, cache: Path) -> dict[str, str | None]:
    """Environment for the real pip: only the wheels in `find_links`, no index, no config of this machine.

    A None value means "remove this variable" (see conftest.subprocess_env).
    """
    return {
        "PIP_NO_INDEX": "1",
        "PIP_FIND_LINKS": str(find_links),
        "PIP_CONFIG_FILE": "/dev/null",
        "PIP_INDEX_URL": None,
        "PIP_EXTRA_INDEX_URL": None,
        "PIP_CACHE_DIR": str(cache),
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
