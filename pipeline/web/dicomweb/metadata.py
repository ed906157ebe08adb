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
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from pipeline.index.db import session_scope
from pipeline.index.schema import Instance, Series, Study
from pipeline.web.dicomweb.dicomjson import dataset_json

log = logging.getLogger(__name__)

BASE = "@radtriage-dicomweb-base@"
CACHE_DIR = "cache/dicomweb-metadata"


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
        return f"/studies/{self.StudyInstanceUID}/series/{self.SeriesInstanceUID}/instances/{self.SOPInstanceUID}"


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


def instance_json(instance: StoredInstance, base: str = BASE) -> dict[str, Any]:
    """One instance's metadata (its file read up to the pixel data)."""
    with instance.path.open("rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        has_pixels = f.tell() < os.fstat(f.fileno()).st_size and "Rows" in ds
    prefix = f"{base}{instance.url}/bulkdata/"
    return dataset_json(ds, lambda path: prefix + path, has_pixel_data=has_pixels)


class MetadataCache:
    """Series metadata arrays, cached on disk and checked against the index on each use."""

    def __init__(self, data_dir: Path, session_factory: sessionmaker[Session]) -> None:
        self.data_dir = data_dir
        self.folder = data_dir / CACHE_DIR
        self.session_factory = session_factory

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
        if instances is None:
            try:
                return cached.read_bytes()
            except FileNotFoundError:  # replaced between the check and the read
                return self.series(study_uid, series_uid)
        body = json.dumps([instance_json(i) for i in instances], separators=(",", ":")).encode()
        self._write(cached, body)
        return body

    def _write(self, cached: Path, body: bytes) -> None:
        cached.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = cached.with_name(f".{cached.name}.{threading.get_ident()}.tmp")
        tmp.write_bytes(body)
        os.replace(tmp, cached)  # readers see the old file or the whole new one
        for old in cached.parent.glob("*.json"):
            if old != cached:
                old.unlink(missing_ok=True)


def with_base(body: bytes, base: str) -> bytes:
    """Fill the base URL into a cached array (``base`` is escaped for JSON)."""
    return body.replace(BASE.encode(), json.dumps(base)[1:-1].encode())
