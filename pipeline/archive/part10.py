"""The File Meta Information of a DICOM Part 10 file (PS3.10 7.1), read within a bound.

A file that arrives from outside (a STOW-RS part) says in its File Meta which transfer
syntax its dataset is in and which SOP Class and Instance it holds, as a C-STORE request
says in its presentation context and command. :func:`read_file_meta` reads just that,
never more than :data:`MAX_FILE_META_BYTES` (an element length cannot make it read
the whole file), and says where the dataset begins; the archive takes the dataset from
there (:meth:`pipeline.archive.Archive.store_encoded_file`) and writes its own File Meta.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import BinaryIO

from pipeline.archive.header import DatasetError

MAX_FILE_META_BYTES = 64 * 1024
_PREAMBLE = 128
# PS3.5 7.1.2: these VRs have a 2-byte reserved field and a 4-byte length.
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_WANTED = {
    0x00020002: "MediaStorageSOPClassUID",
    0x00020003: "MediaStorageSOPInstanceUID",
    0x00020010: "TransferSyntaxUID",
}


@dataclass(frozen=True)
class FileMeta:
    """What the archive needs of a Part 10 file's meta group; ``dataset_offset`` is the byte
    where the dataset starts (after the last group 0002 element)."""

    MediaStorageSOPClassUID: str
    MediaStorageSOPInstanceUID: str
    TransferSyntaxUID: str
    dataset_offset: int


def read_file_meta(fp: BinaryIO) -> FileMeta:
    """Read the File Meta of the Part 10 file ``fp`` (positioned at its start).

    Raises
    ------
    DatasetError
        No ``DICM`` prefix, a meta group that does not parse or is over
        :data:`MAX_FILE_META_BYTES`, or one of the three UIDs above missing.
    """
    head = fp.read(_PREAMBLE + 4)
    if len(head) < _PREAMBLE + 4 or head[_PREAMBLE:] != b"DICM":
        raise DatasetError(
            "not a DICOM Part 10 file: no 'DICM' prefix at byte 128 (send each instance as a file with its File Meta)"
        )
    found: dict[str, str] = {}
    offset = _PREAMBLE + 4
    while True:
        element = fp.read(8)
        if len(element) < 8:
            raise DatasetError("DICOM file ends inside its File Meta (no dataset follows)")
        group, number = struct.unpack("<HH", element[:4])
        if group != 0x0002:
            break
        vr = element[4:6]
        if not vr.isalpha() or not vr.isupper():
            raise DatasetError("File Meta is not in Explicit VR Little Endian as PS3.10 requires")
        if vr in _LONG_VRS:
            extra = fp.read(4)
            if len(extra) < 4:
                raise DatasetError("DICOM file ends inside its File Meta (no dataset follows)")
            (length,) = struct.unpack("<I", extra)
            header_length = 12
        else:
            (length,) = struct.unpack("<H", element[6:8])
            header_length = 8
        offset += header_length + length
        if offset - _PREAMBLE - 4 > MAX_FILE_META_BYTES:
            raise DatasetError(
                f"File Meta is over {MAX_FILE_META_BYTES // 1024} KiB: not a DICOM file this archive reads"
            )
        value = fp.read(length)
        if len(value) < length:
            raise DatasetError("DICOM file ends inside its File Meta (no dataset follows)")
        keyword = _WANTED.get((group << 16) | number)
        if keyword is not None:
            found[keyword] = value.decode("ascii", "replace").rstrip("\x00 ")
    missing = [kw for kw in _WANTED.values() if not found.get(kw)]
    if missing:
        raise DatasetError(f"File Meta lacks {', '.join(missing)}: PS3.10 requires it")
    return FileMeta(dataset_offset=offset, **found)
