"""Binary SEG: valid for dciodvfy, readable by highdicom, frames where the mask is."""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from pipeline.ai.findings import ModelResult
from pipeline.config import ResultSettings
from pipeline.errors import PermanentError
from pipeline.results import build_seg, result_uids, segment_tracking_uid

from .ct import BRAIN, HEMORRHAGE, INFARCT, MODEL, Series, blob_mask, empty_mask, finding, result_with
from .dicomtools import dciodvfy


def write_seg(
    series: Series, headers: list[Dataset], result: ModelResult, settings: ResultSettings, path: Path
) -> Path:
    uids = result_uids(series.study_instance_uid, MODEL.name, MODEL.version, 0)
    seg = build_seg(headers, result, settings, series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_sop)
    seg.save_as(path)
    return path


def frames_by_source(path: Path) -> list[tuple[int, str, np.ndarray]]:
    """(segment number, source SOP Instance UID, frame pixels) per frame, read with plain pydicom."""
    ds = pydicom.dcmread(path)
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    shared = ds.SharedFunctionalGroupsSequence[0]
    out = []
    for item, frame in zip(ds.PerFrameFunctionalGroupsSequence, pixels, strict=True):
        ident = item.get("SegmentIdentificationSequence") or shared.SegmentIdentificationSequence
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        out.append((int(ident[0].ReferencedSegmentNumber), str(source.ReferencedSOPInstanceUID), frame))
    return out


def test_seg_with_a_bleed_is_valid_and_reads_back(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, tmp_path: Path
) -> None:
    mask = blob_mask((7, 30, 36), 12.0)
    result = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, mask, 0.93, True, 24.0))
    path = write_seg(ct_series, ct_headers, result, settings, tmp_path / "seg.dcm")

    verdict = dciodvfy(path)
    assert verdict.iod == "Segmentation", verdict.output
    assert verdict.errors == [], verdict.output

    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == ct_series.study_instance_uid
    assert (seg.SeriesNumber, seg.SeriesDescription, seg.Manufacturer) == (
        7101,
        f"AI ICH mask ({MODEL.name} {MODEL.version})",
        "Example Hospital AI",
    )
    assert seg.DeviceSerialNumber == "RT-0042"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == ct_series.series_instance_uid
    referenced = {i.ReferencedSOPInstanceUID for i in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == set(ct_series.sop_instance_uids)

    (description,) = seg.SegmentSequence
    assert description.SegmentLabel == "hemorrhage"
    assert description.SegmentAlgorithmType == "AUTOMATIC"
    assert description.SegmentedPropertyTypeCodeSequence[0].CodeValue == HEMORRHAGE.value
    assert description.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
    assert description.AnatomicRegionSequence[0].CodeValue == BRAIN.value
    algorithm = description.SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (MODEL.name, MODEL.version)
    assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == MODEL.family.value
    assert description.TrackingUID == segment_tracking_uid(seg.SOPInstanceUID, 1)

    models = [e for e in seg.ContributingEquipmentSequence if e.get("ManufacturerModelName") == MODEL.name]
    assert len(models) == 1 and models[0].SoftwareVersions == MODEL.version

    # The whole mask comes back, slice by slice, in the source geometry.
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ct_series.sop_instance_uids,
        segment_numbers=[1],
        assert_missing_frames_are_empty=True,
    )
    np.testing.assert_array_equal(back[..., 0].astype(bool), mask)


def test_seg_frames_lie_on_the_source_images_the_mask_covers(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, tmp_path: Path
) -> None:
    mask = blob_mask((4, 20, 20), 9.0)
    result = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, mask, 0.8, True, 18.0))
    path = write_seg(ct_series, ct_headers, result, settings, tmp_path / "seg.dcm")
    slice_of = {uid: k for k, uid in enumerate(ct_series.sop_instance_uids)}
    frames = frames_by_source(path)
    assert sorted(slice_of[uid] for _, uid, _ in frames) == [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))]
    ds = pydicom.dcmread(path)
    for (_, uid, pixels), item in zip(frames, ds.PerFrameFunctionalGroupsSequence, strict=True):
        k = slice_of[uid]
        np.testing.assert_array_equal(pixels.astype(bool), mask[k])
        position = [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in ct_series.datasets[k].ImagePositionPatient])


