"""radtriage's core package, one subpackage per concern in the order of the data flow.

==================  ==================================================================
``errors, config``  the error hierarchy and the TOML settings: everything imports these
``index``           the index database: ORM schema, engine and sessions, migrations
``archive``         instances on disk and in the index: header parsing, atomic writes
``dicom``           DICOM networking: the receiver (C-ECHO, C-STORE), association tuning
``ai``              the model zoo and running models: bundles, specs, registry, series
                    selection, volumes, inference, measurements, findings
``results``         AI results as DICOM SEG and TID 1500 SR
``forward``         the durable C-STORE queue that sends results to archive nodes
``triage``          study completion, dispatch to Prefect, the flow's steps, runtime
``web``             the worklist (queries, pages, JSON API), login, audit
``process``         running components in one process: poll loops, ordered start/stop
``cli``             the ``radtriage`` command; composes the process above ``flows/``
``lab``             synthetic studies, phantoms, model evaluation, notebook runner: for
                    data scientists and tests, never imported by the server
==================  ==================================================================

Import rules (checked by ``make lint``): the layers point one way, ``cli`` → ``flows``
→ the rest; nothing that answers DICOM or HTTP imports torch or MONAI; ``lab`` is
never imported by the server.
"""

__version__ = "0.1.0"
