"""The ``capture`` stage (``ctd capture --run DIR``): replay a run's traces into its activation store.

Which tokens of a trace are replayed is :mod:`analyses.methods.replay`; the store and the hooks are
:mod:`probes.capture` and :mod:`probes.store`."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd

from analyses.machinery.io import read_parquet
from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.methods.parsing import Region
from analyses.methods.replay import capture_requests
from probes.capture import CaptureConfig, capture, forward_path
from probes.distributed import rank_and_world
from probes.points import resolve_points

__all__ = ["compute"]


def compute(ctx: StageContext) -> None:
    """Replay the run's traces (``traces.parquet`` and, when present, ``dev_traces.parquet``) with
    the run's model into one store under ``activations/``; resumable (finished shards are kept).

    ``ctx.settings``: :class:`~analyses.machinery.settings.CaptureSettings` (points, positions,
    attention layers, ...); ``ctx.model``: a loaded bridge to reuse (else the run's model is loaded,
    with ``settings.device_map``). Counts go into the stage record, and the loaded model's
    description into the run's ``model`` facts.
    """
    from probes.models import load_model

    run_dir, model_path, settings, progress, model, record = Path(ctx.run_dir), ctx.model_path, ctx.settings, ctx.progress, ctx.model, ctx.record
    columns = ("doc_id", "prompt_ids", "output_ids", "regions", "cot_start", "cot_end")
    traces = read_parquet(run_dir / "traces.parquet", required=columns)
    dev_path = run_dir / "dev_traces.parquet"
    if dev_path.exists():  # dev traces share the store (their doc ids differ): tuning and dev head rankings read them
        traces = pd.concat([traces, read_parquet(dev_path, required=columns)], ignore_index=True)
    bridge = model if model is not None else load_model(model_path, device_map=settings.device_map)
    n_layers = bridge.cfg.n_layers
    hook_names = resolve_points(list(settings.points) or None, n_layers)
    layers = settings.attention_layers
    layers = list(range(n_layers)) if layers == "all" else [] if layers == "none" else [int(x) for x in layers]
    config = CaptureConfig(points=hook_names, attention_layers=layers, n_regions=len(Region), batch_size=settings.batch_size, padding=settings.padding, dtype=settings.dtype, attention=settings.attention)
    record["attention_path"] = config.attention_path
    record["forward_path"] = forward_path(bridge, config)
    requests = capture_requests(traces, settings.positions, run_dir / "traces.parquet")
    identity = {"model": str(model_path), "positions": settings.positions}
    root = capture(bridge, requests, run_dir, config, settings=identity, progress=progress and rank_and_world()[0] == 0)
    if getattr(bridge, "ctd_info", None) is not None:  # what was loaded: family, architecture, sizes
        from dataclasses import asdict

        ctx.facts["model"] = {**ctx.manifest.data.get("model", {}), **asdict(bridge.ctd_info)}
    record["counts"] = {"traces": len(requests), "tokens": int(sum(len(r.positions) for r in requests))}
    record["processes"] = rank_and_world()[1]
    if rank_and_world()[0] == 0:
        print(f"[capture] {len(requests)} traces, {sum(len(r.positions) for r in requests):,} tokens -> {root}", file=sys.stderr)
    return None  # the store is written; nothing for the runner to save


register_stage(Stage("capture", "capture", ("traces.parquet",), ("activations/",), compute, "replay the traces into the activation store"))
