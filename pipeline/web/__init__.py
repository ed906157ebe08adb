"""The radiologist's worklist web app and JSON API (FastAPI).

:func:`create_app` builds the application; :class:`WebServer` runs it in a thread as a
``radtriage serve`` component.
"""

from pipeline.web.app import create_app
from pipeline.web.server import WebServer

__all__ = ["WebServer", "create_app"]
