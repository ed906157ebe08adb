"""Lower per-message latency of pynetdicom associations (used by the receiver).

pynetdicom's DUL thread polls: when neither the peer nor the local user has anything,
it sleeps 1 ms, and reads sockets 4 KiB per ``recv``. For a modality sending one image
after another, each C-STORE then waits up to a millisecond twice (to read the request,
to send the response) and copies every byte through many small reads: with ~5 ms per
image spent in pynetdicom, that alone makes the receiver slower than dcmtk or Orthanc.

:func:`tune_association` (call it from an ``EVT_CONN_OPEN`` handler) keeps pynetdicom's
logic and changes only how its threads wait and read:

* the DUL thread blocks in ``select`` on the socket *and* on a wake-up pipe that is
  written whenever a primitive is queued for sending, so it reacts at once to either,
  without spinning; it reads each PDU with ``recv_into`` into one buffer;
* the association thread's 1 ms poll for complete DIMSE messages becomes a wait on an
  event that the DIMSE layer sets when it queues one (only for tuned associations;
  every other sleep in pynetdicom, and every other association, is unchanged).

Also, :func:`cheap_context_copies` (call it on a started server): pynetdicom deep-copies
the acceptor's presentation contexts for every association, which re-validates every
transfer syntax UID: with all storage SOP classes and 13 transfer syntaxes that is
~60 ms of CPU per association. Contexts hold only immutable UIDs, so a copy of each
context object and of its list of transfer syntaxes is the same thing, 50x cheaper.

This module is the only code that touches pynetdicom's internals. It was written
against pynetdicom 3.0.4 (pinned exactly in pyproject.toml); with any other layout it
leaves the association untouched and says so with a WARNING (once per process and
tuning), so an upgrade that makes it ineffective is seen in the log, and
``tests/core/test_tuning.py`` fails on it.
"""

from __future__ import annotations

import copy
import logging
import select
import socket
import ssl
import threading
import time
from typing import Any

import pynetdicom
import pynetdicom.association
from pynetdicom.transport import AssociationSocket

log = logging.getLogger(__name__)

PYNETDICOM_VERSION = "3.0.4"
_warned: set[str] = set()


def _skipped(tuning: str, why: str) -> None:
    """Log that a tuning was not applied: a WARNING the first time, then at DEBUG."""
    level = logging.DEBUG if tuning in _warned else logging.WARNING
    _warned.add(tuning)
    log.log(
        level,
        "pynetdicom tuning %r skipped (%s): the receiver works, but slower; pynetdicom %s "
        "is not the %s this was written for",
        tuning,
        why,
        pynetdicom.__version__,
        PYNETDICOM_VERSION,
    )


# How long the DUL thread blocks when idle; bounds how late it notices timers and
# the end of an association (it wakes at once for data and for outgoing primitives).
IDLE_WAIT_SECONDS = 0.01


class _LowLatencySocket(AssociationSocket):
    """An :class:`AssociationSocket` whose ``ready`` blocks on socket + wake-up pipe."""

    _wake_r: socket.socket
    _wake_w: socket.socket

    @property
    def ready(self) -> bool:  # type: ignore[override]
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], IDLE_WAIT_SECONDS)
        except (OSError, ValueError):
            self.event_queue.put("Evt17")  # transport connection closed
            return False
        if self._wake_r in readable:
            try:
                self._wake_r.recv(4096)
            except BlockingIOError:
                pass
        return sock in readable

    def recv(self, nr_bytes: int) -> bytearray:
        buffer = bytearray(nr_bytes)
        got = 0
        with memoryview(buffer) as view:
            while got < nr_bytes:
                n = self.socket.recv_into(view[got:], nr_bytes - got)  # type: ignore[union-attr]
                if not n:  # connection closed: return what arrived, as pynetdicom does
                    break
                got += n
        if got < nr_bytes:
            del buffer[got:]
        return buffer

    def close(self) -> None:
        super().close()
        for end in (self._wake_r, self._wake_w):
            end.close()


_REACTOR_POLL_SECONDS = 0.001  # the association reactor's sleep in pynetdicom 3.0
_WAKE_ATTRIBUTE = "_radtriage_wake"


