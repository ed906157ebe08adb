"""uvicorn's HTTP/1.1 protocol with the bounds uvicorn lacks for a hostile network.

uvicorn closes an idle kept-alive connection, but not one that is sending a request
slowly: a client that opens a connection and sends half a request line holds it (and a
file descriptor) for ever. :class:`GuardedH11Protocol` arms a timer when a connection
opens, and again whenever a new request starts: the request's headers must be complete
within ``header_timeout`` (else ``408`` and close) and its body within ``body_timeout``
after them (else close). It also caps open connections per client address (a
connection over it is answered ``503`` and closed at once) and in all: at that cap a new
connection takes the place of the one that has waited longest without sending a whole
request (answered ``503`` and closed), so that stalled connections from many addresses
cannot keep a real client out; only when every connection is busy with a request is the
new one refused.

Request headers (request line included) larger than ``max_header_bytes`` are answered
``431`` and the connection closed. (h11's ``max_incomplete_event_size`` alone does not
do it: it applies only while the headers are incomplete, so headers that arrive in one
read pass whatever their size.)
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections import Counter, OrderedDict
from collections.abc import Sequence
from typing import Any, ClassVar

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)


def _plain_response(status: bytes, text: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status, b"content-type: text/plain; charset=utf-8", *extra, b"connection: close"]
    return b"\r\n".join([*head, b"content-length: %d" % len(text), b"", text])


_TIMEOUT_408 = _plain_response(b"408 Request Timeout", b"request not received in time; send it again")
_TOO_LARGE_431 = _plain_response(b"431 Request Header Fields Too Large", b"request headers too large")
_BUSY_503 = _plain_response(
    b"503 Service Unavailable", b"too many open connections; close some or retry shortly", b"retry-after: 5"
)


class ConnectionLimits:
    """Bounds and counters shared by every connection of one server.

    Used only on the server's event loop (no locks); the counters may be read from any
    thread.

    Parameters
    ----------
    header_timeout, body_timeout
        Seconds for a request's headers (from the connection opening or the request's
        first byte) and then for its body.
    max_connections, max_per_client
        Open connections in all and from one client address.
    max_header_bytes
        Largest request line + headers.
    uncapped
        Addresses or networks (trusted proxies) not held to ``max_per_client``.
    """

    def __init__(
        self,
        *,
        header_timeout: float,
        body_timeout: float,
        max_connections: int,
        max_per_client: int,
        max_header_bytes: int = 16_384,
        uncapped: Sequence[str] = (),
    ) -> None:
        self.header_timeout = header_timeout
        self.body_timeout = body_timeout
        self.max_connections = max_connections
        self.max_per_client = max_per_client
        self.max_header_bytes = max_header_bytes
        self._uncapped = [ipaddress.ip_network(n, strict=False) for n in uncapped]
        self.open = 0
        self.open_by_client: Counter[str] = Counter()
        # Connections waiting for a request's headers, longest waiting first: evictable.
        self.waiting: OrderedDict[GuardedH11Protocol, None] = OrderedDict()
        self.timed_out = 0
        self.refused = 0
        self.evicted = 0

    def _is_uncapped(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._uncapped)

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host``; ``False`` (not counted) when over a cap."""
        if self.open_by_client[host] >= self.max_per_client and not self._is_uncapped(host):
            return self._refuse(host)
        if self.open >= self.max_connections:
            if not self.waiting:
                return self._refuse(host)
            stalest, _ = self.waiting.popitem(last=False)
            stalest.evict()
            self.evicted += 1
        self.open += 1
        self.open_by_client[host] += 1
        return True

    def _refuse(self, host: str) -> bool:
        self.refused += 1
        if self.refused in (1, 10, 100) or self.refused % 1000 == 0:
            log.warning(
                "web connection refused: %d open in all, %d from this address (limits %d, %d); %d refused so far",
                self.open,
                self.open_by_client[host],
                self.max_connections,
                self.max_per_client,
                self.refused,
            )
        return False

    def release(self, host: str) -> None:
        self.open -= 1
        self.open_by_client[host] -= 1
        if self.open_by_client[host] <= 0:
            del self.open_by_client[host]

    def protocol(self) -> type[GuardedH11Protocol]:
        """A protocol class bound to these limits, for ``uvicorn.Config(http=...)``."""
        return type("BoundGuardedH11Protocol", (GuardedH11Protocol,), {"limits": self})


