"""The study page's "which series each model read, and why not the others".

The planner (:mod:`pipeline.triage.planning`) keeps only a line per study for the
worklist (``No AI model applies (...)``), not a reason per series, and the web layer
may not import it (triage sits above web). Its decisions come from two functions of
:mod:`pipeline.ai.selection`, ``select_series`` and ``rejection_reason``: evaluating
them here on the index's series gives the same answers the planner got, without a
table that would have to be kept in step with it. What a model actually read comes
from its stored result; the rules only explain the rest.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.ai.registry import Registry, load_registry
from pipeline.ai.selection import SeriesInfo, rejection_reason, select_series, series_info_of_row
from pipeline.index.schema import Series
from pipeline.web.worklist_items import WorklistItem

# The models folder is read again after this long: a bundle added or edited shows up on
# the study page without a restart, and a page view never costs a folder walk.
REGISTRY_SECONDS = 60.0
_cache: dict[Path, tuple[float, Registry]] = {}
_lock = threading.Lock()


def models_registry(models_dir: Path) -> Registry:
    """The registry of ``models_dir``, validated at most every :data:`REGISTRY_SECONDS` (files only, no torch)."""
    key = Path(models_dir).resolve()
    with _lock:
        found = _cache.get(key)
        if found is None or time.monotonic() - found[0] > REGISTRY_SECONDS:
            found = (time.monotonic(), load_registry(key))
            _cache[key] = found
        return found[1]


@dataclass(frozen=True)
class SeriesVerdict:
    """One received series as one model's rules see it."""

    SeriesInstanceUID: str
    SeriesNumber: int | None
    Modality: str
    SeriesDescription: str
    instances: int
    read: bool
    reason: str  # why it was not read; "" for the series read


@dataclass(frozen=True)
class ModelReading:
    """What one model read of the study."""

    model: str  # "name version"
    read_series: str  # SeriesInstanceUID; "" when it read nothing
    source: str  # "result": it ran on that series; "rules": what its rules choose now
    verdicts: tuple[SeriesVerdict, ...]
    note: str = ""  # an unavailable model's reason, a failed run's error


def _verdict(s: Series, read_uid: str, why: str) -> SeriesVerdict:
    return SeriesVerdict(
        s.SeriesInstanceUID,
        s.SeriesNumber,
        s.Modality or "",
        s.SeriesDescription or "",
        int(s.NumberOfSeriesRelatedInstances or 0),
        s.SeriesInstanceUID == read_uid,
        "" if s.SeriesInstanceUID == read_uid else why,
    )


def _reading(model: Any, series: list[Series], infos: list[SeriesInfo], item: WorklistItem) -> ModelReading:
    rules = model.spec.series
    result = next((r for r in item.results if r.model_name == model.name and r.SourceSeriesInstanceUID), None)
    chosen = select_series(model.spec, infos)
    read_uid = result.SourceSeriesInstanceUID if result else (chosen.series_instance_uid if chosen else "")
    verdicts = []
    for s, info in zip(series, infos, strict=True):
        why = rejection_reason(rules, info)
        if why is None:
            why = "matches the series rules; another series is preferred (" + ", ".join(rules.prefer) + ")"
        verdicts.append(_verdict(s, read_uid, why))
    note = result.error if result is not None and not result.ok else ""
    return ModelReading(
        f"{model.name} {model.version}", read_uid, "result" if result else "rules", tuple(verdicts), note
    )


def study_readings(series: list[Series], item: WorklistItem, registry: Registry) -> list[ModelReading]:
    """Per model: the series it read (its result) or would read (its rules now), and each other series' reason.

    Models that are in the folder but unavailable are listed with their reason; a model
    with a current result that is no longer in the folder is listed with the series it read.
    """
    infos = [series_info_of_row(s) for s in series]
    readings = [_reading(model, series, infos, item) for model in registry.available]
    known = {m.name for m in registry.available}
    for r in item.results:
        if r.model_name not in known:
            readings.append(
                ModelReading(
                    f"{r.model_name} {r.model_version}",
                    r.SourceSeriesInstanceUID,
                    "result",
                    tuple(_verdict(s, r.SourceSeriesInstanceUID, "not read") for s in series),
                    "no longer in the models folder",
                )
            )
    for u in registry.unavailable:
        readings.append(ModelReading(u.name, "", "rules", (), f"unavailable: {u.reason}"))
    return readings
