"""Synthetic CT studies written as real DICOM files (CT Image Storage).

:func:`write_ct_series` turns any Hounsfield-unit volume into a CT series with proper
geometry and rescale; :func:`synth_study` makes a whole study from a volume generator
(by default :func:`head_phantom`: skull, brain, ventricles). The model zoo plugs other
generators in (e.g. a head CT with a hemorrhage) through ``volume=``.

Everything is reproducible from ``seed``: the same seed gives the same patient, dates
and UIDs (so sending it twice is a resend, not a second study).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

VolumeGenerator = Callable[[tuple[int, int, int], tuple[float, float, float], np.random.Generator], np.ndarray]
"""``(shape_zyx, spacing_zyx_mm, rng) -> volume in HU`` (float or int array of that shape)."""

RESCALE_INTERCEPT = -1024.0
_FAMILY = [
    "Garcia",
    "Novak",
    "Schmidt",
    "Rossi",
    "Dubois",
    "Nielsen",
    "Kowalski",
    "Silva",
    "Jansen",
    "Moreau",
    "Fischer",
    "Hansen",
    "Costa",
    "Weber",
    "Lopez",
    "Meyer",
    "Bianchi",
    "Keller",
]
_GIVEN_F = ["Anna", "Maria", "Elena", "Sofia", "Clara", "Ines", "Lena", "Marta", "Eva", "Julia"]
_GIVEN_M = ["Jan", "Luca", "Pierre", "Tomas", "Erik", "Paulo", "Max", "Piotr", "Hugo", "Karl"]


def head_phantom(
    shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: np.random.Generator
) -> np.ndarray:
    """A simple axial head: air, scalp, skull ellipse, brain, two lateral ventricles."""
    nz, ny, nx = shape
    sz, sy, sx = spacing
    z = (np.arange(nz) - (nz - 1) / 2)[:, None, None] * sz
    y = (np.arange(ny) - (ny - 1) / 2)[None, :, None] * sy
    x = (np.arange(nx) - (nx - 1) / 2)[None, None, :] * sx
    # head ellipsoid semi-axes (mm): x 75, y 95, z 90, scaled down for small fields of view
    fov = min(nx * sx, ny * sy)
    k = min(1.0, fov / 220.0)
    ax, ay, az = 75 * k, 95 * k, max(90 * k, nz * sz)

    def inside(a: float, b: float, c: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
        return ((x - dx) / a) ** 2 + ((y - dy) / b) ** 2 + (z / c) ** 2 <= 1.0

    vol = np.full(shape, -1000.0, dtype=np.float32)
    vol[np.broadcast_to(inside(ax, ay, az), shape)] = 40.0  # scalp / soft tissue
    vol[np.broadcast_to(inside(ax - 3 * k, ay - 3 * k, az), shape)] = 1200.0  # skull
    vol[np.broadcast_to(inside(ax - 10 * k, ay - 10 * k, az), shape)] = 32.0  # brain
    for side in (-1, 1):  # lateral ventricles (CSF)
        vent = inside(8 * k, 25 * k, az * 0.35, dx=side * 12 * k, dy=-5 * k)
        vol[np.broadcast_to(vent, shape)] = 6.0
    vol += rng.normal(0.0, 4.0, size=shape).astype(np.float32)
    return vol


def _patient(rng: np.random.Generator) -> dict[str, str]:
    sex = str(rng.choice(["F", "M"]))
    given = _GIVEN_F if sex == "F" else _GIVEN_M
    birth = dt.date(1935, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 70)))
    return {
        "PatientName": f"{rng.choice(_FAMILY)}^{rng.choice(given)}",
        "PatientID": f"P{int(rng.integers(10**6, 10**7))}",
        "PatientBirthDate": birth.strftime("%Y%m%d"),
        "PatientSex": sex,
    }


def write_ct_series(
    volume_hu: np.ndarray,
    spacing_zyx: Sequence[float],
    out_dir: str | Path,
    *,
    seed: int = 0,
    StudyInstanceUID: str | None = None,
    SeriesInstanceUID: str | None = None,
    FrameOfReferenceUID: str | None = None,
    PatientName: str | None = None,
    PatientID: str | None = None,
    PatientBirthDate: str | None = None,
    PatientSex: str | None = None,
    AccessionNumber: str | None = None,
    StudyDate: str | None = None,
    StudyTime: str | None = None,
    StudyDescription: str = "CT HEAD WITHOUT CONTRAST",
    SeriesDescription: str = "Head 5mm axial",
    SeriesNumber: int = 2,
    BodyPartExamined: str = "HEAD",
    Manufacturer: str = "radtriage synth",
    ReferringPhysicianName: str = "Doe^Jane",
) -> list[Path]:
    """Write ``volume_hu`` (z, y, x; Hounsfield units) as one CT Image Storage series.

    Slice ``k`` lies at z = ``k * spacing_zyx[0]`` mm (head first supine, axial), so
    index 0 is the most inferior slice. Pixels are stored as uint16 with
    RescaleIntercept -1024, clipped to [-1024, 3071] HU. Attributes not given are drawn
    from ``seed``. Returns the file paths in slice order.
    """
    volume = np.asarray(volume_hu)
    if volume.ndim != 3:
        raise ValueError(f"volume_hu must be 3-D (z, y, x), got shape {volume.shape}")
    sz, sy, sx = (float(s) for s in spacing_zyx)
    rng = np.random.default_rng(seed)
    patient = _patient(rng)
    when = dt.datetime(2024, 1, 1, 7, 0) + dt.timedelta(minutes=int(rng.integers(0, 60 * 24 * 365)))
    uid = lambda *parts: generate_uid(entropy_srcs=[str(seed), *map(str, parts)])  # noqa: E731
    study_uid = StudyInstanceUID or uid("study")
    series_uid = SeriesInstanceUID or uid("series", study_uid, SeriesNumber)
    for_uid = FrameOfReferenceUID or uid("frame", study_uid)
    date = StudyDate or when.strftime("%Y%m%d")
    time = StudyTime or when.strftime("%H%M%S")
    accession = AccessionNumber or f"A{int(rng.integers(10**7, 10**8))}"
    stored = np.clip(np.rint(volume) - RESCALE_INTERCEPT, 0, 4095).astype(np.uint16)
    nz, ny, nx = stored.shape
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(nz):
        sop_uid = uid("instance", series_uid, k)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = time
        ds.AccessionNumber = accession
        ds.Modality = "CT"
        ds.Manufacturer = Manufacturer
        ds.ReferringPhysicianName = ReferringPhysicianName
        ds.StudyDescription = StudyDescription
        ds.SeriesDescription = SeriesDescription
        ds.PatientName = PatientName or patient["PatientName"]
        ds.PatientID = PatientID or patient["PatientID"]
        ds.PatientBirthDate = PatientBirthDate or patient["PatientBirthDate"]
        ds.PatientSex = PatientSex or patient["PatientSex"]
        ds.BodyPartExamined = BodyPartExamined
        ds.SliceThickness = f"{sz:g}"
        ds.KVP = "120"
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = accession[-8:]
        ds.SeriesNumber = SeriesNumber
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        z = k * sz
        ds.ImagePositionPatient = [f"{-(nx - 1) / 2 * sx:.4f}", f"{-(ny - 1) / 2 * sy:.4f}", f"{z:.4f}"]
        ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
        ds.FrameOfReferenceUID = for_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = f"{z:.4f}"
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.PixelSpacing = [f"{sy:g}", f"{sx:g}"]
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.WindowCenter = "40"
        ds.WindowWidth = "80"
        ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
        ds.RescaleSlope = "1"
        ds.RescaleType = "HU"
        ds.PixelData = stored[k].tobytes()
        path = out / f"CT{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def synth_study(
    out_dir: str | Path,
    seed: int = 0,
    slices: int = 40,
    rows: int = 512,
    cols: int = 512,
    *,
    spacing_zyx: Sequence[float] = (5.0, 0.45, 0.45),
    volume: VolumeGenerator = head_phantom,
    **attributes: object,
) -> list[Path]:
    """Write a synthetic head CT study (one series) to ``out_dir``; return the files.

    ``volume`` makes the HU volume from ``(shape, spacing, rng)``; the remaining keyword
    arguments go to :func:`write_ct_series` (e.g. ``PatientName``, ``SeriesNumber``).
    """
    spacing = (float(spacing_zyx[0]), float(spacing_zyx[1]), float(spacing_zyx[2]))
    rng = np.random.default_rng(seed)
    data = volume((slices, rows, cols), spacing, rng)
    if data.shape != (slices, rows, cols):
        raise ValueError(f"volume generator returned shape {data.shape}, expected {(slices, rows, cols)}")
    return write_ct_series(data, spacing, out_dir, seed=seed, **attributes)  # type: ignore[arg-type]


# Named volume generators for ``radtriage synth --phantom``; add yours here.
VOLUME_GENERATORS: dict[str, VolumeGenerator] = {"head": head_phantom}
