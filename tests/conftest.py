"""Suite-wide settings: real peers need TCP_NODELAY, Prefect needs a private home."""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TCP_NODELAY", "1")
os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="radtriage-prefect-"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_LOGGING_TO_API_ENABLED", "false")
