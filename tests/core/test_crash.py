"""Crash safety: ``kill -9`` the server in the middle of a 200-image send, restart it:
every image that got Success is on disk and indexed; no partial or orphan file. And the
same for a process killed inside a group commit (several writers' instances renamed into
place, their transaction not yet committed)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from pipeline.index.db import create_index_engine, session_scope
from pipeline.index.schema import Instance, Study, StudyState
from pipeline.lab.synth import synth_study
from tests.core.conftest import ENV, HOST, ROOT, ServeProcess, dataset_bytes, echoscu, write_config
from tests.peers.dcmtk import acknowledged
from tests.peers.radtriage import index_url

pytestmark = pytest.mark.slow  # radtriage serve, killed mid-send


def test_kill_9_mid_send_loses_nothingacknowledged(tmp_path: Path) -> None:
    images = synth_study(tmp_path / "images", seed=21, slices=200, rows=256, cols=256)
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "radtriage.toml", data_dir)
    server = ServeProcess(config).start()
    engine = create_index_engine(index_url(data_dir))

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
    acked = acknowledged(output)
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
        for sent in acked:
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


WRITERS = 4
KILL_IN_BATCH = 6  # the sixth transaction that commits several writers' instances at once


def group_commit_child(data_dir: str, images: str) -> None:
    """Run in a child: four threads store the instances of four series through one
    Archive and print ``ack <SOP Instance UID>`` for each store that returned (what a
    C-STORE handler answers Success on). The process SIGKILLs itself inside the
    ``KILL_IN_BATCH``-th group transaction, after its renames and folder fsyncs, before
    its commit: the worst moment for a batch."""
    from pydicom.uid import ExplicitVRLittleEndian

    import pipeline.archive.store as store
    from pipeline.archive import Archive
    from pipeline.archive.store import encode_dataset
    from pipeline.config import Settings

    archive = Archive(Settings(storage={"data_dir": data_dir}))
    together, fsync_dir, batches = archive._commit_together, store._fsync_dir, [0]

    def counted(batch: object) -> object:
        batches[0] += 1
        return together(batch)  # type: ignore[arg-type]

    def fsync_then_die(path: Path) -> None:
        fsync_dir(path)
        if batches[0] >= KILL_IN_BATCH and archive._group._busy:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)

    archive._commit_together = counted  # type: ignore[method-assign]
    store._fsync_dir = fsync_then_die
    lock = threading.Lock()

    def send(folder: Path) -> None:
        for path in sorted(folder.iterdir()):
            ds = dcmread(path)
            archive.store_encoded(
                encode_dataset(ds, ExplicitVRLittleEndian),
                transfer_syntax=ExplicitVRLittleEndian,
                sop_class_uid=ds.SOPClassUID,
                sop_instance_uid=ds.SOPInstanceUID,
            )
            with lock:
                print(f"ack {ds.SOPInstanceUID}", flush=True)

    threads = [threading.Thread(target=send, args=(f,)) for f in sorted(Path(images).iterdir())]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def test_kill_9_inside_a_group_commit_loses_nothingacknowledged(tmp_path: Path) -> None:
    for i in range(WRITERS):
        synth_study(tmp_path / "images" / f"s{i}", seed=40 + i, slices=40, rows=64, cols=64)
    data_dir = tmp_path / "data"
    config = write_config(tmp_path / "radtriage.toml", data_dir)
    ServeProcess(config).start().stop()  # a migrated index, as serve leaves it
    child = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from tests.core.test_crash import group_commit_child; group_commit_child(*sys.argv[1:])",
            str(data_dir),
            str(tmp_path / "images"),
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert child.returncode == -signal.SIGKILL, f"never reached group commit {KILL_IN_BATCH}: {child.stderr[-2000:]}"
    acked = re.findall(r"^ack (\S+)$", child.stdout, re.MULTILINE)
    assert 0 < len(acked) < WRITERS * 40

    restarted = ServeProcess(config).start()  # its recovery runs before it answers
    engine = create_index_engine(index_url(data_dir))
    try:
        assert echoscu(restarted.port).returncode == 0
        assert not list((data_dir / "incoming").iterdir()), "temp files left in incoming/"
        files = [p for p in (data_dir / "files").rglob("*") if p.is_file()]
        assert all(p.name.endswith(".dcm") for p in files), "partial temp files left visible"
        with session_scope(engine, readonly=True) as session:
            rows = {sop: size for sop, size in session.execute(select(Instance.SOPInstanceUID, Instance.size))}
        assert {p.name.removesuffix(".dcm") for p in files} == set(rows), "orphan files or rows without a file"
        assert len(rows) > len(acked), "the killed batch's renamed files were not recovered"
        for sop in acked:
            assert sop in rows, f"acknowledged {sop} is not indexed"
        for path in files:  # whole files only: every one reads to its last pixel, at the size indexed
            assert path.stat().st_size == rows[path.name.removesuffix(".dcm")]
            assert dcmread(path).pixel_array.shape == (64, 64)
    finally:
        restarted.kill()
        engine.dispose()
