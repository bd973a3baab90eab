"""The study: tasks and data, traces, phases, isolation, distillation, figures and the ``ctd`` CLI."""

from analyses.tasks import Dataset, LabelSpace, load_dataset, set_metrics, xmc_metrics

__all__ = ["Dataset", "LabelSpace", "load_dataset", "set_metrics", "xmc_metrics"]
