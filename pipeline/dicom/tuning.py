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

The tuned socket is also where a hostile peer is bounded before it is authenticated
(:class:`PduLimits`), because that is where pynetdicom reads: it reads the 6-byte PDU
header and then ``recv(length)`` with whatever length the peer claims. The header is
checked as it is read (PDU type, and a length of at most the advertised maximum PDU for
P-DATA after the A-ASSOCIATE-AC, far less for every other PDU); a PDU must arrive whole
within its deadline (``SO_RCVTIMEO``, set once per association, bounds each wait, and
the deadline is checked between reads: no extra syscall per PDU), and before the
association is accepted the deadline is also the connection's establishment deadline.
A PDU that breaks a limit is not read: the connection is closed with one log line.
The buffer for a PDU up to :data:`PREALLOCATE_MAX` (a whole PDU at the default maximum
PDU size) is allocated at once, which is the fast path; a longer one grows with the data
that actually arrives.

Also, :func:`cheap_context_copies` (call it on a started server): pynetdicom deep-copies
the acceptor's presentation contexts for every association, which re-validates every
transfer syntax UID: with all storage SOP classes and 13 transfer syntaxes that is
~60 ms of CPU per association. Contexts hold only immutable UIDs, so a copy of each
context object and of its list of transfer syntaxes is the same thing, 50x cheaper.

:func:`tune_association` also unbinds pynetdicom's DEBUG-only PDU summary handlers
unless its logger is at DEBUG (:func:`quiet_pdu_summaries`), and
:func:`cheap_context_copies` lets pynetdicom remember the UID texts it has checked
(:func:`remembered_uid_checks`): together ~20 ms less CPU per association for a
requestor that proposes every storage SOP class (dcmtk getscu).

This module, :mod:`pipeline.dicom.fastsend` (the sending side),
:mod:`pipeline.dicom.lease` (a socket read by the thread that needs the PDU),
:mod:`pipeline.dicom.subops` (a retrieve's sub-operations), :mod:`pipeline.dicom.incoming`
and :mod:`pipeline.dicom.spooling` (received messages) and :mod:`pipeline.dicom.storescp`
(C-STOREs read by the association's thread) are the only code that touches pynetdicom's
internals. It was written
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
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

import pynetdicom
import pynetdicom.association
from pynetdicom import evt
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


# PDU types (PS3.8 9.3): A-ASSOCIATE-RQ/AC/RJ, P-DATA-TF, A-RELEASE-RQ/RP, A-ABORT.
_PDU_TYPES = frozenset(range(0x01, 0x08))
_P_DATA_TF = 0x04
_A_ASSOCIATE_AC = b"\x02"  # the first byte of the PDU we send to accept
# Every PDU but P-DATA: an A-ASSOCIATE-RQ with 128 presentation contexts of 13 transfer
# syntaxes and a 64 KiB user identity is under 150 KiB.
MAX_CONTROL_PDU_LENGTH = 256 * 1024
# A P-DATA PDU is never accepted longer than this, whatever max_pdu_size says.
PDU_HARD_CAP = 64 * 1024 * 1024
# Senders that count the PDV item headers into the maximum overshoot it by a few bytes.
_PDU_SLACK = 4096
# PDUs up to this length get their whole buffer at once (the default 4 MiB PDU: one
# allocation, as fast as before); longer claims grow with the data that arrives.
PREALLOCATE_MAX = 4 * 1024 * 1024 + _PDU_SLACK
_FIRST_CHUNK = 1024 * 1024


@dataclass(frozen=True)
class PduLimits:
    """What a peer may send, enforced as each PDU is read by a tuned association.

    Parameters
    ----------
    max_pdu_size
        The maximum PDU length we advertise (0: unlimited, which means
        :data:`PDU_HARD_CAP`); P-DATA PDUs up to this (plus a few bytes of slack) are
        accepted once the association is accepted.
    pdu_timeout
        Seconds one PDU may take from its first byte to its last.
    establish_timeout
        Seconds from the connection to the A-ASSOCIATE-AC; every PDU before it must
        arrive within this too.
    """

    max_pdu_size: int = 4_194_304
    pdu_timeout: float = 30.0
    establish_timeout: float = 10.0

    @property
    def max_p_data_length(self) -> int:
        return advertised_pdu_size(self.max_pdu_size) + _PDU_SLACK


def advertised_pdu_size(max_pdu_size: int) -> int:
    """The maximum PDU size to advertise for ``max_pdu_size`` (0 or too large: the hard cap)."""
    return max_pdu_size if 0 < max_pdu_size <= PDU_HARD_CAP else PDU_HARD_CAP


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1_000_000))


