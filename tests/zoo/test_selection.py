"""Series selection picks the series a radiologist would give the model."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.ai.selection import SeriesInfo, select_series, series_from_files
from pipeline.ai.spec import load_spec

from .conftest import REFERENCE
from .dicom import header_only_series

STUDY = "1.2.826.0.1.3680043.8.498.111"


@pytest.fixture(scope="module")
def spec():  # type: ignore[no-untyped-def]
    return load_spec(REFERENCE / "configs" / "triage.json")


def _study(root: Path, *names: str) -> dict[str, list[Path]]:
    kinds = {
        "localizer": dict(count=2, thickness=1.0, SeriesDescription="Topogram 0.6 T20s", SeriesNumber=1),
        "thin": dict(count=40, thickness=0.625, SeriesDescription="Head 0.625 axial", SeriesNumber=3),
        "thick": dict(count=32, thickness=5.0, SeriesDescription="Head 5mm axial", SeriesNumber=2),
        "bone": dict(count=32, thickness=5.0, SeriesDescription="Head bone 5mm", SeriesNumber=4),
        "mr": dict(count=24, thickness=5.0, SeriesDescription="T2 axial", SeriesNumber=5),
        "chest": dict(count=40, thickness=5.0, SeriesDescription="Chest 5mm", SeriesNumber=6, BodyPartExamined="CHEST"),
    }
    written = {}
    for i, name in enumerate(names):
        options = dict(kinds[name])
        count, thickness = options.pop("count"), options.pop("thickness")
        paths = header_only_series(root / name, count, seed=i, thickness=thickness, StudyInstanceUID=STUDY, **options)
        import pydicom

        for path in paths:  # what the scanner would have written for these kinds
            ds = pydicom.dcmread(path)
            if name == "localizer":
                ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
            if name == "mr":
                ds.Modality = "MR"
            ds.save_as(path)
        written[name] = paths
    return written


def _files(written: dict[str, list[Path]]) -> list[Path]:
    return [p for paths in written.values() for p in paths]


def test_the_thick_axial_head_series_wins_over_localizer_thin_bone_mr_and_chest(tmp_path: Path, spec) -> None:  # type: ignore[no-untyped-def]
    written = _study(tmp_path, "localizer", "thin", "thick", "bone", "mr", "chest")
    (tmp_path / "DICOMDIR.txt").write_text("not dicom")  # a stray file is skipped, not fatal
    series = series_from_files(_files(written) + [tmp_path / "DICOMDIR.txt"])

    assert len(series) == 6
    by_description = {s.series_description: s for s in series}
    assert by_description["Head 0.625 axial"].number_of_instances == 40
    assert by_description["Head 0.625 axial"].slice_thickness == pytest.approx(0.625)
    assert by_description["Topogram 0.6 T20s"].image_type == ("ORIGINAL", "PRIMARY", "LOCALIZER")
    assert sorted(by_description["Head 5mm axial"].files) == sorted(written["thick"])

    chosen = select_series(spec, series)
    assert chosen is not None and chosen.series_description == "Head 5mm axial"
    # The order the series come in does not matter.
    assert select_series(spec, list(reversed(series))).series_instance_uid == chosen.series_instance_uid


def test_without_a_thick_series_the_thin_one_is_read(tmp_path: Path, spec) -> None:  # type: ignore[no-untyped-def]
    series = series_from_files(_files(_study(tmp_path, "localizer", "thin", "mr")))
    chosen = select_series(spec, series)
    assert chosen is not None and chosen.series_description == "Head 0.625 axial"


def test_nothing_is_selected_from_a_study_with_only_a_localizer_and_mr(tmp_path: Path, spec) -> None:  # type: ignore[no-untyped-def]
    series = series_from_files(_files(_study(tmp_path, "localizer", "mr", "chest")))
    assert select_series(spec, series) is None


def test_series_built_by_the_index_select_the_same_way(spec) -> None:  # type: ignore[no-untyped-def]
    """The archive index builds SeriesInfo itself (no files, other case, missing values)."""

    def info(uid: str, **kw: object) -> SeriesInfo:
        base = dict(
            series_instance_uid=uid,
            modality="ct",
            body_part_examined=None,
            series_description="",
            image_type=("original", "primary", "axial"),
            number_of_instances=30,
            slice_thickness=5.0,
            files=[],
        )
        return SeriesInfo(**{**base, **kw})  # type: ignore[arg-type]

    candidates = [
        info("1.1", slice_thickness=None),
        info("1.2", slice_thickness=2.5),
        info("1.3", slice_thickness=4.0, number_of_instances=12),
        info("1.4", slice_thickness=3.0),
    ]
    # 1.1 has no thickness, 1.3 too few slices; 3.0 mm is closest to the 5 mm target.
    assert select_series(spec, candidates).series_instance_uid == "1.4"
