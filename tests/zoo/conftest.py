"""Fixtures for the model zoo tests: the cached atlas, the repository's models, bundles to break."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.lab.phantom.atlas import HEAD_CT_ATLAS, cached_path

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
REFERENCE = MODELS / "head_ct_hemorrhage"


@pytest.fixture(scope="session")
def atlas() -> Path:
    """The real head-CT atlas; fetched with the project's own script when the cache lacks it.

    Only the tests that build phantoms ask for it: validating a spec downloads nothing."""
    path = cached_path(HEAD_CT_ATLAS)
    if not path.is_file():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_data.py")], check=True)
    assert path.is_file()
    return path


@pytest.fixture(scope="session")
def registry():  # type: ignore[no-untyped-def]
    from pipeline.ai.registry import load_registry

    return load_registry(MODELS)


@pytest.fixture(scope="session")
def reference_model(registry):  # type: ignore[no-untyped-def]
    return registry.get("head_ct_hemorrhage")


@pytest.fixture
def bundle_copy(tmp_path: Path) -> Path:
    """A writable copy of the reference bundle inside a fresh models folder."""
    target = tmp_path / "models" / "head_ct_hemorrhage"
    shutil.copytree(REFERENCE, target)
    return target
