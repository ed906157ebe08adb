"""The writers on the project's own synthetic CT (pipeline.lab.synth), as the flow feeds them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom

from pipeline.ai.findings import Code, Finding, ModelResult, Priority
from pipeline.config import ResultSettings
from pipeline.lab.synth import write_ct_series
from pipeline.results import build_seg, build_sr, result_uids

from .ct import BRAIN, HEMORRHAGE, MODEL, MORPHOLOGY
from .dicomtools import dciodvfy, dsrdump


def test_results_on_a_synth_series_pass_the_validators(tmp_path: Path) -> None:
    volume = np.full((12, 48, 48), 30.0)
    paths = write_ct_series(volume, (5.0, 4.0, 4.0), tmp_path / "ct", seed=7)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    mask = np.zeros(volume.shape, dtype=bool)
    mask[5:8, 20:30, 18:26] = True
    result = ModelResult(
        model=MODEL,
        series_instance_uid=str(headers[0].SeriesInstanceUID),
        source_sop_instance_uids=[str(h.SOPInstanceUID) for h in headers],
        findings=[
            Finding(
                "hemorrhage",
                MORPHOLOGY,
                HEMORRHAGE,
                mask,
                0.88,
                True,
                mask.sum() * 0.08,
                40.0,
                Priority.CRITICAL,
                BRAIN,
            ),
            Finding(
                "mass",
                MORPHOLOGY,
                Code("4147007", "SCT", "Mass"),
                np.zeros_like(mask),
                0.02,
                False,
                0.0,
                0.0,
                Priority.ROUTINE,
            ),
        ],
    )
    uids = result_uids(str(headers[0].StudyInstanceUID), MODEL.name, MODEL.version, 0)
    settings = ResultSettings()
    seg = build_seg(headers, result, settings, series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_sop)
    sr = build_sr(headers, seg, result, settings, series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_sop)
    seg.save_as(tmp_path / "seg.dcm")
    sr.save_as(tmp_path / "sr.dcm")
    for path, iod in ((tmp_path / "seg.dcm", "Segmentation"), (tmp_path / "sr.dcm", "Comprehensive3DSR")):
        verdict = dciodvfy(path)
        assert (verdict.iod, verdict.errors) == (iod, []), verdict.output
    dump = dsrdump(tmp_path / "sr.dcm")
    assert dump.returncode == 0 and dump.stderr == "", dump.stderr
    assert '"Mass"' in dump.stdout and '"Absent"' in dump.stdout
