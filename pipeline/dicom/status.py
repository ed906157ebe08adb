"""The DIMSE statuses radtriage answers with (PS3.4 and PS3.7), one name per code.

The C-STORE, C-FIND, C-MOVE and C-GET handlers all answer from this list, so a code
means the same thing wherever it comes from.
"""

from __future__ import annotations

STATUS_SUCCESS = 0x0000
STATUS_PENDING = 0xFF00
STATUS_CANCELLED = 0xFE00
STATUS_NOT_AUTHORISED = 0x0124  # Refused: Not Authorised (the AE lacks the right)
STATUS_OUT_OF_RESOURCES = 0xA700  # the archive disk or the index is full, or busy
STATUS_TOO_MANY_MATCHES = 0xA701  # Refused: Out of Resources, unable to calculate the number of matches
STATUS_UNKNOWN_DESTINATION = 0xA801  # Refused: Move Destination unknown
STATUS_SOP_CLASS_MISMATCH = 0xA900  # the data set (C-STORE) or identifier (Q/R) does not match the SOP Class
STATUS_CANNOT_UNDERSTAND = 0xC000  # Error: cannot understand / unable to process
STATUS_INVALID_UID = 0xC001  # a Study/Series/SOP Instance UID missing or not a valid UID
