"""The error hierarchy shared by every part of radtriage.

``TransientError`` is worth retrying (a busy archive, a destination that is down, GPU
memory); ``PermanentError`` is not (bad input, a model that cannot handle a study) and
is shown on the worklist instead.
"""

from __future__ import annotations


class RadtriageError(Exception):
    """Base class for every error radtriage raises on purpose."""


class ConfigError(RadtriageError):
    """The configuration is invalid; the message names the key and the problem."""


class TransientError(RadtriageError):
    """A failure that may pass: retry with backoff."""


class PermanentError(RadtriageError):
    """A failure that will not pass by retrying: report it, never retry."""


def describe_error(err: BaseException) -> str:
    """One line for people: the error and, when it wraps another, the root cause.

    Libraries wrap the real reason (MONAI: "applying transform ..."); the worklist
    should show what went wrong, not only where.
    """
    text = f"{type(err).__name__}: {err}"
    root = err
    while root.__cause__ is not None or (root.__context__ is not None and not root.__suppress_context__):
        root = root.__cause__ or root.__context__  # type: ignore[assignment]
    if root is not err:
        text += f" (cause: {type(root).__name__}: {root})"
    return text
