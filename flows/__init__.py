"""Prefect flows and deployments for radtriage: thin wiring over :mod:`pipeline`.

:mod:`.triage` (the ``triage-study`` flow and its tasks), :mod:`.deployment` (its
deployment and the inference concurrency limit), :mod:`.worker` (runs flow runs in this
process, models kept in memory), :mod:`.serve` (the Prefect side of ``radtriage serve``
and ``worker``), :mod:`.engine` (the only code that uses Prefect's internals).

May import: :mod:`pipeline`'s core packages. Never :mod:`pipeline.cli` or :mod:`pipeline.lab`.
"""
