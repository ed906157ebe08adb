"""Media types of DICOMweb: reading ``Accept`` headers and writing multipart/related bodies.

``Accept`` is parsed into :class:`MediaRange` values (type, parameters, quality), so the
WADO-RS handlers can ask "which of what I can serve does the client take?" instead of
matching strings. Bodies are written as PS3.18 8.7.2 and RFC 2387 say, in the form
every client parses: the body starts with the boundary line (no preamble), each part has
a ``Content-Type`` header, and the closing delimiter ends the body.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.uid import (
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from pipeline.errors import PermanentError

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"
OCTET_STREAM = "application/octet-stream"
CHUNK = 1 << 20

# PS3.18 Table 8.7.3-5: the media type of a compressed frame, by transfer syntax.
FRAME_MEDIA_TYPES = {
    JPEGBaseline8Bit: "image/jpeg",
    JPEGExtended12Bit: "image/jpeg",
    JPEGLossless: "image/jpeg",
    JPEGLosslessSV1: "image/jpeg",
    JPEGLSLossless: "image/jls",
    JPEGLSNearLossless: "image/jls",
    JPEG2000Lossless: "image/jp2",
    JPEG2000: "image/jp2",
    RLELossless: "image/x-dicom-rle",
}


class NotAcceptable(PermanentError):
    """Nothing the client accepts can be served (HTTP 406); the message says what can."""


@dataclass(frozen=True)
class MediaRange:
    """One entry of an ``Accept`` header, e.g. ``multipart/related; type="application/dicom"``."""

    media_type: str
    params: dict[str, str] = field(default_factory=dict)
    quality: float = 1.0

    @property
    def part_type(self) -> str:
        """The type of the parts of a multipart range (``type=``), ``""`` when not given."""
        return self.params.get("type", "").lower()

    @property
    def transfer_syntax(self) -> str | None:
        """The ``transfer-syntax`` parameter (``"*"``: any), ``None`` when not given."""
        return self.params.get("transfer-syntax")

    def takes(self, media_type: str) -> bool:
        """Whether this range covers the single (non-multipart) ``media_type``."""
        if self.media_type in ("*/*", media_type):
            return True
        return self.media_type.endswith("/*") and media_type.startswith(self.media_type[:-1])


def _split(text: str, sep: str) -> list[str]:
    """Split on ``sep`` outside double quotes."""
    out, current, quoted = [], [], False
    for ch in text:
        if ch == '"':
            quoted = not quoted
        if ch == sep and not quoted:
            out.append("".join(current))
            current = []
        else:
            current.append(ch)
    out.append("".join(current))
    return out


def parse_media_type(text: str) -> MediaRange:
    """``type/subtype; name=value; ...`` (values may be quoted), names lowercased."""
    head, *params = _split(text, ";")
    values: dict[str, str] = {}
    quality = 1.0
    for param in params:
        name, _, value = param.partition("=")
        name = name.strip().lower()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        if name == "q":
            try:
                quality = float(value)
            except ValueError:
                quality = 0.0
        elif name:
            values[name] = value
    return MediaRange(head.strip().lower(), values, quality)


def parse_accept(header: str | None) -> list[MediaRange]:
    """The ranges of an ``Accept`` header, most preferred first (``*/*`` when absent or empty)."""
    if not header or not header.strip():
        return [MediaRange("*/*")]
    ranges = [parse_media_type(item) for item in _split(header, ",") if item.strip()]
    ranges = [r for r in ranges if r.quality > 0]
    return sorted(ranges, key=lambda r: -r.quality)  # stable: header order among equals


def new_boundary() -> str:
    return "radtriage-" + secrets.token_hex(12)


def multipart_content_type(part_type: str, boundary: str, transfer_syntax: str | None = None) -> str:
    """The response's ``Content-Type`` for a multipart/related body of ``part_type`` parts."""
    value = f'multipart/related; type="{part_type}"; boundary={boundary}'
    if transfer_syntax:
        value += f"; transfer-syntax={transfer_syntax}"
    return value


@dataclass
class Part:
    """One body part: its headers and its content (bytes, or chunks produced on demand)."""

    content_type: str
    content: bytes | Iterable[bytes]
    location: str = ""


def file_chunks(path: Path, start: int = 0) -> Iterator[bytes]:
    """A file's bytes from ``start``, in 1 MiB chunks (never the whole file in memory)."""
    with path.open("rb") as f:
        f.seek(start)
        while chunk := f.read(CHUNK):
            yield chunk


def multipart_body(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body of a multipart/related response, produced part by part."""
    delimiter = b"--" + boundary.encode("ascii")
    for part in parts:
        head = delimiter + b"\r\nContent-Type: " + part.content_type.encode("ascii") + b"\r\n"
        if part.location:
            head += b"Content-Location: " + part.location.encode("ascii") + b"\r\n"
        yield head + b"\r\n"
        if isinstance(part.content, bytes):
            yield part.content
        else:
            yield from part.content
        yield b"\r\n"
    yield delimiter + b"--\r\n"


def choose_instance_syntax(accept: list[MediaRange]) -> str | None:
    """For instances (``application/dicom`` parts): the transfer syntax to send.

    Returns ``"*"`` (as stored), a transfer syntax UID, or ``None`` for the default,
    Explicit VR Little Endian. Raises :class:`NotAcceptable` when no range takes DICOM.
    """
    for r in accept:
        if r.media_type == "multipart/related" and r.part_type in ("", "*/*", DICOM):
            return r.transfer_syntax or None
        if r.media_type in ("*/*", "multipart/*", DICOM):
            return r.transfer_syntax if r.media_type == DICOM else None
    raise NotAcceptable(f'instances are served as multipart/related; type="{DICOM}"')


def wants_json(accept: list[MediaRange]) -> bool:
    """Whether the client takes ``application/dicom+json`` (or plain JSON, or anything)."""
    return any(r.takes(DICOM_JSON) or r.takes("application/json") for r in accept)
