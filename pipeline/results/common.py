"""What the SEG and SR writers share: input checks, codes, and who made the result."""

from __future__ import annotations

import importlib.metadata
import math
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipeline.ai.findings import Code, ModelIdentity, ModelResult
from pipeline.config import ResultSettings
from pipeline.errors import PermanentError

#: Manufacturer's Model Name of the software that writes SEG and SR.
SOFTWARE_NAME = "radtriage"


def software_version() -> str:
    """Version of the installed radtriage distribution (Software Versions)."""
    try:
        return importlib.metadata.version("radtriage")
    except importlib.metadata.PackageNotFoundError:  # running from a bare checkout
        return "0+unknown"


def coded(code: Code) -> hd.sr.CodedConcept:
    """Turn a :class:`pipeline.ai.findings.Code` into a highdicom coded concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def ordered_sources(source_images: Sequence[Dataset], result: ModelResult) -> list[Dataset]:
    """Return the source images in the order of ``result.source_sop_instance_uids``.

    The images may come in any order (e.g. as listed by the archive); what matters is
    that every image the masks refer to is there and belongs to the analysed series.
    Headers read with ``stop_before_pixels=True`` are enough.

    Raises
    ------
    PermanentError
        When an image is missing, belongs to another series or has no patient
        geometry, a mask does not have one frame per source image of the source image
        size, or a probability, volume or diameter is out of range.
    """
    if not result.source_sop_instance_uids:
        raise PermanentError(
            f"model {result.model.name} returned no source SOP Instance UIDs for series "
            f"{result.series_instance_uid}: the result cannot be placed on any image"
        )
    by_uid: dict[str, Dataset] = {}
    for ds in source_images:
        if ds.get("SeriesInstanceUID") != result.series_instance_uid:
            raise PermanentError(
                f"source image {ds.get('SOPInstanceUID')} belongs to series {ds.get('SeriesInstanceUID')}, "
                f"not to the analysed series {result.series_instance_uid}: pass the images of that series"
            )
        by_uid[str(ds.SOPInstanceUID)] = ds
    missing = [uid for uid in result.source_sop_instance_uids if uid not in by_uid]
    if missing:
        raise PermanentError(
            f"{len(missing)} of {len(result.source_sop_instance_uids)} source images of series "
            f"{result.series_instance_uid} were not passed (first: {missing[0]}): load every image "
            "the model read"
        )
    ordered = [by_uid[uid] for uid in result.source_sop_instance_uids]
    if ordered[0].get("ImagePositionPatient") is None or ordered[0].get("ImageOrientationPatient") is None:
        raise PermanentError(
            f"source images of series {result.series_instance_uid} have no Image Position/Orientation "
            "(Patient): results can only be written for cross-sectional single-frame series"
        )
    shape = (len(ordered), int(ordered[0].Rows), int(ordered[0].Columns))
    for finding in result.findings:
        values = {
            "probability": finding.probability,
            "volume_ml": finding.volume_ml,
            "max_diameter_mm": finding.max_diameter_mm,
        }
        bad = {k: v for k, v in values.items() if not math.isfinite(v) or v < 0}
        if bad or finding.probability > 1:
            raise PermanentError(
                f"finding {finding.label!r} from model {result.model.name} has invalid values "
                f"{bad or {'probability': finding.probability}}: probability must lie in [0, 1], "
                "volume and diameter must be finite and >= 0"
            )
        if finding.mask.shape != shape:
            raise PermanentError(
                f"mask of finding {finding.label!r} from model {result.model.name} has shape "
                f"{finding.mask.shape}, expected {shape} (slices, rows, columns of the source series)"
            )
    return ordered


def series_description(base: str, model: ModelIdentity) -> str:
    """``AI segmentation (ich-detector 1.2.0)``: the model shows wherever a viewer lists
    series (OHIF's study browser and segmentation panel show no other field naming it)."""
    return f"{base} ({model.name} {model.version})"[:64]


def model_equipment(model: ModelIdentity, settings: ResultSettings) -> hd.ContributingEquipment:
    """Contributing Equipment item that names the model (IHE AI Results style)."""
    return hd.ContributingEquipment(
        manufacturer=settings.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model.name,
        software_versions=model.version,
        contribution_description=(model.description or f"AI model {model.name} {model.version}")[:1024],
    )


def algorithm_identification(model: ModelIdentity, settings: ResultSettings) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification (SEG) for ``model``."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=coded(model.family),
        version=model.version,
        source=settings.manufacturer,
    )
