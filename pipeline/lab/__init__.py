"""The lab: synthetic studies, the head-CT phantom, model evaluation, notebook runner.

For data scientists (``notebooks/``), tests, benchmarks and the ``radtriage synth`` /
``radtriage demo`` commands. The server (``radtriage serve`` / ``worker``, ``flows/``
and every core package) never imports it; ``make lint`` checks that.

May import anything in :mod:`pipeline` except :mod:`pipeline.cli`.
"""
