"""Data-parallel capture across processes (``torchrun --nproc-per-node N``), with torch.distributed.

Each rank takes every N-th document, writes its own shards under ``activations/rank-<r>/`` (a
complete store of its own, resumable like a single-process one), and rank 0 merges the listings
into one store: the shard files are hard-linked into ``activations/`` under one numbering and one
``shards.json`` and ``index.parquet`` list them (the rank stores stay, sharing the bytes). Readers see a single-process store; a rerun after a
rank died resumes each rank's store and merges again. No scheduler of our own: torchrun starts
the processes, ``torch.distributed`` (gloo on CPUs, NCCL on GPUs) synchronises them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd

__all__ = ["rank_and_world", "is_distributed", "barrier", "merge_rank_stores", "shard_for_rank"]


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of processes (0, 1 outside torchrun)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    return rank_and_world()[1] > 1


def _group():
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() and os.environ.get("CTD_DIST_BACKEND") != "gloo" else "gloo")
    return dist


def barrier() -> None:
    """Wait for every rank (a no-op outside torchrun)."""
    if is_distributed():
        _group().barrier()


def shard_for_rank(items: list, rank: int | None = None, world: int | None = None) -> list:
    """Every ``world``-th item from ``rank`` on: an even split that keeps each rank's order."""
    r, w = rank_and_world()
    return items[(r if rank is None else rank) :: (w if world is None else world)]


def merge_rank_stores(root: Path, world: int, settings: dict) -> Path:
    """Rank 0: one store in ``root`` from the complete stores in ``root/rank-<r>`` (idempotent)."""
    root = Path(root)
    merged_state = {"settings": settings, "shards": {}, "complete": False}
    index_parts = []
    next_id = 0
    for r in range(world):
        sub = root / f"rank-{r}"
        state = json.loads((sub / "shards.json").read_text())
        if not state.get("complete"):
            raise RuntimeError(f"{sub}: rank {r} did not finish its capture; rerun the same torchrun command to resume it")
        index = pd.read_parquet(sub / "index.parquet")
        remap = {}
        for shard_id in sorted(state["shards"], key=int):
            entry = dict(state["shards"][shard_id])
            name = f"shard-{next_id:05d}.safetensors"
            target = root / name
            if target.exists():
                target.unlink()
            try:
                os.link(sub / entry["file"], target)  # no second copy of the bytes
            except OSError:
                shutil.copyfile(sub / entry["file"], target)
            entry["file"] = name
            merged_state["shards"][str(next_id)] = entry
            remap[int(shard_id)] = next_id
            next_id += 1
        index["shard"] = index["shard"].map(remap)
        index_parts.append(index)
    index = pd.concat(index_parts, ignore_index=True)
    tmp = root / ".index.parquet.merge"
    index.to_parquet(tmp, index=False)
    os.replace(tmp, root / "index.parquet")
    merged_state["complete"] = True
    tmp = root / ".shards.json.merge"
    tmp.write_text(json.dumps(merged_state, indent=1))
    os.replace(tmp, root / "shards.json")  # last: the merged store exists only once complete
    # The rank stores stay (their files are the same inodes): a rerun finds every rank complete.
    return root
