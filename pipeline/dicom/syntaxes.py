"""The transfer syntaxes radtriage accepts and offers, and the contexts it proposes.

Stored as received: the receiver accepts all of :data:`TRANSFER_SYNTAXES`, and whatever
radtriage sends (C-MOVE sub-operations, forwarding) offers each instance in the syntax
it is stored in, with the uncompressed ones as fallbacks (:func:`contexts_for`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom.presentation import PresentationContext, build_context

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    RLELossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
]

MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


def contexts_for(stored: Mapping[str, Sequence[str]]) -> tuple[list[PresentationContext], set[tuple[str, str]]]:
    """The contexts to propose for ``SOP class -> stored transfer syntaxes``, and the
    ``(SOP class, syntax)`` pairs they cover.

    One context per stored compressed syntax (the file goes as it is) and one with the
    uncompressed syntaxes (between which pynetdicom converts), at most
    :data:`MAX_CONTEXTS`; a pair left out did not fit.
    """
    contexts: list[PresentationContext] = []
    fitted: set[tuple[str, str]] = set()
    for sop_class, syntaxes in stored.items():
        for syntax_list in [[s] for s in syntaxes if s not in UNCOMPRESSED] + [list(UNCOMPRESSED)]:
            if len(contexts) == MAX_CONTEXTS:
                break
            contexts.append(build_context(sop_class, syntax_list))
            fitted.update((sop_class, s) for s in syntax_list)
    return contexts, fitted
