"""Screenshots for the README, from the real running system.

Starts ``radtriage serve`` (embedded Prefect), sends the demo studies, waits until they
are analysed, logs in with headless Chromium at 1280×800 and saves to ``docs/screenshots/``:
the worklist, the critical-finding banner, the page of the most urgent study, and that
study in the OHIF viewer with its AI segmentation over the CT and the SR's findings
(``make viewer`` first).

Usage: ``.venv/bin/python scripts/screenshots.py``
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.peers import ohif  # noqa: E402
from tests.peers.chromium import CHROMIUM, CHROMIUM_ARGS  # noqa: E402
from tests.peers.radtriage import RadtriageServer  # noqa: E402


def send_large_bleed(folder: Path, ae_title: str, port: int) -> None:
    """A synthetic head CT with a ~60 ml subdural bleed (critical above 30 ml), sent with dcmtk."""
    import os
    import subprocess

    from pipeline.lab.phantom.generator import make_head_ct
    from pipeline.lab.synth import synth_study

    def subdural(shape: tuple[int, int, int], spacing: tuple[float, float, float], rng: object) -> object:
        volume, _, _ = make_head_ct(
            2, "hemorrhage", kinds=["subdural"], slices=shape[0], rows=shape[1], columns=shape[2],
            slice_thickness=spacing[0], pixel_spacing=spacing[1],
        )  # fmt: skip
        return volume

    files = synth_study(folder, seed=2, slices=32, volume=subdural, PatientName="Lindqvist^Anna")
    env = {**os.environ, "TCP_NODELAY": "1"}
    subprocess.run(["storescu", "-aec", ae_title, "127.0.0.1", str(port), *map(str, files)], env=env, check=True)


def main() -> int:
    from playwright.sync_api import sync_playwright

    out = ROOT / "docs" / "screenshots"
    out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory(prefix="radtriage-shots-") as tmp,
        RadtriageServer(Path(tmp), prefect_api_url=None, env={"RADTRIAGE_TRIAGE__STABLE_AGE_SECONDS": "2"}) as server,
    ):
        sent = server.cli("demo", "--to", f"{server.ae_title}@127.0.0.1:{server.dicom_port}", "--studies", "5")
        print(sent.stdout, sent.stderr)
        studies = server.wait_for(
            lambda wl: len(wl) == 5 and all(s["ai_status"] in ("done", "failed", "not_applicable") for s in wl),
            timeout=600,
            what="the demo studies analysed",
        )
        top = studies[0]["StudyInstanceUID"]
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(
                viewport={"width": 1280, "height": 800}, base_url=f"http://127.0.0.1:{server.web_port}"
            )
            page.goto("/login")
            page.fill("#username", server.user[0])
            page.fill("#password", server.user[1])
            page.click("button[type=submit]")
            page.wait_for_url("**/worklist")
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "worklist.png"))
            # A large subdural bleed arrives while the worklist is open: the banner rises.
            send_large_bleed(Path(tmp) / "critical", server.ae_title, server.dicom_port)
            page.locator(".alert-critical").first.wait_for(timeout=600_000)
            page.wait_for_timeout(500)
            page.screenshot(path=str(out / "critical-banner.png"), clip={"x": 0, "y": 0, "width": 1280, "height": 320})
            page.goto(f"/studies/{top}")
            page.wait_for_load_state("networkidle")
            page.screenshot(path=str(out / "study.png"))
            page.set_viewport_size({"width": 1600, "height": 900})
            ohif.open_study_in_viewer(page, top)
            ohif.show_segmentation(page, "Intracranial hemorrhage")
            ohif.wait_until_drawn(page, 1)
            page.wait_for_timeout(1500)  # the SEG's fill and the SR's outline fade in
            page.screenshot(path=str(out / "viewer.png"))
            browser.close()
    print(f"saved {', '.join(sorted(p.name for p in out.glob('*.png')))} in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
