"""Result tables and their figures, apart from the computations that make them (STYLE §12).

Each result is a ``FrameResult``: a table plus the choices behind it, saved to parquet (with its
metadata) and drawn by ``.figure()``. Importing this package loads pandas and plotly, never torch:
a notebook or the report draws from a run's files without the models.

Beside the result types: :mod:`.theme` (the one figure theme), :mod:`.report` (a run's figures
and ``report.html``) and :mod:`.run` (``open_run``: every result of a run directory, for notebooks).
"""

from analyses.results.ablation import AblationResult
from analyses.results.base import FrameResult
from analyses.results.boundary import Boundary
from analyses.results.characterize import Attribution, HeadScores, LensResult, ProbeResults
from analyses.results.distill import DistillResult
from analyses.results.dynamics import Dynamics
from analyses.results.isolation import IsolationResult
from analyses.results.patching import PatchingResult

__all__ = ["FrameResult", "Boundary", "Dynamics", "HeadScores", "Attribution", "ProbeResults", "LensResult", "PatchingResult", "IsolationResult", "AblationResult", "DistillResult"]
