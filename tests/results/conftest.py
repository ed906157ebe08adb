"""Fixtures for the result writers: a synthetic CT series on disk and result settings."""

from __future__ import annotations

import pydicom
import pytest
from pydicom.dataset import Dataset

from pipeline.config import ResultSettings

from .ct import Series, write_ct_series


@pytest.fixture(scope="session")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> Series:
    return write_ct_series(tmp_path_factory.mktemp("ct") / "series")


@pytest.fixture(scope="session")
def ct_headers(ct_series: Series) -> list[Dataset]:
    """The series as the flow reads it: headers only, shuffled like a directory listing."""
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in ct_series.paths]
    return headers[::2] + headers[1::2]


@pytest.fixture(scope="session")
def settings() -> ResultSettings:
    # Not the defaults, so that a test sees whether the writers really read them.
    return ResultSettings(
        manufacturer="Example Hospital AI",
        seg_series_number=7101,
        sr_series_number=7102,
        seg_series_description="AI ICH mask",
        sr_series_description="AI ICH report",
        device_serial_number="RT-0042",
        institution_name="Example Hospital",
    )
