"""The worklist in real headless Chromium: login, order, key image with overlay, read state, live update."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from pipeline.index.triage import AIStatus

from .conftest import WebEnv, login
from .seed import SHAPE, seed_study

pytestmark = pytest.mark.slow  # the web server and Chromium

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _screenshot(page: object, tmp_path: Path, name: str) -> Path:
    """Save a 1280x800 screenshot; copied to $RADTRIAGE_SCREENSHOTS_DIR (e.g. docs/screenshots) when set."""
    path = tmp_path / name
    page.screenshot(path=str(path))  # type: ignore[attr-defined]
    assert Image.open(path).size == (1280, 800)
    target = os.environ.get("RADTRIAGE_SCREENSHOTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / name)
    return path


def _row_uids(page: object) -> list[str]:
    return page.eval_on_selector_all("#rows tr.row", "rows => rows.map(r => r.dataset.uid)")  # type: ignore[attr-defined]


def _coloured(rgb: np.ndarray) -> np.ndarray:
    """Pixels that are not grey: the overlay (the CT itself is drawn in grey levels only)."""
    rgb = rgb.astype(int)
    return (np.abs(rgb[..., 0] - rgb[..., 1]) > 30) | (np.abs(rgb[..., 0] - rgb[..., 2]) > 30)


def _fetch_png(page: object, src: str) -> np.ndarray:
    response = page.request.get(src)  # type: ignore[attr-defined]
    assert response.status == 200 and response.headers["content-type"] == "image/png"
    body = response.body()
    assert body.startswith(PNG_SIGNATURE)
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


def test_login_then_bleed_above_routine(page: object, web: WebEnv, tmp_path: Path) -> None:
    login(page)
    uids = _row_uids(page)
    assert set(uids) == {
        web.bleed.StudyInstanceUID,
        web.routine.StudyInstanceUID,
        web.failed.StudyInstanceUID,
        web.pending.StudyInstanceUID,
    }
    # Routine arrived 42 min ago, the bleed 7 min ago: only priority puts the bleed first.
    assert uids[0] == web.bleed.StudyInstanceUID
    assert uids.index(web.bleed.StudyInstanceUID) < uids.index(web.routine.StudyInstanceUID)
    first = page.locator("#rows tr.row").first  # type: ignore[attr-defined]
    assert first.locator(".badge").inner_text().strip().lower() == "critical"
    summary = first.locator("td.finding").inner_text()
    assert "Hemorrhage" in summary and " ml" in summary and "p 0.97" in summary
    failed = page.locator(f'#rows tr[data-uid="{web.failed.StudyInstanceUID}"] .ai')  # type: ignore[attr-defined]
    assert failed.inner_text().startswith("failed")
    assert "at least 8" in failed.get_attribute("title")
    pending = page.locator(f'#rows tr[data-uid="{web.pending.StudyInstanceUID}"] .ai')  # type: ignore[attr-defined]
    assert pending.inner_text() == "pending"
    assert "decision support, not a diagnosis" in page.inner_text(".notice")  # type: ignore[attr-defined]
    # Every stylesheet and script comes from this server (no CDN).
    sources = page.eval_on_selector_all(
        "link[href], script[src]",  # type: ignore[attr-defined]
        "els => els.map(e => e.href || e.src)",
    )
    assert sources and all(s.startswith(web.url) for s in sources)
    _screenshot(page, tmp_path, "worklist.png")


def test_search_and_filters(page: object, web: WebEnv) -> None:
    login(page)
    page.fill("#search", "garcia maria")  # type: ignore[attr-defined]
    page.press("#search", "Enter")  # type: ignore[attr-defined]
    page.wait_for_url("**q=garcia*")  # type: ignore[attr-defined]
    assert _row_uids(page) == [web.bleed.StudyInstanceUID]
    page.goto("/worklist")  # type: ignore[attr-defined]
    page.select_option("select[name=status]", "failed")  # type: ignore[attr-defined]
    page.wait_for_url("**status=failed*")  # type: ignore[attr-defined]
    assert _row_uids(page) == [web.failed.StudyInstanceUID]


def test_study_page_key_image_overlay_and_slider(page: object, web: WebEnv, tmp_path: Path) -> None:
    login(page)
    page.click(f'#rows tr[data-uid="{web.bleed.StudyInstanceUID}"] td.name a')  # type: ignore[attr-defined]
    page.wait_for_url(f"**/studies/{web.bleed.StudyInstanceUID}")  # type: ignore[attr-defined]
    img = page.locator("#slice")  # type: ignore[attr-defined]
    page.wait_for_function(
        "() => document.getElementById('slice').complete && document.getElementById('slice').naturalWidth > 0"
    )  # type: ignore[attr-defined]
    _, rows, columns = SHAPE
    assert page.evaluate(
        "() => [document.getElementById('slice').naturalWidth, document.getElementById('slice').naturalHeight]"
    ) == [columns, rows]  # type: ignore[attr-defined]
    src = img.get_attribute("src")
    assert web.bleed.sop_uids[web.bleed.key_index] in src and "window=brain" in src  # head CT: brain window
    key = _fetch_png(page, src)
    assert key.shape == (rows, columns, 3)
    assert key[..., 0].std() > 20  # an image, not a blank
    mask = web.bleed.mask[web.bleed.key_index]
    drawn = _coloured(key)
    assert drawn.sum() > 0
    assert not (drawn & ~mask).any(), "overlay pixels outside the segmentation"
    assert (drawn & mask).sum() >= 0.95 * mask.sum()
    _screenshot(page, tmp_path, "study.png")

    findings = page.inner_text("#findings")  # type: ignore[attr-defined]
    assert "Hemorrhage" in findings and "ich-detector 1.2.0" in findings and "0.97" in findings

    # Overlay off: the same slice in grey only.
    page.select_option("#overlay", "none")  # type: ignore[attr-defined]
    page.wait_for_function("() => document.getElementById('slice').src.includes('overlay=none')")  # type: ignore[attr-defined]
    assert not _coloured(_fetch_png(page, img.get_attribute("src"))).any()
    page.select_option("#overlay", "fill")  # type: ignore[attr-defined]

    # Scroll to a slice without the bleed, then to one with it: the overlay follows the mask.
    page.locator("#slider").fill("1")  # type: ignore[attr-defined]
    page.wait_for_function(f"() => document.getElementById('slice').src.includes('{web.bleed.sop_uids[1]}')")  # type: ignore[attr-defined]
    assert not _coloured(_fetch_png(page, img.get_attribute("src"))).any()
    page.locator("#slider").fill("4")  # type: ignore[attr-defined]
    page.wait_for_function(f"() => document.getElementById('slice').src.includes('{web.bleed.sop_uids[4]}')")  # type: ignore[attr-defined]
    drawn4 = _coloured(_fetch_png(page, img.get_attribute("src")))
    assert drawn4.any() and not (drawn4 & ~web.bleed.mask[4]).any()
    assert page.inner_text("#slice-label").startswith("5 / 12")  # type: ignore[attr-defined]

    # The SEG download is the SEG in the archive.
    seg = page.request.get(page.get_attribute("a.dl-seg", "href"))  # type: ignore[attr-defined]
    assert seg.status == 200 and seg.headers["content-type"] == "application/dicom"
    ds = pydicom.dcmread(io.BytesIO(seg.body()))
    assert ds.Modality == "SEG" and ds.SOPInstanceUID == web.bleed.seg_uid
    sr = page.request.get(page.get_attribute("a.dl-sr", "href"))  # type: ignore[attr-defined]
    assert pydicom.dcmread(io.BytesIO(sr.body())).SOPInstanceUID == web.bleed.sr_uid


def test_mark_read_moves_study_down(page: object, web: WebEnv) -> None:
    login(page)
    uid = web.bleed.StudyInstanceUID
    assert _row_uids(page)[0] == uid
    page.goto(f"/studies/{uid}")  # type: ignore[attr-defined]
    page.click("#mark-read")  # type: ignore[attr-defined]
    page.wait_for_url("**/worklist")  # type: ignore[attr-defined]
    uids = _row_uids(page)
    unread = page.eval_on_selector_all('#rows tr.row[data-read="no"]', "rows => rows.map(r => r.dataset.uid)")  # type: ignore[attr-defined]
    assert uid not in unread and uids.index(uid) == len(unread), "a read study sits below every unread one"
    assert "alice" in page.inner_text(f'#rows tr[data-uid="{uid}"]')  # type: ignore[attr-defined]
    page.goto(f"/studies/{uid}")  # type: ignore[attr-defined]
    assert page.inner_text("#read-state").startswith("Read by alice")  # type: ignore[attr-defined]
    page.click("#mark-unread")  # type: ignore[attr-defined]
    page.wait_for_selector("#mark-read")  # type: ignore[attr-defined]
    page.goto("/worklist")  # type: ignore[attr-defined]
    assert _row_uids(page)[0] == uid


def test_new_critical_study_appears_on_top_without_reload(page: object, web: WebEnv) -> None:
    login(page)
    page.evaluate("() => { window.__noReload = true; }")  # type: ignore[attr-defined]
    # Arrived 60 min ago, flagged now: it belongs above the bleed seen so far.
    new = seed_study(
        web.archive,
        web.folder,
        seed=21,
        name="Silva^Ines",
        accession="ACC2001",
        bleed=True,
        ai_status=AIStatus.done,
        minutes_ago=60,
        shape=(12, 64, 64),
    )
    page.wait_for_function(  # type: ignore[attr-defined]
        f"() => {{ const r = document.querySelector('#rows tr.row'); return r && r.dataset.uid === '{new.StudyInstanceUID}'; }}",
        timeout=10_000,
    )
    assert page.evaluate("() => window.__noReload") is True  # type: ignore[attr-defined]
    classes = page.locator("#rows tr.row").first.get_attribute("class") or ""
    assert "flash" in classes and "fresh" in classes  # type: ignore[attr-defined]
