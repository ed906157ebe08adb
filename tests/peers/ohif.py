"""Driving OHIF 3 in headless Chromium as a radiologist does, for the tests and the screenshot script.

Every step waits on what the reader would see (a rendered slice, a panel entry, a slice
number), never on time. Selectors are OHIF's own ``data-cy`` attributes where it has
them. The page must already be logged in to radtriage.

With radtriage's hanging protocol (``pipeline.web.viewer.ai_protocol``) a study with AI
results opens in two viewports: 0, the image series with the SEG over it, on the key
image; 1, the SR's key image with the finding outlined and its values beside it.
"""

from __future__ import annotations

import io
import re
from typing import Any

import numpy as np

LOAD_MS = 60_000  # a cold start on two cores with SwiftShader; a warm one takes a few seconds
STEP_MS = 15_000

Page = Any  # playwright.sync_api.Page: typed loosely so importing this needs no Playwright


def viewport(page: Page, index: int = 0) -> Any:
    """The ``index``-th viewport pane of the grid."""
    return page.locator('[data-cy="viewport-pane"]').nth(index)


def viewport_pixels(page: Page, index: int = 0) -> np.ndarray:
    """What the reader sees in the viewport's image area: ``(rows, columns, RGB)`` uint8.

    A screenshot, not ``canvas.toDataURL``: WebGL canvases read back blank.
    """
    from PIL import Image

    png = viewport(page, index).locator("canvas.cornerstone-canvas").screenshot()
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def red(pixels: np.ndarray, margin: int = 12) -> np.ndarray:
    """Red pixels inside the image area: a CT is drawn in grey, radtriage's first segment
    in red (RecommendedDisplayCIELabValue), OHIF's frame and scroll bar in blue."""
    channels = pixels.astype(np.int16)
    found = channels[..., 0] - np.maximum(channels[..., 1], channels[..., 2]) > 60
    found[:margin], found[-margin:], found[:, :margin], found[:, -margin:] = False, False, False, False
    return found  # type: ignore[no-any-return]


def wait_until_drawn(page: Page, index: int = 0, timeout_ms: int = LOAD_MS) -> None:
    """Wait until the viewport's canvas shows an image, not a black rectangle."""
    canvas = viewport(page, index).locator("canvas.cornerstone-canvas")
    canvas.wait_for(timeout=timeout_ms)
    page.wait_for_function(
        "(el) => el.width > 0 && el.height > 0",
        arg=canvas.element_handle(),
        timeout=timeout_ms,
    )
    deadline = page.evaluate("Date.now()") + timeout_ms
    while viewport_pixels(page, index).max() < 32:  # a rendered slice has a bright skull
        if page.evaluate("Date.now()") > deadline:
            raise AssertionError(f"viewport {index} stayed blank for {timeout_ms} ms")
        page.wait_for_timeout(100)


def wait_for_slice(page: Page, instance_number: int, index: int = 0, timeout_ms: int = STEP_MS) -> None:
    """Wait until the viewport's overlay says it shows the image with ``instance_number`` (``I: n (``)."""
    overlay = viewport(page, index).locator('[data-cy="viewport-overlay-bottom-right"]')
    overlay.get_by_text(re.compile(rf"^I:\s*{instance_number}\s*\(")).wait_for(timeout=timeout_ms)


def slice_number(page: Page, index: int = 0) -> int:
    """The instance number the viewport's overlay shows."""
    text = viewport(page, index).locator('[data-cy="viewport-overlay-bottom-right"]').inner_text()
    match = re.search(r"I:\s*(\d+)", text)
    assert match, text
    return int(match.group(1))


def scroll(page: Page, slices: int, index: int = 0, timeout_ms: int = STEP_MS) -> int:
    """Turn the mouse wheel over the viewport, one notch at a time, until it has moved
    ``slices`` images (positive: towards higher instance numbers, which in OHIF is the
    wheel turned up); returns the instance number shown then."""
    box = viewport(page, index).bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    shown = slice_number(page, index)
    for _ in range(abs(slices)):
        page.mouse.wheel(0, -100 if slices > 0 else 100)
        deadline = page.evaluate("Date.now()") + timeout_ms
        # Polled, not watched: OHIF renders a new overlay element for every slice.
        while (now := slice_number(page, index)) == shown:
            if page.evaluate("Date.now()") > deadline:
                raise AssertionError(f"viewport {index} stayed on image {shown} after the wheel turned")
            page.wait_for_timeout(50)
        shown = now
    return shown


def open_study_in_viewer(page: Page, study_uid: str, timeout_ms: int = LOAD_MS) -> None:
    """From radtriage's study page, "Open in viewer", then wait until the images are drawn."""
    page.goto(f"/studies/{study_uid}")
    page.click("#open-viewer")
    page.wait_for_url("**/viewer/viewer?StudyInstanceUIDs=*")
    wait_until_drawn(page, 0, timeout_ms)


def show_segmentation(page: Page, segment_label: str, timeout_ms: int = LOAD_MS) -> Any:
    """Open OHIF's segmentation panel and wait until it lists ``segment_label``; returns that entry."""
    panel_button = page.locator('[data-cy="panelSegmentation-btn"]')
    entry = page.get_by_text(segment_label, exact=True)
    if not entry.first.is_visible():
        panel_button.click()
    entry.first.wait_for(timeout=timeout_ms)
    return entry.first


def wait_for_report(page: Page, values: list[str], index: int = 1, timeout_ms: int = LOAD_MS) -> str:
    """Wait until the SR viewport's measurement text shows every string in ``values``; returns it."""
    text = viewport(page, index).locator("svg text")
    page.wait_for_function(
        "([el, values]) => { const t = el ? el.textContent : ''; return values.every(v => t.includes(v)); }",
        arg=[viewport(page, index).element_handle(), values],
        timeout=timeout_ms,
    )
    return " ".join(text.all_text_contents())
