"""Seed an archive + index the way the triage flow leaves it: CT series, SEG, SR, worklist rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select

from pipeline.ai.findings import Code, Finding, ModelIdentity, ModelResult, Priority
from pipeline.archive import Archive
from pipeline.config import ResultSettings
from pipeline.index.db import session_scope
from pipeline.index.schema import Study, utcnow
from pipeline.index.triage import AIFinding, AIResult, AIStatus, WorklistEntry
from pipeline.lab.synth import head_phantom, write_ct_series
from pipeline.results import build_seg, build_sr, result_uids

MODEL = ModelIdentity("ich-detector", "1.2.0", Code("123110", "DCM", "Artificial Intelligence"), "test model")
MORPHOLOGY = Code("49755003", "SCT", "Morphologically Altered Structure")
HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
BRAIN = Code("12738006", "SCT", "Brain")
SHAPE = (12, 96, 112)  # slices, rows, columns: not square, so a swapped size shows
SPACING = (5.0, 2.2, 2.2)


@dataclass
class Seeded:
    StudyInstanceUID: str
    SeriesInstanceUID: str
    sop_uids: list[str]  # in slice order
    mask: np.ndarray  # (slices, rows, columns) bool
    seg_uid: str = ""
    sr_uid: str = ""
    key_index: int = -1


def _bleed_mask(shape: tuple[int, int, int]) -> np.ndarray:
    nz, ny, nx = shape
    z, y, x = np.ogrid[:nz, :ny, :nx]
    return ((z - 6) / 2.6) ** 2 + ((y - 38) / 8.0) ** 2 + ((x - 70) / 9.0) ** 2 <= 1.0


def seed_study(
    archive: Archive,
    folder: Path,
    *,
    seed: int,
    name: str,
    accession: str,
    bleed: bool,
    ai_status: AIStatus | None,
    minutes_ago: float,
    error: str = "",
    shape: tuple[int, int, int] = SHAPE,
    with_results: bool = True,
) -> Seeded:
    """Store a synthetic head CT (with a hemorrhage when ``bleed``) and the flow's rows for it."""
    rng = np.random.default_rng(seed)
    volume = head_phantom(shape, SPACING, rng)
    mask = _bleed_mask(shape) if bleed else np.zeros(shape, dtype=bool)
    volume[mask] = 70.0
    paths = write_ct_series(
        volume, SPACING, folder / f"ct{seed}", seed=seed, PatientName=name, AccessionNumber=accession
    )
    datasets = [pydicom.dcmread(p) for p in paths]
    for ds in datasets:
        archive.store_dataset(ds)
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    seeded = Seeded(study_uid, series_uid, [str(ds.SOPInstanceUID) for ds in datasets], mask)
    with session_scope(archive.session_factory) as session:
        study = session.scalar(select(Study).where(Study.StudyInstanceUID == study_uid))
        assert study is not None
        study.first_received_at = utcnow() - timedelta(minutes=minutes_ago)
        study_id = study.id
    if ai_status is None:
        return seeded  # the flow has not touched it: no worklist entry at all
    priority = Priority.CRITICAL if bleed else Priority.ROUTINE
    voxel_ml = SPACING[0] * SPACING[1] * SPACING[2] / 1000.0
    with session_scope(archive.session_factory) as session:
        if with_results and ai_status is AIStatus.done:
            finding = Finding(
                "Hemorrhage",
                MORPHOLOGY,
                HEMORRHAGE,
                mask,
                0.97 if bleed else 0.03,
                bleed,
                float(mask.sum() * voxel_ml),
                39.6 if bleed else 0.0,
                priority,
                BRAIN,
            )
            result = ModelResult(MODEL, series_uid, seeded.sop_uids, [finding])
            uids = result_uids(study_uid, MODEL.name, MODEL.version, 1)
            seg = build_seg(
                datasets, result, ResultSettings(), series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_sop
            )
            sr = build_sr(
                datasets,
                seg,
                result,
                ResultSettings(),
                series_instance_uid=uids.sr_series,
                sop_instance_uid=uids.sr_sop,
            )
            archive.store_dataset(seg, derived=True)
            archive.store_dataset(sr, derived=True)
            seeded.seg_uid, seeded.sr_uid = uids.seg_sop, uids.sr_sop
            areas = mask.sum(axis=(1, 2))
            seeded.key_index = int(areas.argmax()) if bleed else -1
            row = AIResult(
                study_id=study_id,
                revision=1,
                model_name=MODEL.name,
                model_version=MODEL.version,
                SourceSeriesInstanceUID=series_uid,
                SegSOPInstanceUID=uids.seg_sop,
                SRSOPInstanceUID=uids.sr_sop,
                ok=True,
                priority=priority.value,
            )
            row.findings.append(
                AIFinding(
                    label=finding.label,
                    present=finding.present,
                    probability=finding.probability,
                    volume_ml=finding.volume_ml,
                    max_diameter_mm=finding.max_diameter_mm,
                    priority=priority.value,
                    segment_number=1,
                    key_sop_instance_uid=seeded.sop_uids[seeded.key_index] if bleed else "",
                )
            )
            session.add(row)
        session.add(
            WorklistEntry(
                study_id=study_id,
                ai_status=ai_status,
                ai_error=error,
                priority=priority.value if ai_status is AIStatus.done else "routine",
                priority_rank=priority.rank if ai_status is AIStatus.done else 0,
                summary="",
                time_to_triage_seconds=3.4 if ai_status is AIStatus.done else None,
            )
        )
    return seeded
