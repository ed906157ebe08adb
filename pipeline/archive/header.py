"""Read what the index needs from an encoded dataset, without decoding pixel data.

The C-STORE handler gets the dataset bytes exactly as the sender encoded them. This
module walks the elements once (large values are skipped, not copied), checks the
structure, validates the UIDs the archive uses as file names, and returns an
:class:`InstanceHeader`. Strict where the archive depends on a value (UIDs), tolerant
elsewhere (a malformed optional attribute becomes empty and is logged).

Whatever the bytes, parsing ends in an :class:`InstanceHeader` or one of this module's
errors, never in anything else: a deflated dataset inflates to at most
:data:`MAX_INFLATED_BYTES`, and sequences nested deeper than Python can recurse are a
:class:`DatasetError` (``tests/core/test_header_fuzz.py`` checks this).
"""

from __future__ import annotations

import io
import logging
import re
import zlib
from dataclasses import dataclass, field
from struct import error as struct_error
from typing import Any, BinaryIO

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from pipeline.errors import PermanentError

log = logging.getLogger(__name__)

# PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters.
UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_DEFER = 1024  # bytes; longer values (pixel data) are skipped by seeking
# A deflated dataset is inflated in memory to be parsed; a few MB can claim many GB.
MAX_INFLATED_BYTES = 512 * 1024 * 1024
_INFLATE_CHUNK = 4 * 1024 * 1024


class DatasetError(PermanentError):
    """The received dataset cannot be read (corrupt or truncated encoding)."""


class InvalidUIDError(PermanentError):
    """A UID the archive needs is missing or not a valid DICOM UID."""


class SOPClassMismatchError(PermanentError):
    """The dataset's SOP Class/Instance UID differs from the one the request announced."""


class StudyMismatchError(SOPClassMismatchError):
    """The dataset's StudyInstanceUID differs from the study the request stores into (STOW-RS
    ``POST /studies/{uid}``)."""


def validate_uid(value: object, keyword: str) -> str:
    """Return ``value`` as a valid UID string or raise :class:`InvalidUIDError`.

    Safe as a file name: digits and dots only, so no path traversal is possible.
    """
    if value is None or value == "":
        raise InvalidUIDError(f"{keyword} is missing: the sender must include it")
    text = str(value).rstrip("\x00 ")
    if len(text) > 64 or not UID_PATTERN.match(text):
        shown = text if len(text) <= 70 else text[:67] + "..."
        raise InvalidUIDError(f"{keyword} {shown!r} is not a valid UID (digits and dots, 64 chars max)")
    return text


@dataclass(frozen=True)
class InstanceHeader:
    """The attributes of one instance that the index stores (DICOM keywords)."""

    SOPClassUID: str
    SOPInstanceUID: str
    StudyInstanceUID: str
    SeriesInstanceUID: str
    attributes: dict[str, Any] = field(default_factory=dict)

    def get(self, keyword: str, default: Any = "") -> Any:
        value = self.attributes.get(keyword)
        return default if value is None else value


# keyword -> kind ("str", "int", "float", "multi")
INDEXED_ATTRIBUTES: dict[str, str] = {
    "SpecificCharacterSet": "multi",
    "PatientID": "str",
    "IssuerOfPatientID": "str",
    "PatientName": "str",
    "PatientBirthDate": "str",
    "PatientSex": "str",
    "AccessionNumber": "str",
    "StudyID": "str",
    "StudyDate": "str",
    "StudyTime": "str",
    "StudyDescription": "str",
    "ReferringPhysicianName": "str",
    "InstitutionName": "str",
    "Modality": "str",
    "BodyPartExamined": "str",
    "SeriesDescription": "str",
    "SeriesNumber": "int",
    "SeriesDate": "str",
    "SeriesTime": "str",
    "ImageType": "multi",
    "SliceThickness": "float",
    "InstanceNumber": "int",
}


