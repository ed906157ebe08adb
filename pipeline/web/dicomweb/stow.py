"""STOW-RS (PS3.18 10.5): ``POST /studies`` and ``POST /studies/{uid}``, each instance stored
through the archive path C-STORE takes, with the same guarantees.

The body is ``multipart/related; type="application/dicom"``, one DICOM Part 10 file a
part. It is read as it arrives (:mod:`.multipart`): each part streams to a temp file in
the archive's ``incoming/`` folder, never into memory (``[web] stow_max_instance_bytes``
caps one part), and once its closing boundary is read it is stored in a worker thread
while the next part is read: its File Meta gives the transfer syntax and SOP Class and
Instance UIDs (as a C-STORE request does), and :meth:`pipeline.archive.Archive.store_encoded_file`
validates, writes, fsyncs and indexes the dataset behind radtriage's own File Meta. A
resend of a stored instance is a success, as for C-STORE. Only what is fsynced and
indexed is reported stored; a part's temp file is removed whatever happens, and one left
by a crash is removed by the archive's recovery at start.

The answer is the Store Instances Response Module (PS3.18 I.1) as ``application/dicom+json``:
ReferencedSOPSequence (with RetrieveURLs) for what was stored, FailedSOPSequence with a
FailureReason (PS3.18 I.2.2) for each part that was not, a ``Warning`` header saying why
for the first few, and one log line per failed part (UIDs and the reason, no patient data).

======  ===================================================================================
HTTP    when
======  ===================================================================================
200     every instance stored
202     some stored, some failed
409     none stored
400     no boundary, a body that is not multipart, no instance in it, a bad study UID
403     the user's role may not store, or a browser session posting from another origin
415     not ``multipart/related``, or a ``type`` other than ``application/dicom``
======  ===================================================================================

=========  ================================================================================
Failure    reason
=========  ================================================================================
0xA700     out of resources: the archive disk or index is full, or the part is too large
0xA900     the dataset's SOP Class/Instance UID differs from its File Meta's, or its study
           from the one in the path
0xC000     cannot understand: not Part 10, does not parse, a UID missing or invalid, the
           body ended inside the part, a part Content-Type other than application/dicom
0xC122     the File Meta's transfer syntax is not one DICOM defines
0x0110     processing failure: anything else (logged with the request's code locations)
=========  ================================================================================
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydicom import Dataset
from pydicom.uid import UID
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from pipeline.archive import OutOfResourcesError, StoredInstance
from pipeline.archive.header import DatasetError, InvalidUIDError, SOPClassMismatchError, validate_uid
from pipeline.archive.part10 import read_file_meta
from pipeline.web.auth import AuthUser, may_store
from pipeline.web.context import ArchiveFiles, WebContext
from pipeline.web.dicomweb import base_url, resource_path
from pipeline.web.dicomweb.media import DICOM, DICOM_JSON
from pipeline.web.dicomweb.multipart import (
    MultipartError,
    PartData,
    PartEnd,
    PartStart,
    RelatedReader,
    UnsupportedMediaTypeError,
    parse_content_type,
)

log = logging.getLogger(__name__)

router = APIRouter()

FAILURE_OUT_OF_RESOURCES = 0xA700
FAILURE_SOP_CLASS_MISMATCH = 0xA900
FAILURE_CANNOT_UNDERSTAND = 0xC000
FAILURE_TRANSFER_SYNTAX = 0xC122
FAILURE_PROCESSING = 0x0110
_FAILURES: list[tuple[type[Exception], int]] = [
    (OutOfResourcesError, FAILURE_OUT_OF_RESOURCES),
    (SOPClassMismatchError, FAILURE_SOP_CLASS_MISMATCH),  # and StudyMismatchError
    (DatasetError, FAILURE_CANNOT_UNDERSTAND),
    (InvalidUIDError, FAILURE_CANNOT_UNDERSTAND),
]
STORE_THREADS = 4  # parts stored at once per request, while the next ones are read
WRITE_BUFFER_BYTES = 1 << 20  # part data gathered before one write (in a thread)
MAX_WARNINGS = 10
PART_SUFFIX = ".stow.tmp"  # in incoming/: removed by Archive.recover() after a crash


@dataclass
class Outcome:
    """What became of one part; ``failure`` is ``None`` once it is stored."""

    part: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    stored: StoredInstance | None = None
    failure: int | None = None
    reason: str = ""


@dataclass
class _PartFile:
    """One part's data on its way to a temp file; ``refused`` (with its code) stops the writing."""

    number: int
    path: Path
    limit: int
    size: int = 0
    refused: tuple[int, str] | None = None
    _pending: list[bytes] = field(default_factory=list)
    _pending_bytes: int = 0
    _fh: BinaryIO | None = None

    async def write(self, data: bytes) -> None:
        if self.refused is not None:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.refused = (FAILURE_OUT_OF_RESOURCES, f"instance is over [web] stow_max_instance_bytes ({self.limit})")
            await run_in_threadpool(self.discard)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= WRITE_BUFFER_BYTES:
            await run_in_threadpool(self._flush)

    async def close(self) -> None:
        if self.refused is None:
            await run_in_threadpool(self._flush, True)

    def _flush(self, final: bool = False) -> None:
        try:
            if self._fh is None:
                self._fh = open(self.path, "xb")  # noqa: SIM115 - held across writes, closed below or in discard
            pending, self._pending, self._pending_bytes = self._pending, [], 0
            self._fh.writelines(pending)
            if final:
                self._fh.close()
        except OSError as err:
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.refused = (FAILURE_OUT_OF_RESOURCES, "archive disk full: free space, then resend")
            self.discard()

    def discard(self) -> None:
        self._pending, self._pending_bytes = [], 0
        if self._fh is not None:
            self._fh.close()
        self.path.unlink(missing_ok=True)


