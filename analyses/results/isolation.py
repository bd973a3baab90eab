"""Isolation conditions and the complementarity verdict: the table and its figure."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.results.theme import PALETTE, themed
from analyses.results.base import FrameResult

__all__ = ["IsolationResult"]


class IsolationResult(FrameResult):
    """``condition``, ``metric``, ``value``, ``ci_low``, ``ci_high`` (+ ``n``)."""

    REQUIRED = ("condition", "metric", "value", "ci_low", "ci_high")

    def verdict(self) -> str:
        row = self.frame[(self.frame["condition"] == "complementarity") & (self.frame["metric"] == "verdict")]
        return "complementary" if len(row) and row["value"].iloc[0] == 1.0 else "not shown"

    def figure(self, metric: str = "micro_f1") -> go.Figure:
        """Conditions as bars (with CIs), and the truncation curve on its own axis of CoT share."""
        f = self.frame[self.frame["metric"] == metric]
        bars = f[~f["condition"].str.match(r"phase1_only@(0|1)") & (f["condition"] != "complementarity")]
        curve = f[f["condition"].str.match(r"phase1_only@(0|1)")].copy()
        fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], subplot_titles=("conditions", "phase 1 alone, CoT cut at a share of its length"))
        fig.add_trace(go.Bar(x=bars["condition"], y=bars["value"], marker_color=PALETTE[0], error_y=dict(type="data", symmetric=False, array=bars["ci_high"] - bars["value"], arrayminus=bars["value"] - bars["ci_low"]), showlegend=False), row=1, col=1)
        if len(curve):
            curve["share"] = curve["condition"].str.split("@").str[1].astype(float)
            curve = curve.sort_values("share")
            fig.add_trace(go.Scatter(x=curve["share"], y=curve["value"], mode="lines+markers", line=dict(color=PALETTE[1]), error_y=dict(type="data", symmetric=False, array=curve["ci_high"] - curve["value"], arrayminus=curve["value"] - curve["ci_low"]), showlegend=False), row=1, col=2)
        fig = themed(fig, f"Phase isolation: {metric.replace('_', '-')} per condition ({self.verdict()}; 95% CI)", "condition | share of the CoT kept", metric.replace("_", "-"))
        fig.update_xaxes(title_text="condition", tickangle=30, row=1, col=1)
        fig.update_xaxes(title_text="share of the CoT kept before the answer is forced", range=[0, 1.05], row=1, col=2)
        fig.update_layout(width=1100, height=520)
        return fig
