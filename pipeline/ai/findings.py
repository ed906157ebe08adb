"""What a model found, in the form every later step consumes.

The model zoo produces :class:`ModelResult`; the result writers turn it into DICOM SEG
and TID 1500 SR; the worklist reads :class:`Priority` from it. Masks are boolean
arrays ``(slices, rows, columns)`` in the order of ``source_sop_instance_uids``, i.e. in
the geometry of the source series as stored, so every mask frame maps to one source
image.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Priority(str, enum.Enum):
    """Worklist priority; compare with :meth:`rank` (higher is more urgent)."""

    CRITICAL = "critical"
    URGENT = "urgent"
    ROUTINE = "routine"

    @property
    def rank(self) -> int:
        return {"critical": 2, "urgent": 1, "routine": 0}[self.value]

    @classmethod
    def highest(cls, priorities: "list[Priority]") -> "Priority":
        return max(priorities, key=lambda p: p.rank, default=cls.ROUTINE)


@dataclass(frozen=True)
class Code:
    """A coded concept: ``Code("50960005", "SCT", "Hemorrhage")``."""

    value: str
    scheme: str
    meaning: str


@dataclass(frozen=True)
class ModelIdentity:
    """Who produced a result: goes into algorithm identification and Contributing Equipment."""

    name: str
    version: str
    family: Code = Code("123109", "DCM", "Manual Processing")  # overwritten by the zoo
    description: str = ""


@dataclass
class Finding:
    """One output channel's result on one series."""

    label: str
    category: Code
    type: Code
    mask: np.ndarray  # bool (slices, rows, columns), source geometry
    probability: float
    present: bool
    volume_ml: float
    max_diameter_mm: float
    priority: Priority
    anatomic_site: Code | None = None


@dataclass
class ModelResult:
    """Every finding one model made on one series."""

    model: ModelIdentity
    series_instance_uid: str
    source_sop_instance_uids: list[str]
    findings: list[Finding] = field(default_factory=list)

    @property
    def priority(self) -> Priority:
        return Priority.highest([f.priority for f in self.findings if f.present])


class SummarisedFinding(Protocol):
    """What a one-line summary needs of a finding (a :class:`Finding`, an index row, ...)."""

    label: str
    present: bool
    volume_ml: float
    probability: float


def finding_line(finding: SummarisedFinding) -> str:
    """One finding as the worklist shows it: ``"Hemorrhage · 12.4 ml · p 0.97"``."""
    label = finding.label[:1].upper() + finding.label[1:]
    return f"{label} · {finding.volume_ml:.1f} ml · p {finding.probability:.2f}"


def findings_summary(findings: Iterable[SummarisedFinding]) -> str:
    """Every present finding, most probable first, joined by ``"; "`` (``""`` when none)."""
    present = sorted((f for f in findings if f.present), key=lambda f: -f.probability)
    return "; ".join(finding_line(f) for f in present)