class _LowLatencySocket(AssociationSocket):
    """An :class:`AssociationSocket` whose ``ready`` blocks on socket + wake-up pipe,
    and whose ``recv`` enforces :class:`PduLimits`."""

    _wake_r: socket.socket
    _wake_w: socket.socket
    _limits: PduLimits
    _establish_by: float  # time.monotonic() deadline for the A-ASSOCIATE-AC
    _accepted: bool  # we sent the A-ASSOCIATE-AC: P-DATA may now be long
    _body_deadline: float | None  # set between a PDU's header and its body
    send_lock: threading.Lock  # held while bytes are written

    @property
    def ready(self) -> bool:  # type: ignore[override]
        sock = self.socket
        if sock is None or self._is_connected is False:
            return False
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        # An event already queued (the DUL handles one per loop, after this check: on a
        # new connection "connection open" and the A-ASSOCIATE-RQ's arrival) must not
        # wait for the idle timeout: that alone was 10 ms per association.
        wait = 0.0 if self.event_queue.queue else IDLE_WAIT_SECONDS
        try:
            readable, _, _ = select.select([sock, self._wake_r], [], [], wait)
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
        """pynetdicom reads each PDU as ``recv(6)`` (the header), then ``recv(length)``.

        A short return is how pynetdicom learns that the connection is gone: it closes
        the association (a short header silently, a short body with one ERROR line).
        """
        deadline = self._body_deadline
        if deadline is not None:  # the body of the PDU whose header was just read
            self._body_deadline = None
            return self._read(nr_bytes, deadline)
        now = time.monotonic()
        deadline = now + self._limits.pdu_timeout
        if not self._accepted:
            deadline = min(deadline, self._establish_by)
        header = self._read(nr_bytes, deadline)
        if nr_bytes != 6 or len(header) != 6:
            return header
        pdu_type, length = header[0], int.from_bytes(header[2:6], "big")
        limit = self._limits.max_p_data_length if self._accepted and pdu_type == _P_DATA_TF else MAX_CONTROL_PDU_LENGTH
        if pdu_type in _PDU_TYPES and length > limit:
            self._refuse(f"a PDU of type 0x{pdu_type:02X} claims {length} bytes, more than the {limit} accepted")
            return bytearray()
        if pdu_type in _PDU_TYPES:  # (for an unknown type pynetdicom aborts, reading no body)
            self._body_deadline = deadline
        return header

    def _read(self, nr_bytes: int, deadline: float) -> bytearray:
        sock: Any = self.socket
        buffer = bytearray(nr_bytes if nr_bytes <= PREALLOCATE_MAX else _FIRST_CHUNK)
        got = 0
        try:
            while got < nr_bytes:
                if got == len(buffer):  # a long claim, and the peer keeps sending: grow
                    buffer.extend(bytes(min(len(buffer), nr_bytes - got)))
                with memoryview(buffer)[got:] as view:  # released before any resize
                    n = sock.recv_into(view)
                if not n:  # connection closed: return what arrived, as pynetdicom does
                    break
                got += n
                if got < nr_bytes and time.monotonic() > deadline:
                    self._refuse(f"a PDU did not arrive in time ({got} of {nr_bytes} bytes)")
                    break
        except (BlockingIOError, TimeoutError, ssl.SSLWantReadError):  # SO_RCVTIMEO expired
            self._refuse(f"the peer stopped sending inside a PDU ({got} of {nr_bytes} bytes)")
        except OSError as err:  # reset by the peer, or closed under us: the connection is gone
            log.debug("connection from %s lost inside a PDU: %s", self._peer(), err)
        if got < len(buffer):
            del buffer[got:]
        return buffer

    def send(self, bytestream: bytes) -> None:
        """``sendall``: no copy of the rest of the buffer per partial send (pynetdicom
        slices it), which matters for the many-PDU buffers of :mod:`pipeline.dicom.fastsend`."""
        if not self._accepted and bytestream[:1] == _A_ASSOCIATE_AC:
            self._accepted = True
            if self._limits.pdu_timeout > self._limits.establish_timeout:
                _set_timeouts(self.socket, self._limits.pdu_timeout)
        sock: Any = self.socket
        try:
            with self.send_lock:  # whole PDUs, also against pipeline.dicom.fastsend's direct writes
                sock.sendall(bytestream)
        except Exception:  # noqa: BLE001 - as pynetdicom: any failure means the connection is gone
            self.event_queue.put("Evt17")  # transport connection closed
            return
        evt.trigger(self.assoc, evt.EVT_DATA_SENT, {"data": bytestream})

    def reactor_wait(self, seconds: float) -> float:
        """How long the association's reactor may wait for a wake-up before it polls."""
        return seconds

    def _peer(self) -> str:
        info = getattr(self.assoc.requestor, "address_info", None)
        return str(getattr(info, "address", "?"))

    def _refuse(self, why: str) -> None:
        log.warning("DICOM connection from %s closed: %s", self._peer(), why)

    def close(self) -> None:
        super().close()
        for end in (self._wake_r, self._wake_w):
            end.close()


