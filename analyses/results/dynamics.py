"""Focus and Confusion curves per trace, their means with CIs, and their changes per phase."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.results.theme import ESTIMATOR_COLOURS, PALETTE, themed
from analyses.results.base import FrameResult
from analyses.tasks.metrics import bootstrap_ci

__all__ = ["Dynamics"]


class Dynamics(FrameResult):
    """Per-trace curves and their mean with 95% CIs.

    ``frame`` columns: ``doc_id`` (None on summary rows), ``t`` (normalised CoT position),
    ``metric`` (``focus``/``confusion``), ``value``, ``ci_low``, ``ci_high`` (summary rows only).
    """

    REQUIRED = ("doc_id", "t", "metric", "value", "ci_low", "ci_high")

    @property
    def summary(self) -> pd.DataFrame:
        return self.frame[self.frame["doc_id"].isna()].reset_index(drop=True)

    def with_phase_changes(self, tau_norm: dict[str, float], source: str, n_boot: int = 1000, seed: int = 0) -> "Dynamics":
        """A new result with each curve's change over each phase, paired per trace.

        Per trace, ``{focus,confusion}_change_phase1`` = value at its own boundary τ minus value at
        t = 0, and ``..._phase2`` = value at t = 1 minus value at τ (curves interpolated at τ);
        summary rows (``doc_id`` None) hold the mean with a bootstrap CI over traces. ``source``
        says where τ came from. Rows carry ``t`` = NaN.
        """
        curves = self.frame[self.frame["doc_id"].notna() & self.frame["metric"].isin(["focus", "confusion"])]
        rows = []
        per_metric: dict[str, list[float]] = {}
        for (doc_id, metric), g in curves.groupby(["doc_id", "metric"], sort=True):
            if doc_id not in tau_norm:
                continue
            g = g.sort_values("t")
            t, v = g["t"].to_numpy(float), g["value"].to_numpy(float)
            if not np.isfinite(v).all():
                continue
            at_tau = float(np.interp(tau_norm[doc_id], t, v))
            for phase, change in (("phase1", at_tau - v[0]), ("phase2", v[-1] - at_tau)):
                name = f"{metric}_change_{phase}"
                rows.append((doc_id, np.nan, name, float(change), np.nan, np.nan))
                per_metric.setdefault(name, []).append(float(change))
        # Confusion minus Focus, averaged over each phase's grid points, paired per trace.
        wide = curves.pivot_table(index=["doc_id", "t"], columns="metric", values="value").reset_index()
        if {"focus", "confusion"} <= set(wide.columns):
            for doc_id, g in wide.groupby("doc_id", sort=True):
                if doc_id not in tau_norm:
                    continue
                gap = (g["confusion"] - g["focus"]).to_numpy(float)
                early = g["t"].to_numpy(float) < tau_norm[doc_id]
                if not np.isfinite(gap).all() or early.all() or not early.any():
                    continue
                for name, value in (("gap_phase1", gap[early].mean()), ("gap_phase2", gap[~early].mean()), ("gap_phase2_minus_phase1", gap[~early].mean() - gap[early].mean())):
                    rows.append((doc_id, np.nan, name, float(value), np.nan, np.nan))
                    per_metric.setdefault(name, []).append(float(value))
        for name, values in per_metric.items():
            mean, lo, hi = bootstrap_ci(np.asarray(values), n_boot=n_boot, seed=seed)
            rows.append((None, np.nan, name, mean, lo, hi))
        kept = ~self.frame["metric"].str.contains("_change_") & ~self.frame["metric"].str.startswith("gap_")
        frame = pd.concat([self.frame[kept], pd.DataFrame(rows, columns=self.frame.columns)], ignore_index=True)
        meta = {
            **self.meta,
            "phase_changes": f"per trace, paired: value at its own boundary minus value at t=0 (phase 1), value at t=1 minus value at the boundary (phase 2); boundary from {source}; mean and bootstrap 95% CI over traces",
            "phase_gaps": "per trace: Confusion minus Focus averaged over the grid points before its boundary (gap_phase1) and from it on (gap_phase2), and their difference; mean and bootstrap 95% CI over traces",
        }
        return Dynamics(frame, meta)

    def phase_gaps(self) -> pd.DataFrame:
        """Summary rows of Confusion minus Focus per phase (empty before :meth:`with_phase_changes`)."""
        s = self.summary
        return s[s["metric"].str.startswith("gap_")].reset_index(drop=True)

    def phase_changes(self) -> pd.DataFrame:
        """Summary rows of the per-phase changes (empty before :meth:`with_phase_changes`)."""
        s = self.summary
        return s[s["metric"].str.contains("_change_")].reset_index(drop=True)

    def figure(self, boundaries: dict[str, float] | None = None) -> go.Figure:
        """Mean Focus and Confusion with CI bands; vertical lines at median boundary estimates."""
        fig = go.Figure()
        for colour, metric, name in ((PALETTE[0], "focus", "Focus (CoT vs note)"), (PALETTE[3], "confusion", "Confusion (CoT vs near-miss descriptions)")):
            s = self.summary[self.summary["metric"] == metric].sort_values("t")
            fig.add_trace(go.Scatter(x=list(s["t"]) + list(s["t"][::-1]), y=list(s["ci_high"]) + list(s["ci_low"][::-1]), fill="toself", fillcolor=colour, opacity=0.18, line=dict(width=0), showlegend=False, hoverinfo="skip"))
            fig.add_trace(go.Scatter(x=s["t"], y=s["value"], mode="lines+markers", name=name, line=dict(color=colour, width=2.5)))
        # Each boundary line is named in the legend, not on the plot: close estimates would put their
        # labels on top of each other and of the curves.
        values = self.summary[self.summary["metric"].isin(["focus", "confusion"])]
        low, high = float(np.nanmin(values["ci_low"])), float(np.nanmax(values["ci_high"]))
        for estimator, tau in (boundaries or {}).items():
            fig.add_trace(go.Scatter(x=[tau, tau], y=[low, high], mode="lines", name=f"τ {estimator} (median)", line=dict(color=ESTIMATOR_COLOURS.get(estimator, "#777"), dash="dash", width=1.5), hoverinfo="name"))
        n = self.meta.get("n_traces", "?")
        return themed(fig, f"Focus and Confusion across the chain of thought (n={n} traces, 95% CI)", "normalised CoT position t (0 = think open, 1 = think close)", "cosine similarity (MiniLM)")
