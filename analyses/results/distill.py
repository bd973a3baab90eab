"""The distillation study's result table and its figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.results.theme import PALETTE, themed
from analyses.results.base import FrameResult

__all__ = ["DistillResult", "CONDITION_COLOURS"]

CONDITION_COLOURS = {"standard": PALETTE[0], "mechanistic": PALETTE[3], "standard_equal_compute": PALETTE[5]}


class DistillResult(FrameResult):
    """Rows: ``condition``, ``seed``, ``metric``, ``value`` (+ ``step``).

    - per student (``seed`` >= 0): final metrics (``step`` = its last step) and learning-curve
      points (``metric`` ``curve:<name>``, ``step`` = the checkpoint);
    - summaries (``seed`` = -1): paired differences (``<metric>_minus_<reference>``) with
      ``ci_low``/``ci_high``, ``p_value`` and, for the ablation family, ``p_holm``.
    """

    REQUIRED = ("condition", "seed", "metric", "value")

    @property
    def finals(self) -> pd.DataFrame:
        f = self.frame[(self.frame["seed"] >= 0) & ~self.frame["metric"].str.startswith("curve:")]
        return f

    @property
    def differences(self) -> pd.DataFrame:
        return self.frame[self.frame["seed"] < 0]

    def headline(self) -> pd.Series | None:
        d = self.differences
        row = d[(d["condition"] == "mechanistic") & (d["metric"] == "micro_f1_minus_standard")]
        return row.iloc[0] if len(row) else None

    def figure(self, metric: str = "micro_f1") -> go.Figure:
        """Final metric per condition: mean over seeds with each seed shown."""
        per_seed = self.finals[self.finals["metric"] == metric]
        summary = per_seed.groupby("condition", sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
        fig = go.Figure(go.Bar(x=summary["condition"], y=summary["mean"], marker_color=[CONDITION_COLOURS.get(c, PALETTE[2]) for c in summary["condition"]], error_y=dict(type="data", array=summary["std"].fillna(0)), name="mean ± SD over seeds"))
        fig.add_trace(go.Scatter(x=per_seed["condition"], y=per_seed["value"], mode="markers", marker=dict(color="#333", size=6), name="one student (seed)"))
        head = self.headline()
        title = f"Distillation: held-out {metric.replace('_', '-')} per condition"
        if head is not None and metric == "micro_f1":
            title += f" (mechanistic − standard {head['value']:+.3f} [{head['ci_low']:+.3f}, {head['ci_high']:+.3f}])"
        return themed(fig, title, "condition", metric.replace("_", "-"))

    def curve_figure(self) -> go.Figure:
        """Learning curves: micro-F1 and teacher-forced gold-code log-prob against steps (mean over seeds, 95% CI)."""
        curves = self.frame[self.frame["metric"].str.startswith("curve:") & (self.frame["seed"] >= 0)]
        fig = make_subplots(rows=1, cols=2, subplot_titles=("answer micro-F1 (held-out subset)", "gold answer-code log-prob (teacher-forced)"))
        for c, metric in enumerate(("curve:micro_f1", "curve:gold_logprob"), start=1):
            for i, (condition, g) in enumerate(curves[curves["metric"] == metric].groupby("condition", sort=False)):
                stats = g.groupby("step")["value"].agg(["mean", "std", "count"]).reset_index()
                half = 1.96 * stats["std"].fillna(0) / np.sqrt(stats["count"].clip(lower=1))
                colour = CONDITION_COLOURS.get(condition, PALETTE[(i + 1) % len(PALETTE)])
                fig.add_trace(go.Scatter(x=stats["step"], y=stats["mean"], mode="lines+markers", name=condition, line=dict(color=colour), legendgroup=condition, showlegend=c == 1,
                                         error_y=dict(type="data", array=half, visible=True)), row=1, col=c)
        fig = themed(fig, "Learning curves of the students (mean over seeds, 95% CI)", "training steps", "value")
        fig.update_yaxes(title_text="micro-F1", row=1, col=1)
        fig.update_yaxes(title_text="log p (nats)", row=1, col=2)
        fig.update_layout(width=1100, height=460)
        return fig

    def transfer_figure(self) -> go.Figure:
        """Mechanism transfer: KL between mapped teacher and student heads on held-out traces, per condition."""
        f = self.finals[self.finals["metric"].isin(["transfer_kl_phase1", "transfer_kl_phase2"])]
        fig = go.Figure()
        for i, (metric, g) in enumerate(f.groupby("metric")):
            s = g.groupby("condition", sort=False)["value"].agg(["mean", "std"]).reset_index()
            fig.add_trace(go.Bar(x=s["condition"], y=s["mean"], name=metric.replace("transfer_kl_", "heads of "), marker_color=PALETTE[i], error_y=dict(type="data", array=s["std"].fillna(0))))
        fig.update_layout(barmode="group")
        return themed(fig, "Do the mechanistic losses transfer the mechanism? Teacher-vs-student attention KL of mapped heads (held-out traces)", "condition", "KL (nats; lower = closer to the teacher)")

    def trajectory_figure(self) -> go.Figure:
        curves = self.meta.get("curves", {})
        fig = go.Figure()
        for i, (name, c) in enumerate(curves.items()):
            for metric, dash in (("focus", "solid"), ("confusion", "dot")):
                if metric in c:
                    fig.add_trace(go.Scatter(x=c["t"], y=c[metric], name=f"{name} {metric}", line=dict(color=PALETTE[i % len(PALETTE)], dash=dash)))
        return themed(fig, "Focus (solid) and Confusion (dotted) on the same notes: teacher versus students (seed 0)", "normalised CoT position t", "cosine similarity (MiniLM)")
