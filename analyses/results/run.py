"""A run directory as one object for notebooks: ``open_run("results/ctd-default")``.

Every result is loaded on first access and kept; a result whose stage has not run is an input
error that names the command that makes it.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import pandas as pd

from probes.errors import input_error

__all__ = ["Run", "open_run"]

# attribute -> (file, result class path, the command that writes it)
_RESULTS = {
    "boundary": ("boundary.parquet", "analyses.results:Boundary", "ctd characterize --run {run}"),
    "dynamics": ("dynamics.parquet", "analyses.results:Dynamics", "ctd characterize --run {run}"),
    "head_scores": ("head_scores.parquet", "analyses.results:HeadScores", "ctd characterize --run {run}"),
    "dev_head_scores": ("dev_head_scores.parquet", "analyses.results:HeadScores", "ctd characterize --run {run} (with dev traces)"),
    "attribution": ("attribution.parquet", "analyses.results:Attribution", "ctd characterize --run {run}"),
    "probes": ("probes.parquet", "analyses.results:ProbeResults", "ctd characterize --run {run}"),
    "lens": ("lens.parquet", "analyses.results:LensResult", "ctd characterize --run {run}"),
    "patching": ("patching.parquet", "analyses.results:PatchingResult", "ctd patch --run {run}"),
    "ablation": ("ablation.parquet", "analyses.results:AblationResult", "ctd ablate --run {run}"),
    "isolation": ("isolation.parquet", "analyses.results:IsolationResult", "ctd isolate --run {run}"),
    "distill": ("distill.parquet", "analyses.results:DistillResult", "ctd distill --run {run}"),
}


class Run:
    """Lazily loaded results of one run directory (``run.boundary.figure()``, ``run.traces``, ...)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / "manifest.json").is_file():
            raise input_error(self.path, "not a run directory (no manifest.json)", "pass the --out folder of `ctd run` (e.g. results/ctd-default)")

    def __repr__(self) -> str:
        have = [name for name, (file, _, _) in _RESULTS.items() if (self.path / file).exists()]
        return f"Run({str(self.path)!r}: {', '.join(have) or 'no results yet'})"

    @cached_property
    def manifest(self) -> dict:
        return json.loads((self.path / "manifest.json").read_text())

    def _table(self, name: str, command: str) -> pd.DataFrame:
        from analyses.machinery.io import read_parquet

        path = self.path / name
        if not path.exists():
            raise input_error(path, "not written yet", f"run `{command.format(run=self.path)}`")
        return read_parquet(path)

    @cached_property
    def docs(self) -> pd.DataFrame:
        return self._table("docs.parquet", "ctd run --out {run} --until data")

    @cached_property
    def traces(self) -> pd.DataFrame:
        return self._table("traces.parquet", "ctd traces --out {run}")

    @cached_property
    def dev_traces(self) -> pd.DataFrame:
        return self._table("dev_traces.parquet", "ctd traces --out {run} --n-dev-docs 100")

    @cached_property
    def labels(self):
        from analyses.tasks.labels import LabelSpace

        return LabelSpace.load(self.path / "labels.parquet")

    @cached_property
    def store(self):
        from probes.store import open_store

        return open_store(self.path)

    def __getattr__(self, name: str):
        if name not in _RESULTS:
            raise AttributeError(f"a run has no result {name!r}; results: {sorted(_RESULTS)}")
        file, target, command = _RESULTS[name]
        path = self.path / file
        if not path.exists():
            raise input_error(path, "not written yet", f"run `{command.format(run=self.path)}`")
        module, cls = target.split(":")
        import importlib

        result = getattr(importlib.import_module(module), cls).load(path)
        self.__dict__[name] = result  # loaded once
        return result


def open_run(path: str | Path) -> Run:
    """The results of a run directory, loaded when first read."""
    return Run(path)
