"""WADO-RS ``/metadata``: the DICOM JSON of a series, built once and kept on disk.

A 500-slice series must not cost 500 file reads per request (a viewer asks for it every
time a study opens), so the JSON array of a series is written to
``<data_dir>/cache/dicomweb-metadata/<series>/`` the first time it is asked for, under a name
that holds the series' instance count and newest index row: a late instance gives a new
name, so a stale array is never served, and the old file is removed. The URLs inside
are written with a placeholder for the server's base URL, filled in per request (the
same archive may be reached under several names).
"""

from __future__ import annotations

import json
import logging
import os
import struct
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.index.db import session_scope
from pipeline.index.schema import Instance, Series, Study
from pipeline.web.dicomweb import resource_path
from pipeline.web.dicomweb.dicomjson import dataset_json

log = logging.getLogger(__name__)

BASE = "@radtriage-dicomweb-base@"
CACHE_DIR = "cache/dicomweb-metadata"
MAX_LOCATIONS = 200_000  # ~40 MB: the frames of a few hundred open series


@dataclass(frozen=True)
class StoredInstance:
    """What the index says about one instance, enough to find and describe its file."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    SOPInstanceUID: str
    SOPClassUID: str
    TransferSyntaxUID: str
    path: Path

    @property
    def url(self) -> str:
        """Its WADO-RS URL below the DICOMweb base."""
        return resource_path(self.StudyInstanceUID, self.SeriesInstanceUID, self.SOPInstanceUID)


def study_series(session: Session, study_uid: str) -> list[str]:
    """The SeriesInstanceUIDs of a study, in SeriesNumber order (as its metadata lists them)."""
    return list(
        session.scalars(
            select(Series.SeriesInstanceUID)
            .join(Study, Series.study_id == Study.id)
            .where(Study.StudyInstanceUID == study_uid)
            .order_by(Series.SeriesNumber, Series.id)
        )
    )


def stored_instances(
    session: Session, data_dir: Path, study_uid: str, series_uid: str | None = None, sop_uid: str | None = None
) -> list[StoredInstance]:
    """The instances of a study (or one series, or one instance), series by series in
    SeriesNumber order, instances in InstanceNumber order."""
    stmt = (
        select(
            Study.StudyInstanceUID,
            Series.SeriesInstanceUID,
            Instance.SOPInstanceUID,
            Instance.SOPClassUID,
            Instance.TransferSyntaxUID,
            Instance.path,
        )
        .join(Series, Instance.series_id == Series.id)
        .join(Study, Series.study_id == Study.id)
        .where(Study.StudyInstanceUID == study_uid)
        .order_by(Series.SeriesNumber, Series.id, Instance.InstanceNumber, Instance.SOPInstanceUID)
    )
    if series_uid is not None:
        stmt = stmt.where(Series.SeriesInstanceUID == series_uid)
    if sop_uid is not None:
        stmt = stmt.where(Instance.SOPInstanceUID == sop_uid)
    return [StoredInstance(*row[:5], data_dir / row[5]) for row in session.execute(stmt)]


@dataclass(frozen=True)
class FrameLocation:
    """Where an instance's native (uncompressed, little-endian) pixel data lies in its file,
    so a frame is one ``pread``: no index query, no header parse (OHIF asks for each
    frame separately, right after the series metadata that records these)."""

    StudyInstanceUID: str
    SeriesInstanceUID: str
    path: str
    offset: int
    length: int
    frame_bytes: int
    frames: int


_PIXEL_TAG = b"\xe0\x7f\x10\x00"


def _pixel_location(f: Any, ds: pydicom.Dataset, instance: StoredInstance) -> FrameLocation | None:
    """The native pixel data right after ``f``'s position (where ``stop_before_pixels``
    stopped), or ``None`` when the fast path does not apply."""
    syntax = ds.file_meta.get("TransferSyntaxUID")
    if syntax not in ("1.2.840.10008.1.2.1", "1.2.840.10008.1.2"):
        return None  # compressed, deflated or big endian: pydicom's path
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32) or "Rows" not in ds or "Columns" not in ds:
        return None  # 1-bit SEG frames are not byte-aligned
    start = f.tell()
    head = f.read(12)
    if head[:4] != _PIXEL_TAG:
        return None
    if syntax == "1.2.840.10008.1.2":
        (length,), offset = struct.unpack("<I", head[4:8]), start + 8
    elif head[4:6] in (b"OB", b"OW"):
        (length,), offset = struct.unpack("<I", head[8:12]), start + 12
    else:
        return None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    frame_bytes = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits // 8
    if length == 0xFFFFFFFF or frame_bytes * frames > length:
        return None
    return FrameLocation(
        instance.StudyInstanceUID, instance.SeriesInstanceUID, str(instance.path), offset, length, frame_bytes, frames
    )


def instance_json(
    instance: StoredInstance, base: str = BASE, locations: dict[str, FrameLocation] | None = None
) -> dict[str, Any]:
    """One instance's metadata (its file read up to the pixel data); with ``locations``,
    also where its native pixel data lies."""
    with instance.path.open("rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        has_pixels = f.tell() < os.fstat(f.fileno()).st_size and "Rows" in ds
        if has_pixels and locations is not None:
            where = _pixel_location(f, ds, instance)
            if where is not None:
                locations[instance.SOPInstanceUID] = where
    prefix = f"{base}{instance.url}/bulkdata/"
    return dataset_json(ds, lambda path: prefix + path, has_pixel_data=has_pixels)


class MetadataCache:
    """Series metadata arrays, cached on disk and checked against the index on each use."""

    def __init__(self, data_dir: Path, session_factory: sessionmaker[Session]) -> None:
        self.data_dir = data_dir
        self.folder = data_dir / CACHE_DIR
        self.session_factory = session_factory
        self._locations: OrderedDict[str, FrameLocation] = OrderedDict()
        self._lock = threading.Lock()

    def frame_location(self, sop_instance_uid: str) -> FrameLocation | None:
        """Where the instance's native pixels lie, if its series' metadata was built or read."""
        with self._lock:
            return self._locations.get(sop_instance_uid)

    def _remember(self, locations: dict[str, FrameLocation]) -> None:
        with self._lock:
            self._locations.update(locations)
            while len(self._locations) > MAX_LOCATIONS:
                self._locations.popitem(last=False)

    def series(self, study_uid: str, series_uid: str) -> bytes | None:
        """The series' metadata as a JSON array with :data:`BASE` placeholders; ``None``
        when the study has no such series."""
        with session_scope(self.session_factory, readonly=True) as session:
            count, newest = session.execute(
                select(func.count(Instance.id), func.max(Instance.id))
                .join(Series, Instance.series_id == Series.id)
                .join(Study, Series.study_id == Study.id)
                .where(Study.StudyInstanceUID == study_uid, Series.SeriesInstanceUID == series_uid)
            ).one()
            if not count:
                return None
            instances = None
            cached = self.folder / series_uid / f"{count}-{newest}.json"
            if not cached.exists():
                instances = stored_instances(session, self.data_dir, study_uid, series_uid)
        sidecar = cached.with_suffix(".frames.json")
        if instances is None:
            try:
                body = cached.read_bytes()
            except FileNotFoundError:  # replaced between the check and the read
                return self.series(study_uid, series_uid)
            try:
                self._remember({k: FrameLocation(**v) for k, v in json.loads(sidecar.read_bytes()).items()})
            except (FileNotFoundError, ValueError, TypeError):
                pass  # frames then take pydicom's path
            return body
        locations: dict[str, FrameLocation] = {}
        body = json.dumps([instance_json(i, locations=locations) for i in instances], separators=(",", ":")).encode()
        self._write(sidecar, json.dumps({k: asdict(v) for k, v in locations.items()}).encode())
        self._write(cached, body)
        self._remember(locations)
        return body

    def _write(self, cached: Path, body: bytes) -> None:
        cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = cached.with_name(f".{cached.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, cached)  # readers see the old file or the whole new one
        for old in cached.parent.glob("*.json"):
            if not old.name.startswith(cached.name.split(".")[0] + "."):
                old.unlink(missing_ok=True)


def with_base(body: bytes, base: str) -> bytes:
    """Fill the base URL into a cached array (``base`` is escaped for JSON)."""
    return body.replace(BASE.encode(), json.dumps(base)[1:-1].encode())
