"""Running radtriage's components in one process.

:mod:`.component` defines what a component is and the poll-loop component that the
stability sweep, dispatcher, forwarder and worker share; :mod:`.runner` starts the
components in order, stops them in reverse, and handles SIGINT/SIGTERM. Which
components a process runs is decided above the core, in :mod:`pipeline.cli`.

May import: :mod:`pipeline.errors` only.
"""
