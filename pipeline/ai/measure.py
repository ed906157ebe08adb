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

    The mask is ``probability >= voxel_threshold`` without components smaller than
    ``min_component_ml``. ``probability`` is the highest voxel probability left after
    removing those specks, so it is below the threshold when nothing was found. The
    finding is present when the mask holds at least ``min_volume_ml`` (and anything at
    all); its priority comes from the spec's rules.
    """
    if probability_map.shape != volume.shape:
        raise ValueError(f"probability map {probability_map.shape} does not match the volume {volume.shape}")
    voxel_ml = volume.voxel_volume_ml
    raw = probability_map >= spec.voxel_threshold
    mask = remove_small(raw, int(np.ceil(spec.min_component_ml / voxel_ml)))
    specks = raw & ~mask
    if mask.any():
        probability = float(probability_map[mask].max())
    else:
        below = probability_map[~specks] if specks.any() else probability_map
        probability = float(below.max()) if below.size else 0.0
    volume_ml = float(mask.sum() * voxel_ml)
    present = bool(mask.any()) and volume_ml >= spec.min_volume_ml
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
