"""Every notebook runs top to bottom (smoke mode) and leaves the repository's models alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.lab.notebook import execute_notebook

from .conftest import MODELS, ROOT

pytestmark = [pytest.mark.usefixtures("atlas"), pytest.mark.slow]  # notebooks, top to bottom

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = {
    "01_train_head_ct_hemorrhage.ipynb": ["saved ", "model.pt", "study-level sensitivity"],
    "02_add_your_model.ipynb": [
        "refused: configs/triage.json: findings.0.type.scheme",
        "available   hemorrhage_segresnet@0.1.0",
        "Intracranial hemorrhage: present=",
    ],
}


def _text(notebook) -> str:  # type: ignore[no-untyped-def]
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", ""))
            parts.append(output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def test_every_notebook_is_covered() -> None:
    assert [p.name for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs_in_smoke_mode(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    weights = MODELS / "head_ct_hemorrhage" / "models" / "model.pt"
    before = (weights.stat().st_mtime_ns, sorted(p.name for p in MODELS.iterdir()))
    scratch = tmp_path / "scratch"  # the kernel's temporary folders (smoke bundles, studies) go here, not /tmp
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))

    notebook = execute_notebook(path, {"SMOKE": True}, output=tmp_path / path.name, timeout=300)

    text = _text(notebook)
    for expected in EXPECTED[path.name]:
        assert expected in text, f"{path.name}: {expected!r} not in the outputs"
    assert (weights.stat().st_mtime_ns, sorted(p.name for p in MODELS.iterdir())) == before
    assert any(scratch.iterdir()), "the notebook's temporary folders did not go to TMPDIR"
