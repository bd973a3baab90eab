import gzip
import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from analyses.interface.cli import main
from analyses.tasks.metrics import xmc_metrics
from analyses.tasks.sources import SOURCES, Dataset, apply_filter, load_dataset
from probes.errors import CtdInputError


def _write_jsonl(path, rows, gz=False):
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt") as fh:
            fh.write(text)
    else:
        path.write_text(text)


@pytest.fixture
def xc_dir(tmp_path):
    d = tmp_path / "LF-Tiny"
    d.mkdir()
    labels = [{"uid": f"L{i}", "title": t, "content": ""} for i, t in enumerate(["red apple", "green pear", "blue whale", "sea lion"])]
    trn = [
        {"uid": "d1", "title": "Apples", "content": "a red fruit", "target_ind": [0], "target_rel": [1.0]},
        {"uid": "d2", "title": "Whales", "content": "big sea animals", "target_ind": [2, 3], "target_rel": [1.0, 1.0]},
        {"uid": "d3", "title": "Pears", "content": "", "target_ind": [1], "target_rel": [1.0]},
    ]
    tst = [
        {"uid": "t1", "title": "Sea lion", "content": "lives by the sea", "target_ind": [3, 2], "target_rel": [1.0, 1.0]},
        {"uid": "t2", "title": "Fruit bowl", "content": "apples and pears", "target_ind": [0, 1], "target_rel": [1.0, 1.0]},
    ]
    _write_jsonl(d / "lbl.json.gz", labels, gz=True)
    _write_jsonl(d / "trn.json.gz", trn, gz=True)
    _write_jsonl(d / "tst.json.gz", tst, gz=True)
    (d / "filter_labels_test.txt").write_text("0 3\n")
    return d


def test_registry_names():
    assert {"icd10cm", "xc-repo", "mimic-iv-icd10", "jsonl"} <= set(SOURCES)


def test_xc_repo_round_trip(xc_dir, tmp_path):
    ds = load_dataset("xc-repo", xc_dir)
    assert len(ds.labels) == 4 and ds.labels.texts[2] == "blue whale"
    assert ds.split("train")["gold"].tolist() == [[0], [2, 3], [1]]
    assert ds.split("test")["text"].tolist()[0] == "Sea lion\nlives by the sea"
    assert ds.filters["test"].tolist() == [[0, 3]]
    assert ds.label_counts("train").tolist() == [1, 1, 1, 1]
    ds.save(tmp_path / "run")
    back = Dataset.load(tmp_path / "run")
    assert back.docs["gold"].tolist() == ds.docs["gold"].tolist()
    assert back.filters["test"].tolist() == [[0, 3]]


def test_filter_files_are_applied_before_top_k(xc_dir):
    ds = load_dataset("xc-repo", xc_dir)
    gold = ds.gold_matrix("test")
    # Row 0's best score is the filtered reciprocal pair (label 3); it must not count.
    scores = np.array([[0.1, 0.0, 0.5, 0.9], [0.8, 0.7, 0.0, 0.0]])
    unfiltered = xmc_metrics(gold, scores, ks=(1,))
    filtered = xmc_metrics(gold, apply_filter(scores, ds.filters["test"]), ks=(1,))
    assert unfiltered["P@1"] == 1.0
    assert filtered["P@1"] == 1.0  # label 2 moves up and is gold too
    gold_only3 = sp.csr_matrix(np.array([[0, 0, 0, 1], [1, 0, 0, 0]]))
    assert xmc_metrics(gold_only3, apply_filter(scores, ds.filters["test"]), ks=(1,))["P@1"] == 0.5


def test_jsonl_round_trip(tmp_path):
    d = tmp_path / "j"
    d.mkdir()
    _write_jsonl(d / "labels.jsonl", [{"id": "a", "text": "alpha"}, {"id": "b", "text": "beta"}])
    _write_jsonl(d / "train.jsonl", [{"id": "1", "text": "one", "labels": ["a"]}, {"id": "2", "text": "two", "labels": ["a", "b"]}])
    _write_jsonl(d / "test.jsonl", [{"id": "3", "text": "three", "labels": ["b"]}])
    ds = load_dataset("jsonl", d)
    assert ds.docs["gold"].tolist() == [[0], [0, 1], [1]]
    assert ds.docs["split"].tolist() == ["train", "train", "test"]


def test_mimic_feather_layout(tmp_path):
    d = tmp_path / "mimic"
    d.mkdir()
    pd.DataFrame(
        {"_id": [1, 2, 3], "text": ["chf note", "dm note", "both"], "target": [["I50.22"], ["E119"], ["I50.22", "E11.9"]]}
    ).to_feather(d / "mimiciv_icd10.feather")
    pd.DataFrame({"_id": [1, 2, 3], "split": ["train", "val", "test"]}).to_feather(d / "mimiciv_icd10_split.feather")
    ds = load_dataset("mimic-iv-icd10", d)
    assert ds.labels.codes == ["I50.22", "E11.9"]
    assert ds.labels.texts[0] == "Chronic systolic (congestive) heart failure"
    assert ds.docs["split"].tolist() == ["train", "dev", "test"]
    assert ds.docs["gold"].tolist() == [[0], [1], [0, 1]]


def test_mimic_csv_layout_and_unknown_code(tmp_path):
    d = tmp_path / "mimic"
    d.mkdir()
    for split, labels in (("train", "I5022;E119"), ("dev", "I10"), ("test", "0DTJ4ZZ")):
        pd.DataFrame({"HADM_ID": [f"{split}1"], "TEXT": [f"{split} note"], "LABELS": [labels]}).to_csv(d / f"{split}_full.csv", index=False)
    with pytest.raises(CtdInputError, match=r"test_full\.csv:2: unknown ICD-10-CM code '0DTJ4ZZ'"):
        load_dataset("mimic-iv-icd10", d)
    ds = load_dataset("mimic-iv-icd10", d, unknown_codes="keep")
    assert ds.labels.codes == ["I50.22", "E11.9", "I10", "0DTJ4ZZ"]
    assert ds.docs["doc_id"].tolist() == ["train1", "dev1", "test1"]


