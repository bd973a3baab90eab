"""Each figure function on a small hand-made frame: it draws, with a title and axis titles."""

import numpy as np
import pandas as pd

from analyses.boundary import Boundary
from analyses.characterize import Attribution, HeadScores, LensResult, ProbeResults
from analyses.distill import DistillResult
from analyses.dynamics import Dynamics
from analyses.isolate import IsolationResult
from analyses.patch import PatchingResult


def _check(fig):
    assert fig.layout.title.text
    assert len(fig.data) > 0
    layout = fig.to_plotly_json()["layout"]
    for axis in ("xaxis", "yaxis"):  # on subplot grids the title sits on one axis of the grid
        assert any(v.get("title", {}).get("text") for k, v in layout.items() if k.startswith(axis)), axis
    return fig


def test_every_figure_draws_from_a_small_frame(tmp_path):
    t = np.linspace(0, 1, 5)
    dyn = pd.DataFrame([(None, x, m, 0.5 + 0.1 * x, 0.4, 0.6) for x in t for m in ("focus", "confusion")], columns=["doc_id", "t", "metric", "value", "ci_low", "ci_high"])
    _check(Dynamics(dyn).figure(boundaries={"fixed": 0.5, "internal": 0.3}))
    b = pd.DataFrame({"doc_id": ["a", "a", "b", "b"], "estimator": ["fixed", "internal"] * 2, "tau_token": [60, 45, 70, 52], "tau_norm": [0.5, 0.3, 0.5, 0.32], "true_token": [44, 44, 50, 50], "abs_error_tokens": [16.0, 1.0, 20.0, 2.0], "cot_length": [100, 100, 120, 120]})
    boundary = Boundary(b)
    _check(boundary.figure())
    assert boundary.errors().set_index("estimator").loc["internal", "median_abs_error_tokens"] == 1.5
    hs = pd.DataFrame([{"layer": l, "head": h, "score": s, "value": l + h / 10, "ci_low": l, "ci_high": l + 1, "rank": 1 + l * 2 + h} for l in range(2) for h in range(2) for s in ("coarse", "refine")])
    _check(HeadScores(hs).figure())
    at = pd.DataFrame([{"layer": 0, "head": h, "t": x, "measure": m, "region": r if m != "kurtosis" else "", "value": 1.0} for h in range(2) for x in t for m in ("mass", "value_mass", "kurtosis") for r in ("document", "cot")])
    _check(Attribution(at).figure())
    _check(Attribution(at).kurtosis_figure())
    pr = pd.DataFrame([{"target": "phase", "layer": l, "bucket": b, "metric": "accuracy", "value": 0.9, "control_value": 0.5, "ci_low": 0.8, "ci_high": 0.95} for l in range(2) for b in range(3)])
    _check(ProbeResults(pr).figure())
    ln = pd.DataFrame([{"layer": l, "t": x, "metric": "logprob", "value": -3.0, "ci_low": -4.0, "ci_high": -2.0} for l in range(2) for x in t])
    _check(LensResult(ln).figure())
    pt = pd.DataFrame([{"doc_id": None, "mode": m, "score": s, "k": k, "head_set": hs_, "metric": "margin", "value": 0.1 * k, "ci_low": 0.0, "ci_high": 1.0} for m in ("denoise", "noise") for s in ("coarse", "refine") for k in (3, 8) for hs_ in ("ranked", "random-0", "lowest")])
    _check(PatchingResult(pt).figure())
    iso = pd.DataFrame([{"condition": c, "metric": "micro_f1", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6} for c in ("full_model", "retriever_alone", "retriever_shortlist+phase2", "phase1_only@0.5")] + [{"condition": "complementarity", "metric": "verdict", "value": 1.0, "ci_low": np.nan, "ci_high": np.nan}])
    fig = _check(IsolationResult(iso).figure())
    assert "complementary" in fig.layout.title.text
    ds = pd.DataFrame([{"condition": c, "seed": s, "metric": "micro_f1", "value": 0.3 + 0.01 * s} for c in ("standard", "mechanistic") for s in range(3)])
    res = DistillResult(ds, {"curves": {"teacher": {"t": list(t), "focus": list(t), "confusion": list(t)}}})
    _check(res.figure())
    _check(res.trajectory_figure())
    res.save(tmp_path / "d.parquet")
    assert DistillResult.load(tmp_path / "d.parquet").meta["curves"]["teacher"]["t"] == list(t)
