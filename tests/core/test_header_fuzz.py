"""Bounded fuzzing of the header parser: whatever bytes a sender puts in a C-STORE,
parsing ends in a header or in one of the parser's own errors, which the receiver
answers with a failure status. Anything else would be a 0xC211 and a traceback per
request (log flooding), or worse."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from pipeline.archive.header import (
    DatasetError,
    InvalidUIDError,
    SOPClassMismatchError,
    header_from_dataset,
    parse_encoded,
)

# pydicom warns about every malformed value it meets; malformed is the point here.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CT = "1.2.840.10008.5.1.4.1.1.2"
INSTANCE = "1.2.826.0.1.3680043.8.498.1"
UNDERSTOOD = (DatasetError, InvalidUIDError, SOPClassMismatchError)  # mapped to 0xC000/0xC001/0xA900
SYNTAXES = [ImplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian, DeflatedExplicitVRLittleEndian]


def _seed_dataset() -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = INSTANCE
    ds.StudyDate = "20240101"
    ds.Modality = "CT"
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P1"
    ref = Dataset()
    ref.ReferencedSOPClassUID = CT
    ref.ReferencedSOPInstanceUID = INSTANCE
    ds.ReferencedImageSequence = Sequence([ref])
    ds.SliceThickness = "5.0"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.2"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.3"
    ds.SeriesNumber = "3"
    ds.InstanceNumber = "7"
    ds.Rows = 2
    ds.Columns = 2
    ds.BitsAllocated = 16
    ds.PixelData = b"\0\1" * 4
    return ds


def _encode(ds: Dataset, transfer_syntax: str) -> bytes:
    fp = DicomBytesIO()
    fp.is_little_endian = transfer_syntax != ExplicitVRBigEndian
    fp.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(fp, ds)
    return fp.getvalue()


def _deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


SEEDS = {
    ts: _encode(_seed_dataset(), ExplicitVRLittleEndian if ts == DeflatedExplicitVRLittleEndian else ts)
    for ts in SYNTAXES
}


def _nested(depth: int) -> bytes:
    """Explicit VR LE: SOP Class/Instance, ``depth`` undefined-length sequences, Study/Series."""

    def uid(group: int, element: int, value: str) -> bytes:
        raw = value.encode() + b"\0" * (len(value) % 2)
        return struct.pack("<HH2sH", group, element, b"UI", len(raw)) + raw

    opened = struct.pack("<HH2sHL", 0x0008, 0x1140, b"SQ", 0, 0xFFFFFFFF) + struct.pack(
        "<HHL", 0xFFFE, 0xE000, 0xFFFFFFFF
    )
    closed = struct.pack("<HHL", 0xFFFE, 0xE00D, 0) + struct.pack("<HHL", 0xFFFE, 0xE0DD, 0)
    return (
        uid(0x0008, 0x0016, CT)
        + uid(0x0008, 0x0018, INSTANCE)
        + opened * depth
        + closed * depth
        + uid(0x0020, 0x000D, "1.2.3")
        + uid(0x0020, 0x000E, "1.2.4")
    )


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, str]:
    """A seed dataset in one transfer syntax with bytes flipped, cut, inserted or spliced."""
    transfer_syntax = draw(st.sampled_from(SYNTAXES))
    data = bytearray(SEEDS[transfer_syntax])
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "length"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=32))
        else:  # a 16- or 32-bit length field (or anything) set to an extreme value
            data[at : at + 4] = draw(
                st.sampled_from([b"\xff\xff\xff\xff", b"\xfe\xff\xff\x7f", b"\0\0\0\0", b"\xff\xff"])
            )
    encoded = bytes(data)
    if transfer_syntax == DeflatedExplicitVRLittleEndian and draw(st.booleans()):
        encoded = _deflate(encoded)  # well-formed deflate of broken content (else: broken deflate)
    return encoded, transfer_syntax


def _parse(data: bytes, transfer_syntax: str) -> None:
    try:
        ds = parse_encoded(data, transfer_syntax)
        header_from_dataset(ds, expected_sop_class=CT, expected_sop_instance=INSTANCE)
        header_from_dataset(ds)
    except UNDERSTOOD:
        pass


def test_the_seed_parses_in_every_transfer_syntax() -> None:
    for transfer_syntax in SYNTAXES:
        data = SEEDS[transfer_syntax]
        if transfer_syntax == DeflatedExplicitVRLittleEndian:
            data = _deflate(data)
        header = header_from_dataset(parse_encoded(data, transfer_syntax))
        assert (header.SOPInstanceUID, header.get("InstanceNumber")) == (INSTANCE, 7)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)
@given(mutated())
def test_mutated_datasets_end_in_the_parsers_own_errors(case: tuple[bytes, str]) -> None:
    _parse(*case)


@settings(max_examples=150, deadline=None, database=None)
@given(st.binary(max_size=512), st.sampled_from(SYNTAXES))
def test_random_bytes_end_in_the_parsers_own_errors(data: bytes, transfer_syntax: str) -> None:
    _parse(data, transfer_syntax)


@settings(max_examples=25, deadline=None, database=None)
@given(st.integers(0, 3000))
def test_deeply_nested_sequences_are_a_dataset_error_or_parse(depth: int) -> None:
    _parse(_nested(depth), ExplicitVRLittleEndian)


def test_ten_thousand_nested_sequences_are_a_dataset_error() -> None:
    try:
        parse_encoded(_nested(10_000), ExplicitVRLittleEndian)
    except DatasetError as err:
        assert "nested too deep" in str(err)
    else:
        raise AssertionError("10,000 nested sequences parsed")


def test_a_deflate_bomb_is_refused_within_the_bound() -> None:
    bomb = _deflate(SEEDS[ExplicitVRLittleEndian] + bytes(8 << 20))
    try:
        parse_encoded(bomb, DeflatedExplicitVRLittleEndian, max_inflated_bytes=1 << 20)
    except DatasetError as err:
        assert "inflates to more than 1 MiB" in str(err)
    else:
        raise AssertionError("an 8 MiB inflation passed a 1 MiB bound")
