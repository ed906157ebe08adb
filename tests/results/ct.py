"""A small synthetic head CT series (CT Image Storage) and model results on it."""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from pipeline.ai.findings import Code, Finding, ModelIdentity, ModelResult, Priority

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
    """Write SLICES axial CT images of a water cylinder head phantom to ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    study_uid, series_uid, frame_uid = generate_uid(), generate_uid(), generate_uid()
    now = datetime.datetime(2024, 5, 17, 14, 3, 21)
    yy, xx = np.mgrid[:ROWS, :COLUMNS]
    head = ((yy - ROWS / 2) ** 2 + (xx - COLUMNS / 2) ** 2) < (ROWS * 0.42) ** 2
    paths, datasets = [], []
    for k in range(SLICES):
        sop_uid = generate_uid()
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = "ACC0001"
        ds.Modality = "CT"
        ds.Manufacturer = "Synthetic Scanner Co"
        ds.ManufacturerModelName = "Phantom 1"
        ds.ReferringPhysicianName = "Referrer^Rita"
        ds.StudyDescription = "CT HEAD WO CONTRAST"
        ds.SeriesDescription = "Head 5mm"
        ds.PatientName = "Test^Patient"
        ds.PatientID = "PID0001"
        ds.PatientBirthDate = "19600101"
        ds.PatientSex = "F"
        ds.BodyPartExamined = "HEAD"
        ds.SliceThickness = SLICE_THICKNESS
        ds.KVP = 120
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = "1"
        ds.SeriesNumber = 2
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [-COLUMNS * PIXEL_SPACING[1] / 2, -ROWS * PIXEL_SPACING[0] / 2, k * SLICE_THICKNESS]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = k * SLICE_THICKNESS
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ROWS, COLUMNS
        ds.PixelSpacing = list(PIXEL_SPACING)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.WindowCenter, ds.WindowWidth = 40, 80
        pixels = np.where(head, 1024 + 35, 0).astype(np.int16)
        ds.PixelData = pixels.tobytes()
        path = folder / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
        datasets.append(ds)
    return Series(paths, datasets)


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
