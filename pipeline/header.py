"""Read what the index needs from an encoded dataset, without decoding pixel data.

The C-STORE handler gets the dataset bytes exactly as the sender encoded them. This
module walks the elements once (large values are skipped, not copied), checks the
structure, validates the UIDs the archive uses as file names, and returns an
:class:`InstanceHeader`. Strict where the archive depends on a value (UIDs), tolerant
elsewhere (a malformed optional attribute becomes empty and is logged).
"""

from __future__ import annotations

import io
import logging
import re
import zlib
from struct import error as struct_error
from dataclasses import dataclass, field
from typing import Any

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


class DatasetError(PermanentError):
    """The received dataset cannot be read (corrupt or truncated encoding)."""


class InvalidUIDError(PermanentError):
    """A UID the archive needs is missing or not a valid DICOM UID."""


class SOPClassMismatchError(PermanentError):
    """The dataset's SOP Class/Instance UID differs from the one the request announced."""


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
    "PatientID": "str", "IssuerOfPatientID": "str", "PatientName": "str",
    "PatientBirthDate": "str", "PatientSex": "str",
    "AccessionNumber": "str", "StudyID": "str", "StudyDate": "str", "StudyTime": "str",
    "StudyDescription": "str", "ReferringPhysicianName": "str",
    "Modality": "str", "BodyPartExamined": "str", "SeriesDescription": "str",
    "SeriesNumber": "int", "SeriesDate": "str", "SeriesTime": "str",
    "ImageType": "multi", "SliceThickness": "float", "InstanceNumber": "int",
}


def _convert(ds: Dataset, keyword: str, kind: str) -> Any:
    try:
        value = ds.get(keyword)
    except Exception as err:  # pydicom raises many types for bad values; tolerant on read
        log.warning("ignoring malformed %s: %s", keyword, err)
        return None
    if value is None or value == "":
        return None
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "multi":
            return "\\".join(str(v) for v in value) if not isinstance(value, str) else str(value)
        return str(value).strip()
    except (TypeError, ValueError) as err:
        log.warning("ignoring malformed %s %r: %s", keyword, value, err)
        return None


def _walk(data: bytes | memoryview, implicit: bool, little: bool) -> Dataset:
    fp = io.BytesIO(data)
    elements: dict[int, Any] = {}
    previous = -1
    try:
        for elem in data_element_generator(fp, implicit, little, defer_size=_DEFER):
            if elem.tag <= previous:
                raise DatasetError(f"element {elem.tag} out of order after ({previous >> 16:04X},{previous & 0xFFFF:04X})")
            previous = elem.tag
            elements[elem.tag] = elem
    except DatasetError:
        raise
    except (EOFError, ValueError, KeyError, NotImplementedError, OSError, struct_error) as err:
        raise DatasetError(f"dataset does not parse: {err}") from None
    if fp.tell() != len(data):
        raise DatasetError(f"dataset does not parse: element lengths run past the end ({fp.tell()} of {len(data)} bytes)")
    if not elements:
        raise DatasetError("dataset is empty")
    ds = Dataset(elements)
    ds.set_original_encoding(implicit, little, "iso8859")
    return ds


def parse_encoded(data: bytes | memoryview, transfer_syntax: str) -> Dataset:
    """Parse an encoded dataset (no File Meta) in ``transfer_syntax`` into a lazy Dataset.

    Values stay raw until read; values longer than 1 KiB (pixel data) are not loaded.
    Raises :class:`DatasetError` if the encoding is broken.
    """
    if transfer_syntax == DeflatedExplicitVRLittleEndian:
        try:
            data = zlib.decompress(bytes(data), -zlib.MAX_WBITS)
        except zlib.error as err:
            raise DatasetError(f"deflated dataset does not inflate: {err}") from None
    implicit = transfer_syntax == ImplicitVRLittleEndian
    little = transfer_syntax != ExplicitVRBigEndian
    return _walk(data, implicit, little)


def header_from_dataset(ds: Dataset, *, expected_sop_class: str | None = None,
                        expected_sop_instance: str | None = None) -> InstanceHeader:
    """Validate the UIDs of ``ds`` and collect the indexed attributes.

    Parameters
    ----------
    expected_sop_class, expected_sop_instance
        The Affected SOP Class/Instance UID of the C-STORE request; the dataset must
        carry the same values.
    """
    try:
        raw = {kw: ds.get(kw) for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    except Exception as err:  # a UID element whose bytes do not decode
        raise InvalidUIDError(f"UID element does not decode: {err}") from None
    sop_class = validate_uid(raw["SOPClassUID"], "SOPClassUID")
    sop_instance = validate_uid(raw["SOPInstanceUID"], "SOPInstanceUID")
    if expected_sop_class is not None and sop_class != expected_sop_class:
        raise SOPClassMismatchError(
            f"dataset SOPClassUID {sop_class} differs from the request's {expected_sop_class}")
    if expected_sop_instance is not None and sop_instance != expected_sop_instance:
        raise SOPClassMismatchError(
            f"dataset SOPInstanceUID {sop_instance} differs from the request's {expected_sop_instance}")
    return InstanceHeader(
        SOPClassUID=sop_class,
        SOPInstanceUID=sop_instance,
        StudyInstanceUID=validate_uid(raw["StudyInstanceUID"], "StudyInstanceUID"),
        SeriesInstanceUID=validate_uid(raw["SeriesInstanceUID"], "SeriesInstanceUID"),
        attributes={kw: _convert(ds, kw, kind) for kw, kind in INDEXED_ATTRIBUTES.items()},
    )
