"""Prefect flows and deployments for radtriage (thin wiring over :mod:`pipeline`)."""
