"""Each figure function on a small hand-made frame: it draws, with a title and axis titles."""

import numpy as np
import pandas as pd

from analyses.results import Attribution, Boundary, DistillResult, Dynamics, HeadScores, IsolationResult, LensResult, PatchingResult, ProbeResults


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
    pr = pd.DataFrame([{"target": t_, "layer": l, "bucket": b, "bucket_name": f"b{b}", "metric": "accuracy", "value": 0.9, "control_value": 0.5, "ci_low": 0.8, "ci_high": 0.95, "majority": 0.6, "token_baseline": 0.85,
                        "minus_tokens": 0.05, "minus_tokens_ci_low": 0.01, "minus_tokens_ci_high": 0.09, "beats_tokens": True, "selectivity": 0.4, "status": "fitted"} for t_ in ("phase", "gold") for l in range(2) for b in range(3)])
    pr.loc[0, ["value", "token_baseline", "minus_tokens", "status"]] = [np.nan, np.nan, np.nan, "not fitted: single class (1 only)"]
    probes = ProbeResults(pr)
    _check(probes.figure())
    summary = probes.beats_tokens().set_index("target")
    assert summary.loc["phase", "not_fitted"] == 1 and summary.loc["gold", "beats_tokens"] == 6
    ln = pd.DataFrame([{"layer": l, "t": x, "metric": "logprob", "value": -3.0, "ci_low": -4.0, "ci_high": -2.0} for l in range(2) for x in t])
    _check(LensResult(ln).figure())
    base = {"doc_id": None, "positions": "all", "readout": "answer_logprob", "clean": 0.0, "corrupt": -5.0, "patched": np.nan, "effect": np.nan, "ci_low": 0.0, "ci_high": 1.0, "metric": np.nan, "p_value": np.nan}
    pt = [{**base, "analysis": "sweep", "mode": m, "layer": l, "head": h, "score": "", "k": 1, "head_set": "", "value": 0.1 * (l + h)} for m in ("denoise", "noise") for l in range(2) for h in range(2)]
    pt += [{**base, "analysis": "ranked_minus_random", "mode": m, "layer": -1, "head": -1, "score": s, "k": k, "head_set": "", "value": 0.05 * k} for m in ("denoise", "noise") for s in ("coarse", "refine") for k in (1, 2)]
    pt += [{**base, "analysis": "correlation", "mode": m, "layer": -1, "head": -1, "score": s, "k": 0, "head_set": "sweep", "value": 0.5, "metric": "spearman", "p_value": 0.01} for m in ("denoise", "noise") for s in ("coarse", "refine")]
    patching = PatchingResult(pd.DataFrame(pt), {"dev_scores": hs.to_dict(orient="records")})
    _check(patching.figure())
    _check(patching.scatter_figure())
    _check(patching.ranked_figure())
    iso = pd.DataFrame([{"condition": c, "metric": "micro_f1", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6} for c in ("full_model", "retriever_alone", "retriever_shortlist+phase2", "phase1_only@0.5")] + [{"condition": "complementarity", "metric": "verdict", "value": 1.0, "ci_low": np.nan, "ci_high": np.nan}])
    fig = _check(IsolationResult(iso).figure())
    assert "complementary" in fig.layout.title.text
    ds = pd.DataFrame([{"condition": c, "seed": s, "metric": m, "value": 0.3 + 0.01 * s, "step": 100} for c in ("standard", "mechanistic") for s in range(3) for m in ("micro_f1", "transfer_kl_phase1", "transfer_kl_phase2")]
                      + [{"condition": c, "seed": s, "metric": f"curve:{m}", "value": 0.1 * step / 100, "step": step} for c in ("standard", "mechanistic") for s in range(3) for m in ("micro_f1", "gold_logprob") for step in (0, 50, 100)]
                      + [{"condition": "mechanistic", "seed": -1, "metric": "micro_f1_minus_standard", "value": 0.02, "ci_low": -0.01, "ci_high": 0.05, "step": np.nan}])
    res = DistillResult(ds, {"curves": {"teacher": {"t": list(t), "focus": list(t), "confusion": list(t)}}})
    assert "mechanistic − standard +0.020" in _check(res.figure()).layout.title.text
    _check(res.curve_figure())
    _check(res.transfer_figure())
    _check(res.trajectory_figure())
    res.save(tmp_path / "d.parquet")
    assert DistillResult.load(tmp_path / "d.parquet").meta["curves"]["teacher"]["t"] == list(t)


def test_results_draw_without_torch():
    """A notebook or the report draws from a run's files without importing the models."""
    import subprocess
    import sys

    code = "import sys; import analyses.results, analyses.results.report, analyses.machinery.settings; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