def _store_part(archive: ArchiveFiles, part: _PartFile, study_uid: str | None) -> Outcome:
    """Store one received part (in a worker thread); its temp file is removed in every case."""
    outcome = Outcome(part.number)
    try:
        if part.refused is not None:
            outcome.failure, outcome.reason = part.refused
            return outcome
        with open(part.path, "rb") as fp:
            meta = read_file_meta(fp)
        outcome.sop_class_uid = meta.MediaStorageSOPClassUID
        outcome.sop_instance_uid = meta.MediaStorageSOPInstanceUID
        if not UID(meta.TransferSyntaxUID).is_transfer_syntax:
            outcome.failure = FAILURE_TRANSFER_SYNTAX
            outcome.reason = f"transfer syntax {meta.TransferSyntaxUID[:64]!r} is not one DICOM defines"
            return outcome
        outcome.stored = archive.store_encoded_file(
            part.path,
            meta.dataset_offset,
            transfer_syntax=meta.TransferSyntaxUID,
            sop_class_uid=meta.MediaStorageSOPClassUID,
            sop_instance_uid=meta.MediaStorageSOPInstanceUID,
            study_instance_uid=study_uid,
        )
    except tuple(cls for cls, _ in _FAILURES) as err:
        outcome.failure = next(code for cls, code in _FAILURES if isinstance(err, cls))
        outcome.reason = str(err)
    except Exception as err:  # noqa: BLE001 - one part's failure must not hide what the others did
        where = "".join(traceback.format_list(traceback.extract_tb(err.__traceback__)))
        # The type and code locations only: the message of a database error may quote patient data.
        log.error("STOW-RS part %d failed with %s\n%s", part.number, type(err).__name__, where.rstrip())
        outcome.failure, outcome.reason = FAILURE_PROCESSING, f"processing failure ({type(err).__name__})"
    finally:
        part.discard()
    return outcome


