"""OHIF opens the bleed study with its AI results: the CT, the SEG drawn over it, the SR's findings."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

from tests.peers import ohif

from .conftest import WebEnv, login
from .seed import SPACING
from .test_viewer import _watch, needs_ohif

SCREENSHOT_ENV = "RADTRIAGE_SCREENSHOT_DIR"


def _save_screenshot(page: object, name: str) -> None:
    """For the README's screenshot script: the viewer as the reader sees it, when asked for."""
    folder = os.environ.get(SCREENSHOT_ENV)
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name))  # type: ignore[attr-defined]


@needs_ohif
@pytest.mark.slow  # the web server and Chromium
def test_bleed_opens_with_its_segmentation_and_findings(page: object, web: WebEnv) -> None:
    seen = _watch(page, web.url)
    bleed = web.bleed
    key_uid = bleed.sop_uids[bleed.key_index]
    seg = pydicom.dcmread(web.archive.path_of(bleed.seg_uid), stop_before_pixels=True)
    label = str(seg.SegmentSequence[0].SegmentLabel)
    number = {
        uid: int(pydicom.dcmread(web.archive.path_of(uid), stop_before_pixels=True).InstanceNumber)
        for uid in bleed.sop_uids
    }
    empty = next(i for i, plane in enumerate(bleed.mask) if not plane.any())

    login(page)
    ohif.open_study_in_viewer(page, bleed.StudyInstanceUID)
    ohif.wait_for_slice(page, number[key_uid])  # on the key image, not on slice 1
    entry = ohif.show_segmentation(page, label)
    assert entry.is_visible()

    # The mask is drawn in colour over the grey CT on the key image ...
    key_view = ohif.viewport_pixels(page)
    assert key_view.max() > 200 and key_view.std() > 20  # a head, not a blank canvas
    overlay = ohif.red(ohif.viewport_pixels(page))
    assert overlay.sum() > 100, "no segmentation pixels on the key image"
    _save_screenshot(page, "viewer-bleed.png")

    # ... and scrolling to a slice without the finding changes the image and leaves no colour.
    ohif.scroll(page, number[bleed.sop_uids[empty]] - number[key_uid])
    ohif.wait_for_slice(page, number[bleed.sop_uids[empty]])
    moved = ohif.viewport_pixels(page)
    assert np.abs(moved.astype(int) - key_view.astype(int)).mean() > 1
    assert ohif.red(moved).sum() < overlay.sum() / 20

    # The SR's findings beside its key image.
    report = ohif.wait_for_report(page, ["Volume", "Diameter", "Probability"])
    volume_ml = bleed.mask.sum() * np.prod(SPACING) / 1000.0  # as the seed wrote it
    for shown in (f"Volume: {volume_ml:.2f} ml", "Diameter: 39.60 mm", "Probability: 0.97"):
        assert shown in report, report
    assert seen == {"csp": [], "errors": [], "remote": []}
