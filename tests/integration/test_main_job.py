import json
from pathlib import Path

import pytest

from analyses.results.report import collect_figures, png_available

NOTEBOOKS = sorted((Path(__file__).resolve().parents[2] / "notebooks").glob("*.ipynb"))
EXPECTED_FIGURES = {
    "dynamics", "boundary_errors", "head_scores", "kurtosis_map", "region_attention", "region_attention_value_weighted",
    "probes", "logit_lens", "causal_map", "scores_vs_causal_effects", "ranked_vs_random_heads", "ablation", "isolation",
    "distill", "distill_learning_curves", "distill_mechanism_transfer", "distill_trajectories",
}


def test_quick_run_writes_every_stage_and_a_report(quick_run):
    manifest = json.loads((quick_run / "manifest.json").read_text())
    for stage in ("data", "traces", "capture", "characterize", "patch", "ablate", "isolate", "distill", "report"):
        assert manifest["stages"][stage]["status"] == "complete", stage
    for name in ("labels", "docs", "traces", "dynamics", "boundary", "head_scores", "attribution", "probes", "patching", "ablation", "isolation", "distill"):
        assert (quick_run / f"{name}.parquet").exists(), name
    assert manifest["versions"]["transformers"] == "5.23.0"
    report = (quick_run / "report.html").read_text()
    for question in ("1. Characterize", "2. Isolate", "3. Distill"):
        assert question in report
    figures = collect_figures(quick_run)
    assert set(figures) == EXPECTED_FIGURES
    for name in figures:
        assert f'id="{name}"' in report
        assert (quick_run / "figures" / f"{name}.html").exists()
        if png_available():
            assert (quick_run / "figures" / f"{name}.png").stat().st_size > 10_000
    assert 'src="https://cdn.plot.ly' not in report and "Plotly.newPlot" in report  # plotly.js embedded: opens offline


def test_distillation_reports_paired_differences_with_cis(quick_run):
    import pandas as pd

    frame = pd.read_parquet(quick_run / "distill.parquet")
    paired = frame[(frame["seed"] < 0) & (frame["condition"] == "mechanistic")].set_index("metric")
    for metric in ("micro_f1_minus_standard", "gold_logprob_minus_standard", "ce_phase2_minus_standard", "transfer_kl_phase1_minus_standard"):
        row = paired.loc[metric]
        assert row["ci_low"] <= row["value"] <= row["ci_high"], metric
    curves = frame[frame["metric"] == "curve:micro_f1"]
    assert curves.groupby(["condition", "seed"])["step"].nunique().min() >= 3  # step 0 and the checkpoints


def test_rerun_reuses_finished_stages(quick_run, capsys):
    from analyses.interface.cli import main

    assert main(["run", "--quick", "--out", str(quick_run), "--until", "isolate"]) == 0
    err = capsys.readouterr().err
    for stage in ("traces", "capture", "characterize", "patch", "ablate", "isolate"):
        assert f"[{stage}] complete" in err


def test_stage_commands_record_themselves_like_ctd_run(quick_run, tmp_path, capsys):
    import shutil

    from analyses.interface.cli import main

    run = tmp_path / "copy"
    shutil.copytree(quick_run, run)
    assert main(["isolate", "--run", str(run), "--n-docs", "6"]) == 0
    record = json.loads((run / "manifest.json").read_text())["stages"]["isolate"]
    assert record["status"] == "complete" and record["config"]["n_docs"] == 6
    assert set(record["sha256"]) == {"isolation.parquet"}
    capsys.readouterr()
    # `ctd run` sees the stage was made with other settings and says so instead of mixing them.
    assert main(["run", "--quick", "--out", str(run), "--until", "isolate"]) == 2
    assert "stage 'isolate' was run here with other settings" in capsys.readouterr().err


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebooks_execute(notebook, quick_run, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("CTD_NOTEBOOK_RUN", str(quick_run))
    nb = nbformat.read(notebook, as_version=4)
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}}).execute()
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


def test_the_readme_stage_sequence_runs_with_stage_defaults(organism_path, tmp_path, capsys):
    """README: `ctd traces`, `ctd capture --run R`, `ctd characterize --run R`, each with its
    defaults (fewer traces and draws here): what one stage writes by default is what the next reads."""
    from analyses.interface.cli import main

    run = tmp_path / "r"
    assert main(["traces", "--out", str(run), "--n-docs", "10", "--n-dev-docs", "10"]) == 0
    assert main(["capture", "--run", str(run)]) == 0
    assert main(["characterize", "--run", str(run), "--n-boot", "50"]) == 0
    for name in ("boundary", "head_scores", "dev_head_scores", "probes", "dynamics"):
        assert (run / f"{name}.parquet").exists(), name
    capsys.readouterr()
    # asking for more traces than the dataset's split holds stops with the fix, not a silent shortfall
    assert main(["traces", "--out", str(tmp_path / "big"), "--n-docs", "100000"]) == 2
    assert "n_docs" in capsys.readouterr().err
