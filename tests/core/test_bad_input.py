"""Every kind of bad input gets a DICOM failure status and a log line saying why;
nothing is stored, and the next good association still works."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import MRImageStorage
from pynetdicom.sop_class import CTImageStorage
from sqlalchemy import func, select

from pipeline.index.db import session_scope
from pipeline.index.schema import Instance
from tests.core.conftest import (
    Receiver,
    ServeProcess,
    dataset_bytes,
    echoscu,
    send_file_as_is,
    statuses,
    storescu,
    write_config,
)
from tests.peers.radtriage import index_url

pytestmark = pytest.mark.slow  # a receiver on loopback and dcmtk peers


def _count(receiver: Receiver) -> int:
    with session_scope(receiver.archive.session_factory, readonly=True) as session:
        return int(session.scalar(select(func.count(Instance.id))) or 0)


def _stored_files(receiver: Receiver) -> list[Path]:
    return [p for p in (receiver.archive.data_dir / "files").rglob("*") if p.is_file()]


def _next_good_works(receiver: Receiver, good: Path) -> None:
    before = _count(receiver)
    assert statuses(storescu(receiver.port, good)) == [0]
    assert _count(receiver) == before + 1


def _edit(src: Path, dst: Path, **changes: object) -> Path:
    ds = dcmread(src)
    for keyword, value in changes.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    ds.save_as(dst, enforce_file_format=False)
    return dst


@pytest.mark.parametrize(
    "keyword, value, reason",
    [
        ("StudyInstanceUID", None, "StudyInstanceUID is missing"),
        ("SeriesInstanceUID", None, "SeriesInstanceUID is missing"),
        ("SeriesInstanceUID", "../../../../../tmp/radtriage-evil", "not a valid UID"),
        ("StudyInstanceUID", "1.2.840.abc", "not a valid UID"),
        ("StudyInstanceUID", "1.2.840.01.5", "not a valid UID"),  # leading zero in a component
        ("SeriesInstanceUID", "1." + "2" * 70, "not a valid UID"),  # longer than 64
    ],
)
def test_missing_or_malformed_uid(
    keyword: str,
    value: str | None,
    reason: str,
    receiver: Receiver,
    study_files: list[Path],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = _edit(study_files[0], tmp_path / "bad.dcm", **{keyword: value})
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.receiver"):
        result = storescu(receiver.port, bad)
    assert statuses(result) == [0xC001], result.stdout + result.stderr
    assert reason in caplog.text
    assert _count(receiver) == 0 and _stored_files(receiver) == []
    assert not Path("/tmp/radtriage-evil").exists()
    _next_good_works(receiver, study_files[1])


def _send_file_as_is(port: int, path: Path) -> int:
    """C-STORE a file's dataset bytes as they are: the request announces the File Meta's
    SOP Class/Instance UID."""
    return int(send_file_as_is(port, path).Status)


def _with_body(src: Path, dst: Path, body: bytes) -> Path:
    """``src``'s preamble and File Meta followed by ``body``."""
    raw = src.read_bytes()
    dst.write_bytes(raw[: len(raw) - len(dataset_bytes(src))] + body)
    return dst


def test_sop_class_mismatch(
    receiver: Receiver, study_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # the File Meta (hence the request) says CT; the dataset inside says MR
    ds = dcmread(study_files[0])
    ds.SOPClassUID = MRImageStorage
    bad = tmp_path / "mismatch.dcm"
    ds.save_as(bad, enforce_file_format=False)
    bad = _with_body(study_files[0], tmp_path / "mismatch-meta.dcm", dataset_bytes(bad))
    assert read_file_meta_info(bad).MediaStorageSOPClassUID == CTImageStorage
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.receiver"):
        assert _send_file_as_is(receiver.port, bad) == 0xA900
    assert "differs from the request" in caplog.text
    assert _count(receiver) == 0 and _stored_files(receiver) == []
    _next_good_works(receiver, study_files[1])


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_dataset_that_does_not_parse(
    damage: str, receiver: Receiver, study_files: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:

    body = dataset_bytes(study_files[0])
    if damage == "garbage":
        body = body[:200] + bytes(range(256)) * 8 + body[-64:]
    else:
        body = body[: len(body) // 2]
    bad = _with_body(study_files[0], tmp_path / f"{damage}.dcm", body)
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.receiver"):
        status = _send_file_as_is(receiver.port, bad)
    assert status == 0xC000
    assert "0xC000" in caplog.text
    assert _count(receiver) == 0 and _stored_files(receiver) == []
    _next_good_works(receiver, study_files[1])


def _mount_namespace_wrapper(data_dir: Path, size: str) -> list[str] | None:
    """unshare(1) arguments for a private mount namespace with a small tmpfs, or None."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    user = [] if os.geteuid() == 0 else ["--map-root-user"]
    return [
        unshare,
        "--mount",
        "--propagation",
        "private",
        *user,
        "sh",
        "-c",
        f'mount -t tmpfs -o size={size} tmpfs "{data_dir}" && exec "$0" "$@"',
    ]


def test_disk_full_answers_out_of_resources(tmp_path: Path) -> None:
    """The archive sits on a real 1 MiB file system (tmpfs, in a private mount namespace
    so the host sees nothing); the index lies elsewhere. Images fill it: the ones that
    do not fit get 0xA700, leave no partial file, and the receiver stays up."""
    data_dir = tmp_path / "small"
    data_dir.mkdir()
    wrapper = _mount_namespace_wrapper(data_dir, "1m")
    if wrapper is None:
        pytest.skip("unshare(1) is not installed (util-linux); cannot make a small file system")
    config = write_config(tmp_path / "radtriage.toml", data_dir, index_url=index_url(tmp_path))
    server = ServeProcess(config, wrap=lambda cmd: [*wrapper, *cmd]).start()
    try:
        from pipeline.lab.synth import synth_study

        images = synth_study(tmp_path / "big", seed=3, slices=8, rows=256, cols=256)  # ~131 KB each
        result = storescu(server.port, *images)
        got = statuses(result)
        assert len(got) == len(images)
        assert 0x0000 in got and got[-1] == 0xA700, got
        stored = got.count(0)
        assert all(s == 0xA700 for s in got[stored:]), got  # once full, full
        log = server.wait_log(r"refused with 0xA700: archive disk full")
        assert log.count("refused with 0xA700") == len(images) - stored
        # inside the server's mount namespace: exactly the acknowledged files, no partial temp file
        assert server.proc is not None
        seen = [p for p in Path(f"/proc/{server.proc.pid}/root{data_dir}/files").rglob("*") if p.is_file()]
        assert len([p for p in seen if p.suffix == ".dcm"]) == stored and len(seen) == stored, seen
        # the receiver is still up and answers
        assert echoscu(server.port).returncode == 0
    finally:
        server.kill()
    # the namespace is gone with the process: the tmpfs contents with it. The index
    # (outside) lists exactly the acknowledged images.
    from pipeline.index.db import create_index_engine

    engine = create_index_engine(index_url(tmp_path))
    with session_scope(engine, readonly=True) as session:
        assert session.scalar(select(func.count(Instance.id))) == stored
    engine.dispose()
