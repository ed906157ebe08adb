"""Durability of the multi-process receiver (``[dicom] workers = 2``): four dcmtk storescu
send four studies at once while one receiver process, or the whole service, is killed
with ``kill -9``; afterwards every acknowledged image is on disk and in the index and no
partial file is visible. One SOP Instance sent through two receiver processes at the same
moment is stored once."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.association import Association
from sqlalchemy import func, select

from pipeline.config import DicomSettings, Settings
from pipeline.dicom.workers import process_settings
from pipeline.errors import ConfigError
from pipeline.index.db import create_index_engine, session_scope
from pipeline.index.schema import Instance
from pipeline.lab.synth import synth_study
from tests.core.conftest import ENV, HOST, ServeProcess, dataset_bytes, echoscu, write_config
from tests.peers.dcmtk import acknowledged
from tests.peers.radtriage import index_url

SENDERS = 4
SLICES = 60  # per study: 4 x 60 images of 256 x 256


def _serve(tmp_path: Path, data_dir: Path) -> ServeProcess:
    config = write_config(tmp_path / "radtriage.toml", data_dir)
    return ServeProcess(config, env={**ENV, "RADTRIAGE_DICOM__WORKERS": "2"}).start()


def _worker_pids(server: ServeProcess) -> dict[int, int]:
    """Receiver process number -> the pid now running it, from the server's log."""
    return {
        int(n): int(pid)
        for n, pid in re.findall(r"receiver process (\d+) of \d+ started \(pid (\d+)\)", server.log_text())
    }


