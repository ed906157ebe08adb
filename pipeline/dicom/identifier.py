"""C-FIND response identifiers encoded straight to bytes, for the common case.

A C-FIND over 10,000 studies answers with one identifier per match; built as a pydicom
``Dataset`` and written by pydicom, each costs ~0.2 ms, more than everything else per
match together. The identifiers radtriage answers with are flat: text values (or none)
in the request's VRs, in the character set the match was received in. :func:`encode`
writes those in Explicit or Implicit VR Little Endian directly, with the same bytes
pydicom writes (``tests/core/test_find.py`` compares them); anything else (a sequence,
a binary or numeric VR, a character set with code extensions, another transfer syntax)
returns ``None`` and goes the pydicom way.

Character sets follow :func:`pipeline.dicom.find.response_identifier`: the stored one if
every value encodes in it, else UTF-8 (``ISO_IR 192``).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from pydicom.charset import python_encoding
from pydicom.valuerep import PersonName

_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "DS", "IS"})
_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "PN"})
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
UTF8 = "ISO_IR 192"


def _text(value: Any) -> str | None:
    """A value as DICOM text, or ``None`` when this encoder does not write it."""
    if isinstance(value, str | PersonName):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, list | tuple):
        parts = [_text(v) for v in value]
        return None if any(p is None for p in parts) else "\\".join(p for p in parts if p is not None)
    return None


def _element(tag: int, vr: str, data: bytes, explicit: bool) -> bytes:
    if len(data) % 2:
        data += b"\0" if vr == "UI" else b" "
    group, element = tag >> 16, tag & 0xFFFF
    if not explicit:
        return struct.pack("<HHI", group, element, len(data)) + data
    if vr in _LONG_VRS:
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(data)) + data
    return struct.pack("<HH2sH", group, element, vr.encode(), len(data)) + data


def encode(
    elements: Sequence[tuple[int, str, Any]], stored_charset: str, *, explicit: bool
) -> tuple[bytes, str] | None:
    """``(tag, VR, value)`` elements (``None``: empty), tags below (0008,0005) excluded,
    as bytes in ascending tag order, with the SpecificCharacterSet that goes first (if any).

    Returns the bytes and the character set used, or ``None`` for what it does not write.
    """
    if "\\" in stored_charset or stored_charset.startswith("ISO 2022"):
        return None
    codec = python_encoding.get(stored_charset or "ISO_IR 6")
    if codec is None:
        return None
    values: list[tuple[int, str, str | None]] = []
    for tag, vr, value in elements:
        if value is None or value == "":
            values.append((tag, vr, None))
            continue
        if vr not in _ASCII_VRS and vr not in _TEXT_VRS:
            return None
        text = _text(value)
        if text is None or (vr in _ASCII_VRS and not text.isascii()):
            return None
        values.append((tag, vr, text))
    charset = stored_charset
    try:
        parts = [_encoded(values, codec, explicit)]
    except UnicodeEncodeError:
        charset, parts = UTF8, [_encoded(values, "utf-8", explicit)]
    if charset:
        parts.insert(0, _element(0x00080005, "CS", charset.encode("ascii"), explicit))
    return b"".join(parts), charset


def _encoded(values: list[tuple[int, str, str | None]], codec: str, explicit: bool) -> bytes:
    """Raises UnicodeEncodeError when a text value does not fit ``codec``."""
    out = []
    for tag, vr, text in sorted(values, key=lambda v: v[0]):
        if text is None:
            data = b""
        elif vr in _ASCII_VRS:
            data = text.encode("ascii", "replace")  # never another character set
        else:
            data = text.encode(codec, "strict")
        out.append(_element(tag, vr, data, explicit))
    return b"".join(out)
