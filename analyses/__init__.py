"""The study: tasks and data, traces, phases, isolation, distillation, figures and the ``ctd`` CLI.

In a notebook: ``run = open_run("results/ctd-default")``, then ``run.boundary.figure()``,
``run.patching.scatter_figure()``, ``run.distill.curve_figure()``, ``run.traces``, ``run.store``.
"""

from analyses.results.run import Run, open_run
from analyses.tasks import Dataset, LabelSpace, load_dataset, set_metrics, xmc_metrics

__all__ = ["open_run", "Run", "Dataset", "LabelSpace", "load_dataset", "set_metrics", "xmc_metrics"]
