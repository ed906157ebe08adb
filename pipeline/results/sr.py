"""Comprehensive 3D SR with a TID 1500 Measurement Report for one model's result.

The report says who observed (the model, as a device), what procedure was reported,
and for every finding one TID 1411 volumetric measurement group:

* tracking identifier and UID (the UID is the SEG segment's Tracking UID),
* finding category, finding type and finding site (from the model's codes),
* the model as algorithm identification,
* measurements: volume (ml), maximum diameter (mm), probability (no units),
* a qualitative evaluation "Presence of property" = Present / Absent,
* a reference to the SEG segment and to the source images its frames were derived from.

and, for every present finding, one TID 1410 planar ROI group on its key image (the
slice where its mask is largest): the same tracking identifier and UID, the outline of
the mask on that image as a closed SCOORD POLYLINE (:mod:`pipeline.results.outline`)
and its area there. Viewers show a measurement only where it has a graphic on an
image: OHIF 3 merges the groups of one tracking UID into one measurement, draws the
outline on the key image and lists the values of both groups beside it (volume,
diameter, probability, area, finding site). The volumetric group stays the finding's
whole-volume record.

Contributing Equipment names the model (IHE AI Results style), as in the SEG.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from pipeline.ai.findings import Code, Finding, ModelIdentity, ModelResult
from pipeline.config import ResultSettings
from pipeline.errors import PermanentError
from pipeline.results.common import coded, model_equipment, ordered_sources, series_description
from pipeline.results.outline import outline

logger = logging.getLogger(__name__)

# Concept names and units of the measurements in each group.
VOLUME = hd.sr.CodedConcept("118565006", "SCT", "Volume")
DIAMETER = hd.sr.CodedConcept("81827009", "SCT", "Diameter")
MAXIMUM = hd.sr.CodedConcept("56851009", "SCT", "Maximum")
AREA = hd.sr.CodedConcept("42798000", "SCT", "Area")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
PRESENCE = hd.sr.CodedConcept("121052", "DCM", "Presence of property")
PRESENT = hd.sr.CodedConcept("121053", "DCM", "Present")
ABSENT = hd.sr.CodedConcept("121054", "DCM", "Absent")
MILLILITER = hd.sr.CodedConcept("ml", "UCUM", "milliliter")
MILLIMETER = hd.sr.CodedConcept("mm", "UCUM", "millimeter")
SQUARE_MILLIMETER = hd.sr.CodedConcept("mm2", "UCUM", "square millimeter")
NO_UNITS = hd.sr.CodedConcept("1", "UCUM", "no units")

# Procedure reported by modality of the source series, when the caller gives none.
_PROCEDURES = {
    "CT": hd.sr.CodedConcept("77477000", "SCT", "Computed Tomography"),
    "MR": hd.sr.CodedConcept("113091000", "SCT", "Magnetic Resonance Imaging"),
}
_IMAGING_PROCEDURE = hd.sr.CodedConcept("363679005", "SCT", "Imaging procedure")


def device_observer_uid(model: ModelIdentity) -> str:
    """Device Observer UID of a model version: stable, so all its reports name the same device."""
    return str(generate_uid(entropy_srcs=[f"radtriage/device/{model.name}/{model.version}"]))


def _segment_sources(seg: Dataset) -> dict[int, list[str]]:
    """Per segment number: the source SOP Instance UIDs its frames derive from, in frame order."""
    sources: dict[int, list[str]] = {}
    shared = seg.SharedFunctionalGroupsSequence[0]
    for item in seg.PerFrameFunctionalGroupsSequence:
        # With a single segment highdicom moves Segment Identification to the shared groups.
        identification = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        number = int(identification[0].ReferencedSegmentNumber)
        uids = sources.setdefault(number, [])
        for derivation in item.get("DerivationImageSequence", []):
            for source in derivation.get("SourceImageSequence", []):
                uid = str(source.ReferencedSOPInstanceUID)
                if uid not in uids:
                    uids.append(uid)
    return sources


def _measurement_group(
    number: int,
    finding: Finding,
    seg: Dataset,
    source_uids: list[str],
    sources_by_uid: dict[str, Dataset],
    series_instance_uid: str,
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    segment = seg.SegmentSequence[number - 1]
    source_uids = [uid for uid in source_uids if uid in sources_by_uid]
    referenced_segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=number,
        # No frame numbers: the Image SOP Instance Reference Macro forbids Referenced
        # Frame Number next to Referenced Segment Number (dciodvfy error).
        source_images=[hd.sr.SourceImageForSegmentation.from_source_image(sources_by_uid[uid]) for uid in source_uids]
        or None,
        source_series=None if source_uids else hd.sr.SourceSeriesForSegmentation(series_instance_uid),
    )
    measurements = [
        hd.sr.Measurement(name=VOLUME, value=float(finding.volume_ml), unit=MILLILITER),
        hd.sr.Measurement(
            name=DIAMETER,
            value=float(finding.max_diameter_mm),
            unit=MILLIMETER,
            derivation=MAXIMUM,
        ),
        hd.sr.Measurement(name=PROBABILITY, value=float(finding.probability), unit=NO_UNITS),
    ]
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=str(segment.TrackingUID), identifier=str(segment.TrackingID)),
        referenced_segment=referenced_segment,
        finding_category=coded(finding.category),
        finding_type=coded(finding.type),
        finding_sites=[hd.sr.FindingSite(coded(finding.anatomic_site))] if finding.anatomic_site else None,
        algorithm_id=algorithm,
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PRESENCE, PRESENT if finding.present else ABSENT)],
    )


def _key_slice_group(
    finding: Finding,
    tracking: hd.sr.TrackingIdentifier,
    sources: list[Dataset],
    algorithm: hd.sr.AlgorithmIdentification,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations | None:
    """TID 1410 group: the finding outlined on its key image, or ``None`` when its mask is empty."""
    mask = np.asarray(finding.mask, dtype=bool)
    areas = mask.reshape(mask.shape[0], -1).sum(axis=1)
    if not areas.any():
        return None
    key = int(areas.argmax())  # the key image of the worklist and the viewer link (first of ties)
    image = sources[key]
    row_mm, column_mm = (float(v) for v in image.PixelSpacing)
    region = hd.sr.ImageRegion(
        graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
        graphic_data=outline(mask[key]),
        source_image=hd.sr.SourceImageForRegion.from_source_image(image),
    )
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_category=coded(finding.category),
        finding_type=coded(finding.type),
        finding_sites=[hd.sr.FindingSite(coded(finding.anatomic_site))] if finding.anatomic_site else None,
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=AREA, value=float(areas[key]) * row_mm * column_mm, unit=SQUARE_MILLIMETER)
        ],
    )


def build_sr(
    source_images: Sequence[Dataset],
    seg: Dataset,
    result: ModelResult,
    settings: ResultSettings,
    *,
    series_instance_uid: str,
    sop_instance_uid: str,
    procedure_reported: Code | None = None,
) -> hd.sr.Comprehensive3DSR:
    """Build the TID 1500 measurement report for ``result``, pointing at ``seg``.

    Parameters
    ----------
    source_images
        The images of the analysed series (headers are enough).
    seg
        The SEG built by :func:`pipeline.results.build_seg` for the same result;
        segment ``i`` (1-based) belongs to ``result.findings[i - 1]``.
    result, settings
        As for :func:`pipeline.results.build_seg`.
    series_instance_uid, sop_instance_uid
        From :func:`pipeline.results.result_uids`.
    procedure_reported
        Procedure code (CID 100); by default derived from the source Modality
        (CT: SCT 77477000 "Computed Tomography").

    Raises
    ------
    PermanentError
        When ``seg`` does not hold one segment per finding of ``result``.
    """
    sources = ordered_sources(source_images, result)
    labels = [f.label[:64] for f in result.findings]
    seg_labels = [str(s.SegmentLabel) for s in seg.get("SegmentSequence", [])]
    if seg_labels != labels:
        raise PermanentError(
            f"SEG {seg.get('SOPInstanceUID')} has segments {seg_labels}, the result has findings {labels}: "
            "build the SR from the SEG built for this result"
        )
    segment_sources = _segment_sources(seg)
    sources_by_uid = {str(ds.SOPInstanceUID): ds for ds in sources}

    model = result.model
    algorithm = hd.sr.AlgorithmIdentification(name=model.name, version=model.version)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_observer_uid(model),
            name=model.name,
            manufacturer_name=settings.manufacturer,
            model_name=f"{model.name} {model.version}"[:64],
            serial_number=settings.device_serial_number,
        ),
    )
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    ] = []
    for number, finding in enumerate(result.findings, start=1):
        volumetric = _measurement_group(
            number,
            finding,
            seg,
            segment_sources.get(number, []),
            sources_by_uid,
            result.series_instance_uid,
            algorithm,
        )
        segment = seg.SegmentSequence[number - 1]
        tracking = hd.sr.TrackingIdentifier(uid=str(segment.TrackingUID), identifier=str(segment.TrackingID))
        planar = _key_slice_group(finding, tracking, sources, algorithm)
        groups.extend([volumetric, planar] if planar is not None else [volumetric])
    procedure = (
        coded(procedure_reported)
        if procedure_reported
        else _PROCEDURES.get(str(sources[0].get("Modality", "")), _IMAGING_PROCEDURE)
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )
    try:
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*sources, seg],
            content=report[0],
            series_instance_uid=series_instance_uid,
            series_number=settings.sr_series_number,
            sop_instance_uid=sop_instance_uid,
            instance_number=1,
            manufacturer=settings.manufacturer,
            institution_name=settings.institution_name or None,
            series_description=series_description(settings.sr_series_description, model),
            # Machine output nobody has signed: complete, but unverified and preliminary.
            is_complete=True,
            is_final=False,
            is_verified=False,
            contributing_equipment=[model_equipment(model, settings)],
        )
    except ValueError as err:
        raise PermanentError(
            f"cannot build the SR of model {model.name} for series {result.series_instance_uid}: {err}"
        ) from err
    logger.info(
        "SR %s: %d measurement group(s) for series %s (model %s %s), SEG %s",
        sop_instance_uid,
        len(groups),
        result.series_instance_uid,
        model.name,
        model.version,
        seg.SOPInstanceUID,
    )
    return sr
