"""The orchestration plane is closed: the Prefect API radtriage runs refuses anonymous
callers, and its files are radtriage's alone."""

from __future__ import annotations

import base64
import json
import stat
import urllib.error
import urllib.request

import pytest

from pipeline.triage.prefect_server import AUTH_FILE, LocalPrefectServer

pytestmark = pytest.mark.slow  # the session's Prefect server


def _call(server: LocalPrefectServer, method: str, path: str, *, auth: str | None, body: object = None) -> int:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{server.api_url}{path}", data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if auth is not None:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as err:
        return int(err.code)


def test_the_api_refuses_callers_without_the_auth_string(prefect_server: LocalPrefectServer) -> None:
    assert prefect_server.auth_string
    anonymous = [
        _call(prefect_server, "POST", "/deployments/filter", auth=None, body={}),
        _call(prefect_server, "POST", "/flow_runs/filter", auth=None, body={}),
        _call(prefect_server, "GET", "/admin/settings", auth=None),
        _call(prefect_server, "POST", "/deployments/filter", auth="radtriage:guessed", body={}),
    ]
    assert anonymous == [401, 401, 401, 401]
    assert _call(prefect_server, "POST", "/deployments/filter", auth=prefect_server.auth_string, body={}) == 200
    assert _call(prefect_server, "GET", "/health", auth=None) == 200  # the health check stays open


def test_the_auth_string_and_the_database_are_private(prefect_server: LocalPrefectServer) -> None:
    home = prefect_server.home
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / AUTH_FILE).stat().st_mode) == 0o600
    databases = list(home.glob("*.db"))
    assert databases, f"no Prefect database in {home}"
    assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in databases), [
        (p.name, oct(p.stat().st_mode)) for p in databases
    ]