def _connections(pid: int, port: int) -> set[int]:
    """The remote ports of the established connections to ``port`` that process ``pid`` holds."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    remote_ports = set()
    for line in Path(f"/proc/{pid}/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state, inode = fields[1], fields[2], fields[3], fields[9]
        if state == "01" and inode in inodes and int(local.split(":")[1], 16) == port:
            remote_ports.add(int(remote.split(":")[1], 16))
    return remote_ports


def _studies(folder: Path) -> list[list[Path]]:
    return [synth_study(folder / f"s{i}", seed=60 + i, slices=SLICES, rows=256, cols=256) for i in range(SENDERS)]


def _send_all(port: int, studies: list[list[Path]]) -> list[subprocess.Popen[str]]:
    return [
        subprocess.Popen(
            ["storescu", "-v", "-aec", "RADTRIAGE", HOST, str(port), *map(str, files)],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for files in studies
    ]


def _indexed(engine: object) -> int:
    with session_scope(engine, readonly=True) as session:  # type: ignore[arg-type]
        return session.scalar(select(func.count(Instance.id))) or 0


def _wait_indexed(engine: object, at_least: int, senders: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + 90
    while _indexed(engine) < at_least:
        assert any(s.poll() is None for s in senders), "every storescu finished before the kill: nothing was tested"
        assert time.monotonic() < deadline, f"the receiver never indexed {at_least} images"
        time.sleep(0.01)


def _check_archive(data_dir: Path, engine: object, acked: list[Path], *, consistent: bool) -> None:
    """Every acknowledged image on disk, indexed, byte for byte; no partial file outside
    ``incoming/``; with ``consistent``, files and index rows match one to one."""
    files = [p for p in (data_dir / "files").rglob("*") if p.is_file()]
    assert not [p for p in files if not p.name.endswith(".dcm")], "partial temp files visible"
    with session_scope(engine, readonly=True) as session:  # type: ignore[arg-type]
        indexed = set(session.scalars(select(Instance.path)))
    on_disk = {p.relative_to(data_dir).as_posix() for p in files}
    if consistent:
        assert on_disk == indexed, "orphan files or index rows without a file"
    by_name = {p.name: p for p in files}
    for sent in acked:
        sop = pydicom.dcmread(sent, stop_before_pixels=True).SOPInstanceUID
        kept = by_name.get(f"{sop}.dcm")
        assert kept is not None, f"acknowledged {sent} ({sop}) is not in the archive"
        assert kept.relative_to(data_dir).as_posix() in indexed, f"acknowledged {sop} is not indexed"
        assert dataset_bytes(kept) == dataset_bytes(sent)


def _resend_everything(port: int, studies: list[list[Path]], engine: object) -> None:
    resends = _send_all(port, studies)
    for sender in resends:
        out, _ = sender.communicate(timeout=180)
        assert sender.returncode == 0, out[-2000:]
    assert _indexed(engine) == SENDERS * SLICES  # each image once


@pytest.mark.slow  # radtriage serve with receiver processes
def test_kill_9_one_receiver_process_mid_send(tmp_path: Path) -> None:
    studies = _studies(tmp_path / "images")
    data_dir = tmp_path / "data"
    server = _serve(tmp_path, data_dir)
    engine = create_index_engine(index_url(data_dir))
    try:
        senders = _send_all(server.port, studies)
        _wait_indexed(engine, 40, senders)
        pids = _worker_pids(server)
        assert len(pids) == 2, server.log_text()
        busiest = max(pids.values(), key=lambda pid: len(_connections(pid, server.port)))
        assert _connections(busiest, server.port), "no receiver process holds an association"
        os.kill(busiest, signal.SIGKILL)
        outputs = [s.communicate(timeout=180)[0] for s in senders]
        acked = [f for out in outputs for f in acknowledged(out)]
        # 40 were indexed before the kill; each sender may not have had the Success of its last one yet
        assert 40 - SENDERS <= len(acked) < SENDERS * SLICES, (
            f"{len(acked)} acknowledged: the kill did not land mid-send"
        )

        # the supervisor said so, removed the dead process's temp files and started another
        server.wait_log(rf"\(pid {busiest}\) was killed by SIGKILL[\s\S]*of 2 started[\s\S]*accepting on", 60)
        assert busiest not in _worker_pids(server).values()
        assert not list((data_dir / "incoming").glob(f"r{busiest}-*")), "the dead process's temp files are left"
        assert echoscu(server.port).returncode == 0
        _check_archive(data_dir, engine, acked, consistent=False)
        _resend_everything(server.port, studies, engine)
    finally:
        server.stop()
    # a restart's recovery leaves files and index rows matching one to one
    restarted = _serve(tmp_path, data_dir)
    try:
        assert not list((data_dir / "incoming").iterdir()), "temp files left in incoming/"
        _check_archive(data_dir, engine, acked, consistent=True)
        assert _indexed(engine) == SENDERS * SLICES
    finally:
        restarted.stop()
        engine.dispose()


@pytest.mark.slow  # radtriage serve with receiver processes
def test_kill_9_whole_service_mid_send(tmp_path: Path) -> None:
    studies = _studies(tmp_path / "images")
    data_dir = tmp_path / "data"
    server = _serve(tmp_path, data_dir)
    engine = create_index_engine(index_url(data_dir))
    senders = _send_all(server.port, studies)
    _wait_indexed(engine, 40, senders)
    workers = list(_worker_pids(server).values())
    assert server.proc is not None
    for pid in [server.proc.pid, *workers]:  # the parent and its receiver processes at once
        os.kill(pid, signal.SIGKILL)
    server.proc.wait(timeout=30)
    outputs = [s.communicate(timeout=180)[0] for s in senders]
    acked = [f for out in outputs for f in acknowledged(out)]
    # 40 were indexed before the kill; each sender may not have had the Success of its last one yet
    assert 40 - SENDERS <= len(acked) < SENDERS * SLICES, f"{len(acked)} acknowledged: the kill did not land mid-send"

    restarted = _serve(tmp_path, data_dir)
    try:
        for pid in workers:  # none of the old receiver processes lives on (nor accepts)
            assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
        assert echoscu(restarted.port).returncode == 0
        assert not list((data_dir / "incoming").iterdir()), "temp files left in incoming/"
        _check_archive(data_dir, engine, acked, consistent=True)
        _resend_everything(restarted.port, studies, engine)
    finally:
        restarted.stop()
        engine.dispose()


def _nodelay(event: evt.Event) -> None:
    event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _associations_in_two_processes(server: ServeProcess, sop_class: str) -> list[Association]:
    """Two associations that two different receiver processes accepted."""
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class, pydicom.uid.ExplicitVRLittleEndian)
    pids = list(_worker_pids(server).values())
    held: dict[int, Association] = {}
    for _ in range(40):
        assoc = ae.associate(HOST, server.port, ae_title="RADTRIAGE", evt_handlers=[(evt.EVT_CONN_OPEN, _nodelay)])
        assert assoc.is_established
        local_port = assoc.dul.socket.socket.getsockname()[1]  # type: ignore[union-attr]
        owner = next((pid for pid in pids if local_port in _connections(pid, server.port)), None)
        if owner is None or owner in held:
            assoc.release()
            continue
        held[owner] = assoc
        if len(held) == 2:
            return list(held.values())
    raise AssertionError("40 associations all went to one receiver process")


@pytest.mark.slow  # radtriage serve with receiver processes
def test_same_instance_through_two_processes_is_stored_once(tmp_path: Path) -> None:
    path = synth_study(tmp_path / "one", seed=5, slices=1, rows=64, cols=64)[0]
    variants = [pydicom.dcmread(path), pydicom.dcmread(path)]
    variants[1].ImageComments = "x" * 4000  # the same instance, other bytes
    data_dir = tmp_path / "data"
    server = _serve(tmp_path, data_dir)
    engine = create_index_engine(index_url(data_dir))
    associations = _associations_in_two_processes(server, variants[0].SOPClassUID)
    try:
        for round_ in range(15):
            uid = f"1.2.826.0.1.3680043.8.498.66{round_}"
            for ds in variants:
                ds.SOPInstanceUID = uid
            barrier = threading.Barrier(2)
            statuses: list[int] = [-1, -1]

            def send(i: int, barrier: threading.Barrier = barrier, statuses: list[int] = statuses) -> None:
                barrier.wait()
                statuses[i] = int(associations[i].send_c_store(variants[i]).Status)

            threads = [threading.Thread(target=send, args=(i,)) for i in (0, 1)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            assert statuses == [0, 0], (round_, statuses)
            with session_scope(engine, readonly=True) as session:
                rows = session.execute(select(Instance.path, Instance.size).where(Instance.SOPInstanceUID == uid)).all()
            assert len(rows) == 1, rows
            stored = data_dir / rows[0].path
            assert stored.stat().st_size == rows[0].size, "the file is not the one its index row describes"
            assert len(list(stored.parent.iterdir())) == round_ + 1  # one file per instance, no temp file
    finally:
        for assoc in associations:
            assoc.release()
        server.stop()
        engine.dispose()


def test_each_process_takes_its_share_of_the_association_limits() -> None:
    settings = Settings(dicom={"max_associations": 64, "max_associations_per_address": 16, "workers": 3})
    mine = process_settings(settings, 3).dicom
    assert (mine.max_associations, mine.max_associations_per_address, mine.workers) == (22, 16, 1)
    small = process_settings(Settings(dicom={"max_associations": 5, "max_associations_per_address": 4}), 2).dicom
    assert (small.max_associations, small.max_associations_per_address) == (3, 3)  # never more than its share
    assert settings.dicom.max_associations == 64  # the parent's settings are untouched


def test_workers_setting() -> None:
    assert DicomSettings(workers="auto").worker_processes == len(os.sched_getaffinity(0))
    assert DicomSettings(workers="2").worker_processes == 2
    for bad in (0, -1, "many", 2.5, 1000):
        with pytest.raises(ValueError, match='give "auto"'):
            DicomSettings(workers=bad)


def test_a_port_in_use_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    from pipeline.dicom.workers import bind_listening_socket

    taken = socket.create_server((HOST, 0))
    try:
        port = taken.getsockname()[1]
        settings = Settings(dicom={"bind": HOST, "port": port})
        with pytest.raises(ConfigError, match=f"cannot listen on {HOST}:{port}"):
            bind_listening_socket(settings, retry_seconds=0.2)
    finally:
        taken.close()
