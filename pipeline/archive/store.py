"""The archive: DICOM files under ``storage.data_dir`` plus their index rows.

Every store takes the same durable path: write to a temp file in ``incoming/``, fsync,
rename to ``files/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` (same
file system), fsync that folder, then commit the index row. Only after that does a caller (the C-STORE
handler) answer Success. After a crash, :meth:`Archive.recover` deletes temp files and
indexes files that were renamed but not yet indexed, so no partial or orphan file stays.

Writers that arrive together share the last three steps (:mod:`pipeline.archive.group`):
one transaction and one fsync per folder for the batch. A receiver writes the temp file
while the instance still arrives (:mod:`pipeline.archive.spool`), so its fsync finds
most of the file already written back.
"""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import uuid
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, configure_mappers, sessionmaker

from pipeline.archive.group import GroupCommit
from pipeline.archive.header import (
    InstanceHeader,
    InvalidUIDError,
    StudyMismatchError,
    header_from_dataset,
    parse_encoded,
    parse_file,
)
from pipeline.archive.ingest import indexed_path, record_instance
from pipeline.archive.spool import Spool
from pipeline.config import Settings
from pipeline.errors import PermanentError, TransientError
from pipeline.index.db import create_index_engine, make_session_factory, session_scope
from pipeline.index.schema import Instance, Series, utcnow
from pipeline.index.writer import writer_lock, writer_lock_for

log = logging.getLogger(__name__)

IMPLEMENTATION_CLASS_UID = "2.25.105938130551812983121404808708390189929"
IMPLEMENTATION_VERSION_NAME = "RADTRIAGE_01"
FILES_DIR = "files"
INCOMING_DIR = "incoming"  # temp files being written; never more than that
TMP_SUFFIX = ".tmp"
DERIVED_MARK = b"RADTRIAGE DERIVED"
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}


class OutOfResourcesError(TransientError):
    """The archive's disk (or the index's) is full: free space, then resend."""


class NotInArchiveError(PermanentError):
    """The requested object is not in the archive."""


@dataclass(frozen=True)
class _Pending:
    """A fsynced temp file waiting for its commit."""

    header: InstanceHeader
    tmp: Path
    size: int
    transfer_syntax: str
    derived: bool


@dataclass(frozen=True)
class StoredInstance:
    """Where one instance lies. ``duplicate`` is true for a resend of a stored instance."""

    SOPInstanceUID: str
    SeriesInstanceUID: str
    StudyInstanceUID: str
    path: Path
    size: int
    duplicate: bool = False


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def encode_dataset(ds: Dataset, transfer_syntax: str) -> bytes:
    """Encode ``ds`` (without File Meta) in ``transfer_syntax``."""
    buf = DicomBytesIO()
    buf.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    buf.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    write_dataset(buf, ds)
    data = buf.getvalue()
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        packer = zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED, -zlib.MAX_WBITS)
        data = packer.compress(data) + packer.flush()
    return data


def is_derived_file(meta: FileMetaDataset) -> bool:
    """Whether a stored file's File Meta marks it as radtriage's own output."""
    return (
        meta.get("PrivateInformationCreatorUID") == IMPLEMENTATION_CLASS_UID
        and bytes(meta.get("PrivateInformation") or b"").rstrip(b"\x00 ") == DERIVED_MARK
    )