async def _receive(request: Request, reader: RelatedReader, ctx: WebContext, study_uid: str | None) -> list[Outcome]:
    """Read the body part by part, storing each complete one while the next arrives.

    Raises
    ------
    MultipartError
        The body is not multipart at all (nothing was stored).
    ClientDisconnect
        The client went away; every part complete before that is stored, the open one is not.
    """
    archive = ctx.archive
    limit = ctx.settings.web.stow_max_instance_bytes
    slots = asyncio.Semaphore(STORE_THREADS)
    stores: list[asyncio.Future[Outcome]] = []
    early: list[Outcome] = []  # parts that failed before they could be stored
    current: _PartFile | None = None

    async def store(part: _PartFile) -> Outcome:
        try:
            return await run_in_threadpool(_store_part, archive, part, study_uid)
        finally:
            slots.release()

    try:
        try:
            async for chunk in request.stream():
                for event in reader.feed(chunk):
                    if isinstance(event, PartData):
                        if current is not None:
                            await current.write(event.data)
                    elif isinstance(event, PartStart):
                        path = archive.incoming_dir / f"{uuid.uuid4().hex}{PART_SUFFIX}"
                        current = _PartFile(reader.parts, path, limit, refused=_part_type_refusal(event.headers))
                    elif isinstance(event, PartEnd) and current is not None:
                        part, current = current, None
                        await part.close()
                        await slots.acquire()
                        stores.append(asyncio.ensure_future(store(part)))
            reader.finish()
        except MultipartError as err:
            if reader.parts == 0:
                raise
            # The part being read is lost; those before it are complete and stay stored.
            early.append(Outcome(reader.parts, failure=FAILURE_CANNOT_UNDERSTAND, reason=str(err)))
    finally:
        if current is not None:
            current.discard()
        outcomes = list(await asyncio.gather(*stores))  # always: each store removes its own temp file
    return sorted(outcomes + early, key=lambda o: o.part)


def _part_type_refusal(headers: dict[str, str]) -> tuple[int, str] | None:
    media_type = headers.get("content-type", DICOM).partition(";")[0].strip().lower()
    if media_type in (DICOM, ""):
        return None
    return FAILURE_CANNOT_UNDERSTAND, f"part Content-Type {media_type[:64]} is not {DICOM}"


def _response(outcomes: list[Outcome], base: str, study_uid: str | None) -> tuple[int, Dataset]:
    stored = [o for o in outcomes if o.stored is not None]
    failed = [o for o in outcomes if o.stored is None]
    studies = {o.stored.StudyInstanceUID for o in stored if o.stored is not None}
    study = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    ds = Dataset()
    ds.RetrieveURL = base + resource_path(study) if study else None  # Type 2: empty for several studies
    if failed:
        items = []
        for outcome in failed:
            item = Dataset()
            item.ReferencedSOPClassUID = outcome.sop_class_uid or None
            item.ReferencedSOPInstanceUID = outcome.sop_instance_uid or None
            item.FailureReason = outcome.failure
            items.append(item)
        ds.FailedSOPSequence = items
    if stored:
        items = []
        for outcome in stored:
            assert outcome.stored is not None
            item = Dataset()
            item.ReferencedSOPClassUID = outcome.sop_class_uid
            item.ReferencedSOPInstanceUID = outcome.stored.SOPInstanceUID
            done = outcome.stored
            item.RetrieveURL = base + resource_path(done.StudyInstanceUID, done.SeriesInstanceUID, done.SOPInstanceUID)
            items.append(item)
        ds.ReferencedSOPSequence = items
    status = 200 if not failed else (202 if stored else 409)
    return status, ds


def _refuse(request: Request, status: int, detail: str, action: str) -> JSONResponse:
    request.state.audit_action = action
    return JSONResponse({"detail": detail}, status_code=status)


def _cross_origin(request: Request, user: AuthUser) -> bool:
    """A session cookie (a browser) sent with a page of another origin: a forged request (CSRF)."""
    origin = request.headers.get("origin")
    if not user.session_token or origin is None:
        return False
    return origin.strip().rstrip("/").lower() != f"{request.url.scheme}://{request.url.netloc}".lower()


