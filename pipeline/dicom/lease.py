"""Read a response on a pynetdicom association in the thread that sent the request
(and, for :mod:`pipeline.dicom.storescp`, the next request in the thread that answered
the last).

pynetdicom reads every PDU in the association's DUL thread, decodes it through its state
machine and DIMSE layer, and hands the message to the waiting thread through a queue.
For a C-MOVE or C-GET, one C-STORE sub-operation after another, that is ~0.2 ms of
decoding and two thread hand-offs (each a wait for the GIL) per instance: a third of the
CPU a retrieve costs, and the latency of every sub-operation.

A :class:`Lease` lets the thread that sent a request read its response itself:

* while a lease is held the DUL thread does not select the socket (it still wakes for
  what is queued for sending); a DUL that saw the socket readable just before waits on
  ``read_lock`` and then reads only if bytes are still there. Every PDU is read whole by
  one reader or the other, under ``read_lock``;
* the holder reads a whole PDU within the limits the DUL reads within
  (:class:`pipeline.dicom.tuning.PduLimits`, with the same checks and log lines);
* a PDU the holder does not take (an A-ABORT, an A-RELEASE-RQ, a C-CANCEL, a message
  in several PDUs) is handed back (:meth:`Lease.hand_back`): the DUL reads those very
  bytes before the socket's, and pynetdicom handles them as it always does;
* a connection that breaks, or a PDU that breaks a limit, ends as it would in the DUL
  (Evt17: pynetdicom's "transport connection closed").

A lease is taken only in Sta6 with nothing of the peer's half-processed (no PDU waiting
for the state machine, no partial DIMSE message), never on TLS (buffered bytes are
invisible to ``select``), and always ends before the request's ``send_*`` call returns.
Written against pynetdicom 3.0.4, like :mod:`pipeline.dicom.tuning`.
"""

from __future__ import annotations

import logging
import select
import ssl
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from pipeline.dicom.tuning import _WAKE_ATTRIBUTE, IDLE_WAIT_SECONDS, _LowLatencySocket

log = logging.getLogger(__name__)

_POLL_SECONDS = 0.5  # how often a waiting holder checks that the association still stands
# After a lease, the DUL leaves the socket alone this long more, expecting the next
# sub-operation's lease (else it would select the socket between two, and wake for
# every response only to find it taken); :func:`unreserve` ends that at once.
RESERVE_SECONDS = 0.1


class _LeasableSocket(_LowLatencySocket):
    """A tuned socket that a :class:`Lease` can read, with bytes handed back to the DUL."""

    read_lock: threading.Lock  # held by whoever reads a PDU
    _leased: bool
    _reserved_until: float  # time.monotonic(): the DUL keeps off the socket until then
    _handed_back: bytearray

    @property
    def ready(self) -> bool:  # type: ignore[override]
        if self._handed_back:
            return True
        reserved = self._reserved_until - time.monotonic()
        if not self._leased and reserved <= 0:
            return bool(_LowLatencySocket.ready.fget(self))  # type: ignore[attr-defined]
        # Leased or reserved: wait for a wake-up only (something to send, bytes handed back).
        wait = (
            0.0 if self.event_queue.queue else IDLE_WAIT_SECONDS if self._leased else min(reserved, IDLE_WAIT_SECONDS)
        )
        try:
            readable, _, _ = select.select([self._wake_r], [], [], wait)
        except (OSError, ValueError):
            return False
        if readable:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        return bool(self._handed_back)

    def recv(self, nr_bytes: int) -> bytearray:
        """What a lease handed back first (whole PDUs), then the socket's bytes."""
        if self._handed_back:
            data = self._handed_back[:nr_bytes]
            del self._handed_back[:nr_bytes]
            return data
        return _LowLatencySocket.recv(self, nr_bytes)

    def reactor_wait(self, seconds: float) -> float:
        """While leased or reserved nothing arrives for the reactor but what the DUL
        queues (which wakes it): it polls every :data:`IDLE_WAIT_SECONDS`, not every 1 ms."""
        if self._leased or self._reserved_until > time.monotonic():
            return max(seconds, IDLE_WAIT_SECONDS)
        return seconds

    def wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending, or the association is closing


def _readable(sock: Any) -> bool:
    try:
        return bool(select.select([sock], [], [], 0)[0])
    except (OSError, ValueError, TypeError):
        return True  # let pynetdicom's read find out what is wrong


def _read_pdu_data(sock: _LeasableSocket, original: Any) -> None:
    """The DUL's ``_read_pdu_data``: under ``read_lock``, and only if there is still
    something to read (a lease may have read what ``ready`` saw)."""
    with sock.read_lock:
        if sock._handed_back or _readable(sock.socket):
            original()


