"""A hostile network against the receiver (issue 15): each attack is sent over loopback
as it was found, and what a user would notice is asserted: the server's memory stays
bounded, a real echoscu still associates, stalled connections are closed in time, the
wrong called AE is refused, bad input gets one log line rather than a traceback."""

from __future__ import annotations

import logging
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.core.conftest import ENV, HOST, Receiver, running_receiver, send_file_as_is
from tests.core.test_header_fuzz import CT, _nested

pytestmark = pytest.mark.slow  # receivers on loopback and dcmtk peers

ATTACKER = "127.0.0.2"  # also loopback on Linux: another source address than echoscu's
SHORT = 2.0  # seconds: the timeouts these tests configure


def _mib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) // 1024
    raise AssertionError(f"{key} not in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _echo(port: int, aec: str = "RADTRIAGE") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", aec, HOST, str(port)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _connect(port: int, source: str = ATTACKER) -> socket.socket:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.connect((HOST, port))
    return sock


def _closed_by_server(sock: socket.socket, within: float) -> float | None:
    """Seconds until the server closed ``sock`` (EOF or reset), or None if still open."""
    start = time.monotonic()
    sock.settimeout(0.1)
    while time.monotonic() - start < within:
        try:
            if sock.recv(65536) == b"":
                return time.monotonic() - start
        except TimeoutError:
            continue
        except OSError:
            return time.monotonic() - start
    return None


@pytest.fixture
def hostile(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Receiver]:
    """A receiver with short timeouts (and per-test ``[dicom]`` overrides)."""
    dicom = {
        "association_timeout_seconds": SHORT,
        "pdu_timeout_seconds": SHORT,
        "max_associations_per_address": 8,
        **getattr(request, "param", {}),
    }
    with running_receiver(tmp_path, **dicom) as running:
        yield running


@pytest.mark.parametrize(
    "pdu_type, length",
    [(0x01, 0xFFFFFFF0), (0x04, 4 * 1024 * 1024)],
    ids=["associate-rq-claiming-4GiB", "p-data-before-association"],
)
def test_a_huge_pdu_length_is_refused_at_the_header(hostile: Receiver, pdu_type: int, length: int) -> None:
    """Row 1: 6 bytes claiming a ~4 GiB PDU made the server zero ~4 GiB."""
    before = _mib("VmRSS")
    attackers = [_connect(hostile.port) for _ in range(3)]
    for sock in attackers:
        sock.sendall(struct.pack(">BBL", pdu_type, 0, length))
    closed = [_closed_by_server(sock, within=5) for sock in attackers]
    grown = _mib("VmRSS") - before
    for sock in attackers:
        sock.close()
    assert all(t is not None and t < 1.5 for t in closed), closed
    assert grown < 64, f"the server grew by {grown} MiB for 18 bytes"
    assert _echo(hostile.port).returncode == 0


def _deflated_file(path: Path, inflated_bytes: int) -> Path:
    """A C-STORE file whose deflated dataset is ~1/1000 of what it inflates to."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)

    def ui(element: int, value: str) -> bytes:
        raw = value.encode() + b"\0" * (len(value) % 2)
        return struct.pack("<HH2sH", 0x0008 if element < 0x100 else 0x0020, element & 0xFF, b"UI", len(raw)) + raw

    head = (
        ui(0x16, CT)
        + ui(0x18, meta.MediaStorageSOPInstanceUID)
        + ui(0x10D, "1.2.3")
        + ui(0x10E, "1.2.4")
        + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, inflated_bytes)
    )
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(64 << 20)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + fp.getvalue() + compressor.compress(head))
        for _ in range(inflated_bytes // len(zeros)):
            fh.write(compressor.compress(zeros))
        fh.write(compressor.flush())
    return path


def _send_file(port: int, path: Path, transfer_syntax: str) -> tuple[int, str]:
    """C-STORE a file's dataset bytes as they are, as CT in ``transfer_syntax``."""
    status = send_file_as_is(port, path, sop_class=CT, transfer_syntax=transfer_syntax)
    return int(status.Status), str(status.get("ErrorComment", ""))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_deflate_bomb_is_refused_within_bounded_memory(
    hostile: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Row 2: 1 MB inflating to 1 GiB was stored (0x0000) at a 2 GiB peak (3 GiB: 7 GiB)."""
    bomb = _deflated_file(tmp_path / "bomb.dcm", 1 << 30)
    assert bomb.stat().st_size < 2 << 20
    _reset_peak()
    before = _mib("VmHWM")
    with caplog.at_level(logging.WARNING):
        status, comment = _send_file(hostile.port, bomb, DeflatedExplicitVRLittleEndian)
    peak = _mib("VmHWM") - before
    assert status == 0xC000, hex(status)
    assert "inflates to more than" in comment
    assert peak < 256, f"peak memory grew by {peak} MiB"
    logged = _warnings(caplog)
    assert len(logged) == 1 and logged[0].exc_info is None, [r.getMessage() for r in logged]


@pytest.mark.parametrize("hostile", [{"association_timeout_seconds": 5.0}], indirect=True)
def test_idle_connections_cannot_take_the_slots(hostile: Receiver) -> None:
    """Row 3: 66 idle connections took every slot, for ~60 s after they closed."""
    flood = [_connect(hostile.port) for _ in range(66)]
    try:
        refused = sum(_closed_by_server(sock, within=0.2) is not None for sock in flood)
        during = _echo(hostile.port)
        assert during.returncode == 0, during.stdout + during.stderr
        assert refused >= 66 - 8, f"only {refused} of 66 connections from one address were refused"
    finally:
        for sock in flood:
            sock.close()
    assert _echo(hostile.port).returncode == 0  # right after
    # The slots from that address are free again as soon as its connections closed (well
    # before the 5 s association timeout could have freed them).
    ae = AE(ae_title="ECHOSCU")
    ae.add_requested_context(Verification)
    deadline = time.monotonic() + 1.0
    while True:
        assocs = [ae.associate(HOST, hostile.port, ae_title="RADTRIAGE", bind_address=(ATTACKER, 0)) for _ in range(8)]
        established = sum(a.is_established for a in assocs)
        for assoc in assocs:
            if assoc.is_established:
                assoc.release()
        if established == 8 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert established == 8, f"{established} of 8 associations from {ATTACKER} after its idle ones closed"


def test_connections_that_never_associate_are_closed_by_the_association_timeout(hostile: Receiver) -> None:
    idle = [_connect(hostile.port) for _ in range(4)]
    try:
        closed = [_closed_by_server(sock, within=4 * SHORT) for sock in idle]
    finally:
        for sock in idle:
            sock.close()
    assert all(t is not None and t < 2 * SHORT + 1 for t in closed), closed


@pytest.mark.parametrize("hostile", [{"association_timeout_seconds": 60.0}], indirect=True)
def test_a_peer_stalled_inside_a_pdu_is_closed_within_the_pdu_timeout(hostile: Receiver) -> None:
    """Row 4: 3 bytes of a PDU header, then nothing: still open after 224 s."""
    stalled = _connect(hostile.port)
    dripping = _connect(hostile.port)
    try:
        stalled.sendall(b"\x01\x00\x00")
        dripping.sendall(struct.pack(">BBL", 0x01, 0, 1000))
        start = time.monotonic()
        dripped = 0
        while time.monotonic() - start < 3 * SHORT and dripped < 1000:
            try:
                dripping.sendall(b"\0")  # one byte every 0.2 s: never silent for the SO_RCVTIMEO
            except OSError:
                break
            dripped += 1
            time.sleep(0.2)
        stalled_after = _closed_by_server(stalled, within=4 * SHORT)
        dripping_after = _closed_by_server(dripping, within=4 * SHORT)
    finally:
        stalled.close()
        dripping.close()
    assert stalled_after is not None and stalled_after < 2 * SHORT + 1, stalled_after
    assert dripping_after is not None, "a peer dripping one byte at a time held its PDU open"
    assert dripped * 0.2 < 2 * SHORT + 1, f"the dripping peer was read for {dripped * 0.2:.1f} s"
    assert _echo(hostile.port).returncode == 0


def test_deeply_nested_sequences_get_0xc000_and_one_log_line(
    hostile: Receiver, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Row 7: 10,000 nested sequences got 0xC211 and a 180 KB traceback per request."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT
    meta.MediaStorageSOPInstanceUID = "1.2.826.0.1.3680043.8.498.1"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, meta)
    path = tmp_path / "nested.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + _nested(10_000))
    with caplog.at_level(logging.INFO):
        status, comment = _send_file(hostile.port, path, ExplicitVRLittleEndian)
    assert status == 0xC000, hex(status)
    assert "nested too deep" in comment
    logged = _warnings(caplog)
    assert len(logged) == 1 and logged[0].exc_info is None, [r.getMessage() for r in logged]
    text = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert len(text) < 4000, f"{len(text)} characters logged for one request"


@pytest.mark.parametrize("hostile", [{"called_aes": ["RADTRIAGE", "ARCHIVE2"]}], indirect=True)
def test_only_the_configured_called_ae_titles_are_accepted(hostile: Receiver, caplog: pytest.LogCaptureFixture) -> None:
    """Row 13: a C-STORE to the wrong called AE title was accepted."""
    with caplog.at_level(logging.WARNING, logger="pipeline.dicom.receiver"):
        wrong = _echo(hostile.port, aec="NOTUS")
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stdout + wrong.stderr
    assert "called AE title 'NOTUS'" in caplog.text
    assert _echo(hostile.port, aec="RADTRIAGE").returncode == 0
    assert _echo(hostile.port, aec="ARCHIVE2").returncode == 0


def test_by_default_only_our_own_ae_title_is_accepted(hostile: Receiver) -> None:
    assert hostile.settings.dicom.called_ae_titles == ["RADTRIAGE"]
    assert _echo(hostile.port, aec="ANY-SCP").returncode != 0
    assert _echo(hostile.port).returncode == 0
