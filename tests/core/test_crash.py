"""Crash safety: ``kill -9`` the server in the middle of a 200-image send, restart it:
every image that got Success is on disk and indexed; no partial or orphan file."""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from pipeline.index.db import create_index_engine, session_scope
from pipeline.index.schema import Instance, Study, StudyState
from pipeline.lab.synth import synth_study
from tests.core.conftest import ENV, HOST, ServeProcess, dataset_bytes, echoscu, write_config

pytestmark = pytest.mark.slow  # radtriage serve, killed mid-send


def _acknowledged(storescu_output: str) -> list[str]:
    """Files storescu got a Success response for, from its verbose log."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        sending = re.search(r"Sending file: (.+)$", line)
        if sending:
            current = sending.group(1).strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def test_kill_9_mid_send_loses_nothing_acknowledged(tmp_path: Path) -> None:
    images = synth_study(tmp_path / "images", seed=21, slices=200, rows=256, cols=256)
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "radtriage.toml", data_dir)
    server = ServeProcess(config).start()
    engine = create_index_engine(f"sqlite:///{data_dir / 'index.sqlite'}")

    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "RADTRIAGE", HOST, str(server.port), *map(str, images)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.monotonic() + 60
    while True:  # kill once a good part of the study is in
        with session_scope(engine, readonly=True) as session:
            indexed = session.scalar(select(func.count(Instance.id))) or 0
        if indexed >= 40:
            break
        assert sender.poll() is None, "storescu finished before the kill: nothing was tested"
        assert time.monotonic() < deadline, "the receiver never indexed 40 images"
        time.sleep(0.01)
    server.kill()  # SIGKILL
    output, _ = sender.communicate(timeout=60)
    acked = _acknowledged(output)
    assert 30 <= len(acked) < len(images), f"{len(acked)} acknowledged: the kill did not land mid-send"

    restarted = ServeProcess(config).start()
    try:
        assert echoscu(restarted.port).returncode == 0
        files = [p for p in (data_dir / "files").rglob("*") if p.is_file()]
        assert not [p for p in files if not p.name.endswith(".dcm")], "partial temp files left visible"
        assert not [p for p in (data_dir / "incoming").iterdir()], "temp files left in incoming/"
        with session_scope(engine, readonly=True) as session:
            indexed_paths = set(session.scalars(select(Instance.path)))
            study = session.scalars(select(Study)).one()
            assert study.NumberOfStudyRelatedInstances == len(indexed_paths)
            assert study.state == StudyState.received
        on_disk = {p.relative_to(data_dir).as_posix() for p in files}
        assert on_disk == indexed_paths, "orphan files or index rows without a file"
        for sent in map(Path, acked):
            sop = dcmread(sent, stop_before_pixels=True).SOPInstanceUID
            kept = [p for p in files if p.name == f"{sop}.dcm"]
            assert kept, f"acknowledged {sent.name} ({sop}) is not in the archive"
            assert dataset_bytes(kept[0]) == dataset_bytes(sent)
        # and the rest of the study can be sent again: resends are acknowledged, once each
        resend = subprocess.run(
            ["storescu", "-aec", "RADTRIAGE", HOST, str(restarted.port), *map(str, images)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert resend.returncode == 0, resend.stderr
        with session_scope(engine, readonly=True) as session:
            assert session.scalar(select(func.count(Instance.id))) == len(images)
    finally:
        restarted.kill()
        engine.dispose()