class GuardedH11Protocol(H11Protocol):
    """:class:`~uvicorn.protocols.http.h11_impl.H11Protocol` with request timeouts and connection caps."""

    limits: ClassVar[ConnectionLimits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timer: asyncio.TimerHandle | None = None
        self._phase = ""  # "headers", "body" or "" (no timer)
        self._host: str | None = None  # set once admitted (counted)
        self._head_bytes = 0  # of the request whose headers are being received
        self._head_tail = b""  # its last 3 bytes: the blank line may span two reads

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        host = self.client[0] if self.client else ""
        if not self.limits.admit(host):
            transport.write(_BUSY_503)
            transport.close()
            return
        self._host = host
        self._arm("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._host is not None:
            self.limits.release(self._host)
            self._host = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._host is None:
            return  # refused: the 503 is on its way
        if not self._phase and (self.cycle is None or self.cycle.response_complete):
            self._arm("headers")  # a new request on a kept-alive connection
        if self.conn.their_state is h11.IDLE and self._headers_too_large(data):
            self._disarm()
            self.transport.write(_TOO_LARGE_431)
            self.transport.close()
            return
        super().data_received(data)
        self._follow()

    def _headers_too_large(self, data: bytes) -> bool:
        """Count ``data`` toward the current request's headers; True once over the limit."""
        seen = self._head_tail + data
        end = seen.find(b"\r\n\r\n")
        if end >= 0:
            size = self._head_bytes - len(self._head_tail) + end + 4
            self._head_bytes, self._head_tail = 0, b""  # complete: the next request counts afresh
        else:
            size = self._head_bytes + len(data)
            self._head_bytes, self._head_tail = size, seen[-3:]
        return size > self.limits.max_header_bytes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            # The next request (perhaps already half-read, pipelined) gets its own deadline.
            self._follow(next_request=True)

    def _follow(self, next_request: bool = False) -> None:
        """Move the timer along with the request h11 is reading."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._phase != "body":
                self._arm("body")
        elif state is h11.IDLE:
            if next_request and self._phase != "headers":
                self._arm("headers")
        else:  # DONE, MUST_CLOSE, CLOSED, ERROR: nothing more to wait for from the client
            self._disarm()

    def _arm(self, phase: str) -> None:
        self._disarm()
        seconds = self.limits.header_timeout if phase == "headers" else self.limits.body_timeout
        self._phase = phase
        self._timer = self.loop.call_later(seconds, self._expired)
        if phase == "headers":
            self.limits.waiting[self] = None

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        self._phase = ""
        self.limits.waiting.pop(self, None)

    def evict(self) -> None:
        """Give this connection's place to a new one: 503, close, and stop counting it now."""
        self._disarm()
        if self._host is not None:
            self.limits.release(self._host)
            self._host = None
        if not self.transport.is_closing():
            if self.conn.our_state is h11.IDLE:
                self.transport.write(_BUSY_503)
            self.transport.close()

    def _expired(self) -> None:
        phase, self._timer, self._phase = self._phase, None, ""
        self.limits.waiting.pop(self, None)
        if self.transport.is_closing():
            return
        self.limits.timed_out += 1
        log.debug("closing a web connection from %s: request %s not received in time", self._host, phase)
        if phase == "headers" and self.conn.our_state is h11.IDLE:
            self.transport.write(_TIMEOUT_408)
        self.transport.close()
