"""Training pairs for a bundle, made by the same preprocessing it runs at inference.

A phantom study is generated at a scanner-like geometry, turned into the MetaTensor
radtriage hands every bundle (:func:`pipeline.ai.inference.volume_to_metatensor`), passed
through the bundle's own ``preprocessing``; the true mask is resampled onto the result
(``ResampleToMatch``). So what the network learns from is what it will see. Pairs are
cached as ``.npz`` under ``$RADTRIAGE_CACHE/training/<name>/``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.lab.phantom.atlas import cache_dir
from pipeline.lab.phantom.generator import HEAD_COVERAGE_MM, PhantomCase, case_volume, make_head_case

log = logging.getLogger(__name__)

GENERATOR_VERSION = 6  # bump when the phantom changes, so cached pairs are rebuilt


@dataclass(frozen=True)
class CaseRecipe:
    """Everything :func:`make_head_case` needs for one study."""

    seed: int
    finding: str
    rows: int
    columns: int
    pixel_spacing: float
    slice_thickness: float
    slices: int | None = None  # None: the whole head
    z_offset_mm: float = 0.0

    def make(self) -> PhantomCase:
        return make_head_case(
            self.seed,
            self.finding,
            rows=self.rows,
            columns=self.columns,  # type: ignore[arg-type]
            pixel_spacing=self.pixel_spacing,
            slice_thickness=self.slice_thickness,
            slices=self.slices,
            z_offset_mm=self.z_offset_mm,
        )

    @property
    def key(self) -> str:
        partial = f"-n{self.slices}{self.z_offset_mm:+.1f}" if self.slices else ""
        return (
            f"v{GENERATOR_VERSION}-s{self.seed}-{self.finding}-{self.rows}x{self.columns}"
            f"-{self.pixel_spacing:.3f}-{self.slice_thickness:.2f}{partial}"
        )


def recipe(
    seed: int, *, positive_fraction: float = 0.65, full_size_fraction: float = 0.4, partial_fraction: float = 0.3
) -> CaseRecipe:
    """A study drawn from the range of scanners we expect, decided by ``seed`` alone.

    Most are reduced in-plane (256 pixels at 0.85-1.0 mm: cheap to make); the others the
    real thing (512 pixels at 0.4-0.5 mm). Slices are 2.5-5 mm. ``partial_fraction`` of
    them cover only 40-80 % of the head (at least 16 slices), the scan range placed
    anywhere along it, so the top or bottom image cuts through the brain.
    """
    rng = np.random.default_rng([seed, 7919])
    finding = "hemorrhage" if rng.random() < positive_fraction else "none"
    thickness = float(rng.choice([2.5, 3.0, 4.0, 5.0]))
    if rng.random() < full_size_fraction:
        size, pixel = 512, round(float(rng.uniform(0.4, 0.5)), 3)
    else:
        size, pixel = 256, round(float(rng.uniform(0.85, 1.0)), 3)
    slices, offset = None, 0.0
    if rng.random() < partial_fraction:
        whole = math.ceil(HEAD_COVERAGE_MM / thickness)
        slices = max(16, round(whole * float(rng.uniform(0.4, 0.8))))
        offset = round(float(rng.uniform(-1, 1)) * (whole - slices) * thickness / 2, 1)
    return CaseRecipe(seed, finding, size, size, pixel, thickness, slices, offset)


def smoke_recipe(seed: int) -> CaseRecipe:
    """A tiny study (128 pixels at 1.8 mm, 5 mm slices) for smoke runs; even seeds bleed."""
    return CaseRecipe(seed, "hemorrhage" if seed % 2 == 0 else "none", 128, 128, 1.8, 5.0)


def training_pair(preprocessing: Callable[[dict], dict], case: PhantomCase) -> tuple[np.ndarray, np.ndarray]:
    """``(image float16 (1, X, Y, Z), label uint8 (1, X, Y, Z))`` on the bundle's model grid."""
    from monai.transforms import ResampleToMatch

    from pipeline.ai.inference import volume_to_metatensor

    volume = case_volume(case)
    image = preprocessing({"image": volume_to_metatensor(volume)})["image"]
    truth = volume_to_metatensor(dataclasses.replace(volume, array=case.label.astype(np.float32)))
    label = ResampleToMatch(mode="bilinear", padding_mode="zeros")(truth, img_dst=image)
    return image.numpy().astype(np.float16), (label.numpy() >= 0.5).astype(np.uint8)


def build_pairs(
    preprocessing: Callable[[dict], dict],
    recipes: Iterable[CaseRecipe],
    *,
    name: str,
    fingerprint: str = "",
    cache: Path | None = None,
    progress: Callable[[int, CaseRecipe], Any] | None = None,
) -> list[Path]:
    """Make (or reuse from the cache) one ``.npz`` pair per recipe; returns their paths.

    ``fingerprint`` identifies the preprocessing (see :func:`preprocessing_fingerprint`):
    pairs made by another preprocessing are never reused.
    """
    folder = (cache or cache_dir() / "training") / (f"{name}-{fingerprint[:12]}" if fingerprint else name)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, item in enumerate(recipes):
        path = folder / f"{item.key}.npz"
        if not path.is_file():
            image, label = training_pair(preprocessing, item.make())
            partial = path.with_suffix(".tmp.npz")
            np.savez(partial, image=image, label=label)
            partial.replace(path)
        paths.append(path)
        if progress is not None:
            progress(i, item)
    return paths


def preprocessing_fingerprint(inference_config: dict[str, Any]) -> str:
    """A stable hash of a bundle's ``preprocessing`` definition (for the pair cache)."""
    text = json.dumps(inference_config.get("preprocessing"), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load_pair(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {"image": data["image"].astype(np.float32), "label": data["label"]}
