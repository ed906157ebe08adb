"""``radtriage models``, ``radtriage synth --finding`` and ``radtriage analyze`` as a user runs them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pipeline.cli import main

from .conftest import REFERENCE

pytestmark = [pytest.mark.usefixtures("atlas"), pytest.mark.slow]  # radtriage synth + analyze as processes


@pytest.fixture
def models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "models"
    shutil.copytree(REFERENCE, folder / "head_ct_hemorrhage")
    (folder / "half_done").mkdir()
    (folder / "half_done" / "metadata.json").write_text(json.dumps({"name": "half_done", "version": "0.1"}))
    monkeypatch.setenv("RADTRIAGE_MODELS__DIR", str(folder))
    monkeypatch.setenv("RADTRIAGE_MODELS__DEVICE", "cpu")
    return folder


def test_models_lists_available_and_unavailable_with_reasons(models: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "available    head_ct_hemorrhage 0.5.0  [CT] Intracranial hemorrhage" in out
    assert "UNAVAILABLE  half_done:" in out and "version: Value error, '0.1' is not a semantic version" in out

    assert main(["models", "--json", "--quick"]) == 0
    listing = json.loads(capsys.readouterr().out)
    status = {m["name"]: m["status"] for m in listing["models"]}
    assert status == {"head_ct_hemorrhage": "available", "half_done": "unavailable"}


@pytest.mark.parametrize(
    ("finding", "present", "priority"), [("hemorrhage", True, ("urgent", "critical")), ("none", False, ("routine",))]
)
def test_synth_then_analyze(
    models: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    finding: str,
    present: bool,
    priority: tuple[str, ...],
) -> None:
    study = tmp_path / "study"
    assert main(["synth", "--out", str(study), "--finding", finding, "--seed", "4100", "--slices", "36"]) == 0
    assert len(list(study.iterdir())) == 36
    capsys.readouterr()

    assert main(["analyze", str(study), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (result,) = report["results"]
    assert result["model"] == "head_ct_hemorrhage" and result["status"] == "analysed"
    assert result["number_of_instances"] == 36
    (found,) = result["findings"]
    assert found["label"] == "Intracranial hemorrhage"
    assert found["present"] is present
    assert result["priority"] in priority
    assert (found["volume_ml"] > 0.3) is present

    assert main(["analyze", str(study), "--model", "head_ct_hemorrhage"]) == 0
    text = capsys.readouterr().out
    assert f"Intracranial hemorrhage: {'PRESENT' if present else 'absent'}" in text


def test_analyze_refuses_what_it_cannot_do(models: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["analyze", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["analyze", str(tmp_path / "empty")]) == 2
    assert "holds no files" in capsys.readouterr().err
    (tmp_path / "empty" / "a.dcm").write_bytes(b"x")
    assert main(["analyze", str(tmp_path / "empty"), "--model", "half_done"]) == 2
    err = capsys.readouterr().err
    assert "no model half_done" in err and "not a semantic version" in err  # says why it is unavailable
