"""Group commit: writers that arrive while a commit runs are committed together in the next.

Each C-STORE thread brings one fsynced temp file to :meth:`GroupCommit.submit`. When no
commit is running it commits its own item at once (one association: no hand-off, no
added latency). Otherwise it queues and waits; when the running commit ends, one waiting
writer takes *everything* queued and commits it as one batch (one index transaction,
one fsync per distinct folder; :meth:`pipeline.archive.Archive._commit_batch`), so
under load the durable cost per instance falls with the number of concurrent writers
instead of queueing them one by one. Each writer returns (and its handler answers
Success) only after the batch holding its item has committed, so the guarantee is the
same as committing alone. A writer is never overtaken indefinitely: each batch takes
every item queued when it starts.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Outcome = TypeVar("Outcome")


@dataclass(eq=False)
class _Ticket(Generic[Item, Outcome]):
    item: Item
    finished: bool = False
    outcome: Outcome | BaseException | None = None


class GroupCommit(Generic[Item, Outcome]):
    """Run ``commit`` over batches of concurrently submitted items.

    Parameters
    ----------
    commit
        Commits a batch and returns one outcome per item, in order: a value, or the
        exception that item's writer is to raise. An exception it raises itself fails
        the whole batch (every writer in it raises it).
    """

    def __init__(self, commit: Callable[[Sequence[Item]], Sequence[Outcome | BaseException]]) -> None:
        self._commit = commit
        self._cond = threading.Condition()
        self._queue: list[_Ticket[Item, Outcome]] = []
        self._busy = False
        self.batches = 0  # counters for tests and the benchmark's log line
        self.items = 0

    def submit(self, item: Item) -> Outcome:
        """Commit ``item`` (alone, or with the others waiting); return its outcome or raise."""
        ticket: _Ticket[Item, Outcome] = _Ticket(item)
        with self._cond:
            self._queue.append(ticket)
            while self._busy and not ticket.finished:
                self._cond.wait()
            if not ticket.finished:
                self._busy = True
                batch, self._queue = self._queue, []
        if not ticket.finished:
            self._run(batch)
        if isinstance(ticket.outcome, BaseException):
            raise ticket.outcome
        return ticket.outcome  # type: ignore[return-value]

    def _run(self, batch: list[_Ticket[Item, Outcome]]) -> None:
        outcomes: Sequence[Outcome | BaseException]
        try:
            outcomes = self._commit([t.item for t in batch])
            if len(outcomes) != len(batch):
                raise AssertionError(f"commit returned {len(outcomes)} outcomes for {len(batch)} items")
        except BaseException as err:  # noqa: BLE001 - handed to every writer of the batch, re-raised there
            outcomes = [err] * len(batch)
        finally:
            with self._cond:
                self.batches += 1
                self.items += len(batch)
                for t, outcome in zip(batch, outcomes, strict=True):
                    t.outcome = outcome
                    t.finished = True
                self._busy = False
                self._cond.notify_all()
