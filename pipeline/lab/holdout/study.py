"""One study from the independent source, and the recipes of its test set.

:func:`make_holdout_case` returns an object with the attributes the evaluation reads
(``volume_hu``, ``label``, ``spacing``, ``origin``, ``kinds``, ``volume_ml``), so
:func:`pipeline.lab.evaluate.evaluate_model` runs on it as on the training phantom.
Seeds are its own: the same seed gives the same study; nothing here is ever used to
train or calibrate a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from pipeline.lab.holdout.bleeds import ADD, HoldoutKind, paint
from pipeline.lab.holdout.head import build_subject, head_maps
from pipeline.lab.holdout.scanner import COVERAGE_MM, Geometry, render


@dataclass
class HoldoutCase:
    """HU ``(slices, rows, columns)`` and the true blood mask on the same axial grid."""

    volume_hu: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    kinds: list[HoldoutKind] = field(default_factory=list)

    @property
    def volume_ml(self) -> float:
        return float(self.label.sum() * np.prod(self.spacing) / 1000.0)


def make_holdout_case(
    seed: int,
    finding: str = "hemorrhage",
    *,
    kinds: list[HoldoutKind | str] | None = None,
    rows: int = 512,
    columns: int = 512,
    pixel_spacing: float | None = None,
    slice_thickness: float = 5.0,
    slices: int | None = None,
    z_offset_mm: float = 0.0,
) -> HoldoutCase:
    """Generate one independent head CT (``finding`` ``"hemorrhage"`` or ``"none"``).

    ``pixel_spacing`` None: a field of view of 210-250 mm over ``rows``. ``slices``
    fewer than the whole head make a partial scan, moved by ``z_offset_mm``.
    """
    if finding not in ("hemorrhage", "none"):
        raise ValueError(f"finding must be 'hemorrhage' or 'none', not {finding!r}")
    rng = np.random.default_rng([seed, 424242])
    maps = head_maps()
    subject = build_subject(maps, rng)
    fraction = np.zeros(maps.shape, dtype=np.float32)
    chosen: list[HoldoutKind] = []
    if finding == "hemorrhage":
        chosen = [HoldoutKind(k) for k in kinds] if kinds else [HoldoutKind(rng.choice([k.value for k in HoldoutKind]))]
        for kind in chosen:
            part = ADD[kind](maps, subject, rng)
            paint(subject, part, rng)
            np.maximum(fraction, part, out=fraction)
    pixel = pixel_spacing or round(float(rng.uniform(210, 250)) / rows, 3)
    geometry = Geometry(rows, columns, pixel, slice_thickness, slices, z_offset_mm)
    volume, label, origin = render(maps, subject.hu, fraction, geometry, rng)
    return HoldoutCase(volume, label, (slice_thickness, pixel, pixel), origin, chosen)


@dataclass(frozen=True)
class HoldoutRecipe:
    """One study of the independent test set; :meth:`make` builds it."""

    seed: int
    finding: str
    rows: int = 512
    slice_thickness: float = 5.0
    slices: int | None = None
    z_offset_mm: float = 0.0
    kinds: tuple[str, ...] = ()

    def make(self) -> HoldoutCase:
        return make_holdout_case(
            self.seed,
            self.finding,
            kinds=list(self.kinds) or None,
            rows=self.rows,
            columns=self.rows,
            slice_thickness=self.slice_thickness,
            slices=self.slices,
            z_offset_mm=self.z_offset_mm,
        )


def holdout_recipes(count: int, *, first_seed: int = 5_000_000, rows: int = 512) -> list[HoldoutRecipe]:
    """``count`` studies: half normal, the rest cycling through the four kinds; 2.5 or 5 mm; a
    quarter partial scans (50-75 % of the head, anywhere along it)."""
    kinds = [k.value for k in HoldoutKind]
    out = []
    for i in range(count):
        rng = np.random.default_rng([first_seed + i, 99])
        bleed = i % 2 == 1
        thickness = 2.5 if rng.random() < 0.4 else 5.0
        slices, offset = None, 0.0
        if rng.random() < 0.25:
            whole = math.ceil(COVERAGE_MM / thickness)
            slices = max(16, round(whole * float(rng.uniform(0.5, 0.75))))
            offset = round(float(rng.uniform(-1, 1)) * (whole - slices) * thickness / 2, 1)
        out.append(
            HoldoutRecipe(
                first_seed + i,
                "hemorrhage" if bleed else "none",
                rows,
                thickness,
                slices,
                offset,
                (kinds[(i // 2) % 4],) if bleed else (),
            )
        )
    return out
