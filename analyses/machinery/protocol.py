"""One stage protocol: every stage is declared once, and one runner does the rest (STYLE §11).

A :class:`Stage` names its settings (a field of :class:`~analyses.machinery.settings.RunConfig`), the files it
reads and writes, and a ``compute(ctx)`` that returns its result (a ``FrameResult``, a dict of
them by file stem, or None when it wrote its own files, as capture writes its store). The runner
(:func:`run_stage`) checks the inputs, refuses a finished stage with other settings, skips a
finished one, records timing, settings, seed and the sha256 of every output in the manifest, and
saves returned results: a stage's ``compute`` never writes the manifest. ``ctd run`` and every
stage command go through it.

A stage is one module with a ``compute`` and one :func:`register_stage` call. The built-in stages
are such modules in :mod:`analyses.stages`, which registers them, in order, when it is imported;
this module knows none of them (it sits below them), so reach the registry through
``analyses.stages`` (``from analyses.stages import Stage, register_stage, run``).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from analyses.machinery.io import Manifest
from analyses.machinery.settings import RunConfig
from probes.errors import input_error

__all__ = ["Stage", "StageContext", "STAGES", "register_stage", "stage_named", "stage_names", "run", "run_stage", "run_study"]


@dataclass
class StageContext:
    """What a stage's ``compute`` gets: the run, its resolved settings tree and its own settings."""

    run_dir: Path
    config: RunConfig
    settings: Any
    manifest: Manifest
    progress: bool = True
    model: Any = None  # a loaded model to reuse (notebooks, tests); None: the stage loads the run's
    record: dict = field(default_factory=dict)  # facts for this stage's manifest record (counts, ...)
    facts: dict = field(default_factory=dict)  # run-level facts for the manifest (model, dataset)

    @property
    def model_path(self) -> str:
        return self.manifest.model_path()


@dataclass(frozen=True)
class Stage:
    """A stage: ``settings`` names its field of the run config; ``outputs`` are files or folders
    (``name/``) under the run directory, optional ones marked with a trailing ``?``."""

    name: str
    settings: str | None
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    compute: Callable[[StageContext], Any]
    help: str = ""

    def required_outputs(self) -> list[str]:
        return [o for o in self.outputs if not o.endswith("?")]

    def all_outputs(self) -> list[str]:
        return [o.rstrip("?") for o in self.outputs]


STAGES: list[Stage] = []  # the stages of `ctd run`, in order (the built-ins first: analyses.stages)
EXTRA_STAGES: list[Stage] = []  # stages with a command of their own only (the distillation pilot)


def register_stage(stage: Stage, after: str | None = None, in_run: bool = True) -> Stage:
    """Add ``stage`` to the stages ``ctd run`` runs (at the end, or right after the stage
    ``after``); ``in_run=False`` makes it a stage of its own command only."""
    for existing in (STAGES, EXTRA_STAGES):
        existing[:] = [s for s in existing if s.name != stage.name]
    if not in_run:
        EXTRA_STAGES.append(stage)
        return stage
    index = len(STAGES) if after is None else [s.name for s in STAGES].index(after) + 1
    STAGES.insert(index, stage)
    return stage


def stage_names() -> tuple[str, ...]:
    """The stages ``ctd run`` runs, in order."""
    return tuple(s.name for s in STAGES)


def stage_named(name: str) -> Stage:
    for stage in STAGES + EXTRA_STAGES:
        if stage.name == name:
            return stage
    raise input_error(None, f"unknown stage {name!r}", f"use one of {', '.join(s.name for s in STAGES + EXTRA_STAGES)}")


def run(name: str, run_dir: str | Path, config: RunConfig | None = None, model=None, progress: bool = True, **settings) -> Any:
    """Run (or redo) one stage on a run directory, as ``ctd <stage>`` does: ``settings`` override
    fields of the stage's settings (``run("patch", "results/r", n_docs=10)``); ``model`` reuses a
    loaded model. Returns the stage's result."""
    from dataclasses import replace

    from analyses.machinery.io import RunLock

    stage = stage_named(name)
    config = (config or RunConfig()).resolved()
    if settings:
        config = replace(config, **{stage.settings: replace(getattr(config, stage.settings), **settings)})
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with RunLock(run_dir):
        manifest = Manifest(run_dir)
        manifest.verify_complete(skip=(name,))  # the stage is redone; the ones it reads must be intact
        return run_stage(stage, run_dir, config, manifest, redo=True, progress=progress, model=model)


