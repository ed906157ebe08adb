"""AI: the model zoo and running its models on a study.

The zoo: :mod:`.bundle` (a MONAI bundle folder), :mod:`.spec` (its triage spec: which
series it reads, what its findings mean), :mod:`.registry` (every bundle validated at
start). Running: :mod:`.selection` (the series a model reads), :mod:`.volume` (series to
a volume in HU), :mod:`.inference` (the bundle's network on a volume), :mod:`.measure`
(probabilities to findings), :mod:`.findings` (what a model found, as every later step
consumes it) and :mod:`.result_file` (a result saved between flow tasks).

Only :mod:`.inference` imports torch and MONAI, and only inside its functions; the
zoo modules and :mod:`.findings` import neither.

May import: :mod:`pipeline.errors`, :mod:`pipeline.config`.
"""
