"""What the patch stage stores in patching.parquet holds the invariants the report quotes: checked
on the quick run's table itself, each number recomputed from the rows it summarises."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from analyses.methods.readouts import READOUTS

TEACHER_FORCED = ("answer_logprob", "answer_margin")


@pytest.fixture(scope="module")
def patching(quick_run):
    return pd.read_parquet(quick_run / "patching.parquet")


def _pooled(mode, rows):
    gap = np.nansum(rows["clean"] - rows["corrupt"])
    change = np.nansum(rows["patched"] - rows["corrupt"]) if mode == "denoise" else np.nansum(rows["clean"] - rows["patched"])
    return change / gap


def test_patching_every_head_recovers_the_whole_gap_in_the_stored_table(patching):
    per_trace = patching[(patching["analysis"] == "all_heads") & patching["doc_id"].notna() & patching["readout"].isin(TEACHER_FORCED)]
    assert set(per_trace["mode"]) == {"denoise", "noise"} and per_trace["doc_id"].nunique() >= 5
    for mode, source in (("denoise", "clean"), ("noise", "corrupt")):
        rows = per_trace[per_trace["mode"] == mode]
        np.testing.assert_allclose(rows["patched"], rows[source], atol=1e-4)  # patched run == the source run
        moved = (rows["clean"] - rows["corrupt"]).abs() > 1e-3
        assert moved.sum() >= 3  # the invariant is read where the readout moves
        np.testing.assert_allclose(rows.loc[moved, "effect"], 1.0, atol=1e-3)
    pooled = patching[(patching["analysis"] == "all_heads") & patching["doc_id"].isna() & patching["readout"].isin(TEACHER_FORCED)]
    assert len(pooled) == 4
    np.testing.assert_allclose(pooled["value"], 1.0, atol=1e-4)


def test_stored_effects_and_pooled_values_follow_from_the_per_trace_rows(patching):
    per_trace = patching[patching["doc_id"].notna() & (patching["mode"] != "")]
    gap = per_trace["clean"] - per_trace["corrupt"]
    expected = np.where(per_trace["mode"] == "denoise", (per_trace["patched"] - per_trace["corrupt"]) / gap, (per_trace["clean"] - per_trace["patched"]) / gap)
    ok = np.isfinite(expected)
    np.testing.assert_allclose(per_trace["effect"].to_numpy()[ok], expected[ok], rtol=1e-6, atol=1e-9)
    # every baseline row carries the same clean/corrupt values as the patched rows of its trace
    base = patching[(patching["analysis"] == "baseline") & patching["doc_id"].notna()].set_index(["doc_id", "readout"])
    joined = per_trace.join(base[["clean", "corrupt"]], on=["doc_id", "readout"], rsuffix="_baseline")
    np.testing.assert_allclose(joined["clean"], joined["clean_baseline"])
    np.testing.assert_allclose(joined["corrupt"], joined["corrupt_baseline"])
    keys = ["analysis", "mode", "positions", "readout", "layer", "head", "score", "k", "head_set"]
    pooled = patching[patching["doc_id"].isna() & patching["analysis"].isin(["sweep", "attribution", "head_set", "all_heads"])]
    groups = dict(list(per_trace.groupby(keys)))
    checked = 0
    for row in pooled.itertuples():
        rows = groups[tuple(getattr(row, k) for k in keys)]
        value = _pooled(row.mode, rows)
        if np.isfinite(value):
            assert row.value == pytest.approx(value, rel=1e-6, abs=1e-9), row
            checked += 1
    assert checked >= max(100, 0.95 * len(pooled))  # every summary whose gap is not zero


def test_attribution_agrees_with_the_sweep_as_stored(patching):
    """The stored agreement is the Spearman correlation over heads of the two pooled maps, and on
    the organism attribution patching ranks heads like the one-head sweep (answer log-prob)."""
    pooled = patching[patching["doc_id"].isna()]
    agreement = pooled[pooled["analysis"] == "agreement"]
    assert set(zip(agreement["mode"], agreement["readout"])) == {(m, r) for m in ("denoise", "noise") for r in READOUTS}
    for row in agreement.itertuples():
        maps = {}
        for analysis in ("sweep", "attribution"):
            m = pooled[(pooled["analysis"] == analysis) & (pooled["mode"] == row.mode) & (pooled["readout"] == row.readout) & (pooled["positions"] == "all")]
            maps[analysis] = m.set_index(["layer", "head"])["value"].sort_index()
        assert len(maps["sweep"]) == len(maps["attribution"]) >= 16
        assert (maps["sweep"].index == maps["attribution"].index).all()
        a, b = maps["attribution"].to_numpy(), maps["sweep"].to_numpy()
        ok = np.isfinite(a) & np.isfinite(b)
        assert row.value == pytest.approx(spearmanr(a[ok], b[ok]).statistic, abs=1e-9)
        assert row.ci_low <= row.value <= row.ci_high
        # the same units, not only the same order: per head, the linear estimate sits near the
        # sweep's effect (median 0.001-0.07 of the gap measured; a wrong baseline shifts it by 1)
        assert np.median(np.abs(a[ok] - b[ok])) < 0.25, (row.mode, row.readout)
    logprob = agreement[agreement["readout"] == "answer_logprob"]
    assert (logprob["value"] > 0.5).all() and (logprob["ci_low"] > 0).all(), logprob[["mode", "value", "ci_low", "ci_high"]]
