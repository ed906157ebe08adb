"""``radtriage serve``: run radtriage in the foreground until SIGINT/SIGTERM.

This is where the one-machine process is composed: which components run, in which
order, and how they wake each other. Nothing below :mod:`pipeline.cli` knows the list.
"""

from __future__ import annotations

import argparse
from typing import Any

from pipeline.config import Settings
from pipeline.process.component import Component
from pipeline.process.runner import ProcessRunner


def build_serve(settings: Settings) -> ProcessRunner:
    """Migrate the index, recover the archive, and wire every component of ``serve``.

    Start order: receiver (``[dicom] workers`` processes, :mod:`pipeline.dicom.workers`),
    stability sweep, forwarder, web app, then (when triage is enabled) the embedded Prefect
    server and the triage orchestration (deployment, dispatcher, in-process worker). The
    receiver never waits for Prefect.
    """
    from pipeline.archive.permissions import secure_data_dir
    from pipeline.dicom.receiver import DicomReceiver
    from pipeline.dicom.workers import ReceiverPool
    from pipeline.forward import Forwarder
    from pipeline.triage.runtime import Runtime
    from pipeline.triage.stability import StabilitySweeper
    from pipeline.web.dicomweb.warmer import MetadataWarmer
    from pipeline.web.server import WebServer

    secure_data_dir(settings.storage.data_dir, settings.storage.group)  # before the index file exists
    runtime = Runtime.from_settings(settings)
    # Only the machine that receives cleans up after a crash of the archive's writer;
    # a worker sharing the archive must not (it would remove files in flight).
    runtime.archive.recover()
    triage = settings.triage
    sweeper = StabilitySweeper(runtime.session_factory, triage.stable_age_seconds, triage.sweep_interval_seconds)
    forwarder = Forwarder(settings, runtime.archive, runtime.session_factory)
    # [dicom] workers > 1: the receiver alone runs in that many child processes, started
    # after recover() above; everything else stays here and learns of new instances from
    # the index (the sweep polls it).
    processes = settings.dicom.worker_processes
    receiver: Component = (
        DicomReceiver(settings, runtime.archive) if processes == 1 else ReceiverPool(settings, processes)
    )
    # A study that turns stable gets its DICOMweb metadata built before a viewer asks.
    warmer = MetadataWarmer(settings.storage.data_dir.resolve(), runtime.session_factory)
    sweeper.on_stable = warmer.warm
    components: list[Component] = [
        receiver,
        sweeper,
        forwarder,
        warmer,
        WebServer(settings, runtime.session_factory, runtime.archive),
    ]
    if triage.enabled:
        from flows.serve import embedded_prefect, triage_orchestration  # Prefect only when triage runs

        embedded = embedded_prefect(settings)
        orchestration = triage_orchestration(runtime, dispatch=True, embedded=embedded is not None)

        def on_stable(uids: list[str]) -> None:
            orchestration.wake_dispatcher()
            warmer.warm(uids)

        sweeper.on_stable = on_stable
        # Results stored by a flow run in this process go out at once.
        runtime.on_results_stored = forwarder.wake
        if embedded is not None:
            components.append(embedded)
        components.append(orchestration)
    return ProcessRunner(components, on_stop=runtime.engine.dispose)


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    return build_serve(settings).run()


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="run the receiver, archive and triage in the foreground (Ctrl-C stops)",
        description="Migrate the index, then run every radtriage component until SIGINT/SIGTERM.",
    )
    parser.set_defaults(func=_serve)
