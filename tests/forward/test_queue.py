"""The forward queue in the index: who gets what, idempotence, backoff, config."""

from __future__ import annotations

import json

import pytest

from pipeline.config import ForwardDestination, load_settings
from pipeline.errors import ConfigError
from pipeline.forward import Forwarder, backoff_delay, enqueue_forwards, list_jobs
from pipeline.index.db import session_scope
from pipeline.index.triage import ForwardState

PACS = {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "kinds": ["SEG", "SR"]}
VIEWER = {"ae_title": "VIEWER", "host": "127.0.0.1", "port": 11112, "kinds": ["SEG"]}


def test_one_job_per_subscribing_destination_and_no_duplicates(make_settings, index) -> None:
    settings = make_settings([PACS, VIEWER])
    _, factory = index(settings)
    destinations = settings.forward.destinations
    with session_scope(factory) as session:
        assert enqueue_forwards(session, "1.2.3.1", "SEG", destinations) == 2
        assert enqueue_forwards(session, "1.2.3.2", "SR", destinations) == 1  # VIEWER takes SEG only
    with session_scope(factory) as session:  # the flow re-run for the same result
        assert enqueue_forwards(session, "1.2.3.1", "SEG", destinations) == 0
        assert enqueue_forwards(session, "1.2.3.2", "SR", destinations) == 0
    with session_scope(factory, readonly=True) as session:
        jobs = {(j.SOPInstanceUID, j.destination_ae): j for j in list_jobs(session)}
    assert set(jobs) == {("1.2.3.1", "PACS"), ("1.2.3.1", "VIEWER"), ("1.2.3.2", "PACS")}
    assert all(j.state == ForwardState.pending and j.attempts == 0 for j in jobs.values())
    assert (jobs["1.2.3.1", "VIEWER"].host, jobs["1.2.3.1", "VIEWER"].port) == ("127.0.0.1", 11112)


def test_enqueue_refuses_what_it_cannot_route(make_settings, index) -> None:
    settings = make_settings([PACS])
    _, factory = index(settings)
    twins = [ForwardDestination(**PACS), ForwardDestination(**{**PACS, "host": "10.0.0.9"})]
    with session_scope(factory) as session:
        with pytest.raises(ValueError, match="unknown forward kind 'CT'"):
            enqueue_forwards(session, "1.2.3.1", "CT", settings.forward.destinations)
        with pytest.raises(ValueError, match="'PACS' appears twice"):
            enqueue_forwards(session, "1.2.3.1", "SEG", twins)
        assert enqueue_forwards(session, "1.2.3.1", "SEG", []) == 0
    with pytest.raises(ConfigError, match="appears twice"):
        Forwarder(
            settings.model_copy(update={"forward": settings.forward.model_copy(update={"destinations": twins})}),
            None,
            factory,
        )


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_delay(n, 5.0, 600.0) for n in range(1, 9)] == [5, 10, 20, 40, 80, 160, 320, 600]
    assert backoff_delay(1000, 5.0, 600.0) == 600.0


def test_destinations_from_the_environment(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(
        "RADTRIAGE_FORWARD__DESTINATIONS",
        json.dumps([{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "kinds": ["SEG", "SR"]}]),
    )
    monkeypatch.setenv("RADTRIAGE_FORWARD__MAX_ATTEMPTS", "3")
    config = tmp_path / "radtriage.toml"
    config.write_text('[forward]\nmax_attempts = 8\ndestinations = [{ ae_title = "OTHER", host = "h", port = 1 }]\n')
    settings = load_settings(config)
    assert [(d.ae_title, d.host, d.port, d.kinds) for d in settings.forward.destinations] == [
        ("ORTHANC", "127.0.0.1", 4242, ["SEG", "SR"])
    ]
    assert settings.forward.max_attempts == 3

    monkeypatch.setenv(
        "RADTRIAGE_FORWARD__DESTINATIONS", '[{"ae_title": "ORTHANC", "host": "h", "port": 4242, "kinds": ["CT"]}]'
    )
    with pytest.raises(ConfigError, match="forward.destinations.0.kinds"):
        load_settings(config)
