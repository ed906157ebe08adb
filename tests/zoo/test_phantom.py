"""The head-CT generator: real anatomy, bleeds of each kind where and as dense as real ones."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from pipeline.lab.phantom.generator import make_head_case, make_head_ct
from pipeline.lab.phantom.lesions import BleedKind

pytestmark = pytest.mark.usefixtures("atlas")  # the real head-CT atlas the phantom is made of

SMALL = dict(rows=160, columns=160, pixel_spacing=1.5, slice_thickness=5.0)


@pytest.mark.parametrize("kind", [k.value for k in BleedKind])
def test_each_kind_of_bleed_is_acute_blood_inside_the_skull(kind: str) -> None:
    case = make_head_case(900 + len(kind), "hemorrhage", kinds=[kind], **SMALL)
    assert case.kinds == [BleedKind(kind)]
    assert case.volume_ml > 0.3
    # Away from the bone (whose edge blooms into its neighbours), acute blood: 50-90 HU,
    # neither bone (>300) nor brain (~30).
    near_bone = ndi.binary_dilation(case.volume_hu > 300, iterations=1)
    blood = case.volume_hu[case.label & ~near_bone]
    assert blood.size > 0.2 * case.label.sum()  # extra-axial bleeds hug the skull
    assert 45 < np.median(blood) < 95
    # Inside the head: every bleed voxel has skull-dense voxels lateral to it on its row, both sides.
    z, y, x = np.nonzero(case.label)
    for k in np.random.default_rng(0).choice(len(z), size=min(30, len(z)), replace=False):
        row = case.volume_hu[z[k], y[k]]
        assert row[: x[k]].max() > 300 and row[x[k] + 1 :].max() > 300


def test_same_seed_same_study_and_none_means_no_bleed() -> None:
    volume, label, spacing = make_head_ct(77, "none", **SMALL)
    again, _, _ = make_head_ct(77, "none", **SMALL)
    other, _, _ = make_head_ct(78, "none", **SMALL)
    np.testing.assert_array_equal(volume, again)
    assert not np.array_equal(volume, other)
    assert not label.any() and label.shape == volume.shape == (35, 160, 160)
    assert spacing == (5.0, 1.5, 1.5)
    # A head in air: brain, skull and air all present in HU.
    assert (volume < -900).mean() > 0.2 and (volume > 700).mean() > 0.01
    assert ((volume > 20) & (volume < 45)).mean() > 0.05


def test_a_partial_scan_cuts_the_head_where_its_range_ends() -> None:
    whole = make_head_case(79, "none", **SMALL)
    upper = make_head_case(79, "none", slices=16, z_offset_mm=40.0, **SMALL)
    lower = make_head_case(79, "none", slices=16, z_offset_mm=-40.0, **SMALL)
    assert upper.volume_hu.shape == lower.volume_hu.shape == (16, 160, 160)
    assert upper.origin[2] - lower.origin[2] == pytest.approx(80.0)
    brain = [((c.volume_hu > 20) & (c.volume_hu < 45)).mean(axis=(1, 2)) for c in (whole, upper, lower)]
    # The whole head starts and ends outside the brain; a 16-slice range inside it does not.
    assert brain[0][0] < 0.01 and brain[0][-1] < 0.01
    assert brain[1][-1] > 0.02 or brain[1][0] > 0.02
    assert brain[2][-1] > 0.02 or brain[2][0] > 0.02