_REACTOR_POLL_SECONDS = 0.001  # the association reactor's sleep in pynetdicom 3.0
_WAKE_ATTRIBUTE = "_radtriage_wake"


class _ReactorClock:
    """Replaces the ``time`` module inside :mod:`pynetdicom.association` only.

    ``sleep(0.001)`` on a tuned association's thread waits on its wake-up event
    instead (returns as soon as a DIMSE message is queued), as long as its socket's
    :meth:`_LowLatencySocket.reactor_wait` says (the same 1 ms, unless the thread that
    sends on it reads its responses itself: :mod:`pipeline.dicom.lease`); everything
    else is the real :mod:`time`.
    """

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        wake = getattr(thread, _WAKE_ATTRIBUTE, None)
        if wake is None or seconds != _REACTOR_POLL_SECONDS:
            self._real.sleep(seconds)
            return
        sock = getattr(getattr(thread, "dul", None), "socket", None)
        if isinstance(sock, _LowLatencySocket):
            seconds = sock.reactor_wait(seconds)
        if wake.wait(seconds):
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
    """Make ``server`` copy its presentation contexts cheaply for each association (and
    check each UID of an association's negotiation once: :func:`remembered_uid_checks`)."""
    remembered_uid_checks()
    contexts = getattr(server, "contexts", None)
    if not isinstance(contexts, list) or not all(set(vars(cx)) <= _CONTEXT_FIELDS for cx in contexts):
        _skipped("cheap context copies", "the server's presentation contexts have an unknown layout")
        return False
    server.contexts = _CheapCopyContexts(contexts)
    return True


def quiet_pdu_summaries(assoc: Any) -> None:
    """Unbind pynetdicom's standard PDU handlers from ``assoc`` unless its logger is at DEBUG.

    pynetdicom binds them to every association; they write a DEBUG summary of every PDU,
    formatted whatever the log level: for the A-ASSOCIATE-RQ of a C-GET requestor with
    every storage SOP class and its SCP role, ~45 ms of CPU per association (a lookup
    per role for each context). Their output is DEBUG only; the DIMSE handlers, which
    also log at INFO, stay (see :func:`pipeline.dicom.fastsend.enable`).
    """
    if logging.getLogger("pynetdicom").isEnabledFor(logging.DEBUG):
        return
    from pynetdicom import _handlers

    for event, handler in (
        (evt.EVT_PDU_RECV, _handlers.standard_pdu_recv_handler),
        (evt.EVT_PDU_SENT, _handlers.standard_pdu_sent_handler),
    ):
        if (handler, None) in assoc.get_handlers(event):
            assoc.unbind(event, handler)


# Modules of pynetdicom 3.0.4 that call ``set_uid`` by its imported name.
_SET_UID_USERS = ("utils", "ae", "dimse_primitives", "pdu_items", "pdu_primitives", "presentation")
_UID_CACHE_SIZE = 4096


