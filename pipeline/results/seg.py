"""DICOM Segmentation (binary SEG) from a :class:`pipeline.ai.findings.ModelResult`.

One segment per finding, numbered in the order of ``result.findings`` (the model's
output channels), so that segment numbers mean the same thing on every study and the
SR can point at them.

Empty segments
--------------
A finding that is absent usually has an empty mask. Its segment is still declared
(with its codes and tracking UID, so the SR can reference it and a reader sees that
the model looked for it), and it is given zero-valued frames rather than no frame at
all: viewers such as OHIF (OHIF/Viewers#3991) hang or drop a segment that has no
frame. The frames written are:

* every source plane where at least one segment has a pixel, or
* when every mask is empty, the middle plane of the series only,

and when any segment is empty every segment gets a frame at each of those planes
(zero where it is empty); otherwise each segment keeps only its own non-empty frames.
Every frame is matched to its source image by position and references it in its
Derivation Image Sequence; the Referenced Series Sequence lists the whole series.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from pipeline.ai.findings import ModelResult
from pipeline.config import ResultSettings
from pipeline.errors import PermanentError
from pipeline.results.common import (
    SOFTWARE_NAME,
    algorithm_identification,
    coded,
    model_equipment,
    ordered_sources,
    series_description,
    software_version,
)

logger = logging.getLogger(__name__)

# CIELab colours (L*, a*, b*) for segments 1, 2, ...: red, yellow, green, cyan, blue, magenta.
_PALETTE = [
    (53.24, 80.09, 67.20),
    (97.14, -21.55, 94.48),
    (87.73, -86.18, 83.18),
    (91.11, -48.09, -14.13),
    (32.30, 79.19, -107.86),
    (60.32, 98.23, -60.82),
]


def segment_tracking_uid(seg_sop_instance_uid: str, segment_number: int) -> str:
    """Tracking UID of one segment: the same in the SEG and in the SR's measurement group."""
    return str(generate_uid(entropy_srcs=[f"radtriage/segment/{seg_sop_instance_uid}/{segment_number}"]))


def _content_label(model_name: str) -> str:
    # Content Label is a CS: upper case letters, digits, space, underscore; 16 chars.
    label = re.sub(r"[^A-Z0-9_ ]", "_", model_name.upper())[:16].strip()
    return label or "AI_RESULT"


def _planes_to_write(masks: list[np.ndarray]) -> tuple[list[int], bool]:
    """Source planes to encode and whether empty frames must be kept (see module doc)."""
    # Per-mask reductions over contiguous (rows, columns) planes: ~10x faster than
    # reducing a stacked (slices, rows, columns, segments) array.
    per_mask = np.stack([m.any(axis=(1, 2)) for m in masks])  # (segments, slices)
    planes = [int(i) for i in np.flatnonzero(per_mask.any(axis=0))]
    if not planes:
        planes = [per_mask.shape[1] // 2]
    any_segment_empty = not bool(per_mask.any(axis=1).all())
    return planes, any_segment_empty


def build_seg(
    source_images: Sequence[Dataset],
    result: ModelResult,
    settings: ResultSettings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
) -> hd.seg.Segmentation:
    """Build the binary SEG for one model's result on one series.

    Parameters
    ----------
    source_images
        The images of the analysed series (any order). Headers read with
        ``pydicom.dcmread(..., stop_before_pixels=True)`` are enough.
    result
        The model's findings; each mask is ``(slices, rows, columns)`` aligned with
        ``result.source_sop_instance_uids``.
    settings
        Manufacturer, series number and description, device serial number.
    series_instance_uid, sop_instance_uid
        From :func:`pipeline.results.result_uids`.

    Raises
    ------
    PermanentError
        When the result has no findings (a SEG needs a segment), labels repeat, or the
        masks do not fit the source images.
    """
    sources = ordered_sources(source_images, result)
    if not result.findings:
        raise PermanentError(
            f"model {result.model.name} returned no findings for series {result.series_instance_uid}: "
            "a SEG needs at least one segment; the model spec must declare its output channels"
        )
    labels = [f.label for f in result.findings]
    if len(set(labels)) != len(labels):
        raise PermanentError(
            f"model {result.model.name} returned duplicate finding labels {labels}: labels must be unique"
        )

    algorithm = algorithm_identification(result.model, settings)
    descriptions = []
    for number, finding in enumerate(result.findings, start=1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=finding.label[:64],
                segmented_property_category=coded(finding.category),
                segmented_property_type=coded(finding.type),
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=algorithm,
                tracking_uid=segment_tracking_uid(sop_instance_uid, number),
                tracking_id=finding.label[:64],
                anatomic_regions=[coded(finding.anatomic_site)] if finding.anatomic_site else None,
                display_color=hd.color.CIELabColor(*_PALETTE[(number - 1) % len(_PALETTE)]),
            )
        )

    masks = [np.asarray(f.mask, dtype=bool) for f in result.findings]
    planes, keep_empty = _planes_to_write(masks)
    plane_positions = [
        hd.PlanePositionSequence(
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            image_position=[float(v) for v in sources[i].ImagePositionPatient],
        )
        for i in planes
    ]
    try:
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=np.stack([m[planes] for m in masks], axis=-1).astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=descriptions,
            series_instance_uid=series_instance_uid,
            series_number=settings.seg_series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=settings.manufacturer,
            manufacturer_model_name=SOFTWARE_NAME,
            software_versions=software_version(),
            device_serial_number=settings.device_serial_number,
            content_description=f"{result.model.name} {result.model.version}"[:64],
            content_label=_content_label(result.model.name),
            series_description=series_description(settings.seg_series_description, result.model),
            institution_name=settings.institution_name or None,
            plane_positions=plane_positions,
            omit_empty_frames=not keep_empty,
            contributing_equipment=[model_equipment(result.model, settings)],
        )
    except ValueError as err:  # geometry highdicom cannot encode, e.g. irregular slices
        raise PermanentError(
            f"cannot build the SEG of model {result.model.name} for series {result.series_instance_uid}: {err}"
        ) from err
    logger.info(
        "SEG %s: %d segment(s), %d frame(s) for series %s (model %s %s)",
        sop_instance_uid,
        len(descriptions),
        int(seg.NumberOfFrames),
        result.series_instance_uid,
        result.model.name,
        result.model.version,
    )
    return seg
