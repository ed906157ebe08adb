"""A small synthetic head CT series (CT Image Storage) and model results on it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from pipeline.ai.findings import Code, Finding, ModelIdentity, ModelResult, Priority
from pipeline.lab import synth

SLICES, ROWS, COLUMNS = 16, 64, 64
PIXEL_SPACING = (3.5, 3.5)  # mm, row then column
SLICE_THICKNESS = 5.0  # mm
VOXEL_ML = PIXEL_SPACING[0] * PIXEL_SPACING[1] * SLICE_THICKNESS / 1000.0

MORPHOLOGY = Code("49755003", "SCT", "Morphologically Altered Structure")
HEMORRHAGE = Code("50960005", "SCT", "Hemorrhage")
INFARCT = Code("55641003", "SCT", "Infarct")
BRAIN = Code("12738006", "SCT", "Brain")
MODEL = ModelIdentity(
    name="ich-detector",
    version="1.2.0",
    family=Code("123110", "DCM", "Artificial Intelligence"),
    description="Intracranial hemorrhage detection (test model)",
)


@dataclass
class Series:
    paths: list[Path]  # in slice order (inferior to superior)
    datasets: list[Dataset]

    @property
    def study_instance_uid(self) -> str:
        return str(self.datasets[0].StudyInstanceUID)

    @property
    def series_instance_uid(self) -> str:
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(ds.SOPInstanceUID) for ds in self.datasets]


def write_ct_series(folder: Path) -> Series:
    """Write SLICES axial CT images of a water cylinder head phantom to ``folder``
    (with the project's CT writer, :func:`pipeline.lab.synth.write_ct_series`)."""
    yy, xx = np.mgrid[:ROWS, :COLUMNS]
    head = ((yy - ROWS / 2) ** 2 + (xx - COLUMNS / 2) ** 2) < (ROWS * 0.42) ** 2
    volume = np.broadcast_to(np.where(head, 35.0, -1024.0), (SLICES, ROWS, COLUMNS))
    paths = synth.write_ct_series(
        volume,
        (SLICE_THICKNESS, *PIXEL_SPACING),
        folder,
        seed=1705,
        PatientName="Test^Patient",
        PatientID="PID0001",
        AccessionNumber="ACC0001",
        StudyDescription="CT HEAD WO CONTRAST",
    )
    return Series(paths, [pydicom.dcmread(p) for p in paths])


def blob_mask(center: tuple[int, int, int], radius_mm: float) -> np.ndarray:
    """A boolean ellipsoid of ``radius_mm`` around voxel ``center`` (slice, row, column)."""
    zz, yy, xx = np.mgrid[:SLICES, :ROWS, :COLUMNS]
    dz = (zz - center[0]) * SLICE_THICKNESS
    dy = (yy - center[1]) * PIXEL_SPACING[0]
    dx = (xx - center[2]) * PIXEL_SPACING[1]
    return dz**2 + dy**2 + dx**2 <= radius_mm**2


def finding(label: str, type_: Code, mask: np.ndarray, probability: float, present: bool, diameter: float) -> Finding:
    return Finding(
        label=label,
        category=MORPHOLOGY,
        type=type_,
        mask=mask,
        probability=probability,
        present=present,
        volume_ml=float(mask.sum()) * VOXEL_ML,
        max_diameter_mm=diameter,
        priority=Priority.CRITICAL if present else Priority.ROUTINE,
        anatomic_site=BRAIN,
    )


def result_with(series: Series, *findings: Finding) -> ModelResult:
    return ModelResult(
        model=MODEL,
        series_instance_uid=series.series_instance_uid,
        source_sop_instance_uids=series.sop_instance_uids,
        findings=list(findings),
    )


def empty_mask() -> np.ndarray:
    return np.zeros((SLICES, ROWS, COLUMNS), dtype=bool)