_TAGS = {kw: tag_for_keyword(kw) for kw in INDEXED_ATTRIBUTES}
_TEXT_DELIMS = {0x5C, 0x3D, 0x5E}  # backslash, =, ^ (PN component groups)


def _from_text(text: str, kind: str) -> Any:
    text = text.strip(" \x00")
    if not text:
        return None
    if kind == "int":
        return int(text.split("\\")[0])
    if kind == "float":
        return float(text.split("\\")[0])
    return text


def _convert(ds: Dataset, keyword: str, kind: str, encodings: list[str] | None) -> Any:
    """The value of ``keyword`` as str/int/float, or ``None`` (absent, empty, malformed).

    Raw elements from a received dataset are decoded here directly from their bytes:
    far cheaper than pydicom's full conversion, and this runs per received image.
    """
    try:
        elem = ds.get_item(_TAGS[keyword])
        if elem is None:
            return None
        if isinstance(elem, RawDataElement):
            raw = elem.value or b""
            if encodings is None:
                text = raw.decode("latin-1")
            else:
                text = decode_bytes(raw, encodings, _TEXT_DELIMS)
            return _from_text(text, kind)
        value = elem.value
        if value is None or value == "":
            return None
        if kind == "multi" and not isinstance(value, str):
            return "\\".join(str(v) for v in value)
        if kind in ("int", "float") and not isinstance(value, (int, float)):
            value = value[0] if len(value) else None
            if value is None:
                return None
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        return str(value).strip()
    except Exception as err:  # noqa: BLE001 - tolerant on read: pydicom raises many error types for bad values
        log.warning("ignoring malformed %s: %s", keyword, err)
        return None


def _encodings(ds: Dataset) -> list[str] | None:
    """Python codecs of SpecificCharacterSet; ``None`` for the default repertoire."""
    try:
        charset = ds.get("SpecificCharacterSet")
    except Exception as err:  # noqa: BLE001 - tolerant on read: a bad charset must not lose the instance
        log.warning("ignoring malformed SpecificCharacterSet: %s", err)
        return None
    if not charset or charset in ("ISO_IR 6", "ISO_IR 100"):
        return None  # both decode as latin-1 (ASCII is a subset)
    return convert_encodings(charset)


def _walk(data: bytes | memoryview, implicit: bool, little: bool) -> Dataset:
    return _walk_file(io.BytesIO(data), len(data), implicit, little)


def _walk_file(fp: BinaryIO, end: int, implicit: bool, little: bool) -> Dataset:
    """The elements from ``fp``'s position to ``end`` (large values skipped by seeking)."""
    start = fp.tell()
    elements: dict[int, Any] = {}
    previous = -1
    try:
        for elem in data_element_generator(fp, implicit, little, defer_size=_DEFER):
            tag = int(elem.tag)
            if tag <= previous:
                raise DatasetError(
                    f"element {elem.tag} out of order after ({previous >> 16:04X},{previous & 0xFFFF:04X})"
                )
            previous = tag
            elements[elem.tag] = elem
    except DatasetError:
        raise
    except RecursionError:  # pydicom reads undefined-length sequences recursively
        raise DatasetError("dataset does not parse: sequences nested too deep") from None
    except (EOFError, ValueError, KeyError, NotImplementedError, OSError, struct_error) as err:
        raise DatasetError(f"dataset does not parse: {err}") from None
    if fp.tell() != end:
        raise DatasetError(
            f"dataset does not parse: element lengths run past the end ({fp.tell() - start} of {end - start} bytes)"
        )
    if not elements:
        raise DatasetError("dataset is empty")
    ds = Dataset(elements)
    ds.set_original_encoding(implicit, little, "iso8859")
    return ds


