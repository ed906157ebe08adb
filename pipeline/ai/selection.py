"""Which series of a study a model reads.

:class:`SeriesInfo` is what selection needs to know about a series (the archive index
can build it too); :func:`series_from_files` builds it from DICOM headers only, and
:func:`select_series` applies a model's :class:`~pipeline.ai.spec.SeriesRules`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pydicom
from pydicom.errors import InvalidDicomError

if TYPE_CHECKING:
    from pipeline.ai.spec import SeriesRules, TriageSpec
    from pipeline.index.schema import Series

log = logging.getLogger(__name__)

_HEADER_TAGS = [
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "Modality",
    "BodyPartExamined",
    "SeriesDescription",
    "ImageType",
    "SliceThickness",
    "NumberOfFrames",
    "SOPInstanceUID",
    "SeriesNumber",
]


@dataclass
class SeriesInfo:
    """One series as selection sees it."""

    series_instance_uid: str
    modality: str
    body_part_examined: str
    series_description: str
    image_type: tuple[str, ...]
    number_of_instances: int
    slice_thickness: float | None
    files: list[Path] = field(default_factory=list)
    study_instance_uid: str = ""
    series_number: int | None = None


def series_info_of_row(series: Series) -> SeriesInfo:
    """A series as selection sees it, from its index row alone (the dispatch-time planner
    and the study page's "which series each model read" both judge from this)."""
    return SeriesInfo(
        series_instance_uid=series.SeriesInstanceUID,
        modality=series.Modality,
        body_part_examined=series.BodyPartExamined,
        series_description=series.SeriesDescription,
        image_type=tuple(v for v in (series.ImageType or "").split("\\") if v),
        number_of_instances=series.NumberOfSeriesRelatedInstances,
        slice_thickness=series.SliceThickness,
        series_number=series.SeriesNumber,
    )


def _float(value: object) -> float | None:
    try:
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def series_from_files(paths: Iterable[Path | str]) -> list[SeriesInfo]:
    """Group DICOM files into series, reading headers only (no pixel data).

    Files that are not DICOM are skipped with a warning. A series takes its attributes
    from its first file; ``ImageType`` and ``SliceThickness`` come from the most common
    value, so one odd image does not decide.
    """
    grouped: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in sorted(Path(p) for p in paths):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_HEADER_TAGS)
        except (InvalidDicomError, OSError) as err:
            log.warning("skipping %s: not a DICOM file (%s)", path, err)
            continue
        uid = str(ds.get("SeriesInstanceUID", ""))
        if not uid:
            log.warning("skipping %s: no SeriesInstanceUID", path)
            continue
        grouped.setdefault(uid, []).append((path, ds))
    result = []
    for uid, items in grouped.items():
        first = items[0][1]
        types = [tuple(str(v).upper() for v in (ds.get("ImageType") or [])) for _, ds in items]
        thicknesses = [_float(ds.get("SliceThickness")) for _, ds in items]
        number = first.get("SeriesNumber")
        result.append(
            SeriesInfo(
                series_instance_uid=uid,
                modality=str(first.get("Modality", "")).upper(),
                body_part_examined=str(first.get("BodyPartExamined", "") or "").upper(),
                series_description=str(first.get("SeriesDescription", "") or ""),
                image_type=max(set(types), key=types.count),
                number_of_instances=sum(int(ds.get("NumberOfFrames", 1) or 1) for _, ds in items),
                slice_thickness=max(set(thicknesses), key=thicknesses.count),
                files=[p for p, _ in items],
                study_instance_uid=str(first.get("StudyInstanceUID", "")),
                series_number=int(number) if number not in (None, "") else None,
            )
        )
    return result


def rejection_reason(rules: "SeriesRules", series: SeriesInfo) -> str | None:
    """Why ``series`` does not match ``rules``, or ``None`` when it does."""
    # Tolerant when reading: the index or a header may give other case or None.
    modality = (series.modality or "").strip().upper()
    body_part = (series.body_part_examined or "").strip().upper()
    description = series.series_description or ""
    image_type = tuple(str(v).strip().upper() for v in series.image_type or ())
    if rules.modality and modality not in rules.modality:
        return f"Modality {modality or '(none)'} not in {rules.modality}"
    if rules.body_part_examined:
        if not body_part:
            if not rules.body_part_missing_ok:
                return "no BodyPartExamined"
        elif body_part not in rules.body_part_examined:
            return f"BodyPartExamined {body_part} not in {rules.body_part_examined}"
    if rules.series_description and not re.search(rules.series_description, description):
        return f"SeriesDescription {description!r} does not match {rules.series_description!r}"
    if rules.series_description_exclude and re.search(rules.series_description_exclude, description):
        return f"SeriesDescription {description!r} matches exclude {rules.series_description_exclude!r}"
    missing = [v for v in rules.image_type_required if v not in image_type]
    if missing:
        return f"ImageType {'/'.join(image_type)} lacks {missing}"
    excluded = [v for v in rules.image_type_excluded if v in image_type]
    if excluded:
        return f"ImageType {'/'.join(image_type)} has {excluded}"
    if series.number_of_instances < rules.min_slices:
        return f"{series.number_of_instances} slices < {rules.min_slices}"
    if rules.max_slices is not None and series.number_of_instances > rules.max_slices:
        return f"{series.number_of_instances} slices > {rules.max_slices}"
    thickness = _float(series.slice_thickness)
    if rules.slice_thickness_mm is not None:
        low, high = rules.slice_thickness_mm.min, rules.slice_thickness_mm.max
        if thickness is None:
            return "no SliceThickness"
        if (low is not None and thickness < low) or (high is not None and thickness > high):
            return f"SliceThickness {thickness} mm outside [{low}, {high}]"
    return None


def _preference_key(rules: "SeriesRules", series: SeriesInfo) -> tuple:
    thickness = _float(series.slice_thickness)
    thickness = thickness if thickness is not None else float("inf")
    keys: list[float] = []
    for how in rules.prefer:
        if how == "closest_thickness":
            keys.append(abs(thickness - (rules.target_slice_thickness_mm or 0.0)))
        elif how == "thinnest":
            keys.append(thickness)
        elif how == "thickest":
            keys.append(-thickness)
        elif how == "most_slices":
            keys.append(-series.number_of_instances)
        elif how == "fewest_slices":
            keys.append(series.number_of_instances)
    return (*keys, series.series_instance_uid)


def select_series(spec: "TriageSpec | SeriesRules", series: list[SeriesInfo]) -> SeriesInfo | None:
    """The series the model reads, or ``None`` when no series matches its rules.

    Among several matches the spec's ``prefer`` list decides, in order; the
    SeriesInstanceUID breaks remaining ties so the choice is deterministic.
    """
    rules = getattr(spec, "series", spec)
    matching = []
    for candidate in series:
        reason = rejection_reason(rules, candidate)
        if reason is None:
            matching.append(candidate)
        else:
            log.debug("series %s not selected: %s", candidate.series_instance_uid, reason)
    if not matching:
        return None
    return min(matching, key=lambda s: _preference_key(rules, s))
