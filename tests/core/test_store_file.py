"""Archive.store_encoded_file (the STOW-RS path) and the bounded File Meta reader: the same
checks and durable path as C-STORE, for a dataset that lies in a file."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from pipeline.archive import Archive, StoredInstance
from pipeline.archive.header import DatasetError, InvalidUIDError, SOPClassMismatchError, StudyMismatchError
from pipeline.archive.part10 import MAX_FILE_META_BYTES, read_file_meta
from pipeline.index.db import migrate, session_scope
from pipeline.index.schema import Instance, Study, StudyState
from tests.core.conftest import dataset_bytes, make_settings


@pytest.fixture
def archive(tmp_path: Path) -> Iterator[Archive]:
    settings = make_settings(tmp_path)
    migrate(settings.index_url)
    archive = Archive(settings)
    try:
        yield archive
    finally:
        archive.engine.dispose()


def _store(archive: Archive, path: Path, **kw: str) -> StoredInstance:
    with open(path, "rb") as fp:
        meta = read_file_meta(fp)
    return archive.store_encoded_file(
        path,
        meta.dataset_offset,
        transfer_syntax=meta.TransferSyntaxUID,
        sop_class_uid=meta.MediaStorageSOPClassUID,
        sop_instance_uid=meta.MediaStorageSOPInstanceUID,
        **kw,
    )


@pytest.mark.parametrize(
    "syntax", ["as written", ImplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]
)
def test_a_part10_file_is_stored_byte_identical_and_indexed(
    archive: Archive, study_files: list[Path], tmp_path: Path, syntax: str
) -> None:
    source = study_files[0]
    if syntax != "as written":
        ds = pydicom.dcmread(source)
        ds.file_meta.TransferSyntaxUID = syntax
        if syntax == ExplicitVRBigEndian:
            del ds.PixelData  # pydicom does not byte-swap pixels; the header is what matters here
        source = tmp_path / "converted.dcm"
        pydicom.dcmwrite(source, ds, enforce_file_format=True, little_endian=syntax != ExplicitVRBigEndian)
    stored = _store(archive, source)
    assert not stored.duplicate
    assert dataset_bytes(stored.path) == dataset_bytes(source), "the dataset must be kept exactly as sent"
    assert str(pydicom.dcmread(stored.path).file_meta.TransferSyntaxUID) == str(
        pydicom.dcmread(source).file_meta.TransferSyntaxUID
    )
    with session_scope(archive.session_factory, readonly=True) as session:
        assert session.scalar(select(Instance.path).where(Instance.SOPInstanceUID == stored.SOPInstanceUID))
        assert session.scalars(select(Study)).one().state == StudyState.received
    assert _store(archive, source).duplicate, "a resend is acknowledged, not stored twice"
    assert not list(archive.incoming_dir.iterdir())


def test_a_dataset_of_another_study_is_refused(archive: Archive, study_files: list[Path]) -> None:
    with pytest.raises(StudyMismatchError, match="differs from the request's 1.2.3"):
        _store(archive, study_files[0], study_instance_uid="1.2.3")
    assert issubclass(StudyMismatchError, SOPClassMismatchError)  # 0xA900, as for C-STORE
    assert not list(archive.files_dir.rglob("*.dcm")) and not list(archive.incoming_dir.iterdir())


def test_meta_and_dataset_must_agree(archive: Archive, study_files: list[Path], tmp_path: Path) -> None:
    ds = pydicom.dcmread(study_files[1])
    ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    lying = tmp_path / "lying.dcm"
    ds.save_as(lying)  # the File Meta as set, not recomputed from the dataset
    with pytest.raises(SOPClassMismatchError):
        _store(archive, lying)
    ds = pydicom.dcmread(study_files[1])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.02.3"
    bad_uid = tmp_path / "bad_uid.dcm"
    ds.save_as(bad_uid, enforce_file_format=True)
    with pytest.raises(InvalidUIDError):
        _store(archive, bad_uid)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(study_files[1].read_bytes()[:-1000])
    with pytest.raises(DatasetError, match="run past the end"):
        _store(archive, cut)
    assert not list(archive.files_dir.rglob("*.dcm")) and not list(archive.incoming_dir.iterdir())


def _meta(*elements: bytes) -> bytes:
    return b"\x00" * 128 + b"DICM" + b"".join(elements)


def test_file_meta_reader_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"not dicom at all" * 20)
    with path.open("rb") as fp, pytest.raises(DatasetError, match="no 'DICM' prefix"):
        read_file_meta(fp)
    # A meta element claiming 4 GB is refused without reading it.
    path.write_bytes(_meta(struct.pack("<HH2s2xI", 2, 1, b"OB", 0xFFFFFFF0)) + b"\x00" * 100)
    with path.open("rb") as fp, pytest.raises(DatasetError, match=f"over {MAX_FILE_META_BYTES // 1024} KiB"):
        read_file_meta(fp)
    path.write_bytes(
        _meta(struct.pack("<HH2sH", 2, 0x10, b"UI", 4) + b"1.2\x00", struct.pack("<HH2sH", 8, 0x16, b"UI", 0))
    )
    with path.open("rb") as fp, pytest.raises(DatasetError, match="lacks MediaStorageSOPClassUID"):
        read_file_meta(fp)


def test_recovery_removes_an_upload_cut_by_a_crash(archive: Archive) -> None:
    (archive.incoming_dir / "0123abcd.stow.tmp").write_bytes(b"half an instance")
    assert archive.recover() == (1, 0)
    assert not list(archive.incoming_dir.iterdir())
