"""The ``capture`` stage (``ctd capture --run DIR``): replay a run's traces into its activation store."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.io import Manifest, read_parquet
from analyses.parsing import Region
from probes.capture import CaptureConfig, CaptureRequest, capture
from probes.distributed import rank_and_world
from probes.errors import input_error
from probes.points import resolve_points

__all__ = ["capture_run", "capture_requests", "POSITION_SETS"]

POSITION_SETS = ("output", "cot", "mentions", "all")
_DOCUMENT_REGIONS = (int(Region.DOCUMENT), int(Region.ANCHOR))


def capture_requests(traces: pd.DataFrame, positions: str = "output", path: Path | None = None) -> list[CaptureRequest]:
    """One request per trace. ``positions``: ``output`` (CoT + answer tokens, the default), ``cot``,
    ``mentions`` (label-mention tokens) or ``all`` (prompt too)."""
    if positions not in POSITION_SETS:
        raise input_error(None, f"unknown position set {positions!r}", f"use one of {POSITION_SETS}")
    requests = []
    for row_number, row in enumerate(traces.itertuples(index=False)):
        ids = list(row.prompt_ids) + list(row.output_ids)
        regions = np.asarray(row.regions, dtype=np.int64)
        if len(regions) != len(ids):
            raise input_error(path, f"trace {row.doc_id!r} has {len(regions)} regions for {len(ids)} tokens", "regenerate traces.parquet with `ctd traces`", row_number + 1)
        cot_start, cot_end = int(row.cot_start), int(row.cot_end)
        if positions == "output":
            pos = np.arange(len(row.prompt_ids), len(ids))
        elif positions == "cot":
            pos = np.arange(cot_start, cot_end)
        elif positions == "mentions":
            pos = np.flatnonzero(np.isin(regions, [int(Region.MENTION_GOLD), int(Region.MENTION_NEAR_MISS), int(Region.MENTION_OTHER)]))
        else:
            pos = np.arange(len(ids))
        requests.append(
            CaptureRequest(
                doc_id=str(row.doc_id),
                token_ids=ids,
                positions=pos,
                regions=regions,
                document_mask=np.isin(regions, _DOCUMENT_REGIONS),
                norm_origin=cot_start,
                norm_length=max(cot_end - cot_start, 1),
            )
        )
    return requests


def capture_run(
    run_dir: str | Path,
    points: list[str] | None = None,
    attention_layers: str | list[int] = "all",
    positions: str = "output",
    batch_size: int = 8,
    dtype: str = "float16",
    padding: str = "left",
    progress: bool = True,
    model=None,
    manifest: Manifest | None = None,
    device_map: str | None = None,
) -> Path:
    """Capture the run's traces (``traces.parquet`` and, when present, ``dev_traces.parquet``) with
    the run's model into one store; resumable (finished shards are kept)."""
    from probes.models import load_model

    run_dir = Path(run_dir)
    manifest = Manifest.for_stage(run_dir, manifest)
    model_path = manifest.model_path()
    columns = ("doc_id", "prompt_ids", "output_ids", "regions", "cot_start", "cot_end")
    traces = read_parquet(run_dir / "traces.parquet", required=columns)
    dev_path = run_dir / "dev_traces.parquet"
    if dev_path.exists():  # dev traces share the store (their doc ids differ): tuning and dev head rankings read them
        traces = pd.concat([traces, read_parquet(dev_path, required=columns)], ignore_index=True)
    bridge = model if model is not None else load_model(model_path, device_map=device_map)
    n_layers = bridge.cfg.n_layers
    hook_names = resolve_points(points, n_layers)
    layers = list(range(n_layers)) if attention_layers == "all" else [] if attention_layers == "none" else list(attention_layers)
    config = CaptureConfig(points=hook_names, attention_layers=layers, n_regions=len(Region), batch_size=batch_size, padding=padding, dtype=dtype)
    stage_config = {"points": hook_names, "attention_layers": layers, "positions": positions, "batch_size": batch_size, "dtype": dtype, "padding": padding}
    requests = capture_requests(traces, positions, run_dir / "traces.parquet")
    settings = {"model": str(model_path), "positions": positions}
    if rank_and_world()[0] != 0:  # torchrun: rank 0 records the stage once every rank's share is merged
        return capture(bridge, requests, run_dir, config, settings=settings, progress=False)
    if getattr(bridge, "ctd_info", None) is not None:  # what was loaded: family, architecture, sizes
        from dataclasses import asdict

        manifest.update(model={**manifest.data.get("model", {}), **asdict(bridge.ctd_info)})
    with manifest.stage("capture", config=stage_config) as record:
        root = capture(bridge, requests, run_dir, config, settings=settings, progress=progress)
        record["outputs"] = ["activations/"]
        record["counts"] = {"traces": len(requests), "tokens": int(sum(len(r.positions) for r in requests))}
        record["processes"] = rank_and_world()[1]
    print(f"[capture] {len(requests)} traces, {sum(len(r.positions) for r in requests):,} tokens -> {root}", file=sys.stderr)
    return root
