"""STOW-RS against a running web server, with httpx and with the real ``dicomweb-client``
package: what was sent is what the archive holds, bad parts fail alone with their reason,
nothing half-written stays, and a large upload never sits in memory."""

from __future__ import annotations

import base64
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.index.accounts import AuditEvent
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Instance, Study, StudyState
from pipeline.lab.synth import synth_study
from pipeline.web import WebServer
from pipeline.web.auth import create_user

from .conftest import PASSWORD

pytestmark = pytest.mark.slow  # a web server on loopback

DICOM_TYPE = 'multipart/related; type="application/dicom"; boundary="{}"'
FAILED, REFERENCED, REASON, SOP_INSTANCE, RETRIEVE_URL = "00081198", "00081199", "00081197", "00081155", "00081190"


@dataclass
class Stow:
    settings: Settings
    archive: Archive
    server: WebServer
    files: list[Path]  # one CT series of 4 slices
    folder: Path

    @property
    def url(self) -> str:
        return self.server.url + "/dicom-web"


@pytest.fixture(scope="module")
def stow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stow]:
    """A fresh archive of its own (the session archive's worklist must not change)."""
    folder = tmp_path_factory.mktemp("stow")
    settings = Settings(storage={"data_dir": folder / "data"}, web={"bind": "127.0.0.1", "port": 0})
    migrate(settings.index_url)
    archive = Archive(settings)
    with session_scope(archive.session_factory) as session:
        create_user(session, "root", PASSWORD, "admin")
        create_user(session, "alice", PASSWORD, "radiologist")
    files = synth_study(folder / "ct", seed=31, slices=4, rows=64, cols=64)
    server = WebServer(settings, archive.session_factory, archive)
    server.start()
    try:
        yield Stow(settings, archive, server, files, folder)
    finally:
        server.stop()
        archive.engine.dispose()


def body(*parts: bytes, boundary: str = "stow-test", close: bool = True, preamble: bytes = b"") -> bytes:
    out = preamble
    for part in parts:
        out += f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + part + b"\r\n"
    return out + (f"--{boundary}--\r\n".encode() if close else b"")


def post(
    stow: Stow, content: bytes | Iterator[bytes], *, path: str = "/studies", content_type: str | None = None
) -> httpx.Response:
    headers = {"content-type": content_type or DICOM_TYPE.format("stow-test")}
    return httpx.post(stow.url + path, content=content, headers=headers, auth=("root", PASSWORD), timeout=60)


def _indexed(stow: Stow, sop_instance_uid: str) -> bool:
    with session_scope(stow.archive.session_factory, readonly=True) as session:
        return session.scalar(select(Instance.id).where(Instance.SOPInstanceUID == sop_instance_uid)) is not None


def _incoming(stow: Stow) -> list[Path]:
    return list(stow.archive.incoming_dir.iterdir())


