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
