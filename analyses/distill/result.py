"""The distillation result (kept for imports): it lives in :mod:`analyses.results.distill`."""

from analyses.results.distill import CONDITION_COLOURS, DistillResult

__all__ = ["DistillResult", "CONDITION_COLOURS"]
