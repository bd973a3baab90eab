"""The phase-boundary result: one row per trace and estimator, errors with CIs, a figure."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.results.theme import ESTIMATOR_COLOURS, themed
from analyses.results.base import FrameResult
from analyses.tasks.metrics import bootstrap_ci

__all__ = ["Boundary"]


class Boundary(FrameResult):
    """``frame`` columns: doc_id, estimator, tau_token, tau_norm, true_token, abs_error_tokens, cot_length."""

    REQUIRED = ("doc_id", "estimator", "tau_token", "tau_norm", "true_token", "abs_error_tokens")

    def tau(self, estimator: str = "internal", prefer_truth: bool = False) -> dict[str, int]:
        """Per trace, ``estimator``'s boundary token (``prefer_truth``: the true boundary where known)."""
        f = self.frame[self.frame["estimator"] == estimator]
        tau = {str(d): int(t) for d, t in zip(f["doc_id"], f["tau_token"])}
        if prefer_truth:
            tau.update({str(d): int(t) for d, t in zip(f["doc_id"], f["true_token"]) if not pd.isna(t)})
        return tau

    def medians(self) -> dict[str, float]:
        return self.frame.groupby("estimator")["tau_norm"].median().to_dict()

    def error_fractions(self) -> pd.DataFrame:
        """Per trace and estimator: absolute error as a fraction of the CoT (traces with a known boundary)."""
        f = self.frame.dropna(subset=["abs_error_tokens"])
        return f.assign(frac=f["abs_error_tokens"].astype(float) / f["cot_length"].clip(lower=1))

    def errors(self, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
        """Per estimator: median absolute error (tokens and fraction of the CoT) with a bootstrap
        95% CI over traces of the median fraction; the mean fraction with its CI, the share of
        traces placed exactly and the 90th percentile (a median of mostly exact traces has a
        [0, 0] CI and says nothing about the misses)."""
        f = self.error_fractions()
        columns = ["estimator", "median_abs_error_tokens", "median_abs_error_frac", "ci_low", "ci_high", "mean_abs_error_frac", "mean_ci_low", "mean_ci_high", "share_exact", "p90_abs_error_frac", "n"]
        if f.empty:
            return pd.DataFrame(columns=columns)
        rows = []
        for estimator, g in f.groupby("estimator", sort=False):
            frac = g["frac"].to_numpy(float)
            _, lo, hi = bootstrap_ci(lambda idx: float(np.median(frac[idx])), n=len(frac), n_boot=n_boot, seed=seed)
            _, mlo, mhi = bootstrap_ci(lambda idx: float(np.mean(frac[idx])), n=len(frac), n_boot=n_boot, seed=seed)
            exact = float((g["abs_error_tokens"].astype(float) == 0).mean())
            rows.append((estimator, float(g["abs_error_tokens"].median()), float(np.median(frac)), lo, hi, float(np.mean(frac)), mlo, mhi, exact, float(np.quantile(frac, 0.9)), len(g)))
        return pd.DataFrame(rows, columns=columns)

    def ratio(self, estimator: str, baseline: str, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
        """Median error of ``estimator`` over that of ``baseline``, paired by trace: (ratio, CI low,
        CI high); resamples where the baseline's median is 0 (ratio undefined) are left out."""
        f = self.error_fractions().pivot_table(index="doc_id", columns="estimator", values="frac")
        if estimator not in f or baseline not in f:
            return (float("nan"),) * 3
        pair = f[[estimator, baseline]].dropna().to_numpy(float)

        def statistic(idx):
            base = np.median(pair[idx, 1])
            return float(np.median(pair[idx, 0]) / base) if base > 0 else float("nan")

        rng = np.random.default_rng(seed)
        draws = np.array([statistic(rng.integers(0, len(pair), len(pair))) for _ in range(n_boot)])
        draws = draws[np.isfinite(draws)]
        if not len(draws):
            return (statistic(np.arange(len(pair))), float("nan"), float("nan"))
        return (statistic(np.arange(len(pair))), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)))

    def figure(self) -> go.Figure:
        """Median error per estimator with its CI, beside the per-trace errors (or τ when no truth is known)."""
        has_truth = self.frame["abs_error_tokens"].notna().any()
        if not has_truth:
            fig = go.Figure()
            for estimator, group in self.frame.groupby("estimator", sort=False):
                fig.add_trace(go.Histogram(x=group["tau_norm"], name=estimator, opacity=0.6, marker_color=ESTIMATOR_COLOURS.get(estimator), xbins=dict(size=0.025)))
            fig.update_layout(barmode="overlay")
            return themed(fig, "Estimated phase boundary per trace (no true boundary known)", "τ (normalised CoT position)", "traces (count)")
        errors = self.errors(n_boot=int(self.meta.get("n_boot", 1000)))
        fig = make_subplots(rows=1, cols=2, column_widths=[0.4, 0.6], horizontal_spacing=0.12, subplot_titles=("median |error| (95% CI over traces)", "signed error per trace"))
        fig.add_trace(
            go.Bar(
                x=errors["estimator"], y=errors["median_abs_error_frac"], marker_color=[ESTIMATOR_COLOURS.get(e, "#777") for e in errors["estimator"]],
                error_y=dict(type="data", symmetric=False, array=errors["ci_high"] - errors["median_abs_error_frac"], arrayminus=errors["median_abs_error_frac"] - errors["ci_low"]),
                showlegend=False,
            ),
            row=1, col=1,
        )
        for estimator, group in self.frame.groupby("estimator", sort=False):
            values = (group["tau_token"] - group["true_token"]).astype(float) / group["cot_length"].clip(lower=1)
            fig.add_trace(go.Histogram(x=values, name=estimator, opacity=0.6, marker_color=ESTIMATOR_COLOURS.get(estimator), xbins=dict(size=0.025)), row=1, col=2)
        fig.update_layout(barmode="overlay", width=1000)
        fig = themed(fig, f"Phase-boundary error per estimator (n={errors['n'].max()} traces)", "estimator | estimated − true boundary (fraction of CoT)", "fraction of CoT | traces (count)")
        # the bars name their estimators: no axis title under the slanted names, which it would cross
        fig.update_xaxes(title_text="", tickangle=-35, row=1, col=1)
        fig.update_layout(width=1100, height=560, margin=dict(b=150))
        fig.update_xaxes(title_text="estimated − true boundary (fraction of CoT length)", row=1, col=2)
        fig.update_yaxes(title_text="median |error| (fraction of CoT)", row=1, col=1)
        fig.update_yaxes(title_text="traces (count)", row=1, col=2)
        return fig
