"""Bundles run in memory and their masks come back on the source images, in any geometry."""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.ai.inference import analyze_study, check_loads, load_model, resolve_device, run_model
from pipeline.ai.registry import load_registry
from pipeline.ai.volume import load_volume
from pipeline.errors import ConfigError
from pipeline.lab.phantom.generator import make_head_ct, volume_generator
from pipeline.lab.synth import synth_study

from .conftest import REFERENCE
from .dicom import write_series
from .test_volume import _rotation
from .tiny_bundle import BONE_HU, make_tiny_bundle

pytestmark = pytest.mark.usefixtures("atlas")  # the real head-CT atlas the phantom is made of


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder with the reference model and a second bundle a data scientist made."""
    folder = tmp_path_factory.mktemp("zoo") / "models"
    shutil.copytree(REFERENCE, folder / "head_ct_hemorrhage")
    make_tiny_bundle(folder)
    return folder


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, tuple[float, float, float]]:
    volume, _, spacing = make_head_ct(
        4242, "none", rows=200, columns=200, pixel_spacing=1.1, slice_thickness=4.0, slices=40
    )
    return volume, spacing


def test_a_second_bundle_registers_and_runs_beside_the_reference_model(models: Path, tmp_path: Path) -> None:
    registry = load_registry(models, check=check_loads)
    assert [m.key for m in registry.available] == ["dense_bone@1.0.0", "head_ct_hemorrhage@0.5.0"]
    assert registry.unavailable == []

    study = tmp_path / "study"
    synth_study(
        study,
        seed=31,
        slices=36,
        rows=256,
        cols=256,
        spacing_zyx=(5.0, 0.9, 0.9),
        volume=volume_generator("hemorrhage", kinds=["epidural"]),
    )
    analyses = analyze_study(registry, study, device="cpu")

    by_model = {a.model.name: a for a in analyses}
    assert set(by_model) == {"dense_bone", "head_ct_hemorrhage"}
    assert all(a.status == "analysed" for a in analyses), [a.error for a in analyses]
    bone = by_model["dense_bone"].result.findings[0]
    bleed = by_model["head_ct_hemorrhage"].result.findings[0]
    assert bone.present and bone.volume_ml > 200  # a skull
    assert bleed.present and bleed.volume_ml > 1
    # Both read the same series; every mask slice is one source image.
    source = load_volume(sorted(study.iterdir()))
    for analysis in analyses:
        assert analysis.result.source_sop_instance_uids == source.sop_instance_uids
        assert analysis.result.findings[0].mask.shape == source.shape
    truth = source.array > BONE_HU
    assert _dice(bone.mask, truth) > 0.9
    assert not (bleed.mask & truth).any() or (bleed.mask & truth).sum() < 0.02 * bleed.mask.sum()


@pytest.mark.parametrize("geometry", ["oblique", "reversed"])
def test_masks_land_on_the_source_voxels_in_oblique_and_reversed_series(
    models: Path, head, tmp_path: Path, geometry: str
) -> None:  # type: ignore[no-untyped-def]
    volume_hu, spacing = head
    if geometry == "oblique":
        rotation = _rotation(12, -20, 25)
        paths = write_series(
            tmp_path, volume_hu, spacing=spacing, row_direction=rotation[:, 0], column_direction=rotation[:, 1]
        )
    else:
        paths = write_series(
            tmp_path,
            volume_hu,
            spacing=spacing,
            origin=(-100, -110, 80),
            stack_direction=(0, 0, -1),
            row_direction=(-1, 0, 0),
        )
    model = load_registry(models).get("dense_bone")
    source = load_volume(paths)

    result = run_model(model, source, device="cpu")

    mask = result.findings[0].mask
    assert mask.shape == source.shape and mask.dtype == bool
    assert result.source_sop_instance_uids == source.sop_instance_uids
    assert _dice(mask, source.array > BONE_HU) > 0.85


def test_a_model_is_loaded_once_per_process(models: Path) -> None:
    model = load_registry(models).get("dense_bone")
    assert load_model(model, "cpu") is load_model(model, "cpu")
    again = load_registry(models).get("dense_bone")  # a fresh registry finds the loaded model
    assert load_model(again, "cpu") is load_model(model, "cpu")


def test_bundles_run_only_from_the_models_folder(models: Path, tmp_path: Path) -> None:
    model = load_registry(models).get("dense_bone")
    elsewhere = dataclasses.replace(model, models_dir=tmp_path)
    with pytest.raises(ConfigError, match="not inside the models folder"):
        load_model(elsewhere, "cpu")


def test_device_auto_uses_cuda_only_when_present() -> None:
    import torch

    if torch.cuda.is_available():
        assert resolve_device("auto") == "cuda"
    else:
        assert resolve_device("auto") == "cpu"
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")
