"""A model that crashes on a study: the study shows "AI failed" with the reason and stays
on the worklist. Runs the real ``triage-study`` flow against the session's Prefect server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pydicom
import pytest
import torch

from pipeline.index.db import session_scope
from pipeline.lab.synth import synth_study
from pipeline.triage.runtime import Runtime, set_runtime
from pipeline.web.worklist import list_worklist

pytestmark = pytest.mark.slow  # a Prefect server and a model

REPO = Path(__file__).resolve().parents[2]
CRASH = "model crash on this input"


def crashing_bundle(models_dir: Path) -> Path:
    """The reference bundle's configs with random weights and a preprocessing step that raises."""
    source = REPO / "models" / "head_ct_hemorrhage"
    bundle = models_dir / "crashing_model"
    (bundle / "models").mkdir(parents=True)
    shutil.copytree(source / "configs", bundle / "configs")
    shutil.copytree(source / "docs", bundle / "docs")
    metadata = json.loads((source / "metadata.json").read_text())
    metadata.update(name="crashing_model", version="0.0.1", changelog={"0.0.1": "raises on every study"})
    (bundle / "metadata.json").write_text(json.dumps(metadata))
    inference = json.loads((bundle / "configs" / "inference.json").read_text())
    inference["preprocessing"]["transforms"].append(
        {"_target_": "Lambdad", "keys": "image", "func": f"$lambda x: int('{CRASH}')"}
    )
    (bundle / "configs" / "inference.json").write_text(json.dumps(inference))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def test_a_model_that_raises_marks_the_study_ai_failed_and_keeps_it_listed(
    prefect_server, flow_settings, tmp_path, monkeypatch
):
    from flows.deployment import ensure_inference_limit
    from flows.triage import triage_study

    crashing_bundle(tmp_path / "models")
    settings = flow_settings.model_copy(
        update={"models": flow_settings.models.model_copy(update={"dir": tmp_path / "models"})}
    )
    runtime = Runtime.from_settings(settings)
    set_runtime(runtime)
    try:
        assert [m.name for m in runtime.registry.available] == ["crashing_model"], runtime.registry.unavailable
        files = synth_study(tmp_path / "study", seed=301, slices=20, rows=128, cols=128)
        for path in files:
            runtime.archive.store_dataset(pydicom.dcmread(path))
        study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        ensure_inference_limit(1)

        outcome = triage_study(study_uid=study_uid, revision=1)
    finally:
        set_runtime(None)

    assert outcome["ai_status"] == "failed"
    with session_scope(runtime.session_factory, readonly=True) as session:
        [item] = [i.to_json() for i in list_worklist(session) if i.StudyInstanceUID == study_uid]
    assert item["ai_status"] == "failed"
    assert "crashing_model" in item["ai_error"] and CRASH in item["ai_error"]
    assert item["priority"] == "routine"
    assert [r["ok"] for r in item["results"]] == [False]
