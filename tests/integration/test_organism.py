import json

import pandas as pd
import pytest

from analyses.interface.cli import main
from analyses.models.organism import OrganismConfig, evaluate_organism, train_organism
from analyses.tasks.labels import LabelSpace
from probes.models import load_model


def test_shipped_organism_on_200_heldout_notes(organism_path):
    """Every target of the shipped checkpoint holds on its 200 held-out notes (answer micro-F1,
    shortlist recall, well-formed traces, size, label space, training time), and the numbers its
    metadata records are what it does."""
    meta = json.loads((organism_path / "ctd_organism.json").read_text())
    size = sum(p.stat().st_size for p in organism_path.rglob("*") if p.is_file())
    assert size <= 30 * 1024 * 1024, f"checkpoint is {size / 2**20:.1f} MB"
    labels = LabelSpace.load(organism_path / "labels.parquet")
    assert len(labels) >= 1000 and meta["n_labels"] == len(labels)
    assert meta["train_seconds"] <= 60 * 60
    docs = pd.read_parquet(organism_path / "heldout_docs.parquet")
    assert len(docs) == 200
    metrics = evaluate_organism(organism_path, docs, labels, progress=False)
    assert metrics["answer_micro_f1"] >= 0.80, metrics
    assert metrics["shortlist_recall"] >= 0.90, metrics
    assert metrics["well_formed"] >= 0.95, metrics
    assert metrics["with_boundary"] >= 0.95, metrics
    # What the metadata records is what the checkpoint does.
    for key in ("answer_micro_f1", "shortlist_recall", "well_formed"):
        assert metrics[key] == pytest.approx(meta["heldout"][key], abs=0.01)


def test_organism_loads_like_any_model(organism_path):
    bridge = load_model(organism_path)
    assert bridge.ctd_info.family == "qwen3" and bridge.ctd_info.architecture == "Qwen3ForCausalLM"


def test_quick_training_runs_and_lowers_the_loss(tmp_path):
    config = OrganismConfig.quick_config()
    config.max_steps = 40
    config.n_train_docs = 600
    config.n_eval_docs = 10
    out = train_organism(tmp_path / "quick", config, progress=False)
    curve = pd.read_parquet(out / "loss_curve.parquet")
    assert len(curve) == 40
    assert curve["loss"].tail(5).mean() < curve["loss"].head(5).mean() - 1.0
    assert load_model(out).ctd_info.n_layers == 2
    meta = json.loads((out / "ctd_organism.json").read_text())
    assert set(meta["heldout"]) >= {"answer_micro_f1", "shortlist_recall", "well_formed"}


def test_traces_command_writes_the_run(tmp_path, organism_path):
    run = tmp_path / "run"
    assert main(["traces", "--out", str(run), "--n-docs", "6", "--opt", "n_docs=200"]) == 0
    traces = pd.read_parquet(run / "traces.parquet")
    for column in ("doc_id", "prompt_ids", "output_ids", "text", "shortlist", "answer", "well_formed", "cot_start", "cot_end", "true_boundary"):
        assert column in traces.columns
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["path"] == str(organism_path.resolve())
    labels = pd.read_parquet(run / "labels.parquet")
    assert all(0 <= a < len(labels) for ans in traces["answer"] for a in ans)
    good = traces[traces["well_formed"]]
    assert len(good) >= 5
    assert (good["true_boundary"] > good["cot_start"]).all() and (good["true_boundary"] < good["cot_end"]).all()