async def _stow(request: Request, study_uid: str | None) -> Response:
    ctx: WebContext = request.app.state.ctx
    user: AuthUser = request.state.user
    if study_uid is not None:
        request.state.audit_study = study_uid[:64]
    if not may_store(user):
        return _refuse(request, 403, f"role {user.role.value} may not store instances", "stow refused: role")
    if _cross_origin(request, user):
        return _refuse(request, 403, "cross-origin upload refused", "stow refused: cross-origin")
    if study_uid is not None:
        try:
            study_uid = validate_uid(study_uid, "StudyInstanceUID in the path")
        except InvalidUIDError as err:
            return _refuse(request, 400, str(err), "stow refused: bad study UID")
    try:
        related = parse_content_type(request.headers.get("content-type", ""))
    except UnsupportedMediaTypeError as err:
        return _refuse(request, 415, str(err), "stow refused: media type")
    except MultipartError as err:
        return _refuse(request, 400, str(err), "stow refused: bad request")
    if related.type not in ("", DICOM):
        if related.type in (DICOM_JSON, "application/dicom+xml"):
            detail = (
                f"STOW-RS of metadata and bulk data (type={related.type}) is not supported: "
                f'send each instance as a DICOM file, with type="{DICOM}"'
            )
        else:
            detail = f'type={related.type[:64]} is not supported: send DICOM files with type="{DICOM}"'
        return _refuse(request, 415, detail, "stow refused: media type")

    started = time.monotonic()
    try:
        outcomes = await _receive(request, RelatedReader(related.boundary), ctx, study_uid)
    except MultipartError as err:
        return _refuse(request, 400, str(err), "stow refused: not multipart")
    except ClientDisconnect:
        log.warning(
            "STOW-RS by %s: the client went away mid-upload; the part being received was discarded", user.username
        )
        request.state.audit_action = "stow: client disconnected"
        return Response(status_code=400)
    if not outcomes:
        return _refuse(request, 400, "the multipart body holds no instance", "stow refused: empty")
    return _answer(request, user, outcomes, study_uid, time.monotonic() - started)


def _answer(
    request: Request, user: AuthUser, outcomes: list[Outcome], study_uid: str | None, seconds: float
) -> Response:
    status, ds = _response(outcomes, base_url(request), study_uid)
    failed = [o for o in outcomes if o.stored is None]
    for outcome in failed:
        log.warning(
            "STOW-RS by %s: part %d (SOP Instance %s) not stored, 0x%04X: %s",
            user.username,
            outcome.part,
            outcome.sop_instance_uid or "unknown",
            outcome.failure,
            outcome.reason,
        )
    stored = len(outcomes) - len(failed)
    log.info("STOW-RS by %s: %d stored, %d failed in %.2f s", user.username, stored, len(failed), seconds)
    if not study_uid:
        studies = {o.stored.StudyInstanceUID for o in outcomes if o.stored is not None}
        request.state.audit_study = next(iter(studies)) if len(studies) == 1 else ""
    request.state.audit_action = f"stow: {stored} stored, {len(failed)} failed"
    response = JSONResponse(ds.to_json_dict(), status_code=status, media_type=DICOM_JSON)
    for outcome in failed[:MAX_WARNINGS]:
        response.headers.append("Warning", _warning(outcome))
    return response


def _warning(outcome: Outcome) -> str:
    """A PS3.18 8.3.5.1 style ``Warning`` value: ``299 radtriage "<why part N failed>"``."""
    text = f"part {outcome.part}: {outcome.reason}".replace('"', "'").replace("\\", "/")
    text = "".join(c if " " <= c <= "~" else "?" for c in text)[:300]
    return f'299 radtriage "{text}"'


@router.post("/studies")
async def store_instances(request: Request) -> Response:
    """Store the instances of the multipart body, whatever their studies."""
    return await _stow(request, None)


@router.post("/studies/{study_uid}")
async def store_study_instances(request: Request, study_uid: str) -> Response:
    """Store the instances of the multipart body; one of another study fails (0xA900)."""
    return await _stow(request, study_uid)
