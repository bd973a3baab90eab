"""Run configuration: a typed dataclass with defaults, read from TOML, written resolved into manifest.json."""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from probes.errors import input_error

__all__ = ["RunConfig", "load_config", "DEFAULT_LABEL_CHAPTERS", "DEFAULT_N_NOTES", "DEFAULT_N_TRACES"]

# The embedded task's default label space: ICD-10-CM chapter 9 (circulatory system), 1,427 billable
# codes with deep sibling structure (acute/chronic, systolic/diastolic, laterality, ...).
DEFAULT_LABEL_CHAPTERS = ("9",)
# Notes of the embedded task's default dataset: 2,400 train / 300 dev / 300 test. Distillation
# evaluates on 200 test notes and picks training notes covering their codes; traces, capture and
# characterisation read the first 100 test (and 100 dev) notes.
DEFAULT_N_NOTES = 3000
DEFAULT_N_TRACES = 100


@dataclass
class RunConfig:
    """Everything a run needs; every field can be set in a TOML file or on the command line."""

    out: str = "results/ctd-default"
    model: str | None = None
    dataset: str = "icd10cm"
    dataset_path: str | None = None
    dataset_options: dict = field(default_factory=lambda: {"chapters": list(DEFAULT_LABEL_CHAPTERS), "n_docs": DEFAULT_N_NOTES})
    split: str = "test"
    n_docs: int | None = DEFAULT_N_TRACES
    seed: int = 0
    quick: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def load_config(path: str | Path | None, **overrides) -> RunConfig:
    """Defaults, then the TOML file (if any), then non-None ``overrides``; unknown keys are errors."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise input_error(path, "config file not found", "pass an existing TOML file to --config")
        try:
            values = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise input_error(path, f"malformed TOML ({exc})", "fix the file") from None
        known = {f.name for f in fields(RunConfig)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise input_error(path, f"unknown setting(s) {unknown}", f"use only {sorted(known)}")
        _check_types(path, values)
    values.update({k: v for k, v in overrides.items() if v is not None})
    return RunConfig(**values)


_TYPES = {"out": (str,), "model": (str,), "dataset": (str,), "dataset_path": (str,), "dataset_options": (dict,), "split": (str,), "n_docs": (int,), "seed": (int,), "quick": (bool,)}


def _check_types(path: Path, values: dict) -> None:
    for key, value in values.items():
        expected = _TYPES[key]
        # bool is an int in Python; a TOML `seed = true` is still a mistake
        if not isinstance(value, expected) or (isinstance(value, bool) and bool not in expected):
            raise input_error(path, f"setting {key!r} is {type(value).__name__} {value!r}", f"give a {expected[0].__name__}")
        if key == "n_docs" and value < 1:
            raise input_error(path, f"n_docs is {value}", "give a positive number of documents")