def _writer_of(path: str) -> str:
    for stage in STAGES + EXTRA_STAGES:
        if path in stage.all_outputs():
            return stage.name
    return "an earlier stage"


def _recorded_settings(stage: Stage, config: RunConfig) -> dict:
    settings = getattr(config, stage.settings) if stage.settings else None
    value = asdict(settings) if settings is not None else {}
    if stage.name == "traces":
        value = {"model": config.model, **value}
    return json.loads(json.dumps(value, default=str))  # as the manifest stores it (tuples become lists)


def run_stage(stage: Stage, run_dir: str | Path, config: RunConfig, manifest: Manifest | None = None, redo: bool = False, progress: bool = True, model=None) -> Any:
    """Run one stage through the protocol (see the module docstring).

    Args:
        redo: recompute even when the stage finished (a stage command); ``ctd run`` reuses a
            finished stage with the same settings and refuses one made with other settings.
    """
    from probes.distributed import rank_and_world

    run_dir = Path(run_dir)
    config = config.resolved()
    manifest = manifest or Manifest(run_dir)
    recorded = _recorded_settings(stage, config)
    done = manifest.data["stages"].get(stage.name, {})
    if done.get("status") == "complete" and not redo:
        if done.get("config") != recorded:
            raise input_error(manifest.path, f"stage {stage.name!r} was run here with other settings ({done.get('config')})", "choose another --out, or delete the run directory to start over")
        if all((run_dir / o.rstrip("/")).exists() for o in stage.required_outputs()):
            print(f"[{stage.name}] complete", file=sys.stderr)
            return None
    missing = [i for i in stage.inputs if not (run_dir / i.rstrip("/")).exists()]
    if missing:
        raise input_error(run_dir / missing[0], "not written yet", f"run `ctd {_writer_of(missing[0])} --run {run_dir}` first (or `ctd run --out {run_dir}`)")
    ctx = StageContext(run_dir, config, getattr(config, stage.settings) if stage.settings else None, manifest, progress, model)
    if rank_and_world()[0] != 0:  # torchrun: the other ranks compute their share; rank 0 records
        return stage.compute(ctx)
    with manifest.stage(stage.name, config=recorded, seed=config.seed) as record:
        result = stage.compute(ctx)
        if ctx.facts:
            manifest.data.update(ctx.facts)
        for stem, item in (result.items() if isinstance(result, dict) else [(None, result)] if result is not None else []):
            if hasattr(item, "save"):
                target = f"{stem}.parquet" if stem is not None else next(o.rstrip("?") for o in stage.outputs if o.endswith(".parquet") or o.endswith(".parquet?"))
                item.save(run_dir / target)
        record["outputs"] = [o for o in stage.all_outputs() if (run_dir / o.rstrip("/")).exists()]
        record.update(ctx.record)
    return result


def run_study(config: RunConfig, until: str | None = None, progress: bool = True) -> Path:
    """``ctd run``: every registered stage in order into ``config.out`` (up to and including
    ``until``); finished stages are reused, each output checked against its recorded hash first."""
    names = [s.name for s in STAGES]
    if until is not None and until not in names:
        raise input_error(None, f"unknown stage {until!r}", f"use one of {', '.join(names)}")
    config = config.resolved()
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    manifest.verify_complete()
    manifest.update(config=config.to_dict())
    started = time.perf_counter()
    for stage in STAGES:
        print(f"[run] stage {stage.name}", file=sys.stderr)
        run_stage(stage, run_dir, config, manifest, progress=progress)
        if stage.name == until:
            break
    manifest.update(run_seconds=round(time.perf_counter() - started, 1))
    print(f"[run] manifest: {run_dir / 'manifest.json'}", file=sys.stderr)
    return run_dir
