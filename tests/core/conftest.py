"""Fixtures for the PACS core tests: real dcmtk peers against a receiver on loopback."""

from __future__ import annotations

import os
import re
import shutil
import struct
import subprocess
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from pynetdicom.transport import ThreadedAssociationServer

from pipeline.archive import Archive
from pipeline.config import Settings
from pipeline.dicom.receiver import start_receiver
from pipeline.index.db import migrate
from pipeline.lab.synth import synth_study
from tests.peers.radtriage import ServeProcess  # noqa: F401 - the serve harness the core tests import from here

ROOT = Path(__file__).resolve().parents[2]


class _ChildEnv(Mapping[str, str]):
    """The environment for dcmtk and ``radtriage`` children: ours *as it is now* (the
    index switch sets ``RADTRIAGE_INDEX__URL`` per test) with ``TCP_NODELAY=1``."""

    def _now(self) -> dict[str, str]:
        return {**os.environ, "TCP_NODELAY": "1"}

    def __getitem__(self, key: str) -> str:
        return self._now()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._now())

    def __len__(self) -> int:
        return len(self._now())


ENV: Mapping[str, str] = _ChildEnv()
HOST = "127.0.0.1"


def make_settings(tmp: Path, **dicom: object) -> Settings:
    return Settings(
        storage={"data_dir": tmp / "data"},
        dicom={"bind": HOST, "port": 0, "allowed_aes": ["*"], **dicom},
        triage={"stable_age_seconds": 3600},
    )


@dataclass
class Receiver:
    settings: Settings
    archive: Archive
    port: int
    server: ThreadedAssociationServer


@contextmanager
def running_receiver(tmp: Path, **dicom: object) -> Iterator[Receiver]:
    """An in-process receiver on a free loopback port, with a fresh archive in ``tmp`` and
    ``[dicom]`` overrides; stopped (and its index closed) on exit."""
    settings = make_settings(tmp, **dicom)
    migrate(settings.index_url)
    archive = Archive(settings)
    server = start_receiver(settings, archive)
    try:
        yield Receiver(settings, archive, int(server.server_address[1]), server)
    finally:
        server.shutdown()
        archive.engine.dispose()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    """An in-process receiver on a free loopback port, with a fresh archive."""
    with running_receiver(tmp_path) as running:
        yield running


@pytest.fixture(scope="session")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A small synthetic CT study (12 slices of 128x128)."""
    return synth_study(tmp_path_factory.mktemp("study"), seed=11, slices=12, rows=128, cols=128)


def storescu(
    port: int, *files: Path | str, aet: str = "STORESCU", aec: str = "RADTRIAGE", extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """dcmtk storescu with debug output (so each DIMSE status is visible); no halt on failure."""
    return subprocess.run(
        ["storescu", "-d", "-nh", "-aet", aet, "-aec", aec, *extra, HOST, str(port), *map(str, files)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )


def statuses(result: subprocess.CompletedProcess[str]) -> list[int]:
    """The DIMSE statuses of every C-STORE response storescu received, in order."""
    return [int(m, 16) for m in re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", result.stdout + result.stderr)]


def echoscu(port: int, aet: str = "ECHOSCU") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", "RADTRIAGE", HOST, str(port)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )


def dataset_bytes(path: Path) -> bytes:
    """A DICOM file's bytes after the File Meta group (what travelled on the wire)."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    with open(path, "rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)
        return fh.read()


def write_config(path: Path, data_dir: Path, *, index_url: str = "", allowed: str = '["*"]') -> Path:
    path.write_text(
        f'[dicom]\nbind = "{HOST}"\nport = 0\nallowed_aes = {allowed}\n'
        f'[storage]\ndata_dir = "{data_dir}"\n'
        f'[index]\nurl = "{index_url}"\n'
        f'[web]\nbind = "{HOST}"\nport = 0\n'
        # The archive alone: these tests need neither Prefect nor models.
        f"[triage]\nenabled = false\nstable_age_seconds = 3600\n"
    )
    return path


def require_tool(name: str) -> str:
    found = shutil.which(name)
    assert found, f"{name} not found: run `make test` (it installs dcmtk and dicom3tools)"
    return found


def send_file_as_is(
    port: int, path: Path, *, sop_class: str | None = None, transfer_syntax: str | None = None
) -> Dataset:
    """C-STORE a file's dataset bytes as they are (pynetdicom's documented
    STORE_SEND_CHUNKED_DATASET mode): no re-encoding, so broken or hostile bytes arrive
    as written. The context is the File Meta's SOP Class and transfer syntax unless
    given. Returns the C-STORE response."""
    meta = read_file_meta_info(path)
    ae = AE(ae_title="STORESCU")
    ae.add_requested_context(sop_class or meta.MediaStorageSOPClassUID, transfer_syntax or meta.TransferSyntaxUID)
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    assoc = ae.associate(HOST, port, ae_title="RADTRIAGE")
    try:
        assert assoc.is_established
        status = assoc.send_c_store(path)
        assert "Status" in status, "no C-STORE response"
        return status
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
        assoc.release()


def pdv_item(context_id: int, control: int, fragment: bytes) -> bytes:
    """One presentation data value item (PS3.8 9.3.5.1): its message control header
    ``control`` (0x01 command, 0x02 last fragment) and ``fragment``."""
    return struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment


def p_data_pdu(*items: bytes) -> bytes:
    """A P-DATA-TF PDU of these items, as raw bytes for a socket."""
    body = b"".join(items)
    return struct.pack(">BBL", 0x04, 0, len(body)) + body