def remembered_uid_checks() -> bool:
    """Let pynetdicom check each UID text once per process instead of every time it sees it.

    pynetdicom checks every UID it decodes or sets (``pynetdicom.utils.set_uid``: three
    regular-expression matches and two ``UID`` objects): for a C-GET requestor that
    proposes every storage SOP class with an SCP role, ~2,000 checks and ~30 ms of CPU per
    association, in the A-ASSOCIATE-RQ, the negotiation and the A-ASSOCIATE-AC. The
    requestors' UIDs are the same each time: a check that passed (a conformant UID, from
    ``str``, ``bytes`` or a plain ``UID``) is remembered, up to :data:`_UID_CACHE_SIZE`
    texts; anything else (a failure, a non-conformant UID with its warning, a ``UID``
    that carries a private encoding) goes through pynetdicom's own ``set_uid`` every time.
    """
    import pynetdicom.utils as utils

    original = getattr(utils, "set_uid", None)
    if getattr(original, "_radtriage_remembers", False):
        return True
    modules = [getattr(pynetdicom, name, None) for name in _SET_UID_USERS]
    if original is None or any(getattr(m, "set_uid", None) is not original for m in modules):
        _skipped("remembered UID checks", "pynetdicom's set_uid is not where it was")
        return False
    from pydicom.uid import UID
    from pynetdicom import _config

    cache: dict[tuple[Any, ...], Any] = {}

    def set_uid(value: Any, name: str, allow_empty: bool = True, allow_none: bool = True, validate: bool = True) -> Any:
        if type(value) not in (str, bytes) and (type(value) is not UID or vars(value)):
            return original(value, name, allow_empty, allow_none, validate)
        key = (
            value,
            name,
            allow_empty,
            allow_none,
            validate,
            _config.ENFORCE_UID_CONFORMANCE,
            _config.VALIDATORS["UI"],
        )
        uid = cache.get(key)
        if uid is None:
            uid = original(value, name, allow_empty, allow_none, validate)
            if uid is not None and len(cache) < _UID_CACHE_SIZE and (not uid or uid.is_valid):
                cache[key] = uid
        return uid

    set_uid._radtriage_remembers = True  # type: ignore[attr-defined]
    for module in modules:
        module.set_uid = set_uid  # type: ignore[union-attr]
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


def _set_timeouts(sock: Any, seconds: float) -> None:
    """Bound each blocking ``recv``/``send`` on ``sock`` by ``seconds`` (kernel timers:
    no extra syscall per read, unlike :meth:`socket.socket.settimeout`)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(seconds))
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(seconds))
    except OSError as err:  # closed already: the association ends on its own
        log.debug("cannot set socket timeouts: %s", err)


def tune_association(assoc: Any, limits: PduLimits | None = None, *, requestor: bool = False) -> bool:
    """Switch one association's DUL to blocking, wake-up driven waits, reading PDUs
    within ``limits`` (default :class:`PduLimits`). ``True`` if done.

    ``requestor``: we opened it (a C-MOVE destination): no establishment deadline of an
    acceptor, and P-DATA up to the limit from the start."""
    dul = getattr(assoc, "dul", None)
    sock = getattr(dul, "socket", None)
    queue = getattr(dul, "to_provider_queue", None)
    if type(sock) is not AssociationSocket or queue is None or not hasattr(dul, "_run_loop_delay"):
        _skipped("low-latency DUL", "the association's DUL has an unknown layout")
        return False
    limits = limits or PduLimits()
    quiet_pdu_summaries(assoc)
    wake_r, wake_w = socket.socketpair()
    wake_r.setblocking(False)
    wake_w.setblocking(False)
    sock._wake_r, sock._wake_w = wake_r, wake_w  # type: ignore[attr-defined]
    sock._limits = limits  # type: ignore[attr-defined]
    sock._establish_by = time.monotonic() + limits.establish_timeout  # type: ignore[attr-defined]
    sock._accepted = requestor  # type: ignore[attr-defined]
    sock._body_deadline = None  # type: ignore[attr-defined]
    sock.send_lock = threading.Lock()  # type: ignore[attr-defined]
    sock.__class__ = _LowLatencySocket
    _set_timeouts(sock.socket, limits.pdu_timeout if requestor else min(limits.pdu_timeout, limits.establish_timeout))

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


def end_unrequested(assoc: Any) -> None:
    """Call on ``EVT_CONN_CLOSE``: when the peer closed before its A-ASSOCIATE-RQ, end
    the association thread now instead of when the ACSE timeout expires.

    pynetdicom's acceptor thread waits for the request on the DUL's queue for the whole
    ACSE timeout even after the connection is gone, and every such thread counts against
    the association limit: a burst of connect-and-close would lock modalities out. An
    empty item is what that wait returns on a timeout, so the thread ends the same way.
    """
    if not getattr(assoc, "is_acceptor", False):
        return
    dul = getattr(assoc, "dul", None)
    state = getattr(getattr(dul, "state_machine", None), "current_state", None)
    to_user = getattr(dul, "to_user_queue", None)
    if to_user is None or state is None:
        _skipped("early end of unrequested connections", "the association's DUL has an unknown layout")
        return
    if state == "Sta2":  # connected, no A-ASSOCIATE-RQ yet (the action runs before the transition)
        to_user.put(None)


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