def _element(group_elem: int, vr: bytes, value: bytes) -> bytes:
    group, elem = group_elem >> 16, group_elem & 0xFFFF
    if vr in (b"OB",):
        return struct.pack("<HH2s2xI", group, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def _pad(value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii")
    return raw + pad if len(raw) % 2 else raw


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    source_ae: str | None = None,
    *,
    derived: bool = False,
) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group for one instance.

    Hand-encoded (it runs once per received image; pydicom's writer takes 20x longer);
    the test suite checks it against pydicom. Derived objects carry a private mark
    (PrivateInformationCreatorUID = our implementation UID) so crash recovery can
    re-index them as derived.
    """
    body = [
        _element(0x00020001, b"OB", b"\x00\x01"),
        _element(0x00020002, b"UI", _pad(sop_class_uid, b"\x00")),
        _element(0x00020003, b"UI", _pad(sop_instance_uid, b"\x00")),
        _element(0x00020010, b"UI", _pad(transfer_syntax, b"\x00")),
        _element(0x00020012, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")),
        _element(0x00020013, b"SH", _pad(IMPLEMENTATION_VERSION_NAME, b" ")),
    ]
    if source_ae:
        body.append(_element(0x00020016, b"AE", _pad(source_ae.strip(), b" ")))
    if derived:
        body.append(_element(0x00020100, b"UI", _pad(IMPLEMENTATION_CLASS_UID, b"\x00")))
        body.append(_element(0x00020102, b"OB", _pad(DERIVED_MARK.decode(), b"\x00")))
    payload = b"".join(body)
    return b"\x00" * 128 + b"DICM" + _element(0x00020000, b"UL", struct.pack("<I", len(payload))) + payload


class Archive:
    """Files and index of one radtriage installation.

    Parameters
    ----------
    settings
        Uses ``storage.data_dir``, ``storage.fsync`` and the index URL.
    engine
        An existing index engine to share; created from the settings when omitted.
        The index must be migrated (:func:`pipeline.index.db.migrate`).
    """

    def __init__(self, settings: Settings, *, engine: Engine | None = None) -> None:
        self.data_dir = settings.storage.data_dir.resolve()
        self.fsync = settings.storage.fsync
        self.engine = engine if engine is not None else create_index_engine(settings.index_url)
        self.session_factory: sessionmaker[Session] = make_session_factory(self.engine)
        configure_mappers()  # ~20 ms the ORM spends once per process: now, not in the first C-STORE
        self.files_dir = self.data_dir / FILES_DIR
        self.incoming_dir = self.data_dir / INCOMING_DIR
        for folder in (self.files_dir, self.incoming_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self._writer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="archive-write")
        self._group: GroupCommit[_Pending, StoredInstance] = GroupCommit(self._commit_batch)
        self._writer_lock = writer_lock_for(self.engine)
        self._known_dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()
        # Starts every temp file's name: a receiver process sets its own, so that its
        # supervisor can remove exactly its files in incoming/ after it crashed.
        self.temp_prefix = ""

    # ---- public API -------------------------------------------------------------
    def store_encoded(
        self,
        encoded: bytes | memoryview,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        source_ae: str | None = None,
        spool: Spool | None = None,
    ) -> StoredInstance:
        """Store a dataset exactly as a sender encoded it (no File Meta, pixels untouched).

        With ``spool`` (from :meth:`open_spool`, written while the bytes arrived), that
        file is used instead of writing ``encoded`` again, if it holds exactly them.

        Raises
        ------
        pipeline.archive.header.DatasetError, InvalidUIDError, SOPClassMismatchError
            Bad input; nothing is written.
        OutOfResourcesError
            The disk or the index is full; nothing is kept.
        """
        try:
            meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, source_ae)
        except UnicodeEncodeError:
            raise InvalidUIDError("the request's SOP Class/Instance UID is not ASCII") from None
        # From memory: written and fsynced in the pool (no GIL held) while this thread
        # parses the header. The temp file is anonymous until the header is valid, then
        # renamed into place.
        key = (sop_class_uid, sop_instance_uid, transfer_syntax, source_ae)
        if spool is not None and (spool.failed or spool.key != key or spool.size != len(meta) + len(encoded)):
            spool.discard()
            spool = None
        staged: Callable[[], tuple[Path, int]]
        if spool is not None:
            # Finished by this thread after the parse: it waits for an fdatasync already
            # running (Spool.flush_ahead), or syncs the file itself; handing it to the pool
            # and waiting cost more than the overlap saved (1 and 4 senders).
            staged = partial(self._finish_spool, spool)
        else:
            staged = self._writer.submit(self._write_temp, (meta, encoded)).result
        try:
            ds = parse_encoded(encoded, transfer_syntax)
            header = header_from_dataset(ds, expected_sop_class=sop_class_uid, expected_sop_instance=sop_instance_uid)
        except BaseException:
            try:
                tmp, _ = staged()
                tmp.unlink(missing_ok=True)
            except Exception:  # noqa: BLE001 - the write failed too; the input error is the one to report
                pass
            raise
        tmp, size = staged()
        return self._commit(header, tmp, size, transfer_syntax, derived=False)

    def open_spool(
        self, *, transfer_syntax: str, sop_class_uid: str, sop_instance_uid: str, source_ae: str | None = None
    ) -> Spool | None:
        """A temp file, its File Meta written, for the dataset of an instance still
        arriving (:mod:`pipeline.archive.spool`); give it to :meth:`store_encoded`. ``None``
        when one cannot be made: then store from memory alone."""
        try:
            meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax, source_ae)
        except UnicodeEncodeError:
            return None  # store_encoded says why
        tmp = self.incoming_dir / f"{self.temp_prefix}{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            fd = os.open(
                tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666
            )  # less the umask, as open() does
        except OSError as err:
            log.info("cannot spool to %s (%s); storing from memory", tmp, err)
            return None
        spool = Spool(
            tmp,
            fd,
            (sop_class_uid, sop_instance_uid, transfer_syntax, source_ae),
            writeback=self.fsync,
            flusher=self._writer if self.fsync else None,
        )
        spool.write(meta)
        return None if spool.failed else spool

    def _finish_spool(self, spool: Spool) -> tuple[Path, int]:
        try:
            return spool.finish(fsync=self.fsync)
        except OSError as err:
            if err.errno in _NO_SPACE:
                raise OutOfResourcesError(f"archive disk full at {self.data_dir}: free space, then resend") from err
            raise

    def store_encoded_file(
        self,
        path: Path,
        offset: int,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        study_instance_uid: str | None = None,
    ) -> StoredInstance:
        """:meth:`store_encoded` for a dataset that lies in the file ``path`` from ``offset`` to
        its end (a STOW-RS part, after its File Meta): the same checks and durable path, but
        the header is read by seeking and the bytes are copied file to file, so an instance
        of any size costs no memory. ``path`` is left in place for the caller to remove.

        With ``study_instance_uid``, a dataset of another study raises
        :class:`~pipeline.archive.header.StudyMismatchError` and is not stored.
        """
        try:
            meta = encode_file_meta(sop_class_uid, sop_instance_uid, transfer_syntax)
        except UnicodeEncodeError:
            raise InvalidUIDError("the File Meta's SOP Class/Instance UID is not ASCII") from None
        with open(path, "rb") as fp:
            fp.seek(offset)
            ds = parse_file(fp, transfer_syntax)
        header = header_from_dataset(ds, expected_sop_class=sop_class_uid, expected_sop_instance=sop_instance_uid)
        if study_instance_uid is not None and header.StudyInstanceUID != study_instance_uid:
            raise StudyMismatchError(
                f"dataset StudyInstanceUID {header.StudyInstanceUID} differs from the request's {study_instance_uid}"
            )
        tmp, size = self._write_temp((meta,), copy_from=(path, offset))
        return self._commit(header, tmp, size, transfer_syntax, derived=False)

    def store_dataset(self, ds: Dataset, *, derived: bool = False) -> StoredInstance:
        """Store a pydicom dataset (e.g. an AI SEG or SR) through the same durable path.

        The transfer syntax is ``ds.file_meta.TransferSyntaxUID`` when set, else
        Explicit VR Little Endian. With ``derived=True`` the series is marked as
        radtriage's own output, and the study keeps its state and ``last_received_at``
        (storing results must not trigger another analysis).
        """
        meta_in = getattr(ds, "file_meta", None)
        transfer_syntax = str(getattr(meta_in, "TransferSyntaxUID", "") or ExplicitVRLittleEndian)
        header = header_from_dataset(ds)
        encoded = encode_dataset(ds, transfer_syntax)
        meta = encode_file_meta(header.SOPClassUID, header.SOPInstanceUID, transfer_syntax, derived=derived)
        tmp, size = self._write_temp((meta, encoded))
        return self._commit(header, tmp, size, transfer_syntax, derived=derived)

    def path_of(self, sop_instance_uid: str) -> Path:
        """Absolute path of the file holding ``sop_instance_uid``."""
        with session_scope(self.session_factory, readonly=True) as session:
            rel = session.scalar(select(Instance.path).where(Instance.SOPInstanceUID == sop_instance_uid))
        if rel is None:
            raise NotInArchiveError(f"SOP Instance {sop_instance_uid} is not in the archive")
        return self.data_dir / rel

    def series_files(self, series_uid: str) -> list[Path]:
        """The files of one series, in InstanceNumber order (then SOP Instance UID)."""
        with session_scope(self.session_factory, readonly=True) as session:
            rows = (
                session.execute(
                    select(Instance.path)
                    .join(Series)
                    .where(Series.SeriesInstanceUID == series_uid)
                    .order_by(Instance.InstanceNumber, Instance.SOPInstanceUID)
                )
                .scalars()
                .all()
            )
        return [self.data_dir / rel for rel in rows]

    def relative_path(self, header: InstanceHeader) -> str:
        """Where an instance lives, relative to ``data_dir`` (from validated UIDs only)."""
        return f"{FILES_DIR}/{header.StudyInstanceUID}/{header.SeriesInstanceUID}/{header.SOPInstanceUID}.dcm"

    # ---- the durable path ---------------------------------------------------------
    def _commit(
        self, header: InstanceHeader, tmp: Path, size: int, transfer_syntax: str, *, derived: bool
    ) -> StoredInstance:
        """Make a fsynced temp file durable in the archive and the index (see
        :meth:`_commit_alone`); concurrent writers are committed together
        (:mod:`pipeline.archive.group`). Returns once this instance's commit is done."""
        return self._group.submit(_Pending(header, tmp, size, transfer_syntax, derived))

    def _commit_batch(self, batch: Sequence[_Pending]) -> list[StoredInstance | BaseException]:
        """One transaction and one fsync per folder for the batch; if that transaction
        fails (a series created at the same moment by another process), each item alone."""
        if len(batch) > 1:
            try:
                return list(self._commit_together(batch))
            except Exception as err:  # noqa: BLE001 - retried item by item, where each gets its own error
                log.info("group commit of %d instances failed (%s); committing them one by one", len(batch), err)
        outcomes: list[StoredInstance | BaseException] = []
        for pending in batch:
            try:
                outcomes.append(self._commit_alone(pending))
            except Exception as err:  # noqa: BLE001 - this item's writer raises it
                outcomes.append(err)
        return outcomes

    def _commit_alone(self, pending: _Pending) -> StoredInstance:
        """For a fsynced temp file: in one index transaction, resend check, index row,
        rename into place, fsync the folder, commit. A resend leaves the stored file as is.

        The row comes before the rename: its unique SOP Instance UID is the claim on the
        file name. A second writer of the same instance (another association, another
        receiver on the same index) waits on that row, then finds it and answers "already
        stored" without touching the file; renaming first let the loser replace the
        winner's file under its index row. Isolation this needs from the index: the
        resend check, the insert and the rename must not interleave with another writer
        of the same SOP Instance UID. SQLite gives that by having one writer at a time
        (``BEGIN IMMEDIATE``, queued on :mod:`pipeline.index.writer`); PostgreSQL at READ
        COMMITTED, by the unique index on SOPInstanceUID: a second insert of the same UID
        waits for the first transaction, then fails with ``IntegrityError`` and is tried
        again, finding the committed row. The folder is fsynced before the commit, so
        an instance another writer finds committed is on disk under its name.
        """
        rel = self.relative_path(pending.header)
        final = self.data_dir / rel
        with writer_lock(self._writer_lock):  # held through the clean-up below, too
            return self._commit_locked(pending, final, rel)

    def _commit_locked(self, pending: _Pending, final: Path, rel: str) -> StoredInstance:
        renamed = False
        tmp = pending.tmp
        try:
            for attempt in range(3):
                try:
                    with self.engine.begin() as conn:
                        outcome = self._claim(conn, pending, rel)
                        if outcome.duplicate:
                            return outcome
                        os.replace(tmp, final)
                        renamed = True
                        if self.fsync:
                            _fsync_dir(final.parent)  # the rename is durable before the row commits
                    return outcome
                except IntegrityError:
                    # A concurrent writer created the same patient/study/series/instance first:
                    # nothing was renamed (the row comes first); look again.
                    if attempt == 2:
                        raise
        except OperationalError as err:
            self._discard(final if renamed else None)
            if "full" in str(err.orig).lower():
                raise OutOfResourcesError(f"index database full: free space, then resend ({err.orig})") from err
            raise
        except BaseException:
            # Not acknowledged, so not kept: no orphan file without an index row.
            self._discard(final if renamed else None)
            raise
        finally:
            if not renamed:
                tmp.unlink(missing_ok=True)
        raise AssertionError("unreachable")  # pragma: no cover

    def _commit_together(self, batch: Sequence[_Pending]) -> list[StoredInstance]:
        """:meth:`_commit_alone` for several instances in one transaction: every claim and
        rename, then one fsync per distinct folder, then one commit. If anything fails,
        the renames are undone (files back to their temp names) before the transaction
        ends, so the caller can commit the items one by one."""
        outcomes: list[StoredInstance] = []
        renamed: list[tuple[Path, Path, int]] = []
        with writer_lock(self._writer_lock), self.engine.connect() as conn:
            transaction = conn.begin()
            try:
                folders: dict[Path, None] = {}
                for pending in batch:
                    rel = self.relative_path(pending.header)
                    outcome = self._claim(conn, pending, rel)
                    if not outcome.duplicate:
                        final = self.data_dir / rel
                        os.replace(pending.tmp, final)
                        renamed.append((final, pending.tmp, os.stat(final).st_ino))
                        folders[final.parent] = None
                    outcomes.append(outcome)
                if self.fsync:
                    for folder in folders:
                        _fsync_dir(folder)
            except BaseException:
                _unrename(renamed)  # before the rollback frees the names' claims
                transaction.rollback()
                raise
            try:
                transaction.commit()
            except BaseException:
                _unrename(renamed)
                raise
        for pending, outcome in zip(batch, outcomes, strict=True):
            if outcome.duplicate:
                pending.tmp.unlink(missing_ok=True)
        return outcomes

    def _claim(self, conn: Connection, pending: _Pending, rel: str) -> StoredInstance:
        """In ``conn``'s write transaction: the resend check and the index row (not yet
        the rename). A result marked ``duplicate`` means: stored already, leave it."""
        header = pending.header
        existing = indexed_path(conn, header.SOPInstanceUID)
        if existing is not None and (self.data_dir / existing).exists():
            log.info("SOP Instance %s already stored; resend acknowledged, not stored again", header.SOPInstanceUID)
            return self._result(header, existing, duplicate=True)
        if existing is None:
            record_instance(
                conn,
                header,
                path=rel,
                transfer_syntax=pending.transfer_syntax,
                size=pending.size,
                now=utcnow(),
                derived=pending.derived,
                known_new=True,
            )
        else:
            log.warning("SOP Instance %s was indexed but its file was missing; file restored", header.SOPInstanceUID)
        self._ensure_dir((self.data_dir / rel).parent)
        return self._result(header, rel, duplicate=False, size=pending.size)

    def _discard(self, final: Path | None) -> None:
        if final is not None:
            final.unlink(missing_ok=True)

    def _result(self, header: InstanceHeader, rel: str, *, duplicate: bool, size: int | None = None) -> StoredInstance:
        path = self.data_dir / rel
        return StoredInstance(
            header.SOPInstanceUID,
            header.SeriesInstanceUID,
            header.StudyInstanceUID,
            path,
            size if size is not None else path.stat().st_size,
            duplicate,
        )

    def _ensure_dir(self, folder: Path) -> None:
        if folder in self._known_dirs:
            return
        with self._dirs_lock:
            missing = []
            probe = folder
            while not probe.exists():
                missing.append(probe)
                probe = probe.parent
            folder.mkdir(parents=True, exist_ok=True)
            if self.fsync:
                for created in reversed(missing):
                    _fsync_dir(created.parent)
            self._known_dirs.add(folder)

    def _write_temp(
        self, parts: tuple[bytes | memoryview, ...], copy_from: tuple[Path, int] | None = None
    ) -> tuple[Path, int]:
        """Write ``parts`` (then the file ``copy_from[0]`` from byte ``copy_from[1]``) to a
        fsynced temp file in ``incoming/``; return it and its size."""
        tmp = self.incoming_dir / f"{self.temp_prefix}{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            size = 0
            with open(tmp, "xb") as fh:
                for part in parts:
                    size += fh.write(part)
                fh.flush()
                if copy_from is not None:
                    size += _copy_file_tail(copy_from[0], copy_from[1], fh.fileno())
                if self.fsync:
                    os.fdatasync(fh.fileno())
            return tmp, size
        except OSError as err:
            tmp.unlink(missing_ok=True)
            if err.errno in _NO_SPACE:
                raise OutOfResourcesError(f"archive disk full at {self.data_dir}: free space, then resend") from err
            raise

    def _index(self, header: InstanceHeader, rel: str, transfer_syntax: str, size: int, derived: bool) -> bool:
        """Index a file already in place (crash recovery); ``False`` if already indexed."""
        for attempt in range(3):
            try:
                with self.engine.begin() as conn:
                    return record_instance(
                        conn,
                        header,
                        path=rel,
                        transfer_syntax=transfer_syntax,
                        size=size,
                        now=utcnow(),
                        derived=derived,
                    )
            except IntegrityError:
                if attempt == 2:
                    raise
        return False  # pragma: no cover

    # ---- crash recovery -----------------------------------------------------------
    def recover(self) -> tuple[int, int]:
        """Remove temp files and index renamed-but-unindexed files left by a crash.

        Returns ``(temp files removed, files indexed)``. Cheap when nothing is amiss:
        one directory listing and one count query per series folder.
        """
        removed = indexed = 0
        for entry in os.scandir(self.incoming_dir):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed += 1
        for study_dir in _subdirs(self.files_dir):
            for series_dir in _subdirs(study_dir):
                names = []
                for entry in os.scandir(series_dir):
                    if entry.name.endswith(TMP_SUFFIX):
                        os.unlink(entry.path)
                        removed += 1
                    elif entry.name.endswith(".dcm"):
                        names.append(entry.name)
                if not names:
                    continue
                with session_scope(self.session_factory, readonly=True) as session:
                    known = set(
                        session.execute(
                            select(Instance.path).join(Series).where(Series.SeriesInstanceUID == series_dir.name)
                        ).scalars()
                    )
                for name in names:
                    rel = f"{FILES_DIR}/{study_dir.name}/{series_dir.name}/{name}"
                    if rel not in known:
                        indexed += self._recover_file(self.data_dir / rel, rel)
        if removed or indexed:
            log.warning("recovery: removed %d partial temp files, indexed %d unindexed files", removed, indexed)
        return removed, indexed

    def _recover_file(self, path: Path, rel: str) -> int:
        try:
            ds = dcmread(path, stop_before_pixels=True)
            header = header_from_dataset(ds)
            if self.relative_path(header) != rel:
                raise PermanentError(f"file name does not match its UIDs ({self.relative_path(header)})")
        except Exception as err:  # noqa: BLE001 - a file we cannot trust is moved aside, never deleted
            aside = self.data_dir / "quarantine" / rel
            aside.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, aside)
            log.error("recovery: %s is unreadable (%s); moved to %s", path, err, aside)
            return 0
        self._index(
            header, rel, str(ds.file_meta.TransferSyntaxUID), path.stat().st_size, derived=is_derived_file(ds.file_meta)
        )
        return 1


def _unrename(renamed: list[tuple[Path, Path, int]]) -> None:
    """Move files renamed in a failed transaction back to their temp names (only if the
    name still holds the same file: after a failed PostgreSQL commit, another writer
    may have claimed it)."""
    for final, tmp, inode in reversed(renamed):
        try:
            if os.stat(final).st_ino == inode:
                os.replace(final, tmp)
        except FileNotFoundError:
            pass


def _copy_file_tail(source: Path, offset: int, out_fd: int) -> int:
    """Append ``source`` from ``offset`` to its end to ``out_fd`` in the kernel (no copy
    through Python); where the file system cannot, in 1 MiB pieces."""
    with open(source, "rb") as src:
        remaining = os.fstat(src.fileno()).st_size - offset
        copied = 0
        try:
            while copied < remaining:
                n = os.copy_file_range(src.fileno(), out_fd, remaining - copied, offset + copied)
                if n == 0:
                    break
                copied += n
        except OSError as err:
            if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or copied:
                raise
            src.seek(offset)
            while piece := src.read(1 << 20):
                view = memoryview(piece)
                while view:
                    written = os.write(out_fd, view)
                    copied += written
                    view = view[written:]
        return copied


def _subdirs(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return [Path(e.path) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False)]
