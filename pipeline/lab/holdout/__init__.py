"""A second, independent source of synthetic head CTs: for evaluation only.

The training phantom (:mod:`pipeline.lab.phantom`) and this source share only the
downloaded brain atlas file (through :func:`pipeline.lab.phantom.atlas.fetch`); skull,
scalp, CSF, dura, calcifications, bleeds, slice profile, artefacts and noise are built
here with other constructions and other ranges, so that a model which learned the
phantom's habits rather than the task fails here. Never train or calibrate on it.

* :mod:`.head` — anatomy at 1 mm: thin CSF rim, skull with a smooth table/diploe
  profile, dense skull base and petrous ridges, falx, calcifications, scalp and muscle.
* :mod:`.bleeds` — hemorrhages of a known volume (IPH, SDH, EDH, IVH).
* :mod:`.scanner` — pose and field of view, box slice profile, reconstruction kernel,
  beam hardening near bone, streaks at the skull base, textured noise.
* :mod:`.study` — :func:`make_holdout_case` and the recipes of the test set.
"""
