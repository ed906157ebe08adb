"""The inference slots of one worker process, handed out in the AI queue's order.

The worker claims a flow run from Prefect only when an inference slot is free for it
(:meth:`InferenceGate.reserve`): the runs still queued stay in Prefect's work queues,
which hand the next free slot to the most urgent, oldest run, whichever worker asks.
Had the worker claimed runs ahead, a bleed arriving later would wait behind routine
runs already claimed, and Prefect's concurrency limit retries a refused slot only
after roughly one inference (its Retry-After), not when the slot frees.

Everything else in a flow (loading the plan, writing and storing SEG and SR, the
worklist update) overlaps with the next run's inference: a slot is released as soon as
the model step ends, and :attr:`InferenceGate.on_release` wakes the worker to claim
the next run.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class InferenceGate:
    """A counting semaphore whose waiters are served most urgent first, then in arrival order.

    Parameters
    ----------
    slots
        Model runs at once in this process (``[triage] inference_slots``).
    """

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError(f"inference slots must be at least 1, not {slots}")
        self.slots = slots
        self.on_release: Callable[[], None] | None = None
        self._cond = threading.Condition()
        self._held = 0
        self._reserved: set[str] = set()
        self._waiting: list[tuple[int, int, str]] = []  # (-rank, arrival, key)
        self._arrival = itertools.count()

    @property
    def committed(self) -> int:
        """Slots held, waited for, or reserved by claimed runs that have not reached the gate."""
        with self._cond:
            return self._held + len(self._waiting) + len(self._reserved)

    def free(self) -> int:
        """How many more runs the worker may claim now."""
        return max(0, self.slots - self.committed)

    def reserve(self, key: str) -> bool:
        """Keep a slot's turn for a run about to be claimed; ``False`` when none is free."""
        with self._cond:
            if self._held + len(self._waiting) + len(self._reserved) >= self.slots:
                return False
            self._reserved.add(key)
            return True

    def cancel(self, key: str) -> None:
        """Drop an unused reservation (the claim was lost, or the run ended before its model step)."""
        with self._cond:
            self._reserved.discard(key)

    @contextmanager
    def slot(self, key: str = "", rank: int = 0) -> Iterator[None]:
        """Hold one slot for the block; wait first if none is free.

        ``rank`` is the urgency (:attr:`pipeline.ai.findings.Priority.rank`): a more
        urgent waiter goes first, equal ones in arrival order.
        """
        ticket = (-rank, next(self._arrival), key)
        with self._cond:
            self._reserved.discard(key)
            self._waiting.append(ticket)
            self._waiting.sort()
            while self._held >= self.slots or self._waiting[0] != ticket:
                self._cond.wait()
            self._waiting.pop(0)
            self._held += 1
            self._cond.notify_all()  # the next waiter may now be first with a slot free
        try:
            yield
        finally:
            with self._cond:
                self._held -= 1
                self._cond.notify_all()
            if self.on_release is not None:
                self.on_release()