def make_leasable(assoc: Any) -> bool:
    """Let :func:`take` lease ``assoc``'s socket (a tuned association); ``True`` if done."""
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    if isinstance(sock, _LeasableSocket):
        return True
    if type(sock) is not _LowLatencySocket or not callable(getattr(dul, "_read_pdu_data", None)):
        return False
    if isinstance(sock.socket, ssl.SSLSocket):
        return False
    needed = ("_recv_pdu", "event_queue", "state_machine", "_idle_timer")
    if not all(hasattr(dul, name) for name in needed) or not hasattr(getattr(assoc, "dimse", None), "message"):
        return False
    sock.read_lock = threading.Lock()  # type: ignore[attr-defined]
    sock._leased = False  # type: ignore[attr-defined]
    sock._reserved_until = 0.0  # type: ignore[attr-defined]
    sock._handed_back = bytearray()  # type: ignore[attr-defined]
    sock.__class__ = _LeasableSocket
    dul._read_pdu_data = partial(_read_pdu_data, sock, dul._read_pdu_data)
    for name in ("release", "abort"):  # the DUL reads the answer (A-RELEASE-RP) at once
        setattr(assoc, name, partial(_unreserved, assoc, getattr(assoc, name)))
    return True


def _unreserved(assoc: Any, original: Any) -> None:
    unreserve(assoc)
    reactor = getattr(assoc, _WAKE_ATTRIBUTE, None)
    if reactor is not None:  # release() waits for the reactor to pause: now, not in 10 ms
        reactor.set()
    original()


def reserve(assoc: Any, seconds: float = RESERVE_SECONDS) -> bool:
    """Keep the DUL off ``assoc``'s socket for ``seconds`` (until a lease ends or
    :func:`unreserve`), so that a lease taken meanwhile reads what comes next; ``True``
    if done (a leasable socket)."""
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    if not isinstance(sock, _LeasableSocket):
        return False
    sock._reserved_until = time.monotonic() + seconds
    return True


def unreserve(assoc: Any) -> None:
    """No more leases follow for now: the DUL reads ``assoc``'s socket again at once.
    Call it when the sub-operations end on an association that goes on (C-GET)."""
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    if isinstance(sock, _LeasableSocket) and sock._reserved_until:
        sock._reserved_until = 0.0
        sock.wake()


class Lease:
    """The right to read ``assoc``'s socket until :meth:`end` (see the module docstring)."""

    def __init__(self, assoc: Any, sock: _LeasableSocket) -> None:
        self.assoc = assoc
        self.sock = sock
        self.ended = False

    def read_pdu(
        self, timeout: float | None, *, poll: float = _POLL_SECONDS, give_up: Callable[[], bool] | None = None
    ) -> bytearray | None:
        """The next whole PDU; ``None`` when the association or the connection is gone
        (then the DUL has Evt17 to act on), or when ``give_up()`` (asked every ``poll``
        seconds while none comes) says so; :class:`TimeoutError` when none began
        within ``timeout`` seconds (the DIMSE timeout)."""
        sock, dul = self.sock, self.assoc.dul
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            raw = sock.socket
            if raw is None or dul.state_machine.current_state != "Sta6" or (give_up is not None and give_up()):
                return None
            wait = poll if deadline is None else min(poll, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(f"no response within the DIMSE timeout ({timeout} s)")
            try:
                if select.select([raw], [], [], wait)[0]:
                    break
            except (OSError, ValueError):
                return self._closed()
        # The DUL's own read: the same limits, deadlines and log lines.
        header = _LowLatencySocket.recv(sock, 6)
        if len(header) != 6:
            return self._closed()
        pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
        if not 0x01 <= pdu_type <= 0x07:
            self.hand_back(header)  # the DUL finds it unknown, as it would have
            return None
        body = _LowLatencySocket.recv(sock, length)  # also for 0: it ends the header's deadline
        if len(body) != length:
            return self._closed()
        dul._idle_timer.restart()  # what the DUL does for each PDU it reads
        header += body
        return header

    def _closed(self) -> None:
        self.assoc.dul.event_queue.put("Evt17")  # transport connection closed, as the DUL does
        self.end(reserve=False)
        return None

    def hand_back(self, pdu: bytes | bytearray) -> None:
        """Give ``pdu`` (read by this lease) to the DUL, to be read before the socket."""
        self.sock._handed_back += pdu
        self.end(reserve=False)

    def end(self, *, reserve: bool = True) -> None:
        """Give the socket back; ``reserve``: the DUL still keeps off it for
        :data:`RESERVE_SECONDS`, for the next lease (no reservation after a hand-back)."""
        if self.ended:
            return
        self.ended = True
        sock = self.sock
        sock._reserved_until = time.monotonic() + RESERVE_SECONDS if reserve else 0.0
        sock._leased = False
        sock.read_lock.release()
        if not reserve:
            sock.wake()


def take(assoc: Any) -> Lease | None:
    """A lease on ``assoc``'s socket, or ``None`` when one cannot be had now (not leasable,
    not established, the peer's bytes half-processed, the DUL reading)."""
    dul = assoc.dul
    sock = dul.socket
    if not isinstance(sock, _LeasableSocket) or not sock.read_lock.acquire(blocking=False):
        return None
    if (
        sock._handed_back
        or dul.state_machine.current_state != "Sta6"
        or dul._recv_pdu.queue
        or dul.event_queue.queue
        or assoc.dimse.message is not None
    ):
        sock.read_lock.release()
        return None
    sock._leased = True
    return Lease(assoc, sock)
