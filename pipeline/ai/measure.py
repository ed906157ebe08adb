"""From a probability map to a finding: mask, probability, volume, diameter, priority.

Everything here works in the source geometry (``(slices, rows, columns)`` with the
volume's spacing and direction), so the numbers are what a radiologist would measure
on the images the SEG refers to.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from pipeline.ai.cranium import CranialCavity, within_cranium
from pipeline.ai.findings import Finding
from pipeline.ai.spec import FindingSpec
from pipeline.ai.volume import Volume

_STRUCTURE = ndi.generate_binary_structure(3, 3)  # 26-connectivity: a bleed is one object


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    return ndi.label(mask, structure=_STRUCTURE)  # type: ignore[return-value]


def remove_small(mask: np.ndarray, min_voxels: int) -> np.ndarray:
    """Drop connected components smaller than ``min_voxels``."""
    if min_voxels <= 1 or not mask.any():
        return mask
    labels, count = components(mask)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    return keep[labels]


HU_SMOOTHING_MM = 0.75  # in-plane: the HU gate must not punch noise holes into a bleed


def hu_gate(mask: np.ndarray, volume: Volume, min_hu: float | None, max_hu: float | None) -> np.ndarray:
    """``mask`` without the voxels whose in-plane smoothed HU lies outside ``[min_hu, max_hu)``."""
    if (min_hu is None and max_hu is None) or not mask.any():
        return mask
    (box,) = ndi.find_objects(mask.astype(np.uint8))
    out = mask.copy()
    out[box] &= hu_inside(smoothed_hu(volume, box), min_hu, max_hu)
    return out


def smoothed_hu(volume: Volume, box: tuple[slice, ...] | None = None) -> np.ndarray:
    """HU inside ``box`` (default: everywhere), smoothed in-plane by :data:`HU_SMOOTHING_MM`."""
    box = box or tuple(slice(0, n) for n in volume.shape)
    sigma = [0.0] + [HU_SMOOTHING_MM / float(s) for s in volume.spacing[1:]]
    margin = [0] + [int(np.ceil(3 * g)) + 1 for g in sigma[1:]]
    shape = volume.shape
    wide = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, shape, strict=True))
    hu = ndi.gaussian_filter(volume.array[wide].astype(np.float32), sigma, truncate=3.0)
    return hu[tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, wide, strict=True))]


def bone_distances_mm(labels: np.ndarray, count: int, volume: Volume, bone_hu: float, cap_mm: float) -> np.ndarray:
    """For each component ``1..count``: how far (mm) its farthest voxel lies from bone.

    Distances are exact up to ``cap_mm`` (each component's box is widened by that much
    before the distance transform) and reported as ``cap_mm`` beyond it; a component
    with no bone within reach gets ``cap_mm``.
    """
    out = np.full(count, float(cap_mm))
    if count == 0 or cap_mm <= 0:
        return out
    spacing = np.asarray(volume.spacing, dtype=float)
    margin = np.ceil(cap_mm / spacing).astype(int) + 1
    for i, box in enumerate(ndi.find_objects(labels)):
        if box is None:
            continue
        wide = tuple(
            slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, margin, labels.shape, strict=True)
        )
        bone = volume.array[wide] >= bone_hu
        if not bone.any():
            continue
        distance = ndi.distance_transform_edt(~bone, sampling=spacing)
        out[i] = min(float(distance[labels[wide] == i + 1].max()), cap_mm)
    return out


def drop_along_bone(mask: np.ndarray, volume: Volume, bone_hu: float, min_distance_mm: float) -> np.ndarray:
    """Drop components lying wholly within ``min_distance_mm`` of bone.

    A thick slice through the skull's inner table or the skull base mixes bone with
    brain into voxels as dense as blood, in a thin sliver along the bone; a network
    easily takes it for a bleed. A real subdural or epidural hematoma worth reporting
    is thicker than that, so some of its voxels lie farther from the bone and it is
    kept whole.
    """
    if min_distance_mm <= 0 or not mask.any():
        return mask
    labels, count = components(mask)
    farthest = bone_distances_mm(labels, count, volume, bone_hu, min_distance_mm)
    keep = np.concatenate([[False], farthest >= min_distance_mm])
    return keep[labels]


def grow(
    core: np.ndarray,
    probability_map: np.ndarray,
    volume: Volume,
    spec: FindingSpec,
    cavity: CranialCavity | None = None,
) -> np.ndarray:
    """``core`` extended over the connected voxels of probability >= ``spec.grow_threshold``
    that pass the spec's HU gate and, with ``within_cranium``, lie inside the cranial cavity
    (hysteresis thresholding: a component is only ever extended, never started, by them).
    ``cavity``: the one the core was gated by, so its slices are not judged twice."""
    if spec.grow_threshold is None or not core.any():
        return core
    # The gates only remove voxels: the gated regions touching the core lie inside the
    # ungated ones that do, so only those need gating.
    labels, _ = components((probability_map >= spec.grow_threshold) | core)
    gated = hu_gate(np.isin(labels, _touching(labels, core)), volume, spec.min_hu, spec.max_hu)
    if spec.within_cranium:
        gated = within_cranium(gated, volume, spec.bone_hu, cavity)
    labels, _ = components(gated | core)
    return np.isin(labels, _touching(labels, core))


def _touching(labels: np.ndarray, core: np.ndarray) -> np.ndarray:
    found = np.unique(labels[core])
    return found[found > 0]


def hu_inside(hu: np.ndarray, min_hu: float | None, max_hu: float | None) -> np.ndarray:
    """Where ``hu`` lies in ``[min_hu, max_hu)`` (an open end when None)."""
    keep = np.ones(hu.shape, dtype=bool)
    if min_hu is not None:
        keep &= hu >= min_hu
    if max_hu is not None:
        keep &= hu < max_hu
    return keep


def max_diameter_mm(mask: np.ndarray, volume: Volume) -> float:
    """Largest distance (mm) between two voxel centres of the largest component.

    Measured in patient space, so anisotropic and tilted grids measure right.
    """
    if not mask.any():
        return 0.0
    labels, count = components(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = int(np.argmax(sizes))
    box = ndi.find_objects(labels)[largest - 1]
    blob = np.pad(labels[box] == largest, 1)
    surface = blob & ~ndi.binary_erosion(blob)
    offset = np.array([s.start - 1 for s in box])
    points = volume.index_to_lps(np.argwhere(surface) + offset)
    if len(points) < 2:
        return 0.0
    try:
        points = points[ConvexHull(points, qhull_options="QJ").vertices]
    except QhullError:
        pass  # flat or tiny: few points, compare them all
    if len(points) > 4000:
        points = points[:: len(points) // 4000 + 1]
    return float(pdist(points).max())


def make_finding(probability_map: np.ndarray, volume: Volume, spec: FindingSpec) -> Finding:
    """Turn one channel's probability map (source geometry) into a :class:`Finding`.

    The mask is ``probability >= voxel_threshold`` inside the HU gate (``min_hu``,
    ``max_hu``) and, with ``within_cranium``, inside the cranial cavity, without components smaller than
    ``min_component_ml`` and, when ``min_bone_distance_mm`` is set, without those lying
    wholly along bone. The finding is present when that mask holds at least
    ``min_volume_ml`` (and anything at all). A present finding's mask is then, with
    ``grow_threshold``, extended over connected voxels down to that probability inside
    the same gates (:func:`grow`): its volume, diameter and priority are measured on the
    grown mask, while the decision and the probability are taken on the detected one, so
    growing never turns specks on a normal head into a finding.

    ``probability`` is the study-level probability the decision was taken on: with a
    ``study_probability`` calibration, the calibrated function of the volume (0.5
    exactly at ``min_volume_ml``); without one, the highest voxel probability in the
    mask when present and the highest one outside every discarded component when
    absent (so below ``voxel_threshold``). Either way, an absent finding never comes
    with a probability above its decision point.
    """
    if probability_map.shape != volume.shape:
        raise ValueError(f"probability map {probability_map.shape} does not match the volume {volume.shape}")
    voxel_ml = volume.voxel_volume_ml
    raw = probability_map >= spec.voxel_threshold
    mask = hu_gate(raw, volume, spec.min_hu, spec.max_hu)
    cavity = CranialCavity(volume, spec.bone_hu) if spec.within_cranium else None
    if cavity is not None:
        mask = cavity.within(mask)
    mask = remove_small(mask, int(np.ceil(spec.min_component_ml / voxel_ml)))
    mask = drop_along_bone(mask, volume, spec.bone_hu, spec.min_bone_distance_mm)
    detected_ml = float(mask.sum() * voxel_ml)
    present = bool(mask.any()) and detected_ml >= spec.min_volume_ml
    if spec.study_probability is not None:
        probability = spec.study_probability.probability(detected_ml if mask.any() else 0.0, spec.min_volume_ml)
    elif present:
        probability = float(probability_map[mask].max())
    else:
        rest = probability_map[~raw]
        probability = float(rest.max()) if rest.size else 0.0
    if present:  # measured to the visible edge; growing never decides
        mask = grow(mask, probability_map, volume, spec, cavity)
    volume_ml = float(mask.sum() * voxel_ml)
    diameter = max_diameter_mm(mask, volume) if present else 0.0
    return Finding(
        label=spec.label,
        category=spec.category.to_code(),
        type=spec.type.to_code(),
        mask=mask if present else np.zeros_like(mask),
        probability=probability,
        present=present,
        volume_ml=volume_ml if present else 0.0,
        max_diameter_mm=diameter,
        priority=spec.priority_for(present, volume_ml, probability, diameter),
        anatomic_site=spec.anatomic_site.to_code() if spec.anatomic_site else None,
    )
