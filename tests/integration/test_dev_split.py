"""Heads are ranked on dev traces for every model, and nothing falls back to the test traces."""

import json
import shutil

import pandas as pd
import pytest

from analyses.interface.cli import main
from analyses.results.report import causal_findings
from analyses.results import PatchingResult
from analyses.stages.traces import dev_documents


def test_ctd_run_on_another_family_writes_dev_traces(tiny_models, tmp_path, capsys):
    """A model that is not the organism (a tiny random Llama folder) gets dev traces by default."""
    run = tmp_path / "run"
    assert main(["run", "--model", str(tiny_models["llama"]), "--out", str(run), "--until", "traces", "--set", "traces.n_docs=3", "--set", "traces.generation.max_new_tokens=8"]) == 0
    dev = pd.read_parquet(run / "dev_traces.parquet")
    docs = pd.read_parquet(run / "docs.parquet").set_index("doc_id")
    assert len(dev) == 50 and set(docs.loc[dev["doc_id"], "split"]) == {"dev"}
    assert not set(dev["doc_id"]) & set(pd.read_parquet(run / "traces.parquet")["doc_id"])
    record = json.loads((run / "manifest.json").read_text())["stages"]["traces"]
    assert record["counts"]["dev_traces"] == 50 and record["dev_split"] == "dev"


class _Splits:
    def __init__(self, frame):
        self.docs = frame

    def split(self, name):
        return self.docs[self.docs["split"] == name]


def test_dev_documents_come_from_dev_then_train_never_test():
    frame = pd.DataFrame({"doc_id": [f"d{i}" for i in range(9)], "split": ["train"] * 4 + ["dev"] * 2 + ["test"] * 3})
    docs, split = dev_documents(_Splits(frame), 50)
    assert split == "dev" and list(docs["doc_id"]) == ["d4", "d5"]  # fewer when the dev split is small
    docs, split = dev_documents(_Splits(frame[frame["split"] != "dev"]), 3)
    assert split == "train" and list(docs["doc_id"]) == ["d0", "d1", "d2"]  # XC-repo: train and test only
    docs, split = dev_documents(_Splits(frame[frame["split"] == "test"]), 3)
    assert docs.empty and split == ""


def test_the_report_names_the_traces_heads_were_ranked_on(quick_run, tmp_path, capsys):
    n_dev = len(pd.read_parquet(quick_run / "dev_traces.parquet"))
    sentences = " ".join(causal_findings(quick_run))
    assert f"ranked on {n_dev} dev traces" in sentences and "circular" not in sentences
    # Without dev traces the patch stage stops with the fix instead of ranking on test traces.
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    for name in ("dev_traces.parquet", "dev_head_scores.parquet"):
        (run / name).unlink()
    manifest = json.loads((run / "manifest.json").read_text())
    for record in manifest["stages"].values():  # the run's own record no longer lists them
        for name in ("dev_traces.parquet", "dev_head_scores.parquet"):
            record.get("sha256", {}).pop(name, None)
    (run / "manifest.json").write_text(json.dumps(manifest))
    capsys.readouterr()
    assert main(["patch", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "dev_head_scores.parquet" in err and "--n-dev-docs" in err and "Traceback" not in err
    # A table whose heads were ranked on test traces (as runs before this rule were) is reported so.
    patching = PatchingResult.load(run / "patching.parquet")
    n_test = patching.meta["n_traces"]
    legacy = {k: v for k, v in patching.meta.items() if k not in ("ranked_on", "measured_on")}
    legacy["ranking"] = "CoarseScore / RefineScore on test traces (no dev head scores in this run: rankings and effects share traces)"
    PatchingResult(patching.frame, legacy).save(run / "patching.parquet")
    sentences = " ".join(causal_findings(run))
    assert "ranked on test traces" in sentences and "circular" in sentences and "dev traces" not in sentences
    assert f"over {n_test} test traces" in sentences


def test_patching_ranks_heads_with_the_dev_scores_it_records(quick_run):
    """patching.parquet's record of the ranking is the dev_head_scores table, head for head, and
    names the dev traces it came from."""
    from analyses.results import HeadScores

    patching = PatchingResult.load(quick_run / "patching.parquet")
    dev = HeadScores.load(quick_run / "dev_head_scores.parquet")
    recorded = pd.DataFrame(patching.meta["dev_scores"]).sort_values(["score", "layer", "head"]).reset_index(drop=True)
    stored = dev.frame[["layer", "head", "score", "value", "rank"]].sort_values(["score", "layer", "head"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(recorded, stored, check_dtype=False)
    dev_ids = set(pd.read_parquet(quick_run / "dev_traces.parquet")["doc_id"].astype(str))
    assert set(patching.meta["ranked_on"]["doc_ids"]) <= dev_ids and patching.meta["ranked_on"]["split"] == "dev"
