"""Data-parallel traces and capture under torchrun (2 CPU processes, gloo) equal a single process."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from probes.store import open_store

ROOT = Path(__file__).resolve().parents[2]


def _torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "CTD_DIST_BACKEND": "gloo", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "analyses.interface.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


def _single(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "analyses.interface.cli", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    """The same traces and capture made by one process and by two torchrun ranks (batch size 1:
    each document's numbers do not depend on which documents share its batch)."""
    root = tmp_path_factory.mktemp("dist")
    out = {}
    for name, runner in (("single", _single), ("torchrun", _torchrun)):
        run = root / name
        common = ["--out", str(run), "--model", str(tiny_models["qwen3"]), "--template", "organism", "--n-docs", "7", "--n-dev-docs", "0", "--batch-size", "1", "--max-new-tokens", "12", "--opt", "n_docs=120"]
        proc = runner("traces", *common, cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        proc = runner("capture", "--run-dir", str(run), "--batch-size", "1", "--dtype", "float32", "--points", "resid_post", "head_out", cwd=ROOT)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[name] = run
    return out


def _store_content(run: Path) -> dict:
    store = open_store(run)
    return {(doc, name): store.read(doc, name) for doc in store.doc_ids for name in store.points + store.reductions}


def test_two_ranks_write_the_same_traces_as_one_process(runs):
    a = pd.read_parquet(runs["single"] / "traces.parquet")
    b = pd.read_parquet(runs["torchrun"] / "traces.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert not list(runs["torchrun"].glob("*.rank-*.parquet"))  # the shares are joined and removed
    manifest = json.loads((runs["torchrun"] / "manifest.json").read_text())
    assert manifest["stages"]["traces"]["processes"] == 2 and manifest["stages"]["capture"]["processes"] == 2


def test_the_merged_store_equals_a_single_process_store_byte_for_byte(runs):
    single, merged = _store_content(runs["single"]), _store_content(runs["torchrun"])
    assert set(single) == set(merged) and len(single) > 0
    for key, (positions, values) in single.items():
        assert torch.equal(positions, merged[key][0]), key
        assert torch.equal(values, merged[key][1]), key  # float32 store, batch size 1: identical bytes
    a = open_store(runs["single"]).index.sort_values(["doc_id", "position"]).drop(columns="shard").reset_index(drop=True)
    b = open_store(runs["torchrun"]).index.sort_values(["doc_id", "position"]).drop(columns="shard").reset_index(drop=True)
    pd.testing.assert_frame_equal(a, b)


def test_a_rank_that_died_is_resumed_by_rerunning_the_same_command(runs, tmp_path):
    """What a rank killed mid-capture leaves: its store lists only the shards it finished, and no
    merged store exists yet. The same torchrun command finishes that rank's share alone and merges."""
    run = tmp_path / "resume"
    shutil.copytree(runs["torchrun"], run)
    store = run / "activations"
    for leftover in store.glob("*"):
        if leftover.is_file():
            leftover.unlink()  # no merged store yet
    rank1 = store / "rank-1"
    state = json.loads((rank1 / "shards.json").read_text())
    last = max(state["shards"], key=int)
    (rank1 / state["shards"].pop(last)["file"]).unlink()
    state["complete"] = False
    (rank1 / "shards.json").write_text(json.dumps(state))
    (rank1 / "index.parquet").unlink()
    untouched = {p.name: p.stat().st_mtime_ns for p in (store / "rank-0").glob("shard-*")}
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["stages"]["capture"]["status"] = "running"
    (run / "manifest.json").write_text(json.dumps(manifest))
    proc = _torchrun("capture", "--run-dir", str(run), "--batch-size", "1", "--dtype", "float32", "--points", "resid_post", "head_out", cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in (store / "rank-0").glob("shard-*")} == untouched  # rank 0's finished work kept
    resumed, reference = _store_content(run), _store_content(runs["single"])
    assert set(resumed) == set(reference)
    assert all(torch.equal(resumed[k][1], reference[k][1]) for k in reference)
