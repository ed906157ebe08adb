"""DICOM networking: the receiver (C-ECHO, C-STORE SCP) and pynetdicom tuning.

:mod:`.receiver` answers associations and hands received bytes to the archive;
:mod:`.tuning` holds the one place that reaches into pynetdicom's internals.
Query/Retrieve (C-FIND, C-MOVE, C-GET) belongs here too.

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`, :mod:`pipeline.archive`.
Never imports torch, MONAI, Prefect or the AI packages: it answers DICOM.
"""
