"""End to end: storescu sends studies to a running ``radtriage serve``; the worklist,
the archive and a real Orthanc archive node show the AI results."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from pipeline.ai.inference import run_model
from pipeline.ai.registry import load_registry
from pipeline.ai.volume import load_volume
from pipeline.index.db import create_index_engine
from pipeline.index.schema import Study
from pipeline.index.triage import AIResult
from pipeline.lab.phantom.generator import volume_generator
from pipeline.lab.synth import synth_study
from tests.peers.orthanc import OrthancPeer
from tests.peers.radtriage import REPO, RadtriageServer
from tests.results.dicomtools import dciodvfy

SLICES = 24
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]  # radtriage serve, Prefect, Orthanc


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory):
    with OrthancPeer(tmp_path_factory.mktemp("orthanc")) as peer:
        yield peer


@pytest.fixture(scope="module")
def system(prefect_server, orthanc, tmp_path_factory: pytest.TempPathFactory):
    destinations = [
        {"ae_title": orthanc.ae_title, "host": "127.0.0.1", "port": orthanc.dicom_port, "kinds": ["SEG", "SR"]}
    ]
    env = {
        "RADTRIAGE_FORWARD__DESTINATIONS": json.dumps(destinations),
        "RADTRIAGE_FORWARD__BACKOFF_SECONDS": "0.5",
        "RADTRIAGE_FORWARD__BACKOFF_MAX_SECONDS": "2",
    }
    with RadtriageServer(
        tmp_path_factory.mktemp("radtriage"), prefect_api_url=prefect_server.api_url, env=env
    ) as server:
        yield server


def storescu(system: RadtriageServer, files: list[Path]) -> None:
    subprocess.run(
        [
            "storescu",
            "-aet",
            "STORESCU",
            "-aec",
            system.ae_title,
            "127.0.0.1",
            str(system.dicom_port),
            *map(str, files),
        ],
        env={**os.environ, "TCP_NODELAY": "1"},
        check=True,
        capture_output=True,
        timeout=120,
    )


def make_study(folder: Path, seed: int, finding: str) -> tuple[str, list[Path]]:
    files = synth_study(folder / f"{finding}-{seed}", seed=seed, slices=SLICES, volume=volume_generator(finding))
    return str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID), files


def entry(studies: list[dict], study_uid: str) -> dict | None:
    return next((s for s in studies if s["StudyInstanceUID"] == study_uid), None)


def analysed(*study_uids: str):
    def check(studies: list[dict]) -> bool:
        entries = [entry(studies, uid) for uid in study_uids]
        return all(e is not None and e["ai_status"] in ("done", "failed") for e in entries)

    return check


def archived_file(system: RadtriageServer, sop_instance_uid: str) -> Path:
    matches = list(system.data_dir.rglob(f"{sop_instance_uid}.dcm"))
    assert len(matches) == 1, f"{sop_instance_uid} is not in the archive exactly once: {matches}"
    return matches[0]


RANK = {"critical": 3, "urgent": 2, "routine": 1}


def model_decision(files: list[Path]) -> tuple[str, bool]:
    """``(priority, present)`` of the shipped model run directly on ``files``."""
    model = load_registry(REPO / "models").get("head_ct_hemorrhage")
    result = run_model(model, load_volume(files), device="cpu")
    return result.priority.value, result.findings[0].present


def test_a_bleed_rises_to_the_top_with_seg_and_sr_archived_and_forwarded(system, orthanc, tmp_path):
    """The worklist shows the model's own decision on each study and puts the bleed above
    an older study without one. Whether the model is silent on that
    normal head is the model's accuracy, which its card and tests/zoo measure over many
    studies: here the pipeline must report exactly what the model decided."""
    routine_uid, routine_files = make_study(tmp_path, seed=202, finding="none")
    bleed_uid, bleed_files = make_study(tmp_path, seed=201, finding="hemorrhage")
    storescu(system, routine_files)  # the routine study arrives first: it is older
    storescu(system, bleed_files)
    routine_decision = model_decision(routine_files)  # while the system analyses

    studies = system.wait_for(analysed(routine_uid, bleed_uid), what="both studies analysed")
    bleed, routine = entry(studies, bleed_uid), entry(studies, routine_uid)
    assert bleed["ai_status"] == "done", bleed
    assert routine["ai_status"] == "done", routine
    assert (routine["priority"], any(f["present"] for f in routine["findings"])) == routine_decision, routine
    assert RANK[bleed["priority"]] > RANK[routine["priority"]], (bleed, routine)
    order = [s["StudyInstanceUID"] for s in studies]
    assert order.index(bleed_uid) < order.index(routine_uid), "the bleed must be listed above the older study"
    bleed_findings = [f for f in bleed["findings"] if f["present"]]
    assert bleed_findings and bleed_findings[0]["volume_ml"] > 0
    assert bleed["time_to_triage_seconds"] is not None

    sent: set[str] = set()
    for study in (bleed, routine):
        [result] = study["results"]
        for sop_uid in (result["SegSOPInstanceUID"], result["SRSOPInstanceUID"]):
            verdict = dciodvfy(archived_file(system, sop_uid))
            assert verdict.errors == [], verdict.output
            sent.add(sop_uid)
    orthanc.wait_for_instances(sent, timeout=60)


def test_results_wait_for_a_down_node_and_are_delivered_when_it_is_back(system, orthanc, tmp_path):
    orthanc.stop()
    try:
        study_uid, files = make_study(tmp_path, seed=203, finding="hemorrhage")
        storescu(system, files)
        studies = system.wait_for(analysed(study_uid), what="the study analysed")
        [result] = entry(studies, study_uid)["results"]
        owed = {result["SegSOPInstanceUID"], result["SRSOPInstanceUID"]}

        def failed_attempts() -> dict[str, int]:
            listing = json.loads(system.cli("forwards", "--json", "--state", "pending").stdout)
            return {j["SOPInstanceUID"]: j["attempts"] for j in listing["jobs"] if j["SOPInstanceUID"] in owed}

        system.wait_for(
            lambda _: len(failed_attempts()) == 2 and min(failed_attempts().values()) >= 1,
            timeout=60,
            what="failed delivery attempts to the down node",
        )
    finally:
        orthanc.start()
    orthanc.wait_for_instances(owed, timeout=60)


def test_a_late_instance_regenerates_the_results_and_supersedes_the_old(system, tmp_path):
    study_uid, files = make_study(tmp_path, seed=204, finding="hemorrhage")
    storescu(system, files)
    studies = system.wait_for(analysed(study_uid), what="first analysis")
    [first] = entry(studies, study_uid)["results"]

    # One more slice, next to the last one, as a modality sending late would.
    last = pydicom.dcmread(files[-1])
    last.SOPInstanceUID = last.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    last.InstanceNumber = int(last.InstanceNumber) + 1
    spacing = float(last.SliceThickness)
    last.ImagePositionPatient = [*last.ImagePositionPatient[:2], float(last.ImagePositionPatient[2]) + spacing]
    late = tmp_path / "late.dcm"
    last.save_as(late)
    storescu(system, [late])

    def regenerated(studies: list[dict]) -> bool:
        e = entry(studies, study_uid)
        return bool(
            e
            and e["ai_status"] == "done"
            and e["results"]
            and e["results"][0]["SegSOPInstanceUID"] != first["SegSOPInstanceUID"]
        )

    studies = system.wait_for(regenerated, what="results regenerated after the late instance")
    [second] = entry(studies, study_uid)["results"]
    assert second["SRSOPInstanceUID"] != first["SRSOPInstanceUID"]
    engine = create_index_engine(system.index_url)  # SQLite or PostgreSQL (RADTRIAGE_TEST_INDEX)
    with engine.connect() as db:
        rows = db.execute(
            select(AIResult.revision, AIResult.superseded, AIResult.SegSOPInstanceUID)
            .join(Study, Study.id == AIResult.study_id)
            .where(Study.StudyInstanceUID == study_uid)
            .order_by(AIResult.revision)
        ).all()
    engine.dispose()
    assert [tuple(r) for r in rows] == [(1, 1, first["SegSOPInstanceUID"]), (2, 0, second["SegSOPInstanceUID"])]
    # Both generations stay in the archive: superseded objects are kept, not deleted.
    archived_file(system, first["SegSOPInstanceUID"])
    archived_file(system, second["SegSOPInstanceUID"])


def test_demo_fills_the_worklist(system):
    before = {s["StudyInstanceUID"] for s in system.worklist()}
    sent = system.cli(
        "demo", "--to", f"{system.ae_title}@127.0.0.1:{system.dicom_port}", "--studies", "2", "--slices", "16"
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert sent.stdout.count("16/16 images sent") == 2, sent.stdout
    assert sent.stdout.endswith("analysed.\n"), repr(sent.stdout[-80:])  # the prompt starts on its own line
    new = [s for s in system.worklist() if s["StudyInstanceUID"] not in before]
    assert len(new) == 2
    assert {s["PatientName"] for s in new} and all(s["ai_status"] in ("pending", "running", "done") for s in new)
