"""A temp file written while an instance still arrives, so its fsync has little left to do.

On one association the sender waits for each C-STORE response, so every millisecond
between the last PDU and Success counts. Written only at the end, a 512 KB slice left
its whole write-back to the fsync (2-4 ms on this machine's disk). A :class:`Spool`
receives the dataset's bytes as each PDU brings them and asks the kernel to start
writing back every :data:`WRITEBACK_BYTES` (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
which does not wait), so by the last PDU most of the file is on its way to the disk.
The fsync itself still comes after the last byte and before the rename: the durable
path (:mod:`pipeline.archive.store`) is unchanged.

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

    def __init__(self, path: Path, fd: int, key: tuple[str, str, str, str | None], *, writeback: bool) -> None:
        self.path = path
        self.key = key
        self.size = 0
        self.failed = False
        self._fd = fd
        self._writeback = writeback and _sync_file_range is not None
        self._kicked = 0
        self._finalizer = weakref.finalize(self, _close_and_remove, fd, path)

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
            if self._writeback and self.size - self._kicked >= WRITEBACK_BYTES:
                _sync_file_range(self._fd, self._kicked, self.size - self._kicked, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]
                self._kicked = self.size
        except OSError as err:
            log.info("spooling %s stopped (%s); the instance is written from memory instead", self.path.name, err)
            self.discard()

    def finish(self, *, fsync: bool) -> tuple[Path, int]:
        """fsync (``fdatasync``) and close the file; return it and its size. The caller
        now owns the file (renames or removes it)."""
        if self.failed:
            raise RuntimeError(f"spool {self.path} failed; store from memory instead")
        self._finalizer.detach()
        try:
            if fsync:
                os.fdatasync(self._fd)
        except OSError:
            _close_and_remove(self._fd, self.path)
            raise
        os.close(self._fd)
        return self.path, self.size

    def discard(self) -> None:
        """Close and remove the file (idempotent)."""
        self.failed = True
        self._finalizer()
