"""The study: tasks and data, traces, phases, isolation, distillation, figures and the ``ctd`` CLI.

One folder per role, each importing only ``probes`` and the folders before it (DESIGN §3):
:mod:`.machinery` (settings tree, run directory, stage protocol), :mod:`.tasks` (data),
:mod:`.results` (result tables and their figures, ``open_run``), :mod:`.methods`, :mod:`.models`
(generation, the organism, the student base), :mod:`.stages` (one module per stage of ``ctd run``)
and :mod:`.interface` (the ``ctd`` command).

In a notebook: ``run = open_run("results/ctd-default")``, then ``run.boundary.figure()``,
``run.patching.scatter_figure()``, ``run.distill.curve_figure()``, ``run.traces``, ``run.store``.
"""

from analyses.results.run import Run, open_run
from analyses.tasks import Dataset, LabelSpace, load_dataset, set_metrics, xmc_metrics

__all__ = ["open_run", "Run", "Dataset", "LabelSpace", "load_dataset", "set_metrics", "xmc_metrics"]
