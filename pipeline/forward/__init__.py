"""Forwarding AI results to archive nodes: a durable, retried C-STORE queue.

``enqueue_forwards`` (:mod:`.queue`) queues an archived object for the destinations
that subscribe to its kind; the :class:`Forwarder` (:mod:`.forwarder`, a ``radtriage
serve`` component) delivers due jobs through :mod:`.scu`, one association per
destination per round, with exponential backoff and a dead state after
``forward.max_attempts``. ``radtriage forwards`` shows the queue.

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`, :mod:`pipeline.index`, :mod:`pipeline.dicom.syntaxes`,
:mod:`pipeline.process`; it finds files through an archive it is given.
"""

from pipeline.forward.forwarder import ArchiveLike, Forwarder, RoundResult, deliver_due
from pipeline.forward.queue import (
    KINDS,
    JobInfo,
    Outcome,
    Target,
    backoff_delay,
    enqueue_forwards,
    list_jobs,
    retry_now,
)

__all__ = [
    "KINDS",
    "JobInfo",
    "ArchiveLike",
    "Forwarder",
    "Outcome",
    "RoundResult",
    "Target",
    "backoff_delay",
    "deliver_due",
    "enqueue_forwards",
    "list_jobs",
    "retry_now",
]
