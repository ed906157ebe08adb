"""A modality (dcmtk storescu/echoscu) sends to the receiver: what it gets back and
what ends up in the archive."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import func, select

from pipeline.index.db import session_scope
from pipeline.index.schema import Instance, Series, SeriesOrigin, Study, StudyState
from tests.core.conftest import ENV, ROOT, Receiver, dataset_bytes, echoscu, statuses, storescu

pytestmark = pytest.mark.slow  # a receiver on loopback and dcmtk peers


def test_echo(receiver: Receiver) -> None:
    result = echoscu(receiver.port)
    assert result.returncode == 0, result.stderr


def test_whole_study_is_indexed_and_byte_identical(receiver: Receiver, study_files: list[Path]) -> None:
    result = storescu(receiver.port, *study_files)
    assert result.returncode == 0, result.stderr
    assert statuses(result) == [0] * len(study_files)

    with session_scope(receiver.archive.session_factory, readonly=True) as session:
        study = session.scalars(select(Study)).one()
        assert study.state == StudyState.received
        assert study.NumberOfStudyRelatedInstances == len(study_files)
        assert study.NumberOfStudyRelatedSeries == 1
        assert study.ModalitiesInStudy == "CT"
        assert study.patient.PatientName  # from the synthetic header
        series = study.series[0]
        assert (series.Modality, series.BodyPartExamined, series.origin) == ("CT", "HEAD", SeriesOrigin.received)
        assert series.SliceThickness == 5.0
        assert series.NumberOfSeriesRelatedInstances == len(study_files)
        series_uid = series.SeriesInstanceUID

    stored = receiver.archive.series_files(series_uid)
    assert len(stored) == len(study_files)
    for sent, kept in zip(study_files, stored, strict=True):  # both in InstanceNumber order
        assert dataset_bytes(kept) == dataset_bytes(sent), f"{kept} differs from {sent}"
        assert kept.stat().st_size > 128 * 128 * 2


def test_resend_is_acknowledged_and_stored_once(receiver: Receiver, study_files: list[Path]) -> None:
    first = storescu(receiver.port, *study_files[:4])
    again = storescu(receiver.port, *study_files[:4])
    assert statuses(first) == statuses(again) == [0, 0, 0, 0]
    with session_scope(receiver.archive.session_factory, readonly=True) as session:
        assert session.scalar(select(func.count(Instance.id))) == 4
        assert session.scalar(select(Study.NumberOfStudyRelatedInstances)) == 4
    files = list((receiver.archive.data_dir / "files").rglob("*"))
    assert len([f for f in files if f.is_file()]) == 4


def test_unknown_calling_ae_rejected_allowed_accepted(tmp_path: Path, study_files: list[Path]) -> None:
    from tests.core.conftest import running_receiver

    with running_receiver(tmp_path, allowed_aes=["CT_SCANNER"]) as running:
        port, archive = running.port, running.archive
        rejected = storescu(port, study_files[0], aet="INTRUDER")
        assert rejected.returncode != 0
        assert "Calling AE Title Not Recognized" in rejected.stdout + rejected.stderr
        accepted = storescu(port, study_files[0], aet="CT_SCANNER")
        assert accepted.returncode == 0 and statuses(accepted) == [0]
        with session_scope(archive.session_factory, readonly=True) as session:
            assert session.scalar(select(func.count(Instance.id))) == 1


def test_studies_cli_lists_state_and_counts(receiver: Receiver, study_files: list[Path], tmp_path: Path) -> None:
    assert statuses(storescu(receiver.port, *study_files[:3])) == [0, 0, 0]
    env = {**ENV, "RADTRIAGE_STORAGE__DATA_DIR": str(receiver.settings.storage.data_dir)}
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "studies", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [(r["state"], r["NumberOfStudyRelatedInstances"], r["ModalitiesInStudy"]) for r in rows] == [
        ("received", 3, "CT")
    ]
    table = subprocess.run(
        [sys.executable, "-m", "pipeline", "studies"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert rows[0]["StudyInstanceUID"] in table.stdout and "received" in table.stdout


def test_series_lookup(receiver: Receiver, study_files: list[Path]) -> None:
    assert statuses(storescu(receiver.port, *study_files[:2])) == [0, 0]
    with session_scope(receiver.archive.session_factory, readonly=True) as session:
        sop, series_uid = session.execute(
            select(Instance.SOPInstanceUID, Series.SeriesInstanceUID).join(Series).order_by(Instance.InstanceNumber)
        ).first()
    path = receiver.archive.path_of(sop)
    assert path.is_file() and path.name == f"{sop}.dcm"
    assert path.parent.name == series_uid


def test_parallel_associations_into_one_new_study(receiver: Receiver, study_files: list[Path]) -> None:
    """Modalities often send one study over several associations at once: the study,
    patient and series are created once, and every instance is counted."""
    from tests.core.conftest import HOST

    halves = [study_files[0::3], study_files[1::3], study_files[2::3]]
    senders = [
        subprocess.Popen(
            ["storescu", "-aec", "RADTRIAGE", HOST, str(receiver.port), *map(str, part)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for part in halves
    ]
    for sender in senders:
        out, _ = sender.communicate(timeout=120)
        assert sender.returncode == 0, out
    with session_scope(receiver.archive.session_factory, readonly=True) as session:
        study = session.scalars(select(Study)).one()
        assert study.NumberOfStudyRelatedInstances == len(study_files)
        assert study.NumberOfStudyRelatedSeries == 1
        assert session.scalar(select(func.count(Instance.id))) == len(study_files)
        assert session.scalar(select(func.count(Series.id))) == 1


def test_a_send_aborted_mid_dataset_leaves_no_file(receiver: Receiver, tmp_path: Path) -> None:
    """The dataset is written to a temp file while its PDUs arrive; a sender that aborts
    halfway leaves neither that file nor an index row."""
    import time
    from io import BytesIO

    import pydicom
    from pynetdicom import AE
    from pynetdicom.dimse_messages import C_STORE_RQ
    from pynetdicom.dimse_primitives import C_STORE

    from pipeline.archive.store import encode_dataset
    from pipeline.lab.synth import synth_study
    from tests.core.conftest import HOST

    ds = pydicom.dcmread(synth_study(tmp_path / "big", seed=3, slices=1, rows=512, cols=512)[0])
    syntax = pydicom.uid.ExplicitVRLittleEndian
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(ds.SOPClassUID, syntax)
    assoc = ae.associate(HOST, receiver.port, ae_title="RADTRIAGE")
    assert assoc.is_established
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    request.DataSet = BytesIO(encode_dataset(ds, syntax))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    pdus = list(message.encode_msg(assoc.accepted_contexts[0].context_id, 16384))
    for pdu in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdu)
    incoming = receiver.archive.incoming_dir
    deadline = time.monotonic() + 10
    while not list(incoming.iterdir()):  # half the dataset is in: being written already
        assert time.monotonic() < deadline, "nothing was written while the dataset arrived"
        time.sleep(0.01)
    assoc.abort()
    deadline = time.monotonic() + 10
    while list(incoming.iterdir()):
        assert time.monotonic() < deadline, f"the aborted send left {list(incoming.iterdir())}"
        time.sleep(0.01)
    assert not [p for p in (receiver.archive.data_dir / "files").rglob("*") if p.is_file()]
    with session_scope(receiver.archive.session_factory, readonly=True) as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
    # and the same instance sent whole afterwards is stored
    assert statuses(
        storescu(receiver.port, *synth_study(tmp_path / "again", seed=3, slices=1, rows=512, cols=512))
    ) == [0]
