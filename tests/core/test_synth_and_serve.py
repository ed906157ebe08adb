"""``radtriage synth`` writes valid CT; ``radtriage serve`` starts, logs where it
listens and stops cleanly on SIGTERM/SIGINT."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from pipeline.lab.synth import head_phantom, synth_study
from tests.core.conftest import ENV, ROOT, ServeProcess, echoscu, require_tool, write_config


def test_synth_cli_writes_a_valid_ct_series(tmp_path: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "synth",
            "--out",
            str(tmp_path / "s"),
            "--seed",
            "4",
            "--slices",
            "6",
            "--rows",
            "96",
            "--cols",
            "96",
        ],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    files = sorted((tmp_path / "s").glob("*.dcm"))
    assert len(files) == 6
    check = subprocess.run([require_tool("dciodvfy"), str(files[0])], capture_output=True, text=True)
    problems = [line for line in (check.stdout + check.stderr).splitlines() if line.startswith(("Error", "Warning"))]
    assert problems == []
    slices = [dcmread(f) for f in files]
    assert {s.SeriesInstanceUID for s in slices} == {slices[0].SeriesInstanceUID}
    assert [float(s.ImagePositionPatient[2]) for s in slices] == [0.0, 5.0, 10.0, 15.0, 20.0, 25.0]
    assert (slices[0].Modality, slices[0].BodyPartExamined) == ("CT", "HEAD")
    hu = slices[3].pixel_array * float(slices[3].RescaleSlope) + float(slices[3].RescaleIntercept)
    assert hu.min() <= -990 and hu.max() >= 1000  # air and skull
    brain = (hu > 15) & (hu < 50)
    csf = (hu > -10) & (hu < 15)
    assert brain.mean() > 0.2 and csf.mean() > 0.01  # brain with ventricles inside the skull


def test_same_seed_same_study_other_seed_other_patient(tmp_path: Path) -> None:
    a = dcmread(synth_study(tmp_path / "a", seed=9, slices=1, rows=32, cols=32)[0])
    b = dcmread(synth_study(tmp_path / "b", seed=9, slices=1, rows=32, cols=32)[0])
    c = dcmread(synth_study(tmp_path / "c", seed=10, slices=1, rows=32, cols=32)[0])
    assert (a.StudyInstanceUID, a.PatientName, a.AccessionNumber) == (
        b.StudyInstanceUID,
        b.PatientName,
        b.AccessionNumber,
    )
    assert a.StudyInstanceUID != c.StudyInstanceUID and a.PatientID != c.PatientID


def test_synth_takes_a_volume_generator(tmp_path: Path) -> None:
    def with_blob(shape, spacing, rng):  # type: ignore[no-untyped-def]
        vol = head_phantom(shape, spacing, rng)
        vol[:, 10:14, 10:14] = 70.0
        return vol

    ds = dcmread(synth_study(tmp_path, seed=1, slices=2, rows=64, cols=64, volume=with_blob)[0])
    hu = ds.pixel_array.astype(float) + float(ds.RescaleIntercept)
    assert np.all(hu[10:14, 10:14] == 70.0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_serve_stops_cleanly(sig: int, tmp_path: Path) -> None:
    server = ServeProcess(write_config(tmp_path / "c.toml", tmp_path / "data")).start()
    assert echoscu(server.port).returncode == 0
    assert server.kill(sig) == 0
    log = server.wait_log("radtriage stopped")
    assert f"listening on 127.0.0.1:{server.port}" in log
    assert "Traceback" not in log


@pytest.mark.slow
def test_serve_refuses_a_bad_config_in_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[dicom]\nport = "eleven"\n')
    out = subprocess.run(
        [sys.executable, "-m", "pipeline", "--config", str(bad), "serve"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert out.stderr.count("\n") == 1 and "dicom.port" in out.stderr
