"""A study that adds an arm, seeds or bootstrap draws reuses the students it already trained; one that
changes how a student is trained or evaluated retrains it."""

import json
from dataclasses import asdict, replace

from analyses.stages.distill import _finished
from analyses.machinery.io import write_json
from analyses.machinery.settings import DistillConfig


def _student(folder, cfg):
    folder.mkdir(parents=True)
    write_json({"config": json.loads(json.dumps(asdict(cfg))), "metrics": {"train_seconds": 1.0}}, folder / "student.json")


def test_finished_students_are_reused_across_study_level_changes(tmp_path):
    trained = DistillConfig(seeds=(0, 1), conditions=("standard", "mechanistic"))
    _student(tmp_path / "standard-seed0", trained)
    wider = replace(trained, seeds=(0, 1, 2, 3, 4), conditions=("standard", "mechanistic", "standard_equal_compute"), ablation_seeds=3, n_boot=2000)
    assert _finished(tmp_path / "standard-seed0", wider) is not None


def test_students_trained_otherwise_are_not_reused(tmp_path):
    trained = DistillConfig()
    _student(tmp_path / "standard-seed0", trained)
    for change in ({"steps": trained.steps + 1}, {"lr": trained.lr / 2}, {"n_train_docs": 10}, {"n_eval_docs": 7}, {"lambda1": 0.1}):
        assert _finished(tmp_path / "standard-seed0", replace(trained, **change)) is None, change
    assert _finished(tmp_path / "missing", trained) is None
