"""Incoming P-DATA and C-STORE requests decoded with less work than pynetdicom's way.

A receiver's share of the CPU per image is mostly pynetdicom's; two parts of it are
generic work this module does the lean way, with the same outcome for pynetdicom:

* **P-DATA-TF PDUs** (:func:`lean_p_data`, the DUL's ``_decode_pdu``): pynetdicom copies
  every received PDU into ``bytes``, decodes it into item objects and slices each fragment
  out again before its DIMSE layer copies it into the message; for a 512x512 CT slice in
  128 KiB PDUs that is four copies of the image. Here the DIMSE layer gets views of the
  received PDU (the message's buffer and the spool take the only copy), and pynetdicom's
  state machine the same event, in the same order. A PDU of another type, a P-DATA-TF
  that does not parse exactly (pynetdicom then handles it as it always did) and every PDU
  while handlers watch received PDUs (``EVT_DATA_RECV``, ``EVT_PDU_RECV``: pynetdicom's
  own DEBUG summary) go pynetdicom's way.
* **The C-STORE-RQ primitive** (:func:`lean_store_request`): pynetdicom builds it by
  converting every element of the decoded command set through pydicom. Here the command
  set's few elements (PS3.7 9.3.1.1) are read from its Implicit VR Little Endian bytes and
  set through the primitive's own setters, which validate as before. A command set with
  anything else (a value pydicom would read as several, a non-ASCII UID or AE title, an
  element not in PS3.7 9.3.1.1) is built pynetdicom's way.

Both were written against pynetdicom 3.0.4 like :mod:`pipeline.dicom.tuning`, and leave
the association untouched (with a WARNING) when its layout differs.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from functools import partial
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_primitives import P_DATA

log = logging.getLogger(__name__)

_P_DATA_TF = 0x04
_P_DATA_EVENT = "Evt10"  # pynetdicom's state machine event: P-DATA-TF PDU received
_WATCHERS = (evt.EVT_DATA_RECV, evt.EVT_PDU_RECV)
_ITEM_HEADER = struct.Struct(">LB")  # PS3.8 9.3.5.1: item length, presentation context ID
_ELEMENT_HEADER = struct.Struct("<HHL")  # Implicit VR Little Endian: group, element, length
_US = struct.Struct("<H")
_FIELDS = "_radtriage_store_fields"

# The C-STORE-RQ command elements (group 0000) read here, and the primitive's names for
# them; None: not a primitive parameter (group length, command field, data set type).
_STORE_RQ: dict[int, tuple[str | None, str]] = {
    0x0000: (None, "UL"),
    0x0002: ("AffectedSOPClassUID", "UI"),
    0x0100: (None, "US"),
    0x0110: ("MessageID", "US"),
    0x0700: ("Priority", "US"),
    0x0800: (None, "US"),
    0x1000: ("AffectedSOPInstanceUID", "UI"),
    0x1030: ("MoveOriginatorApplicationEntityTitle", "AE"),  # a C-MOVE's sub-operation
    0x1031: ("MoveOriginatorMessageID", "US"),
}


class ReceivedPData(P_DATA_TF):
    """A received P-DATA-TF PDU whose presentation data values are views of its bytes."""

    def __init__(self, values: list[tuple[int, memoryview]]) -> None:
        super().__init__()
        self.values = values

    def to_primitive(self) -> P_DATA:
        primitive = P_DATA()
        primitive.presentation_data_value_list.extend(self.values)  # type: ignore[arg-type]
        return primitive


def presentation_data_values(pdu: bytearray | bytes) -> list[tuple[int, memoryview]] | None:
    """The ``(presentation context ID, message control header + fragment)`` items of the
    P-DATA-TF ``pdu`` (its 6-byte header included), as views; ``None`` if it does not
    parse exactly (an item without its control header or running past the PDU's end)."""
    view = memoryview(pdu)
    end = len(pdu)
    if end < 6 or pdu[0] != _P_DATA_TF or int.from_bytes(pdu[2:6], "big") != end - 6:
        return None
    values = []
    offset = 6
    while offset < end:
        if offset + 6 > end:
            return None
        length, context_id = _ITEM_HEADER.unpack_from(pdu, offset)
        if length < 2 or offset + 4 + length > end:
            return None
        values.append((context_id, view[offset + 5 : offset + 4 + length]))
        offset += 4 + length
    return values or None


def decode_p_data(
    assoc: Any, original: Callable[[bytearray], tuple[Any, str]], bytestream: bytearray
) -> tuple[Any, str]:
    """The DUL's ``_decode_pdu`` for one received PDU (see the module docstring)."""
    if bytestream[:1] != b"\x04" or any(assoc.get_handlers(watched) for watched in _WATCHERS):
        return original(bytestream)
    values = presentation_data_values(bytestream)
    if values is None:
        return original(bytestream)
    return ReceivedPData(values), _P_DATA_EVENT


def lean_p_data(assoc: Any) -> bool:
    """Give ``assoc``'s DUL :func:`decode_p_data`; ``True`` if done (pynetdicom 3.0's layout)."""
    dul = getattr(assoc, "dul", None)
    original = getattr(dul, "_decode_pdu", None)
    if original is not None and getattr(original, "func", None) is decode_p_data:
        return True
    if not callable(original) or not hasattr(dul, "_recv_pdu"):
        log.warning("pynetdicom's DUL has no _decode_pdu: received PDUs are decoded its own (slower) way")
        return False
    dul._decode_pdu = partial(decode_p_data, assoc, original)  # type: ignore[union-attr]
    return True


_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101


def store_request_fields(command: bytes, *, checked: bool = False) -> dict[str, str | int] | None:
    """The primitive parameters of a C-STORE-RQ command set (Implicit VR Little Endian),
    as pydicom would read them; ``None`` for anything but the plain elements above.
    ``checked``: also ``None`` unless the Command Field says C-STORE-RQ and a data set
    follows (for a command not yet known to be one)."""
    fields: dict[str, str | int] = {}
    kinds: dict[int, int] = {}
    offset, end, previous = 0, len(command), -1
    while offset < end:
        if offset + 8 > end:
            return None
        group, element, length = _ELEMENT_HEADER.unpack_from(command, offset)
        offset += 8
        known = _STORE_RQ.get(element)
        if group != 0 or known is None or element <= previous or offset + length > end:
            return None
        previous = element
        name, vr = known
        raw = command[offset : offset + length]
        offset += length
        if vr == "US":
            if length != 2:
                return None
            value: str | int = _US.unpack(raw)[0]
            kinds[element] = int(value)
        elif vr in ("UI", "AE"):
            if b"\\" in raw or not raw.isascii():
                return None
            value = raw.decode("ascii").rstrip("\0 ") if vr == "UI" else raw.decode("ascii").strip(" ")
        else:
            continue
        if name is not None:
            fields[name] = value
    if "AffectedSOPClassUID" not in fields or "AffectedSOPInstanceUID" not in fields:
        return None
    if checked and (kinds.get(0x0100) != _C_STORE_RQ or kinds.get(0x0800, _NO_DATA_SET) == _NO_DATA_SET):
        return None
    return fields


def _fields(message: Any) -> dict[str, str | int] | None:
    if not hasattr(message, _FIELDS):
        setattr(message, _FIELDS, store_request_fields(message.encoded_command_set.getvalue()))
    return getattr(message, _FIELDS)  # type: ignore[no-any-return]


def store_request_uids(message: Any) -> tuple[str, str]:
    """The Affected SOP Class and Instance UID of the C-STORE-RQ ``message`` (its command set is in)."""
    fields = _fields(message)
    if fields is not None:
        return str(fields["AffectedSOPClassUID"]), str(fields["AffectedSOPInstanceUID"])
    command = message.command_set
    return str(command.AffectedSOPClassUID), str(command.AffectedSOPInstanceUID)


def _store_primitive(message: Any, original: Callable[[], Any]) -> Any:
    """``message.message_to_primitive`` of a C-STORE-RQ (see the module docstring)."""
    fields = _fields(message)
    if fields is None:
        return original()
    primitive = C_STORE()
    for name, value in fields.items():
        setattr(primitive, name, value)
    primitive.DataSet = message.data_set
    primitive._context_id = message.context_id
    primitive._dataset_path = message._data_set_path
    primitive._dataset_file = message._data_set_file
    return primitive


def lean_store_request(message: Any) -> bool:
    """Let the C-STORE-RQ ``message`` (its command set decoded, its dataset arriving)
    build its primitive the lean way when it is complete; ``True`` if done."""
    original = getattr(message, "message_to_primitive", None)
    needed = ("encoded_command_set", "data_set", "context_id", "_data_set_path", "_data_set_file")
    if not callable(original) or not all(hasattr(message, name) for name in needed):
        log.warning("pynetdicom's C-STORE-RQ message has an unknown layout: requests are decoded its own way")
        return False
    message.message_to_primitive = partial(_store_primitive, message, original)
    return True
