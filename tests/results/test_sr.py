"""TID 1500 SR: valid for dciodvfy and dsrdump, readable by highdicom, pointing at the SEG."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import pytest
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes

from pipeline.ai.findings import ModelResult
from pipeline.config import ResultSettings
from pipeline.errors import PermanentError
from pipeline.results import build_seg, build_sr, result_uids
from pipeline.results.sr import ABSENT, DIAMETER, MAXIMUM, PRESENCE, PRESENT, PROBABILITY, VOLUME

from .ct import BRAIN, HEMORRHAGE, INFARCT, MODEL, Series, blob_mask, empty_mask, finding, result_with
from .dicomtools import dciodvfy, dsrdump


def write_pair(
    series: Series, headers: list[Dataset], result: ModelResult, settings: ResultSettings, folder: Path
) -> tuple[Path, Path]:
    uids = result_uids(series.study_instance_uid, MODEL.name, MODEL.version, 1)
    seg = build_seg(headers, result, settings, series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_sop)
    sr = build_sr(headers, seg, result, settings, series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_sop)
    seg.save_as(folder / "seg.dcm")
    sr.save_as(folder / "sr.dcm")
    return folder / "seg.dcm", folder / "sr.dcm"


def check_valid(path: Path) -> None:
    verdict = dciodvfy(path)
    assert verdict.iod == "Comprehensive3DSR", verdict.output
    assert verdict.errors == [], verdict.output
    dump = dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert dump.stderr == "", dump.stderr  # dsrdump reports problems on stderr
    assert "Imaging Measurement Report" in dump.stdout


def test_sr_with_a_bleed_reports_it_and_points_at_the_seg(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, tmp_path: Path
) -> None:
    mask = blob_mask((7, 30, 36), 12.0)
    bleed = finding("hemorrhage", HEMORRHAGE, mask, 0.93, True, 24.0)
    seg_path, sr_path = write_pair(ct_series, ct_headers, result_with(ct_series, bleed), settings, tmp_path)
    check_valid(sr_path)
    dump = dsrdump(sr_path).stdout
    assert '"Hemorrhage"' in dump and '"Present"' in dump

    seg = hd.seg.segread(seg_path)
    sr = hd.sr.srread(sr_path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert sr.StudyInstanceUID == ct_series.study_instance_uid
    assert (sr.SeriesNumber, sr.SeriesDescription, sr.Manufacturer) == (
        7102,
        f"AI ICH report ({MODEL.name} {MODEL.version})",
        "Example Hospital AI",
    )
    assert (sr.CompletionFlag, sr.VerificationFlag) == ("COMPLETE", "UNVERIFIED")
    models = [e for e in sr.ContributingEquipmentSequence if e.get("ManufacturerModelName") == MODEL.name]
    assert len(models) == 1 and models[0].SoftwareVersions == MODEL.version

    report = sr.content
    (device,) = report.get_observer_contexts(observer_type=codes.DCM.Device)
    assert device.observer_identifying_attributes.name == MODEL.name
    assert report[0].ContentSequence  # procedure reported etc. are there
    procedure = [i for i in report[0].ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "77477000"

    (group,) = report.get_volumetric_roi_measurement_groups()
    segment = seg.SegmentSequence[0]
    assert group.tracking_uid == segment.TrackingUID
    assert group.tracking_identifier == "hemorrhage"
    assert group.finding_type == hd.sr.CodedConcept(HEMORRHAGE.value, "SCT", HEMORRHAGE.meaning)
    assert group.finding_category.value == "49755003"
    assert [s.value.value for s in group.finding_sites] == [BRAIN.value]

    (volume,) = group.get_measurements(name=VOLUME)
    assert volume.value == pytest.approx(bleed.volume_ml) and volume.unit.value == "ml"
    assert volume.value > 1.0  # a 12 mm radius bleed is several ml
    (diameter,) = group.get_measurements(name=DIAMETER)
    assert diameter.value == pytest.approx(24.0) and diameter.unit.value == "mm"
    assert diameter.derivation == MAXIMUM
    (probability,) = group.get_measurements(name=PROBABILITY)
    assert probability.value == pytest.approx(0.93) and probability.unit.value == "1"
    (presence,) = group.get_qualitative_evaluations(name=PRESENCE)
    assert presence.value == PRESENT

    assert group.reference_type == codes.DCM.ReferencedSegment
    referenced = group.referenced_segment
    segment_item = referenced[0].ReferencedSOPSequence[0]
    assert (segment_item.ReferencedSOPInstanceUID, int(segment_item.ReferencedSegmentNumber)) == (seg.SOPInstanceUID, 1)
    sources = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in referenced[1:]}
    covered = {ct_series.sop_instance_uids[k] for k in range(len(mask)) if mask[k].any()}
    assert sources == covered

    evidence = {
        i.ReferencedSOPInstanceUID
        for s in sr.CurrentRequestedProcedureEvidenceSequence
        for series in s.ReferencedSeriesSequence
        for i in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence and covered <= evidence


def test_sr_without_a_finding_is_valid_and_says_absent(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, tmp_path: Path
) -> None:
    result = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, empty_mask(), 0.04, False, 0.0))
    seg_path, sr_path = write_pair(ct_series, ct_headers, result, settings, tmp_path)
    check_valid(sr_path)
    (group,) = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    (presence,) = group.get_qualitative_evaluations(name=PRESENCE)
    assert presence.value == ABSENT
    assert group.get_measurements(name=VOLUME)[0].value == 0.0
    assert group.get_measurements(name=PROBABILITY)[0].value == pytest.approx(0.04)
    segment_item = group.referenced_segment[0].ReferencedSOPSequence[0]
    assert segment_item.ReferencedSOPInstanceUID == hd.seg.segread(seg_path).SOPInstanceUID


def test_sr_has_one_group_per_finding_in_segment_order(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, tmp_path: Path
) -> None:
    result = result_with(
        ct_series,
        finding("hemorrhage", HEMORRHAGE, blob_mask((9, 34, 28), 10.0), 0.9, True, 20.0),
        finding("infarct", INFARCT, empty_mask(), 0.1, False, 0.0),
    )
    seg_path, sr_path = write_pair(ct_series, ct_headers, result, settings, tmp_path)
    check_valid(sr_path)
    seg = hd.seg.segread(seg_path)
    groups = hd.sr.srread(sr_path).content.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == ["hemorrhage", "infarct"]
    assert [g.tracking_uid for g in groups] == [s.TrackingUID for s in seg.SegmentSequence]
    numbers = [int(g.referenced_segment[0].ReferencedSOPSequence[0].ReferencedSegmentNumber) for g in groups]
    assert numbers == [1, 2]
    assert [g.get_qualitative_evaluations(name=PRESENCE)[0].value for g in groups] == [PRESENT, ABSENT]


def test_sr_refuses_a_seg_of_another_result(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings
) -> None:
    one = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, empty_mask(), 0.1, False, 0.0))
    other = result_with(ct_series, finding("infarct", INFARCT, empty_mask(), 0.1, False, 0.0))
    seg = build_seg(ct_headers, one, settings, series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.5")
    with pytest.raises(PermanentError, match="segments"):
        build_sr(ct_headers, seg, other, settings, series_instance_uid="1.2.3.6", sop_instance_uid="1.2.3.7")
