"""The outline of a finding on one slice, as SR spatial coordinates (SCOORD POLYLINE).

Viewers draw a TID 1500 measurement only where it has a graphic on an image: OHIF 3
reads a measurement group without SCOORD/SCOORD3D but cannot place it on any image
(and 3.13 stops loading the report on it). So each present finding also gets a planar
ROI on its key slice, outlined here.

The outline runs along pixel edges (DICOM image coordinates: the top left corner of
the top left pixel is (0, 0), so a pixel's corners lie on whole numbers) around the
largest 4-connected part of the mask, holes filled, so that it encloses exactly the
pixels drawn by the SEG on that slice and nothing else. Straight runs are reduced to
their end points. An outline of more than :data:`MAX_POINTS` points (a large, ragged
finding) is simplified (Douglas-Peucker, tolerance from half a pixel up) so that the
SR's Graphic Data stays small enough to be sent inline in DICOMweb metadata, which is
where OHIF reads it, rather than as bulk data.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy import ndimage

Vertex = tuple[int, int]  # (column, row)

#: Most points of one outline (radtriage's DICOMweb inlines values up to 1024 numbers).
MAX_POINTS = 256


def _largest_part(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)  # 4-connected: the SEG's pixels as drawn
    if count > 1:
        sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, count + 1))
        mask = labels == int(np.argmax(sizes)) + 1
    return ndimage.binary_fill_holes(mask)


def _boundary_edges(mask: np.ndarray) -> dict[Vertex, list[Vertex]]:
    """Directed pixel edges between the mask and the background, clockwise on screen."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1]
    edges: dict[Vertex, list[Vertex]] = defaultdict(list)
    sides = (  # neighbour offset (row, column), edge start and end as corner offsets (column, row)
        ((-1, 0), (0, 0), (1, 0)),  # top: left to right
        ((0, 1), (1, 0), (1, 1)),  # right: top to bottom
        ((1, 0), (1, 1), (0, 1)),  # bottom: right to left
        ((0, -1), (0, 1), (0, 0)),  # left: bottom to top
    )
    for (dr, dc), (sx, sy), (ex, ey) in sides:
        neighbour = padded[1 + dr : padded.shape[0] - 1 + dr, 1 + dc : padded.shape[1] - 1 + dc]
        for r, c in zip(*np.nonzero(inner & ~neighbour), strict=True):
            edges[(int(c) + sx, int(r) + sy)].append((int(c) + ex, int(r) + ey))
    return edges


def _circuit(edges: dict[Vertex, list[Vertex]], start: Vertex) -> list[Vertex]:
    """Every edge once (Hierholzer): the outline may touch itself where pixels meet diagonally."""
    stack, path = [start], []
    while stack:
        vertex = stack[-1]
        if edges.get(vertex):
            stack.append(edges[vertex].pop())
        else:
            path.append(stack.pop())
    return path[::-1]


def _without_straight_runs(points: list[Vertex]) -> list[Vertex]:
    kept = [points[0]]
    for here, after in zip(points[1:-1], points[2:], strict=True):
        before = kept[-1]
        if (here[0] - before[0]) * (after[1] - here[1]) != (here[1] - before[1]) * (after[0] - here[0]):
            kept.append(here)
    kept.append(points[-1])
    return kept


def _simplified(points: np.ndarray, tolerance: float) -> np.ndarray:
    """Douglas-Peucker on an open polyline: its end points are always kept."""
    keep = np.zeros(len(points), dtype=bool)
    keep[[0, -1]] = True
    spans = [(0, len(points) - 1)]
    while spans:
        first, last = spans.pop()
        if last - first < 2:
            continue
        start, end = points[first], points[last]
        direction = end - start
        length = float(np.hypot(*direction))
        between = points[first + 1 : last] - start
        if length == 0:
            distance = np.hypot(between[:, 0], between[:, 1])
        else:
            distance = np.abs(direction[0] * between[:, 1] - direction[1] * between[:, 0]) / length
        farthest = int(np.argmax(distance))
        if distance[farthest] > tolerance:
            middle = first + 1 + farthest
            keep[middle] = True
            spans += [(first, middle), (middle, last)]
    return points[keep]


def outline(mask: np.ndarray) -> np.ndarray:
    """Closed outline of ``mask`` (rows, columns) as ``(n, 2)`` float (column, row) points.

    The first point is repeated at the end (a closed POLYLINE).

    Raises
    ------
    ValueError
        When the mask is empty: there is nothing to outline.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2 or not mask.any():
        raise ValueError("outline needs a 2D mask with at least one pixel")
    part = _largest_part(mask)
    edges = _boundary_edges(part)
    r, c = np.argwhere(part)[0]  # first pixel in raster order: its top left corner is a convex corner
    points = np.asarray(_without_straight_runs(_circuit(edges, (int(c), int(r)))), dtype=np.float64)
    tolerance = 0.5
    while len(points) > MAX_POINTS:
        # Split the closed outline at its farthest point from the start, simplify both halves.
        far = int(np.argmax(np.hypot(*(points - points[0]).T)))
        points = np.concatenate([_simplified(points[: far + 1], tolerance)[:-1], _simplified(points[far:], tolerance)])
        tolerance *= 2
    return points.astype(np.float32)
