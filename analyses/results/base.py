"""A base for result objects: a table plus metadata that saves to parquet and draws itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import pandas as pd

from analyses.machinery.io import read_parquet, write_parquet
from probes.errors import input_error

__all__ = ["FrameResult"]


@dataclass
class FrameResult:
    """``frame`` holds the rows (``REQUIRED`` columns at least); ``meta`` the choices made."""

    frame: pd.DataFrame
    meta: dict = field(default_factory=dict)
    REQUIRED: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.frame.empty and len(self.frame.columns) == 0:
            self.frame = pd.DataFrame(columns=list(self.REQUIRED))
        missing = [c for c in self.REQUIRED if c not in self.frame.columns]
        if missing:
            raise input_error(f"{type(self).__name__}", f"the table lacks column(s) {missing}", "load a file written by this result's stage")

    def save(self, path: str | Path) -> Path:
        return write_parquet(self.frame, path, metadata={"ctd_meta": json.dumps(self.meta, default=str)})

    @classmethod
    def load(cls, path: str | Path):
        frame, meta = read_parquet(path, required=cls.REQUIRED, with_metadata=True)
        return cls(frame, json.loads(meta.get("ctd_meta", "{}")))

    def figure(self):  # pragma: no cover - every subclass draws its own
        raise NotImplementedError
