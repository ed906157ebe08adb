"""Compressed and other transfer syntaxes are received and stored exactly as sent."""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from tests.core.conftest import ENV, Receiver, dataset_bytes, require_tool, statuses, storescu

pytestmark = pytest.mark.slow  # a receiver on loopback and dcmtk peers


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One 12-bit CT slice and one 8-bit copy (JPEG baseline needs 8 bits)."""
    from pipeline.lab.synth import synth_study

    folder = tmp_path_factory.mktemp("ts")
    ct = synth_study(folder / "ct", seed=5, slices=1, rows=64, cols=64)[0]
    ds = dcmread(ct)
    ds.PixelData = (np.clip(ds.pixel_array // 16, 0, 255)).astype(np.uint8).tobytes()
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    eight = folder / "ct8.dcm"
    ds.save_as(eight, enforce_file_format=True)
    return {"ct": ct, "ct8": eight}


def _dcmtk(tool: str, *args: str | Path) -> None:
    require_tool(tool)
    done = subprocess.run([tool, *map(str, args)], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def _pydicom_compress(src: Path, dst: Path, syntax: str) -> None:
    ds = dcmread(src)
    ds.compress(syntax, **({"j2k_cr": [20]} if syntax == JPEG2000 else {}))
    ds.save_as(dst, enforce_file_format=True)


MAKERS = {
    RLELossless: ("ct", lambda s, d: _dcmtk("dcmcrle", s, d)),
    JPEGBaseline8Bit: ("ct8", lambda s, d: _dcmtk("dcmcjpeg", "+eb", s, d)),
    JPEGLosslessSV1: ("ct", lambda s, d: _dcmtk("dcmcjpeg", "+e1", s, d)),
    JPEGLSLossless: ("ct", lambda s, d: _dcmtk("dcmcjpls", "+el", s, d)),
    JPEG2000Lossless: ("ct", lambda s, d: _pydicom_compress(s, d, JPEG2000Lossless)),
    JPEG2000: ("ct", lambda s, d: _pydicom_compress(s, d, JPEG2000)),
    DeflatedExplicitVRLittleEndian: ("ct", lambda s, d: _dcmtk("dcmconv", "+td", s, d)),
    ImplicitVRLittleEndian: ("ct", lambda s, d: _dcmtk("dcmconv", "+ti", s, d)),
    ExplicitVRBigEndian: ("ct", lambda s, d: _dcmtk("dcmconv", "+tb", s, d)),
}

# storescu options that propose exactly the file's transfer syntax
PROPOSE = {
    RLELossless: "-xr",
    JPEGBaseline8Bit: "-xy",
    JPEGLosslessSV1: "-xs",
    JPEGLSLossless: "-xt",
    JPEG2000Lossless: "-xv",
    JPEG2000: "-xw",
    DeflatedExplicitVRLittleEndian: "-xd",
    ImplicitVRLittleEndian: "-xi",
    ExplicitVRBigEndian: "-xb",
}


@pytest.mark.parametrize("syntax", list(MAKERS), ids=lambda uid: uid.name)
def test_transfer_syntax_stored_as_received(
    syntax: str, source: dict[str, Path], receiver: Receiver, tmp_path: Path
) -> None:

    kind, make = MAKERS[syntax]
    sent = tmp_path / "sent.dcm"
    make(source[kind], sent)
    assert dcmread(sent).file_meta.TransferSyntaxUID == syntax

    result = storescu(receiver.port, sent, extra=(PROPOSE[syntax],))
    assert statuses(result) == [0], result.stdout + result.stderr

    ds_sent = dcmread(sent)
    kept = receiver.archive.path_of(ds_sent.SOPInstanceUID)
    stored = dcmread(kept)
    assert stored.file_meta.TransferSyntaxUID == syntax  # not recompressed
    if syntax == DeflatedExplicitVRLittleEndian:
        # the deflate stream may be re-packed by the sender; the inflated bytes are the dataset
        inflate = lambda p: zlib.decompress(dataset_bytes(p), -zlib.MAX_WBITS)  # noqa: E731
        assert inflate(kept) == inflate(sent)
    else:
        assert dataset_bytes(kept) == dataset_bytes(sent)
    # and the pixels still decode to what was sent
    assert np.array_equal(stored.pixel_array, ds_sent.pixel_array)
