"""The shipped student base: what its metadata says it can do before distillation, re-measured."""

import json

import pandas as pd
import pytest

from analyses.models.student import default_student_base_path, heldout_perplexity


@pytest.fixture(scope="module")
def base():
    path = default_student_base_path()
    assert (path / "config.json").exists(), "the shipped student base is missing: restore analyses/assets/student_base"
    return path, json.loads((path / "ctd_student.json").read_text())


def test_the_base_knows_the_language_but_not_the_task(base):
    _, meta = base
    before = meta["before_distillation"]
    assert before["heldout_notes"] == 200 and before["task_docs"] == 200
    assert before["heldout_perplexity"] < 3.0  # it reads notes (a 4,427-token vocabulary; uniform would be 4,427)
    # it has never seen a trace: no answer, no shortlist, no two-phase trace
    assert before["task_answer_micro_f1"] == 0.0 and before["task_well_formed"] == 0.0 and before["task_shortlist_recall"] == 0.0
    assert meta["train_seconds"] <= 30 * 60 and meta["n_params"] < 3_000_000


def test_the_recorded_perplexity_is_the_checkpoints(base):
    from probes.models import load_hf_model, load_tokenizer

    path, meta = base
    notes = pd.read_parquet(path / "heldout_notes.parquet")
    model = load_hf_model(path, attn_implementation="sdpa")
    ppl = heldout_perplexity(model, load_tokenizer(path), list(notes["text"]))
    assert ppl == pytest.approx(meta["before_distillation"]["heldout_perplexity"], abs=0.02)


def test_the_checkpoint_is_small_and_loads_like_any_model(base):
    from probes.models import load_model

    path, _ = base
    assert sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) <= 10 * 2**20
    bridge = load_model(path)
    assert bridge.cfg.n_layers == 3 and bridge.cfg.d_model == 128
