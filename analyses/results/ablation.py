"""Heads ablated while the model reasons: what regenerating the CoT without them changes."""

from __future__ import annotations

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.results.base import FrameResult
from analyses.results.theme import PALETTE, themed

__all__ = ["AblationResult", "ABLATION_METRICS"]

ABLATION_METRICS = {
    "shortlist_recall": "shortlist recall",
    "near_miss_kept": "near-misses kept",
    "answer_micro_f1": "answer micro-F1",
    "boundary_share": "boundary share",
}
_SETS = {"ranked": PALETTE[0], "random": PALETTE[1], "lowest": PALETTE[2]}


class AblationResult(FrameResult):
    """One row per (``score``, ``k``, ``head_set``, ``metric``): ``value`` = ablated minus the
    unablated regeneration of the same prompts, paired per trace, with a bootstrap 95% CI
    (``ci_low``, ``ci_high``); ``clean`` and ``ablated`` hold the two levels, ``n`` the traces."""

    REQUIRED = ("score", "k", "head_set", "metric", "value", "ci_low", "ci_high")

    def figure(self) -> go.Figure:
        metrics = [m for m in ABLATION_METRICS if m in set(self.frame["metric"])]
        scores = [s for s in ("coarse", "refine") if s in set(self.frame["score"])]
        titles = [f"{'CoarseScore' if s == 'coarse' else 'RefineScore'}: {ABLATION_METRICS[m]}" for s in scores for m in metrics]
        fig = make_subplots(rows=max(len(scores), 1), cols=max(len(metrics), 1), subplot_titles=titles, horizontal_spacing=0.06, vertical_spacing=0.16)
        for r, score in enumerate(scores, start=1):
            for c, metric in enumerate(metrics, start=1):
                for head_set, colour in _SETS.items():
                    g = self.frame[(self.frame["score"] == score) & (self.frame["metric"] == metric) & (self.frame["head_set"] == head_set)].sort_values("k")
                    if g.empty:
                        continue
                    fig.add_trace(
                        go.Scatter(
                            x=g["k"], y=g["value"], mode="lines+markers", name=head_set, legendgroup=head_set, showlegend=r == 1 and c == 1, line=dict(color=colour),
                            error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["value"], arrayminus=g["value"] - g["ci_low"]),
                        ),
                        row=r, col=c,
                    )
                fig.add_hline(y=0, line=dict(color="#999", width=1, dash="dot"), row=r, col=c)
        fig = themed(fig, f"Heads mean-ablated while the model regenerates its CoT and answer (ablated minus unablated, paired, {self.meta.get('n_traces', '?')} test traces)", "k heads ablated", "change")
        fig.update_layout(width=320 * max(len(metrics), 1), height=330 * max(len(scores), 1) + 80)
        fig.update_xaxes(dtick=1)  # k is a count
        return fig
