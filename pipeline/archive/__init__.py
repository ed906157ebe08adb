"""The archive: received and derived instances as files on disk, indexed in the database.

:class:`Archive` (:mod:`.store`) writes each instance atomically (temp file, fsync,
rename) and records it in the index (:mod:`.ingest`) in one transaction; :mod:`.header`
parses the attributes the index holds straight from the encoded bytes.

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`, :mod:`pipeline.index`.
Never imports networking, models or the web app.
"""

from pipeline.archive.store import Archive, NotInArchiveError, OutOfResourcesError, StoredInstance

__all__ = ["Archive", "NotInArchiveError", "OutOfResourcesError", "StoredInstance"]
