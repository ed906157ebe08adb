"""AI results as DICOM: binary SEG and TID 1500 Comprehensive 3D SR (highdicom).

The triage flow calls, for one model's :class:`pipeline.ai.findings.ModelResult`::

    uids = result_uids(study_uid, model.name, model.version, revision)
    seg = build_seg(images, result, settings.results,
                    series_instance_uid=uids.seg_series, sop_instance_uid=uids.seg_sop)
    sr = build_sr(images, seg, result, settings.results,
                  series_instance_uid=uids.sr_series, sop_instance_uid=uids.sr_sop)

``images`` may be headers read with ``stop_before_pixels=True``. Both objects are
pydicom Datasets ready for ``save_as`` or C-STORE.

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`, :mod:`pipeline.ai.findings`.
"""

from pipeline.results.seg import build_seg, segment_tracking_uid
from pipeline.results.sr import build_sr
from pipeline.results.uids import ResultUIDs, result_uids

__all__ = ["ResultUIDs", "build_seg", "build_sr", "result_uids", "segment_tracking_uid"]
