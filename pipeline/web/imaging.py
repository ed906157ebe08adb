"""Server-side rendering of CT slices with the AI segmentation drawn over them.

A slice is read from the archive, converted to Hounsfield units (modality LUT), put
through a CT window and, where a DICOM SEG has frames for that slice, overlaid with
each segment's recommended display colour as a translucent fill with a solid outline
(or the outline only). Results are PNG bytes at the image's own size (Rows ×
Columns); they are kept in an LRU cache, so scrolling back and forth costs nothing.

SEG frames are matched to slices by highdicom's SEG reader, through each frame's
Derivation Image Sequence (Source Image Sequence), which every SEG written by radtriage
and by highdicom has; a SEG without it is shown without overlay (and logged), never an
error.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from highdicom.color import CIELabColor
from PIL import Image
from pydicom.pixels import apply_modality_lut
from scipy import ndimage

from pipeline.errors import RadtriageError

log = logging.getLogger(__name__)

# name -> (label, centre, width) in HU
WINDOWS: dict[str, tuple[str, float, float]] = {
    "brain": ("Brain (40/80)", 40.0, 80.0),
    "subdural": ("Subdural (75/215)", 75.0, 215.0),
    "stroke": ("Stroke (40/40)", 40.0, 40.0),
    "soft": ("Soft tissue (40/400)", 40.0, 400.0),
    "lung": ("Lung (-600/1500)", -600.0, 1500.0),
    "bone": ("Bone (600/2800)", 600.0, 2800.0),
}
OVERLAYS = {"fill": "Fill + outline", "outline": "Outline", "none": "No overlay"}
FILL_ALPHA = 0.4
_FALLBACK_COLOURS = [(255, 0, 0), (255, 255, 0), (0, 255, 0), (0, 255, 255), (0, 0, 255), (255, 0, 255)]
_HEAD_WORDS = ("HEAD", "BRAIN", "SKULL", "CRAN", "NEURO", "CEREBR")


class NotAnImage(RadtriageError):
    """The object has no pixel data to show (an SR, for one)."""


def default_window(body_parts: list[str], descriptions: list[str]) -> str:
    """``brain`` for a head CT (by Body Part Examined or description), else ``soft``."""
    text = " ".join(body_parts + descriptions).upper()
    return "brain" if any(word in text for word in _HEAD_WORDS) else "soft"


@dataclass
class SegOverlay:
    """The frames of one SEG, by source SOP Instance UID."""

    masks: dict[str, list[tuple[int, np.ndarray]]] = field(default_factory=dict)
    colours: dict[int, tuple[int, int, int]] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)


def read_seg_overlay(path: Path) -> SegOverlay:
    """Read a binary or fractional SEG into per-source-image boolean masks."""
    ds = pydicom.dcmread(path)
    overlay = SegOverlay()
    for segment in ds.get("SegmentSequence", []):
        number = int(segment.SegmentNumber)
        overlay.labels[number] = str(segment.get("SegmentLabel", number))
        lab = segment.get("RecommendedDisplayCIELabValue")
        if lab is not None:
            overlay.colours[number] = tuple(int(c) for c in CIELabColor.from_dicom_value(list(lab)).to_rgb())  # type: ignore[assignment]
        else:
            overlay.colours[number] = _FALLBACK_COLOURS[(number - 1) % len(_FALLBACK_COLOURS)]
    try:
        # highdicom's reader maps every frame to its source image and segment.
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        numbers = list(seg.get_segment_numbers())
        sources = [sop for _, _, sop in seg.get_source_image_uids()]
        pixels = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=sources,
            segment_numbers=numbers,
            ignore_spatial_locations=True,
            skip_overlap_checks=True,
        )
    except (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError) as err:
        log.warning("SEG %s cannot be mapped to its source images (%s); it is not drawn", ds.SOPInstanceUID, err)
        return overlay
    # Binary frames come back 0/1, fractional ones rescaled to 0..1: more than half is in.
    threshold = 0.5 if ds.get("SegmentationType") == "FRACTIONAL" else 0
    for i, source in enumerate(sources):
        for j, number in enumerate(numbers):
            mask = pixels[i, :, :, j] > threshold
            if mask.any():
                overlay.masks.setdefault(source, []).append((number, mask))
    return overlay


def window_to_grey(hu: np.ndarray, centre: float, width: float) -> np.ndarray:
    """Linear CT window to 0-255 (values below black, above white)."""
    low = centre - width / 2.0
    scaled = (hu.astype(np.float32) - low) * (255.0 / max(width, 1.0))
    return np.clip(scaled, 0, 255).astype(np.uint8)


def draw_overlay(
    rgb: np.ndarray, masks: list[tuple[int, np.ndarray]], colours: dict[int, tuple[int, int, int]], mode: str
) -> np.ndarray:
    """Draw each segment mask on ``rgb`` (rows, columns, 3) as fill + outline, or outline only."""
    if mode == "none" or not masks:
        return rgb
    out = rgb.astype(np.float32)
    for number, mask in masks:
        if mask.shape != rgb.shape[:2]:
            log.warning("SEG frame of segment %d is %s, image is %s: not drawn", number, mask.shape, rgb.shape[:2])
            continue
        colour = np.array(colours.get(number, _FALLBACK_COLOURS[0]), dtype=np.float32)
        if mode == "fill":
            out[mask] = out[mask] * (1.0 - FILL_ALPHA) + colour * FILL_ALPHA
        edge = mask & ~ndimage.binary_erosion(mask)
        out[edge] = colour
    return np.clip(out, 0, 255).astype(np.uint8)


def _first(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value[0] if isinstance(value, (list, tuple, pydicom.multival.MultiValue)) else value)  # type: ignore[arg-type,index]
    except (TypeError, ValueError, IndexError):
        return None


def frame_pixels(ds: pydicom.Dataset, frame: int = 0) -> np.ndarray:
    """Frame ``frame`` (0-based) of ``ds`` as stored values (rows, columns[, samples])."""
    if "PixelData" not in ds:
        raise NotAnImage(f"{ds.get('Modality', 'the object')} {ds.get('SOPInstanceUID', '')} has no pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if not 0 <= frame < frames:
        raise NotAnImage(f"frame {frame + 1} is beyond the {frames} frame(s) of the instance")
    pixels = ds.pixel_array
    return pixels[frame] if frames > 1 else pixels


def render_frame(
    ds: pydicom.Dataset,
    frame: int = 0,
    *,
    window: tuple[float, float] | None = None,
    size: tuple[int, int] | None = None,
    media_type: str = "image/png",
    quality: int = 90,
) -> bytes:
    """One frame as PNG or JPEG for a viewer: modality LUT, then ``window`` (centre,
    width), else the instance's own window, else its value range; MONOCHROME1 inverted;
    fitted into ``size`` (width, height) keeping the aspect ratio."""
    pixels = frame_pixels(ds, frame)
    if pixels.ndim == 3:  # colour: as it is
        image = Image.fromarray(pixels.astype(np.uint8))
    else:
        values = apply_modality_lut(pixels, ds)
        if window is None:
            centre, width = _first(ds.get("WindowCenter")), _first(ds.get("WindowWidth"))
            if centre is None or width is None:
                low, high = float(np.min(values)), float(np.max(values))
                centre, width = (low + high) / 2, max(high - low, 1.0)
            window = (centre, width)
        grey = window_to_grey(values, *window)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            grey = 255 - grey
        image = Image.fromarray(grey)
    if size is not None:
        image.thumbnail(size, Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    if media_type == "image/jpeg":
        image.convert("RGB" if image.mode not in ("L", "RGB") else image.mode).save(
            buffer, format="JPEG", quality=quality
        )
    else:
        image.save(buffer, format="PNG", compress_level=3)
    return buffer.getvalue()


class SliceRenderer:
    """Renders slices as PNG, caching both the PNGs and the parsed SEGs.

    Parameters
    ----------
    path_of
        Maps a SOP Instance UID to its file in the archive.
    cache_size
        How many rendered PNGs to keep (a 512×512 slice is about 150 kB).
    """

    def __init__(self, path_of: Callable[[str], Path], cache_size: int = 768) -> None:
        self._path_of = path_of
        self._cache_size = cache_size
        self._pngs: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self._segs: OrderedDict[str, SegOverlay] = OrderedDict()
        self._lock = threading.Lock()

    def render_png(self, sop_instance_uid: str, *, window: str, overlay: str, seg_uids: tuple[str, ...]) -> bytes:
        """The slice as PNG (Rows × Columns, RGB) with the overlays of ``seg_uids``."""
        if window not in WINDOWS:
            raise ValueError(f"unknown window {window!r}; choose one of {', '.join(WINDOWS)}")
        if overlay not in OVERLAYS:
            raise ValueError(f"unknown overlay {overlay!r}; choose one of {', '.join(OVERLAYS)}")
        key = (sop_instance_uid, window, overlay, seg_uids)
        with self._lock:
            if key in self._pngs:
                self._pngs.move_to_end(key)
                return self._pngs[key]
        png = self._render(sop_instance_uid, window, overlay, seg_uids)
        with self._lock:
            self._pngs[key] = png
            while len(self._pngs) > self._cache_size:
                self._pngs.popitem(last=False)
        return png

    def seg_overlay(self, seg_uid: str) -> SegOverlay:
        with self._lock:
            if seg_uid in self._segs:
                return self._segs[seg_uid]
        parsed = read_seg_overlay(self._path_of(seg_uid))
        with self._lock:
            self._segs[seg_uid] = parsed
            while len(self._segs) > 16:
                self._segs.popitem(last=False)
        return parsed

    def _render(self, sop_instance_uid: str, window: str, overlay: str, seg_uids: tuple[str, ...]) -> bytes:
        ds = pydicom.dcmread(self._path_of(sop_instance_uid))
        if "PixelData" not in ds:
            raise NotAnImage(f"{ds.get('Modality', 'the object')} {sop_instance_uid} has no pixel data")
        pixels = ds.pixel_array
        if pixels.ndim != 2:
            pixels = pixels[0]  # multi-frame: the first frame
        hu = apply_modality_lut(pixels, ds)
        _, centre, width = WINDOWS[window]
        grey = window_to_grey(hu, centre, width)
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            grey = 255 - grey
        rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
        for seg_uid in seg_uids:
            seg = self.seg_overlay(seg_uid)
            rgb = draw_overlay(rgb, seg.masks.get(sop_instance_uid, []), seg.colours, overlay)
        buffer = io.BytesIO()
        Image.fromarray(rgb).save(buffer, format="PNG", compress_level=3)
        return buffer.getvalue()
