import numpy as np
import pandas as pd

from analyses.methods.boundary import Boundary
from analyses.stages.characterize import PROBE_TARGETS, bucket_names


def test_internal_boundary_beats_the_fitted_constant(organism_run):
    """The organism's boundary share varies from trace to trace, so a constant fitted on dev traces
    cannot pass for an estimator: the internal one must be within 5% of the CoT and at most half
    the constant's error (BENCHMARKS.md has both with CIs)."""
    run, results = organism_run
    boundary = results["boundary"]
    errors = boundary.errors(n_boot=300).set_index("estimator")
    assert set(errors.index) == {"fixed", "constant", "tokens", "text_probe", "behavioural", "internal", "internal_unsupervised"}
    internal = errors.loc["internal", "median_abs_error_frac"]
    assert internal <= 0.05, errors
    assert internal <= 0.5 * errors.loc["constant", "median_abs_error_frac"], errors
    assert (errors["ci_low"] <= errors["median_abs_error_frac"]).all() and (errors["median_abs_error_frac"] <= errors["ci_high"]).all()
    ratio, lo, hi = boundary.ratio("internal", "constant", n_boot=300)
    assert lo <= ratio <= hi
    assert 0.0 < boundary.meta["constant_share"] < 1.0
    # the file round-trips
    again = Boundary.load(run / "boundary.parquet")
    assert set(again.frame["estimator"]) == {"fixed", "constant", "tokens", "text_probe", "behavioural", "internal", "internal_unsupervised"}


def test_true_boundary_shares_spread_across_traces(organism_run):
    run, _ = organism_run
    traces = pd.read_parquet(run / "traces.parquet")
    share = (traces["true_boundary"] - traces["cot_start"]) / (traces["cot_end"] - traces["cot_start"])
    assert share.max() - share.min() >= 0.35
    assert np.subtract(*np.percentile(share, [75, 25])) >= 0.12


def test_every_probe_cell_has_its_baselines_or_says_why_not(organism_run):
    _, results = organism_run
    f = results["probes"].frame
    expected = sum(4 * len(bucket_names(t)) for t in PROBE_TARGETS)
    assert len(f) == expected  # no cell dropped silently
    fitted = f[f["status"] == "fitted"]
    assert len(fitted) >= 0.6 * expected
    assert fitted[["majority", "token_baseline", "control_value", "minus_tokens", "selectivity"]].notna().all().all()
    assert f.loc[f["status"] != "fitted", "value"].isna().all()
    # phase cells hold both classes by construction (buckets by distance to each trace's boundary)
    phase = f[f["target"] == "phase"]
    assert (phase["status"] == "fitted").all()
    # Past the first block (layer 0 is little more than the token's identity, and its control task
    # says so), phase probes read more than a control task of the same form (selectivity) and more
    # than the current and previous tokens tell, with the CI above zero, on most cells.
    mixed = phase[phase["layer"] >= 1]
    assert (mixed["selectivity"] > 0.05).mean() >= 0.75
    assert (mixed["minus_tokens_ci_low"] > 0).mean() >= 0.75
    assert ((fitted["minus_tokens_ci_low"] <= fitted["minus_tokens"]) & (fitted["minus_tokens"] <= fitted["minus_tokens_ci_high"])).all()


def test_top_heads_are_reported_with_cis(organism_run):
    run, results = organism_run
    scores = pd.read_parquet(run / "head_scores.parquet")
    for score in ("coarse", "refine"):
        s = scores[scores["score"] == score]
        assert len(s) == 4 * 8
        top = s.nsmallest(3, "rank")
        assert (top["ci_low"] <= top["value"]).all() and (top["value"] <= top["ci_high"]).all()
        assert top["value"].iloc[0] > s["value"].median()


def test_dynamics_are_paired_per_trace(organism_run):
    _, results = organism_run
    changes = results["dynamics"].phase_changes().set_index("metric")
    assert set(changes.index) == {f"{m}_change_{p}" for m in ("focus", "confusion") for p in ("phase1", "phase2")}
    assert (changes["ci_low"] <= changes["value"]).all() and (changes["value"] <= changes["ci_high"]).all()
    assert "rendering" in results["dynamics"].meta


def test_every_result_draws_a_figure(organism_run):
    _, results = organism_run
    for name, result in results.items():
        fig = result.figure()
        assert fig.layout.title.text, name
        assert len(fig.data) > 0, name
    assert len(results["attribution"].kurtosis_figure().data) == 1


def test_boundary_tuning_reads_dev_traces_only(organism_run, tmp_path, monkeypatch):
    """`ctd characterize --tune-boundary` chooses the internal estimator's settings on dev traces:
    it opens neither the test traces' table nor any test trace's activations."""
    import shutil

    import pyarrow.parquet as pq

    import analyses.machinery.io
    from analyses.stages.characterize import tune_boundary_run
    from probes.store import StoreReader

    run, _ = organism_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)  # the session's run stays read-only
    test_ids = set(pd.read_parquet(copy / "traces.parquet")["doc_id"].astype(str))
    dev_ids = set(pd.read_parquet(copy / "dev_traces.parquet")["doc_id"].astype(str))
    assert test_ids and dev_ids and not test_ids & dev_ids
    tables, docs = [], []
    real_read_table, real_read = pq.read_table, StoreReader.read
    monkeypatch.setattr(pq, "read_table", lambda path, *a, **k: tables.append(str(path)) or real_read_table(path, *a, **k))
    monkeypatch.setattr(analyses.machinery.io.pq, "read_table", pq.read_table)
    monkeypatch.setattr(pd, "read_parquet", lambda path, *a, **k: tables.append(str(path)) or pq.read_table(path).to_pandas())
    monkeypatch.setattr(StoreReader, "read", lambda self, doc_id, point: docs.append(str(doc_id)) or real_read(self, doc_id, point))
    table = tune_boundary_run(copy, progress=False)
    assert len(table) and (copy / "boundary_tuning.parquet").exists()
    assert docs and set(docs) <= dev_ids  # activations of dev traces, and only those
    opened = {p.split("/")[-1] for p in tables}
    assert "dev_traces.parquet" in opened and "traces.parquet" not in opened, opened


def test_dev_head_scores_come_from_dev_traces(organism_run):
    """The ranking later stages act on is computed on dev traces: its record names them, and its
    values are not the test traces' scores (a ranking computed on test traces would equal them)."""
    run, results = organism_run
    dev_ids = set(pd.read_parquet(run / "dev_traces.parquet")["doc_id"].astype(str))
    test_ids = set(pd.read_parquet(run / "traces.parquet")["doc_id"].astype(str))
    dev_scores, test_scores = results["dev_head_scores"], results["head_scores"]
    assert set(dev_scores.meta["doc_ids"]) <= dev_ids and not set(dev_scores.meta["doc_ids"]) & test_ids
    assert dev_scores.meta["split"] == "dev" and "dev traces" in dev_scores.meta["traces"]
    key = ["score", "layer", "head"]
    both = dev_scores.frame.set_index(key)["value"].align(test_scores.frame.set_index(key)["value"], join="inner")
    assert len(both[0]) == len(test_scores.frame) and not np.allclose(both[0], both[1])
