"""Reading a ``multipart/related`` request body (RFC 2387) as it arrives, part by part.

A STOW-RS upload is many instances, each up to gigabytes, in one body: :class:`RelatedReader`
is fed the body a chunk at a time and hands back each part's headers and data as they
arrive, so no part is ever held whole. The byte-level parsing is python-multipart's (the
parser FastAPI's forms use); this module adds what ``multipart/related`` needs on top:
the Content-Type parameters (:func:`parse_content_type`), tolerance for a preamble
before the first boundary, and telling a body that ends inside a part from one that ends
with the close delimiter (:meth:`RelatedReader.finish`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

MAX_PREAMBLE_BYTES = 64 * 1024  # text before the first boundary that is skipped; more is not multipart
MAX_PART_HEADERS = 16
MAX_PART_HEADER_BYTES = 8 * 1024  # one header line
# RFC 2046 5.1.1: 1 to 70 characters of these, not ending in a space.
_BCHARS = frozenset(b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ'()+_,-./:=? ")


class MultipartError(ValueError):
    """The request is not a readable ``multipart/related`` body (answered 400)."""


class UnsupportedMediaTypeError(MultipartError):
    """The Content-Type is not one this endpoint accepts (answered 415)."""


@dataclass(frozen=True)
class RelatedType:
    """The parameters of a ``multipart/related`` Content-Type that a reader needs."""

    boundary: bytes
    type: str  # the root body part's media type, lower case; "" when the parameter is absent


def parse_content_type(value: str) -> RelatedType:
    """``boundary`` and ``type`` of a ``multipart/related`` Content-Type (quoted or not).

    Raises
    ------
    UnsupportedMediaTypeError
        Not ``multipart/related`` at all.
    MultipartError
        ``multipart/related`` without a usable ``boundary`` parameter.
    """
    media_type, params = parse_options_header(value or "")
    if media_type.lower() != b"multipart/related":
        shown = media_type.decode("latin-1")[:80] or "none"
        raise UnsupportedMediaTypeError(
            f'Content-Type {shown} is not multipart/related: send multipart/related; type="application/dicom"'
        )
    boundary = params.get(b"boundary", b"")
    if not boundary:
        raise MultipartError("multipart/related Content-Type has no boundary parameter")
    if len(boundary) > 70 or boundary.endswith(b" ") or not set(boundary) <= _BCHARS:
        raise MultipartError("the boundary parameter is not a valid RFC 2046 boundary (1-70 characters)")
    return RelatedType(boundary=boundary, type=params.get(b"type", b"").decode("latin-1").strip().lower())


@dataclass(frozen=True)
class PartStart:
    """A part begins; ``headers`` by lower-case name (the last one wins when repeated)."""

    headers: dict[str, str]


@dataclass(frozen=True)
class PartData:
    data: bytes


@dataclass(frozen=True)
class PartEnd:
    """The part's closing delimiter was read: its data is complete."""


Event = PartStart | PartData | PartEnd


@dataclass
class _Header:
    name: bytearray = field(default_factory=bytearray)
    value: bytearray = field(default_factory=bytearray)


class RelatedReader:
    """A push parser: :meth:`feed` it chunks of the body, get back the events they complete.

    Memory stays within one chunk plus a few kilobytes whatever the parts' sizes: data is
    handed out as it is found (python-multipart holds back only what could be the start
    of a boundary).

    Parameters
    ----------
    boundary
        From :func:`parse_content_type`.
    """

    def __init__(self, boundary: bytes) -> None:
        self._delimiter = b"--" + boundary
        self._preamble = b""  # unsearched tail of the preamble (a delimiter may span chunks)
        self._skipped = 0
        self._started = False
        self._ended = False
        self._error: MultipartError | None = None
        self.parts = 0  # parts begun so far
        self.in_part = False  # a part has begun and its closing delimiter has not been read
        self._events: list[Event] = []
        self._headers: dict[str, str] = {}
        self._header = _Header()
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
            max_header_count=MAX_PART_HEADERS,
            max_header_size=MAX_PART_HEADER_BYTES,
        )

    @property
    def ended(self) -> bool:
        """Whether the close delimiter has been read (what follows it is ignored)."""
        return self._ended

    def feed(self, chunk: bytes) -> list[Event]:
        """Parse the next ``chunk`` of the body.

        Raises
        ------
        MultipartError
            The body is not multipart (no delimiter within :data:`MAX_PREAMBLE_BYTES`), or
            its structure broke in the previous chunk (whose complete parts were handed
            out first); nothing after that point can be trusted.
        """
        if self._error is not None:
            raise self._error
        if self._ended or not chunk:
            return []
        if not self._started:
            chunk = self._skip_preamble(chunk)
            if not chunk:
                return []
        try:
            self._parser.write(chunk)
        except MultipartParseError as err:
            # Raised on the next call: the parts this chunk completed come out first.
            self._error = MultipartError(f"multipart body is malformed: {err}")
        events, self._events = self._events, []
        return events

    def finish(self) -> None:
        """Say the body has ended.

        Raises
        ------
        MultipartError
            It ended before the close delimiter (inside a part when :attr:`in_part`), or
            had no delimiter at all (:attr:`parts` is 0).
        """
        if self._error is not None:
            raise self._error
        if self._ended:
            return
        if not self._started:
            raise MultipartError("the body has no multipart boundary: it is not multipart/related")
        raise MultipartError("the body ended before the closing boundary (truncated upload)")

    def _skip_preamble(self, chunk: bytes) -> bytes:
        seen = self._preamble + chunk
        start = 0
        while True:
            at = seen.find(self._delimiter, start)
            if at < 0:
                break
            if at == 0 and self._skipped == 0 or seen[max(0, at - 1) : at] == b"\n":
                self._started = True
                self._preamble = b""
                return seen[at:]
            start = at + 1
        keep = len(self._delimiter) + 1  # a delimiter (and the LF before it) may continue in the next chunk
        self._skipped += max(0, len(seen) - keep)
        self._preamble = seen[-keep:]
        if self._skipped > MAX_PREAMBLE_BYTES:
            raise MultipartError(
                f"no multipart boundary in the first {MAX_PREAMBLE_BYTES // 1024} KiB of the body: "
                "the body does not match the Content-Type's boundary"
            )
        return b""

    # ---- python-multipart callbacks -----------------------------------------------
    def _on_part_begin(self) -> None:
        self.parts += 1
        self.in_part = True
        self._headers = {}

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header.name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header.value += data[start:end]

    def _on_header_end(self) -> None:
        name = self._header.name.decode("latin-1").strip().lower()
        self._headers[name] = self._header.value.decode("latin-1").strip()
        self._header = _Header()

    def _on_headers_finished(self) -> None:
        self._events.append(PartStart(self._headers))

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if end > start:
            self._events.append(PartData(bytes(data[start:end])))

    def _on_part_end(self) -> None:
        self.in_part = False
        self._events.append(PartEnd())

    def _on_end(self) -> None:
        self._ended = True
