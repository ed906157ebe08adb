"""Deterministic UIDs for result objects.

Re-running the same model version on the same study state must not create new
objects in the archive or at the archive nodes: the UIDs of the SEG and SR series and
instances are therefore derived (``pydicom.uid.generate_uid`` with entropy sources)
from the study, the model name and version and the study's *revision* (a counter the
index bumps whenever late instances change the study). A new revision or a new model
version gives new UIDs; everything else gives the same ones.
"""

from __future__ import annotations

import json
from typing import NamedTuple

from pydicom.uid import PYDICOM_ROOT_UID, generate_uid

# Kept apart from the study UID so that our derivation can never collide with a
# scanner's own use of the same entropy scheme.
_NAMESPACE = "radtriage/results/v1"


class ResultUIDs(NamedTuple):
    """UIDs of the objects one model writes for one study revision."""

    seg_series: str
    seg_sop: str
    sr_series: str
    sr_sop: str


def _derive(*parts: str, prefix: str) -> str:
    # generate_uid joins its sources without a separator; JSON keeps ("ab", "c")
    # and ("a", "bc") apart.
    return str(generate_uid(prefix=prefix, entropy_srcs=[json.dumps([_NAMESPACE, *parts])]))


def result_uids(
    study_instance_uid: str,
    model_name: str,
    model_version: str,
    revision: int,
    *,
    prefix: str = PYDICOM_ROOT_UID,
) -> ResultUIDs:
    """Return the UIDs of the SEG and SR that ``model_name`` writes for this study state.

    Parameters
    ----------
    study_instance_uid
        Study Instance UID of the analysed study.
    model_name, model_version
        The model identity (as in :class:`pipeline.ai.findings.ModelIdentity`).
    revision
        The study's revision number, ``>= 0``; increase it when the study changes
        after analysis so that the new results get new UIDs and supersede the old.
    prefix
        UID root ending in ``.``; pydicom's root by default.

    Returns
    -------
    ResultUIDs
        Four distinct UIDs, identical for identical arguments.
    """
    if not study_instance_uid:
        raise ValueError("study_instance_uid is empty: pass the Study Instance UID of the analysed study")
    if not model_name or not model_version:
        raise ValueError("model_name and model_version must not be empty: they identify the result objects")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 0:
        raise ValueError(f"revision must be an integer >= 0, got {revision!r}")
    base = (study_instance_uid, model_name, model_version, str(revision))
    return ResultUIDs(
        seg_series=_derive("seg-series", *base, prefix=prefix),
        seg_sop=_derive("seg-sop", *base, prefix=prefix),
        sr_series=_derive("sr-series", *base, prefix=prefix),
        sr_sop=_derive("sr-sop", *base, prefix=prefix),
    )