def _instance(stow: Stow, tmp: Path, name: str, study_uid: str | None = None, **attrs: str) -> Path:
    """A copy of the first slice as a new instance (new SOP Instance UID unless given)."""
    ds = pydicom.dcmread(stow.files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = attrs.pop("SOPInstanceUID", generate_uid())
    if study_uid:
        ds.StudyInstanceUID = study_uid
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    path = tmp / f"{name}.dcm"
    ds.save_as(path)
    return path


def test_dicomweb_client_stores_a_study_as_sent(stow: Stow) -> None:
    session = requests.Session()
    session.auth = ("root", PASSWORD)
    client = DICOMwebClient(url=stow.url, session=session)
    sent = [pydicom.dcmread(p) for p in stow.files]
    response = client.store_instances(sent)
    study_uid = str(sent[0].StudyInstanceUID)
    # dicomweb-client sends "Host: 127.0.0.1" without the port, so URLs built from the Host
    # header lack it: compare the paths (the httpx tests below check whole URLs).
    path = stow.url.removeprefix(stow.server.url)
    assert response.RetrieveURL.endswith(f"{path}/studies/{study_uid}")
    assert "FailedSOPSequence" not in response
    referenced = {str(item.ReferencedSOPInstanceUID): item for item in response.ReferencedSOPSequence}
    assert set(referenced) == {str(ds.SOPInstanceUID) for ds in sent}
    for ds in sent:
        item = referenced[str(ds.SOPInstanceUID)]
        assert item.ReferencedSOPClassUID == ds.SOPClassUID
        assert item.RetrieveURL.endswith(
            f"{path}/studies/{study_uid}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        )
        kept = pydicom.dcmread(stow.archive.path_of(str(ds.SOPInstanceUID)))
        assert kept == ds, "every data element as sent"
        assert kept.PixelData == ds.PixelData
        assert kept.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    with session_scope(stow.archive.session_factory, readonly=True) as session:
        study = session.scalars(select(Study).where(Study.StudyInstanceUID == study_uid)).one()
        assert study.state == StudyState.received and study.NumberOfStudyRelatedInstances == len(sent)
        audit = session.scalars(select(AuditEvent).where(AuditEvent.path == "/dicom-web/studies")).all()
        assert [(a.username, a.status_code, a.StudyInstanceUID, a.action) for a in audit][-1] == (
            "root",
            200,
            study_uid,
            f"stow: {len(sent)} stored, 0 failed",
        )
    # A resend is a success, as for C-STORE, and stores nothing twice.
    again = client.store_instances(sent[:2])
    assert len(again.ReferencedSOPSequence) == 2
    with session_scope(stow.archive.session_factory, readonly=True) as session:
        assert session.scalar(select(func.count(Instance.id))) >= len(sent)
        assert session.scalars(
            select(Study).where(Study.StudyInstanceUID == study_uid)
        ).one().NumberOfStudyRelatedInstances == len(sent)
    assert not _incoming(stow)


def test_study_path_unquoted_boundary_and_preamble(stow: Stow, tmp_path: Path) -> None:
    study_uid = generate_uid()
    one = _instance(stow, tmp_path, "one", study_uid)
    content = body(one.read_bytes(), boundary="abc123", preamble=b"\r\nThis is a preamble.\r\n")
    answer = post(stow, content, path=f"/studies/{study_uid}", content_type="multipart/related; boundary=abc123")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    assert answer.json()[RETRIEVE_URL]["Value"] == [f"{stow.url}/studies/{study_uid}"]
    assert _indexed(stow, pydicom.dcmread(one).SOPInstanceUID)


def test_bad_parts_fail_alone_and_leave_nothing(stow: Stow, tmp_path: Path) -> None:
    study_uid = generate_uid()
    good = _instance(stow, tmp_path, "good", study_uid)
    other_study = _instance(stow, tmp_path, "other", generate_uid())
    bad_uid = _instance(stow, tmp_path, "bad_uid", study_uid, SOPInstanceUID="1.2.03")
    last_good = _instance(stow, tmp_path, "last", study_uid)
    truncated = _instance(stow, tmp_path, "cut", study_uid)
    content = body(
        good.read_bytes(),
        b"this part is not DICOM at all",
        other_study.read_bytes(),
        bad_uid.read_bytes(),
        last_good.read_bytes(),
        close=False,
    ) + (b"--stow-test\r\nContent-Type: application/dicom\r\n\r\n" + truncated.read_bytes()[:3000])
    answer = post(stow, content, path=f"/studies/{study_uid}")
    assert answer.status_code == 202, answer.text
    result = answer.json()
    stored = [item[SOP_INSTANCE]["Value"][0] for item in result[REFERENCED]["Value"]]
    assert stored == [pydicom.dcmread(good).SOPInstanceUID, pydicom.dcmread(last_good).SOPInstanceUID]
    failed = [
        (item.get(SOP_INSTANCE, {}).get("Value", [""])[0], item[REASON]["Value"][0]) for item in result[FAILED]["Value"]
    ]
    assert failed == [
        ("", 0xC000),  # not DICOM: no UIDs to name
        (pydicom.dcmread(other_study).SOPInstanceUID, 0xA900),  # another study than the path's
        ("1.2.03", 0xC000),  # invalid UID
        ("", 0xC000),  # the body ended inside it
    ]
    warnings = answer.headers.get_list("warning")
    assert len(warnings) == 4 and "not a DICOM Part 10 file" in warnings[0] and "truncated" in warnings[3]
    for path in (other_study, bad_uid, truncated):
        assert not _indexed(stow, str(pydicom.dcmread(path, force=True).SOPInstanceUID))
    assert not _incoming(stow), "temp files left in incoming/"
    on_disk = {p.stem for p in stow.archive.files_dir.rglob("*.dcm")}
    assert pydicom.dcmread(other_study).SOPInstanceUID not in on_disk and "1.2.03" not in on_disk


def test_a_malformed_part_fails_and_the_parts_before_it_stay_stored(stow: Stow, tmp_path: Path) -> None:
    good = _instance(stow, tmp_path, "before_malformed")
    content = body(good.read_bytes(), close=False) + b"--stow-test\r\nnot a header line\r\n\r\nxx\r\n--stow-test--"
    answer = post(stow, content)
    assert answer.status_code == 202, answer.text
    assert [i[REASON]["Value"][0] for i in answer.json()[FAILED]["Value"]] == [0xC000]
    assert "malformed" in answer.headers["warning"]
    assert _indexed(stow, pydicom.dcmread(good).SOPInstanceUID)
    assert not _incoming(stow)


def test_none_stored_is_409(stow: Stow) -> None:
    answer = post(stow, body(b"garbage", b"more garbage"))
    assert answer.status_code == 409
    assert [i[REASON]["Value"][0] for i in answer.json()[FAILED]["Value"]] == [0xC000, 0xC000]
    assert REFERENCED not in answer.json()


@pytest.mark.parametrize(
    ("content_type", "content", "status", "says"),
    [
        ("application/dicom", b"x", 415, "is not multipart/related"),
        ('multipart/related; type="application/dicom+json"; boundary=b', b"x", 415, "not supported"),
        ('multipart/related; type="application/dicom+xml"; boundary=b', b"x", 415, "not supported"),
        ('multipart/related; type="application/dicom"', b"x", 400, "no boundary"),
        ('multipart/related; type="application/dicom"; boundary=b', b"{}" * 100, 400, "no multipart boundary"),
        ('multipart/related; type="application/dicom"; boundary=b', b"--b--\r\n", 400, "holds no instance"),
    ],
)
def test_media_type_and_structure_errors(stow: Stow, content_type: str, content: bytes, status: int, says: str) -> None:
    answer = post(stow, content, content_type=content_type)
    assert answer.status_code == status and says in answer.json()["detail"], answer.text


def test_bad_study_uid_in_the_path_is_400(stow: Stow) -> None:
    answer = post(stow, body(stow.files[0].read_bytes()), path="/studies/1.2.abc")
    assert answer.status_code == 400 and "not a valid UID" in answer.json()["detail"]


def test_only_a_role_that_may_store_stores(stow: Stow) -> None:
    content = body(stow.files[0].read_bytes())
    headers = {"content-type": DICOM_TYPE.format("stow-test")}
    nobody = httpx.post(stow.url + "/studies", content=content, headers=headers)
    assert nobody.status_code == 401 and "basic" in nobody.headers["www-authenticate"].lower()
    radiologist = httpx.post(stow.url + "/studies", content=content, headers=headers, auth=("alice", PASSWORD))
    assert radiologist.status_code == 403 and "may not store" in radiologist.json()["detail"]


def test_a_browser_session_may_not_post_from_another_origin(stow: Stow, tmp_path: Path) -> None:
    with httpx.Client(base_url=stow.server.url, follow_redirects=False) as browser:
        assert browser.post("/login", data={"username": "root", "password": PASSWORD}).status_code == 303
        headers = {"content-type": DICOM_TYPE.format("stow-test")}
        one = _instance(stow, tmp_path, "csrf")
        forged = browser.post(
            "/dicom-web/studies", content=body(one.read_bytes()), headers={**headers, "origin": "https://evil.example"}
        )
        assert forged.status_code == 403 and "cross-origin" in forged.json()["detail"]
        assert not _indexed(stow, pydicom.dcmread(one).SOPInstanceUID)
        same = browser.post(
            "/dicom-web/studies", content=body(one.read_bytes()), headers={**headers, "origin": stow.server.url}
        )
        assert same.status_code == 200


def test_a_part_over_the_limit_fails_with_a700(stow: Stow, tmp_path: Path) -> None:
    small = stow.settings.model_copy(
        update={"web": stow.settings.web.model_copy(update={"stow_max_instance_bytes": 20_000})}
    )
    big = _instance(stow, tmp_path, "big")  # 64x64 slice: ~9 KB ... made larger below
    ds = pydicom.dcmread(big)
    ds.ImageComments = "x" * 30_000
    ds.save_as(big)
    fits = _instance(stow, tmp_path, "fits")
    with WebServer(small, stow.archive.session_factory, stow.archive) as server:
        answer = httpx.post(
            server.url + "/dicom-web/studies",
            content=body(big.read_bytes(), fits.read_bytes()),
            headers={"content-type": DICOM_TYPE.format("stow-test")},
            auth=("root", PASSWORD),
        )
    assert answer.status_code == 202
    assert [i[REASON]["Value"][0] for i in answer.json()[FAILED]["Value"]] == [0xA700]
    assert "stow_max_instance_bytes" in answer.headers["warning"]
    assert _indexed(stow, pydicom.dcmread(fits).SOPInstanceUID) and not _indexed(stow, ds.SOPInstanceUID)
    assert not _incoming(stow)


def test_a_client_gone_mid_upload_leaves_nothing_half_written(stow: Stow, tmp_path: Path) -> None:
    first, second = _instance(stow, tmp_path, "first"), _instance(stow, tmp_path, "second")
    ds = pydicom.dcmread(second)  # large enough that half of it is already on disk when the client goes
    ds.Rows = ds.Columns = 1200
    ds.PixelData = bytes(1200 * 1200 * 2)
    ds.save_as(second)
    content = body(first.read_bytes(), second.read_bytes())
    cut = content[: len(content) - len(second.read_bytes()) // 2]
    host, port = stow.server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        head = (
            f"POST /dicom-web/studies HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: {DICOM_TYPE.format('stow-test')}\r\nContent-Length: {len(content)}\r\n"
            f"Authorization: Basic {base64.b64encode(f'root:{PASSWORD}'.encode()).decode()}\r\n\r\n"
        )
        sock.sendall(head.encode() + cut)
        deadline = time.monotonic() + 10
        while not _indexed(stow, pydicom.dcmread(first).SOPInstanceUID):  # the complete part is stored at once
            assert time.monotonic() < deadline, "the complete first part was not stored"
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while _incoming(stow):  # the part being received is removed once the server sees the close
        assert time.monotonic() < deadline, f"left in incoming/: {_incoming(stow)}"
        time.sleep(0.02)
    assert not _indexed(stow, pydicom.dcmread(second).SOPInstanceUID)
    assert pydicom.dcmread(second).SOPInstanceUID not in {p.stem for p in stow.archive.files_dir.rglob("*.dcm")}


def _anon_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon in /proc/self/status")


def test_a_50_mb_instance_streams_through_without_being_held_in_memory(stow: Stow, tmp_path: Path) -> None:
    """Measured: the server runs in this process, so its anonymous memory is sampled while
    a 50 MB instance is uploaded from disk in 64 KiB pieces; holding the part (or the body)
    anywhere would raise it by 50 MB."""
    ds = pydicom.dcmread(stow.files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Rows = ds.Columns = 5000
    ds.PixelData = np.random.default_rng(1).integers(0, 4095, (5000, 5000), dtype=np.uint16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big)
    sop = str(ds.SOPInstanceUID)
    del ds
    size = big.stat().st_size
    assert size > 50_000_000

    def chunks() -> Iterator[bytes]:
        yield b"--stow-test\r\nContent-Type: application/dicom\r\n\r\n"
        with big.open("rb") as fh:
            while piece := fh.read(65536):
                yield piece
        yield b"\r\n--stow-test--\r\n"

    # Warm up first: the first HTTP Basic login of a run costs argon2 its 64 MiB.
    assert post(stow, body(b"not DICOM")).status_code == 409
    baseline, peak, done = _anon_rss(), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _anon_rss())
            time.sleep(0.001)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answer = post(stow, chunks())
    finally:
        done.set()
        sampler.join()
    assert answer.status_code == 200, answer.text
    assert stow.archive.path_of(sop).stat().st_size >= size - 1000
    grew = peak - baseline
    assert grew < 20_000_000, f"memory grew by {grew / 1e6:.0f} MB while a {size / 1e6:.0f} MB instance was stored"
