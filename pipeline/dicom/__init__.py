"""DICOM networking: the receiver and Query/Retrieve SCP, its limits and rights.

:mod:`.receiver` answers associations (C-ECHO, C-STORE) and hands received bytes to the
archive; :mod:`.find` (C-FIND over :mod:`pipeline.index.query`), :mod:`.retrieve` and
:mod:`.substore` (C-MOVE, C-GET and their C-STORE sub-operations) answer Query/Retrieve;
:mod:`.peers` says which AE may do what; :mod:`.audit` records every Q/R operation;
:mod:`.syntaxes` lists the transfer syntaxes; :mod:`.tuning` holds the one place that
reaches into pynetdicom's internals (latency, and the limits on what a peer may send).

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`, :mod:`pipeline.archive`,
:mod:`pipeline.index`. Never imports torch, MONAI, Prefect or the AI packages: it answers DICOM.
"""