# ---- bad input through the CLI: exit code 2, one line naming the file and line, no traceback ----


def _cli(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_missing_file(tmp_path, capsys):
    d = tmp_path / "empty"
    d.mkdir()
    code, err = _cli(["data", "show", "xc-repo", str(d)], capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert "lbl.json.gz: file not found" in err and "Traceback" not in err


def test_cli_missing_folder(tmp_path, capsys):
    code, err = _cli(["data", "show", "jsonl", str(tmp_path / "nope")], capsys)
    assert code == 2 and "nope: folder not found" in err


def test_cli_malformed_json_line(xc_dir, capsys):
    with gzip.open(xc_dir / "trn.json.gz", "at") as fh:
        fh.write('{"uid": "bad", "title": \n')
    code, err = _cli(["data", "show", "xc-repo", str(xc_dir)], capsys)
    assert code == 2 and "trn.json.gz:4: malformed JSON" in err and len(err.splitlines()) == 1


def test_cli_label_index_out_of_range(xc_dir, capsys):
    rows = [{"uid": "t9", "title": "x", "content": "y", "target_ind": [7]}]
    _write_jsonl(xc_dir / "tst.json.gz", rows, gz=True)
    code, err = _cli(["data", "show", "xc-repo", str(xc_dir)], capsys)
    assert code == 2 and "tst.json.gz:1: label index 7 out of range (lbl file has 4 labels)" in err


def test_cli_filter_out_of_range(xc_dir, capsys):
    (xc_dir / "filter_labels_test.txt").write_text("0 3\n5 1\n")
    code, err = _cli(["data", "show", "xc-repo", str(xc_dir)], capsys)
    assert code == 2 and "filter_labels_test.txt:2: row 5 out of range" in err


def test_cli_unknown_code(tmp_path, capsys):
    d = tmp_path / "j"
    d.mkdir()
    _write_jsonl(d / "labels.jsonl", [{"id": "a", "text": "alpha"}])
    _write_jsonl(d / "train.jsonl", [{"id": "1", "text": "one", "labels": ["a"]}, {"id": "2", "text": "two", "labels": ["zz"]}])
    _write_jsonl(d / "test.jsonl", [])
    code, err = _cli(["data", "show", "jsonl", str(d)], capsys)
    assert code == 2 and "train.jsonl:2: unknown label code 'zz'" in err


def test_cli_empty_document(tmp_path, capsys):
    d = tmp_path / "j"
    d.mkdir()
    _write_jsonl(d / "labels.jsonl", [{"id": "a", "text": "alpha"}])
    _write_jsonl(d / "train.jsonl", [{"id": "1", "text": "   ", "labels": ["a"]}])
    _write_jsonl(d / "test.jsonl", [])
    code, err = _cli(["data", "show", "jsonl", str(d)], capsys)
    assert code == 2 and "train.jsonl:1: empty document text" in err
    ds = load_dataset("jsonl", d, on_empty="drop")
    assert len(ds.docs) == 0


def test_cli_bad_input_keeps_what_was_written(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--out", str(out), "--quick", "--opt", "n_docs=30", "--until", "data"]) == 0
    docs_before = (out / "docs.parquet").read_bytes()
    capsys.readouterr()
    code, err = _cli(["run", "--out", str(tmp_path / "run2"), "--dataset", "jsonl", "--dataset-path", str(tmp_path / "missing")], capsys)
    assert code == 2 and "missing: folder not found" in err
    # Pointing a different dataset at a finished run is refused, not overwritten.
    code, err = _cli(["run", "--out", str(out), "--dataset", "jsonl", "--dataset-path", str(tmp_path / "missing")], capsys)
    assert code == 2 and "manifest.json: stage 'data' was run here with other settings" in err
    assert (out / "docs.parquet").read_bytes() == docs_before
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stages"]["data"]["status"] == "complete"


def test_console_script_exit_code_and_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "analyses.interface.cli", "data", "show", "icd10cm", "--chapters", "99"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == "ctd: error: icd10cm: unknown chapter '99'; use a chapter number 1-22 or a range like I00-I99"


def test_data_show_icd10cm(capsys):
    assert main(["data", "show", "icd10cm", "--n-docs", "30"]) == 0
    out = capsys.readouterr().out
    assert "74,724" in out and "labels: 74,719" in out
    assert out.count("\n[note-") == 3


def test_run_directory_lock_and_names(tmp_path, capsys, monkeypatch):
    import os
    import subprocess

    from analyses.machinery.io import RunLock

    run = tmp_path / "locked"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        run.mkdir()
        (run / ".ctd.lock").write_text(json.dumps({"pid": sleeper.pid, "host": os.uname().nodename, "started": "now"}))
        code, err = _cli(["run", "--out", str(run), "--until", "data"], capsys)
        assert code == 2 and f"another ctd process (pid {sleeper.pid}" in err
    finally:
        sleeper.kill()
        sleeper.wait()
    # the owner is gone: the stale lock is taken over and released afterwards
    assert main(["run", "--out", str(run), "--until", "data", "--quick", "--opt", "n_docs=20"]) == 0
    assert not (run / ".ctd.lock").exists()
    with RunLock(run):
        assert (run / ".ctd.lock").exists()
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["run", "--out", "results/../../escape", "--until", "data"], capsys)
    assert code == 2 and "escapes results/" in err
