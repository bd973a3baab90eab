"""``ctd run``: the whole study, stage by stage, each stage resumable from its files."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from analyses.config import DEFAULT_N_NOTES, RunConfig
from analyses.io import Manifest
from analyses.tasks.sources import Dataset, load_dataset
from probes.errors import input_error

__all__ = ["run_study", "STAGES"]

# Every stage of DESIGN §4 in order.
STAGES = ("data", "traces", "capture", "characterize", "patch", "isolate", "distill", "report")


def _check_same_config(manifest: Manifest, stage: str, config: dict) -> None:
    """A finished stage is reused only for the same settings; otherwise refuse rather than overwrite."""
    done = manifest.data["stages"].get(stage, {})
    config = json.loads(json.dumps(config, default=str))  # as the manifest stores it (tuples become lists)
    if done.get("status") == "complete" and done.get("config") != config:
        raise input_error(
            manifest.path,
            f"stage {stage!r} was run here with other settings ({done.get('config')})",
            "choose another --out, or delete the run directory to start over",
        )


def _stage_data(config: RunConfig, run_dir: Path, manifest: Manifest) -> Dataset:
    if config.dataset == "icd10cm":
        options = {**config.dataset_options}
        options.setdefault("seed", config.seed)
        if config.quick:
            options["n_docs"] = min(int(options.get("n_docs", DEFAULT_N_NOTES)), 200)
    else:
        options = {k: v for k, v in config.dataset_options.items() if k not in ("chapters", "n_docs")}
    stage_config = {"source": config.dataset, "path": config.dataset_path, **options}
    _check_same_config(manifest, "data", stage_config)
    if manifest.is_complete("data") and (run_dir / "docs.parquet").exists():
        print("[data] complete, reading labels.parquet and docs.parquet", file=sys.stderr)
        return Dataset.load(run_dir)
    with manifest.stage("data", config=stage_config, seed=config.seed) as record:
        dataset = load_dataset(config.dataset, config.dataset_path, **options)
        dataset.save(run_dir)
        record["outputs"] = ["labels.parquet", "docs.parquet"]
        record["counts"] = {"labels": len(dataset.labels), "docs": int(len(dataset.docs))}
    print(f"[data] {len(dataset.labels):,} labels, {len(dataset.docs):,} documents -> {run_dir}", file=sys.stderr)
    return dataset


def _stage_traces(config: RunConfig, run_dir: Path, manifest: Manifest, dataset: Dataset) -> None:
    from analyses.traces import GenerationConfig, default_dev_docs, resolve_model_path, traces_stage_config, write_traces

    model_dir = resolve_model_path(config.model)
    n_docs = 20 if config.quick else config.n_docs
    n_dev_docs = min(default_dev_docs(model_dir), 20 if config.quick else 100)
    generation = GenerationConfig(seed=config.seed)
    expected = traces_stage_config(model_dir, config.split, n_docs, None, generation, n_dev_docs)
    _check_same_config(manifest, "traces", expected)
    if manifest.is_complete("traces") and (run_dir / "traces.parquet").exists():
        print("[traces] complete, reading traces.parquet", file=sys.stderr)
        return
    write_traces(run_dir, dataset, model=model_dir, split=config.split, n_docs=n_docs, config=generation, manifest=manifest, n_dev_docs=n_dev_docs)


def _stage_capture(config: RunConfig, run_dir: Path, manifest: Manifest) -> None:
    from analyses.capture_stage import capture_run

    # capture_run resumes by itself: finished shards are kept, a changed setting is refused.
    if manifest.is_complete("capture") and (run_dir / "activations" / "index.parquet").exists():
        print("[capture] complete", file=sys.stderr)
        return
    capture_run(run_dir, points=["resid_post", "head_out"], positions="output", batch_size=8, manifest=manifest)


def _stage_characterize(config: RunConfig, run_dir: Path, manifest: Manifest) -> None:
    from analyses.characterize import characterize_run

    from analyses.boundary import InternalSettings

    n_boot = 200 if config.quick else 1000
    internal = InternalSettings()
    _check_same_config(manifest, "characterize", {"n_boot": n_boot, "seed": config.seed, "internal": {"channels": internal.channels, "smoothing": internal.smoothing}})
    if manifest.is_complete("characterize") and (run_dir / "boundary.parquet").exists():
        print("[characterize] complete", file=sys.stderr)
        return
    characterize_run(run_dir, n_boot=n_boot, seed=config.seed, manifest=manifest)


def _stage_patch(config: RunConfig, run_dir: Path, manifest: Manifest) -> None:
    from dataclasses import asdict

    from analyses.patch import PatchSettings, patch_run

    patch_settings = PatchSettings.quick() if config.quick else PatchSettings()
    patch_settings.seed = config.seed
    settings = asdict(patch_settings)
    _check_same_config(manifest, "patch", settings)
    if manifest.is_complete("patch") and (run_dir / "patching.parquet").exists():
        print("[patch] complete", file=sys.stderr)
        return
    with manifest.stage("patch", config=settings, seed=config.seed) as record:
        result = patch_run(run_dir, patch_settings, manifest=manifest)
        result.save(run_dir / "patching.parquet")
        record["outputs"] = ["patching.parquet"]


def _stage_isolate(config: RunConfig, run_dir: Path, manifest: Manifest) -> None:
    from analyses.isolate import isolate_run

    settings = {"n_docs": 20 if config.quick else None, "seed": config.seed}
    _check_same_config(manifest, "isolate", settings)
    if manifest.is_complete("isolate") and (run_dir / "isolation.parquet").exists():
        print("[isolate] complete", file=sys.stderr)
        return
    with manifest.stage("isolate", config=settings, seed=config.seed) as record:
        result = isolate_run(run_dir, n_docs=settings["n_docs"], seed=config.seed, manifest=manifest)
        result.save(run_dir / "isolation.parquet")
        record["outputs"] = ["isolation.parquet"]
        record["complementarity"] = result.verdict()


def _stage_distill(config: RunConfig, run_dir: Path, manifest: Manifest) -> None:
    from dataclasses import asdict

    from analyses.distill import DistillConfig, distill_run

    distill_config = DistillConfig.quick() if config.quick else DistillConfig.for_run()
    settings = asdict(distill_config)
    _check_same_config(manifest, "distill", settings)
    if manifest.is_complete("distill") and (run_dir / "distill.parquet").exists():
        print("[distill] complete", file=sys.stderr)
        return
    with manifest.stage("distill", config=settings, seed=config.seed) as record:
        result = distill_run(run_dir, distill_config, manifest=manifest)
        result.save(run_dir / "distill.parquet")
        record["outputs"] = ["distill.parquet", "head_map.json", "students/"]


def _stage_report(config: RunConfig, run_dir: Path, manifest: Manifest) -> None:
    from analyses.report import write_figures, write_report

    with manifest.stage("report", config={}) as record:
        written = write_figures(run_dir)
        path = write_report(run_dir)
        record["outputs"] = ["report.html", "figures/"]
        record["figures"] = sorted(written)
    print(f"[report] {path} ({len(written)} figures)", file=sys.stderr)


def run_study(config: RunConfig, until: str | None = None) -> Path:
    """Run the stages in order into ``config.out`` (up to and including ``until``); finished stages are reused."""
    if until is not None and until not in STAGES:
        raise input_error(None, f"unknown stage {until!r}", f"use one of {', '.join(STAGES)}")
    run_dir = Path(config.out)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(run_dir)
    manifest.verify_complete()
    manifest.update(config=config.to_dict())
    started = time.perf_counter()
    dataset = _stage_data(config, run_dir, manifest)
    stages = [
        ("traces", lambda: _stage_traces(config, run_dir, manifest, dataset)),
        ("capture", lambda: _stage_capture(config, run_dir, manifest)),
        ("characterize", lambda: _stage_characterize(config, run_dir, manifest)),
        ("patch", lambda: _stage_patch(config, run_dir, manifest)),
        ("isolate", lambda: _stage_isolate(config, run_dir, manifest)),
        ("distill", lambda: _stage_distill(config, run_dir, manifest)),
        ("report", lambda: _stage_report(config, run_dir, manifest)),
    ]
    for name, run in stages:
        if until == "data" or (until is not None and STAGES.index(name) > STAGES.index(until)):
            break
        print(f"[run] stage {name}", file=sys.stderr)
        run()
    manifest.update(run_seconds=round(time.perf_counter() - started, 1))
    print(f"[run] manifest: {run_dir / 'manifest.json'}", file=sys.stderr)
    return run_dir
