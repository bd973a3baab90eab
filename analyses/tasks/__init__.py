"""Label spaces, dataset sources, the embedded note generator and metrics."""

from analyses.tasks.icd10 import icd10cm_labels
from analyses.tasks.labels import LabelSpace
from analyses.tasks.metrics import bootstrap_ci, set_metrics, xmc_metrics, xmc_metrics_ci
from analyses.tasks.notes import NoteConfig, NoteGenerator
from analyses.tasks.sources import SOURCES, Dataset, apply_filter, load_dataset, register_source

__all__ = [
    "LabelSpace",
    "Dataset",
    "SOURCES",
    "register_source",
    "load_dataset",
    "apply_filter",
    "icd10cm_labels",
    "NoteConfig",
    "NoteGenerator",
    "xmc_metrics",
    "xmc_metrics_ci",
    "set_metrics",
    "bootstrap_ci",
]