class _ReactorClock:
    """Replaces the ``time`` module inside :mod:`pynetdicom.association` only.

    ``sleep(0.001)`` on a tuned association's thread waits on its wake-up event
    instead (same upper bound, returns as soon as a DIMSE message is queued);
    everything else is the real :mod:`time`.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        wake = getattr(threading.current_thread(), _WAKE_ATTRIBUTE, None)
        if wake is None or seconds != _REACTOR_POLL_SECONDS:
            self._real.sleep(seconds)
        elif wake.wait(seconds):
            wake.clear()


def _install_reactor_clock() -> bool:
    module_time = getattr(pynetdicom.association, "time", None)
    if isinstance(module_time, _ReactorClock):
        return True
    if module_time is not time:
        return False
    pynetdicom.association.time = _ReactorClock(time)  # type: ignore[attr-defined]
    return True


class _CheapCopyContexts(list):  # type: ignore[type-arg]
    """The server's presentation contexts; ``deepcopy`` copies each context shallowly,
    with its own lists (every value inside is an immutable UID, int, bool or None)."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        copies = []
        for cx in self:
            clone = copy.copy(cx)
            for name, value in vars(cx).items():
                if isinstance(value, list):
                    setattr(clone, name, list(value))
            copies.append(clone)
        return copies


def cheap_context_copies(server: Any) -> bool:
    """Make ``server`` copy its presentation contexts cheaply for each association."""
    contexts = getattr(server, "contexts", None)
    if not isinstance(contexts, list) or not all(set(vars(cx)) <= _CONTEXT_FIELDS for cx in contexts):
        _skipped("cheap context copies", "the server's presentation contexts have an unknown layout")
        return False
    server.contexts = _CheapCopyContexts(contexts)
    return True


_CONTEXT_FIELDS = {
    "_context_id",
    "_abstract_syntax",
    "_transfer_syntax",
    "result",
    "_scu_role",
    "_scp_role",
    "_as_scp",
    "_as_scu",
}


def _wrap_put(queue: Any, after: Any) -> None:
    original_put = queue.put

    def put(item: Any, *args: Any, **kwargs: Any) -> None:
        original_put(item, *args, **kwargs)
        after()

    queue.put = put


def tune_association(assoc: Any) -> bool:
    """Switch one association's DUL to blocking, wake-up driven waits. ``True`` if done."""
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    queue = getattr(dul, "to_provider_queue", None)
    if type(sock) is not AssociationSocket or queue is None or not hasattr(dul, "_run_loop_delay"):
        _skipped("low-latency DUL", "the association's DUL has an unknown layout")
        return False
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    sock._wake_r, sock._wake_w = wake_r, wake_w  # type: ignore[attr-defined]
    sock.__class__ = _LowLatencySocket

    def wake_dul() -> None:
        try:
            wake_w.send(b"\0")
        except OSError:
            pass  # a wake-up is already pending (buffer full), or the association is closing

    _wrap_put(queue, wake_dul)
    dul._run_loop_delay = 0  # the wait happens in select() instead

    messages = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if messages is None:
        _skipped("reactor wake-up", "the association has no DIMSE message queue")
    elif not _install_reactor_clock():
        _skipped("reactor wake-up", "pynetdicom.association.time is not the time module")
    else:
        event = threading.Event()
        setattr(assoc, _WAKE_ATTRIBUTE, event)
        _wrap_put(messages, event.set)
    return True


def is_tuned(assoc: Any) -> bool:
    """Whether every tuning of :func:`tune_association` is active on ``assoc``."""
    sock = getattr(getattr(assoc, "dul", None), "socket", None)
    return (
        isinstance(sock, _LowLatencySocket)
        and getattr(assoc, _WAKE_ATTRIBUTE, None) is not None
        and isinstance(getattr(pynetdicom.association, "time", None), _ReactorClock)
    )


def contexts_are_cheap(server: Any) -> bool:
    """Whether :func:`cheap_context_copies` is active on ``server``."""
    return isinstance(getattr(server, "contexts", None), _CheapCopyContexts)
