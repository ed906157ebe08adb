"""The radiologist's worklist web app and JSON API (FastAPI).

:mod:`.worklist` (the worklist's queries and the mark-read transaction), :mod:`.app`
(the application: login, audit, routes), :mod:`.pages` and :mod:`.api` (HTML and JSON),
:mod:`.auth` (passwords, sessions, CSRF, lockout, the HTTP Basic cache), :mod:`.imaging`
(key images with the SEG drawn), :mod:`.server` (uvicorn in a thread, a ``radtriage
serve`` component; HTTPS, trusted proxies), :mod:`.protocol` (uvicorn's HTTP/1.1 with
request timeouts, a header size limit and connection caps).
:func:`create_app` builds the application; :class:`WebServer` runs it.

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`, :mod:`pipeline.index`,
:mod:`pipeline.archive`, :mod:`pipeline.ai.findings`. Never torch or MONAI: it answers HTTP.
"""

from pipeline.web.app import create_app
from pipeline.web.server import WebServer

__all__ = ["WebServer", "create_app"]