def test_seg_without_a_finding_is_valid_and_every_segment_has_a_frame(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, tmp_path: Path
) -> None:
    result = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, empty_mask(), 0.04, False, 0.0))
    path = write_seg(ct_series, ct_headers, result, settings, tmp_path / "seg.dcm")

    verdict = dciodvfy(path)
    assert verdict.iod == "Segmentation", verdict.output
    assert verdict.errors == [], verdict.output

    frames = frames_by_source(path)
    assert [number for number, _, _ in frames] == [1], "one empty frame, so that viewers show the segment"
    assert not frames[0][2].any()
    assert frames[0][1] == ct_series.sop_instance_uids[len(ct_series.sop_instance_uids) // 2]
    seg = hd.seg.segread(path)
    assert seg.SegmentSequence[0].SegmentLabel == "hemorrhage"


def test_seg_with_an_absent_and_a_present_finding_keeps_both_segments(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, tmp_path: Path
) -> None:
    bleed = blob_mask((9, 34, 28), 10.0)
    result = result_with(
        ct_series,
        finding("hemorrhage", HEMORRHAGE, bleed, 0.9, True, 20.0),
        finding("infarct", INFARCT, empty_mask(), 0.1, False, 0.0),
    )
    path = write_seg(ct_series, ct_headers, result, settings, tmp_path / "seg.dcm")
    verdict = dciodvfy(path)
    assert verdict.errors == [], verdict.output

    seg = hd.seg.segread(path)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["hemorrhage", "infarct"]
    frames = frames_by_source(path)
    assert {number for number, _, _ in frames} == {1, 2}
    assert not any(pixels.any() for number, _, pixels in frames if number == 2)
    back = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ct_series.sop_instance_uids,
        segment_numbers=[1, 2],
        assert_missing_frames_are_empty=True,
    ).astype(bool)
    np.testing.assert_array_equal(back[..., 0], bleed)
    assert not back[..., 1].any()


def test_full_datasets_and_headers_give_the_same_seg(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings
) -> None:
    mask = blob_mask((7, 30, 36), 12.0)
    result = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, mask, 0.93, True, 24.0))
    kwargs = {"series_instance_uid": "1.2.3.4", "sop_instance_uid": "1.2.3.5"}
    from_headers = build_seg(ct_headers, result, settings, **kwargs)
    from_full = build_seg(ct_series.datasets, result, settings, **kwargs)
    assert from_headers.PixelData == from_full.PixelData
    assert from_headers.NumberOfFrames == from_full.NumberOfFrames


def test_bad_results_are_refused_with_a_clear_error(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings
) -> None:
    kwargs = {"series_instance_uid": "1.2.3.4", "sop_instance_uid": "1.2.3.5"}
    wrong_shape = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, empty_mask()[:-1], 0.1, False, 0.0))
    with pytest.raises(PermanentError, match="shape"):
        build_seg(ct_headers, wrong_shape, settings, **kwargs)
    ok = result_with(ct_series, finding("hemorrhage", HEMORRHAGE, empty_mask(), 0.1, False, 0.0))
    with pytest.raises(PermanentError, match="were not passed"):
        build_seg(ct_headers[1:], ok, settings, **kwargs)
    with pytest.raises(PermanentError, match="no findings"):
        build_seg(ct_headers, result_with(ct_series), settings, **kwargs)
    twice = result_with(
        ct_series,
        finding("hemorrhage", HEMORRHAGE, empty_mask(), 0.1, False, 0.0),
        finding("hemorrhage", HEMORRHAGE, empty_mask(), 0.1, False, 0.0),
    )
    with pytest.raises(PermanentError, match="duplicate"):
        build_seg(ct_headers, twice, settings, **kwargs)


@pytest.mark.parametrize(("probability", "volume"), [(1.5, 0.0), (-0.1, 0.0), (0.5, float("nan")), (0.5, -1.0)])
def test_out_of_range_values_are_refused(
    ct_series: Series, ct_headers: list[Dataset], settings: ResultSettings, probability: float, volume: float
) -> None:
    bad = finding("hemorrhage", HEMORRHAGE, empty_mask(), probability, False, 0.0)
    bad.volume_ml = volume
    with pytest.raises(PermanentError, match="invalid values"):
        build_seg(
            ct_headers, result_with(ct_series, bad), settings, series_instance_uid="1.2.3.4", sop_instance_uid="1.2.3.5"
        )