def _inflate(data: bytes | memoryview, limit: int) -> bytes:
    """Inflate ``data``, refusing more than ``limit`` bytes; memory stays within ~``limit``.

    A first pass only counts (a chunk at a time), so a bomb costs no memory and at most
    ``limit`` bytes of CPU; the second inflates into one buffer of the exact size.
    """
    counter = zlib.decompressobj(-zlib.MAX_WBITS)
    size = 0
    pending: bytes | memoryview = data
    try:
        while True:
            out = counter.decompress(pending, _INFLATE_CHUNK)
            size += len(out)
            if size > limit:
                raise DatasetError(f"deflated dataset inflates to more than {limit / 2**20:g} MiB: refused")
            pending = counter.unconsumed_tail
            if not out and not pending:
                break
        return zlib.decompress(data, -zlib.MAX_WBITS, max(size, 1))
    except zlib.error as err:
        raise DatasetError(f"deflated dataset does not inflate: {err}") from None


def parse_encoded(
    data: bytes | memoryview, transfer_syntax: str, *, max_inflated_bytes: int = MAX_INFLATED_BYTES
) -> Dataset:
    """Parse an encoded dataset (no File Meta) in ``transfer_syntax`` into a lazy Dataset.

    Values stay raw until read; values longer than 1 KiB (pixel data) are not loaded.
    Raises :class:`DatasetError` if the encoding is broken, or if a deflated dataset
    inflates to more than ``max_inflated_bytes`` (memory stays within that bound).
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        data = _inflate(data, max_inflated_bytes)
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    return _walk(data, implicit, little)


def parse_file(fp: BinaryIO, transfer_syntax: str, *, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Dataset:
    """:func:`parse_encoded` for the dataset from ``fp``'s position to the end of the file.

    Values longer than 1 KiB are skipped by seeking, so an instance of any size is parsed
    in a few kilobytes of memory (a deflated one is read and inflated within the bound).
    """
    start = fp.tell()
    end = fp.seek(0, io.SEEK_END)
    fp.seek(start)
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        if end - start > max_inflated_bytes + _INFLATE_CHUNK:  # deflate never grows data that much
            raise DatasetError(f"deflated dataset is over {max_inflated_bytes / 2**20:g} MiB: refused")
        return parse_encoded(fp.read(), transfer_syntax, max_inflated_bytes=max_inflated_bytes)
    return _walk_file(fp, end, transfer_syntax == ImplicitVRLittleEndian, transfer_syntax != ExplicitVRBigEndian)


def header_from_dataset(
    ds: Dataset, *, expected_sop_class: str | None = None, expected_sop_instance: str | None = None
) -> InstanceHeader:
    """Validate the UIDs of ``ds`` and collect the indexed attributes.

    Parameters
    ----------
    expected_sop_class, expected_sop_instance
        The Affected SOP Class/Instance UID of the C-STORE request; the dataset must
        carry the same values.
    """
    try:
        raw = {kw: ds.get(kw) for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    except Exception as err:  # noqa: BLE001 - a UID element whose bytes do not decode
        raise InvalidUIDError(f"UID element does not decode: {err}") from None
    sop_class = validate_uid(raw["SOPClassUID"], "SOPClassUID")
    sop_instance = validate_uid(raw["SOPInstanceUID"], "SOPInstanceUID")
    if expected_sop_class is not None and sop_class != expected_sop_class:
        raise SOPClassMismatchError(f"dataset SOPClassUID {sop_class} differs from the request's {expected_sop_class}")
    if expected_sop_instance is not None and sop_instance != expected_sop_instance:
        raise SOPClassMismatchError(
            f"dataset SOPInstanceUID {sop_instance} differs from the request's {expected_sop_instance}"
        )
    encodings = _encodings(ds)
    return InstanceHeader(
        SOPClassUID=sop_class,
        SOPInstanceUID=sop_instance,
        StudyInstanceUID=validate_uid(raw["StudyInstanceUID"], "StudyInstanceUID"),
        SeriesInstanceUID=validate_uid(raw["SeriesInstanceUID"], "SeriesInstanceUID"),
        attributes={kw: _convert(ds, kw, kind, encodings) for kw, kind in INDEXED_ATTRIBUTES.items()},
    )
