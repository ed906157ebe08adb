"""Debian's Chromium, headless, as every browser test and the screenshot script start it.

A fresh profile each time (Playwright's default) and no background networking: this
machine's closed network otherwise refuses Chromium's own connections at every start.
"""

from __future__ import annotations

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
