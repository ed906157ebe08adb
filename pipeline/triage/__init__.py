"""Triage: from a received study to its AI results on the worklist.

:mod:`.stability` decides when a study is complete (quiet period); :mod:`.dispatch`
turns stable studies into Prefect flow runs (the index is the outbox); :mod:`.steps`
holds the flow's steps as plain functions; :mod:`.runtime` the process-wide objects a
flow run uses; :mod:`.prefect_server` runs the embedded Prefect API server for
one-machine installs.

May import every core package below it (index, archive, ai, results, forward) and
Prefect's public client (:mod:`.dispatch` only). Flows and tasks are defined in
``flows/``, never here.
"""
