"""A temp file written while an instance still arrives, so its fsync has little left to do.

On one association the sender waits for each C-STORE response, so every millisecond
between the last PDU and Success counts. Written only at the end, a 512 KB slice left
its whole write-back to the fsync (2-4 ms on this machine's disk). A :class:`Spool`
receives the dataset's bytes as each PDU brings them and asks the kernel to start
writing back every :data:`WRITEBACK_BYTES` (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
which does not wait), so by the last PDU most of the file is on its way to the disk.
The fsync itself still comes after the last byte and before the rename: the durable
path (:mod:`pipeline.archive.store`) is unchanged. For a C-STORE that pynetdicom read, it
starts as soon as the last byte is written (:meth:`Spool.flush_ahead`, called by the
receiver when the message is complete, before the C-STORE handler even runs), in the
archive's writer pool, so it overlaps everything the handler does before it needs the
file. The C-STOREs an association's own thread reads (:mod:`pipeline.dicom.storescp`)
are synced by that thread after the header is parsed: there, handing the fdatasync to
the pool and waiting for it cost more CPU and time than the overlap saved.

A spool that cannot write (disk full, ...) gives up quietly and the store falls back to
writing the bytes it holds in memory, which reports the error the usual way. A spool
dropped without being stored (the association was aborted) closes and removes its file.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import weakref
from concurrent.futures import Executor, Future
from pathlib import Path

log = logging.getLogger(__name__)

WRITEBACK_BYTES = 128 * 1024
_SYNC_FILE_RANGE_WRITE = 2


def _load_sync_file_range() -> object | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.sync_file_range
    except (OSError, AttributeError):  # not Linux: the fsync does all the work, as before
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


def _close_and_remove(fd: int, path: Path) -> None:
    try:
        os.close(fd)
    except OSError:
        pass
    path.unlink(missing_ok=True)


class Spool:
    """One temp file in ``incoming/`` that grows as bytes arrive (see the module docstring).

    Made by :meth:`pipeline.archive.Archive.open_spool`, which writes the File Meta first;
    ``key`` records what that File Meta says, so the store can check it against the
    request before using the file.
    """

    def __init__(
        self,
        path: Path,
        fd: int,
        key: tuple[str, str, str, str | None],
        *,
        writeback: bool,
        flusher: Executor | None = None,
    ) -> None:
        self.path = path
        self.key = key
        self.size = 0
        self.failed = False
        self._fd = fd
        self._writeback = writeback and _sync_file_range is not None
        self._kicked = 0
        self._flusher = flusher
        self._flushing: Future[None] | None = None
        self._written_since_flush = False
        self._finalizer = weakref.finalize(self, _close_and_remove, fd, path)

    @property
    def flushing(self) -> bool:
        """Whether :meth:`flush_ahead` started the fdatasync (:meth:`finish` then only waits)."""
        return self._flushing is not None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        """Append ``data``; on an OS error stop spooling (the caller's bytes are the fallback)."""
        if self.failed:
            return
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
                self.size += written
            if self._flushing is not None:
                self._written_since_flush = True  # not covered: finish() syncs again
            if self._writeback and self.size - self._kicked >= WRITEBACK_BYTES:
                _sync_file_range(self._fd, self._kicked, self.size - self._kicked, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]
                self._kicked = self.size
        except OSError as err:
            log.info("spooling %s stopped (%s); the instance is written from memory instead", self.path.name, err)
            self.discard()

    def flush_ahead(self) -> None:
        """The last byte is written: start the ``fdatasync`` now in the flusher pool
        (nothing without one, i.e. with fsync off). Call once, from the thread that writes."""
        if self.failed or self._flusher is None or self._flushing is not None:
            return
        self._flushing = self._flusher.submit(self._flush)  # the task holds self: fd stays open

    def _flush(self) -> None:
        os.fdatasync(self._fd)

    def _wait_for_flush(self) -> None:
        """Wait for :meth:`flush_ahead`'s fdatasync; its OSError is raised here."""
        flushing, self._flushing = self._flushing, None
        if flushing is not None:
            flushing.result()

    def finish(self, *, fsync: bool) -> tuple[Path, int]:
        """fsync (``fdatasync``) and close the file; return it and its size. The caller
        now owns the file (renames or removes it)."""
        if self.failed:
            raise RuntimeError(f"spool {self.path} failed; store from memory instead")
        self._finalizer.detach()
        try:
            ahead = self._flushing is not None
            self._wait_for_flush()  # even with fsync off: the fd must not close under it
            if fsync and (not ahead or self._written_since_flush):
                os.fdatasync(self._fd)
        except OSError:
            _close_and_remove(self._fd, self.path)
            raise
        os.close(self._fd)
        return self.path, self.size

    def discard(self) -> None:
        """Close and remove the file (idempotent)."""
        self.failed = True
        try:
            self._wait_for_flush()
        except OSError:
            pass  # the file goes anyway
        self._finalizer()
