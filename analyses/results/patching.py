"""Every head's causal effect and the scores' agreement with it: the table and its figures."""

from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.results.theme import PALETTE, themed
from analyses.results.base import FrameResult

__all__ = ["PatchingResult", "EFFECT_NAME"]

EFFECT_NAME = {"denoise": "recovery", "noise": "damage"}


class PatchingResult(FrameResult):
    """Long table; ``analysis`` says what a row is:

    - ``baseline``: per trace ``clean`` and ``corrupt`` values of each read-out;
    - ``sweep`` / ``attribution``: per head (``layer``, ``head``), ``mode``, ``positions`` and
      read-out: per trace ``patched`` (sweep; attribution: ``corrupt``/``clean`` plus the linear
      estimate) and ``effect`` (recovery or damage); summary rows (``doc_id`` null) pool traces
      (ratio of sums) with ``ci_low``/``ci_high``;
    - ``head_set``: ``score``, ``k``, ``head_set`` (ranked, random-i, lowest), same columns;
    - ``all_heads``: the invariant (every head, every position);
    - ``ranked_minus_random`` / ``ranked_minus_lowest``: paired differences of effects per k;
    - ``correlation``: ``score`` against a causal map (``mode``, ``readout``): ``metric``
      (spearman, top_k_overlap@k) with CI and ``p_value``;
    - ``agreement``: Spearman between attribution and the sweep per mode and read-out.
    """

    REQUIRED = ("doc_id", "analysis", "mode", "readout", "value", "ci_low", "ci_high")

    @property
    def summary(self) -> pd.DataFrame:
        return self.frame[self.frame["doc_id"].isna()]

    def head_effects(self, analysis: str = "sweep", readout: str = "answer_logprob", positions: str = "all") -> pd.DataFrame:
        s = self.summary
        return s[(s["analysis"] == analysis) & (s["readout"] == readout) & (s["positions"] == positions)]

    def correlations(self) -> pd.DataFrame:
        return self.summary[self.summary["analysis"] == "correlation"]

    def figure(self, readout: str = "answer_logprob") -> go.Figure:
        """The causal map (layer x head, both modes) beside the CoarseScore and RefineScore maps."""
        effects = self.head_effects("sweep", readout)
        if effects.empty:
            effects = self.head_effects("attribution", readout)
        scores = pd.DataFrame(self.meta.get("dev_scores", []))
        titles = [f"{EFFECT_NAME[m]} when patched alone ({m})" for m in ("denoise", "noise")] + ["CoarseScore (dev traces)", "RefineScore (dev traces)"]
        # wide gaps: each colour bar sits between its panel and the next one's tick labels
        fig = make_subplots(rows=1, cols=4, subplot_titles=titles, horizontal_spacing=0.09)
        for c, mode in enumerate(("denoise", "noise"), start=1):
            g = effects[effects["mode"] == mode]
            if g.empty:
                continue
            table = g.pivot_table(index="layer", columns="head", values="value")
            fig.add_trace(go.Heatmap(z=table.values, x=[f"H{h}" for h in table.columns], y=[f"L{l}" for l in table.index], coloraxis="coloraxis", hovertemplate="%{y}%{x}: %{z:.3f}<extra></extra>"), row=1, col=c)
        # One colour scale per score: RefineScore's values are orders of magnitude below
        # CoarseScore's, and on a shared scale its panel is one flat colour.
        for c, score, axis in ((3, "coarse", "coloraxis2"), (4, "refine", "coloraxis3")):
            if scores.empty:
                continue
            g = scores[scores["score"] == score]
            table = g.pivot_table(index="layer", columns="head", values="value")
            fig.add_trace(go.Heatmap(z=table.values, x=[f"H{h}" for h in table.columns], y=[f"L{l}" for l in table.index], coloraxis=axis, hovertemplate="%{y}%{x}: %{z:.4g}<extra></extra>"), row=1, col=c)
        fig = themed(fig, f"Causal map ({readout.replace('_', ' ')}, {self.meta.get('what', 'z')}, test traces) beside the phase scores (dev traces)", "head", "layer")
        fig.update_layout(
            width=1400, height=430,
            coloraxis=dict(colorscale="RdBu", cmid=0, colorbar=dict(title="effect", x=0.462, len=0.9, thickness=12)),
            coloraxis2=dict(colorscale="Viridis", colorbar=dict(title="Coarse", x=0.735, len=0.9, thickness=12)),
            coloraxis3=dict(colorscale="Viridis", colorbar=dict(title="Refine", x=1.0, len=0.9, thickness=12, exponentformat="e")),
        )
        return fig

    def scatter_figure(self, readout: str = "answer_logprob") -> go.Figure:
        """Each head's score (dev) against its causal effect (test), with Spearman ρ and its CI."""
        effects = self.head_effects("sweep", readout)
        if effects.empty:
            effects = self.head_effects("attribution", readout)
        scores = pd.DataFrame(self.meta.get("dev_scores", []))
        corr = self.correlations()
        panels = [(s, m) for s in ("coarse", "refine") for m in ("denoise", "noise")]
        titles = []
        for score, mode in panels:
            r = corr[(corr["score"] == score) & (corr["mode"] == mode) & (corr["readout"] == readout) & (corr["metric"] == "spearman")]
            titles.append(f"{score} vs {EFFECT_NAME[mode]}: ρ = {r['value'].iloc[0]:.2f} [{r['ci_low'].iloc[0]:.2f}, {r['ci_high'].iloc[0]:.2f}], p = {r['p_value'].iloc[0]:.3f}" if len(r) else f"{score} vs {mode}")
        fig = make_subplots(rows=1, cols=4, subplot_titles=titles, horizontal_spacing=0.06)
        for c, (score, mode) in enumerate(panels, start=1):
            if scores.empty:
                continue
            e = effects[effects["mode"] == mode][["layer", "head", "value"]].rename(columns={"value": "effect"})
            s = scores[scores["score"] == score][["layer", "head", "value"]]
            m = e.merge(s, on=["layer", "head"])
            fig.add_trace(go.Scatter(x=m["value"], y=m["effect"], mode="markers", marker=dict(color=PALETTE[0] if score == "coarse" else PALETTE[3], size=8), text=[f"L{l}H{h}" for l, h in zip(m["layer"], m["head"])], hovertemplate="%{text}: score %{x:.3f}, effect %{y:.3f}<extra></extra>", showlegend=False), row=1, col=c)
        fig = themed(fig, f"Do the phase scores find the causal heads? ({readout.replace('_', ' ')}; one dot per head)", "score on dev traces", "effect on test traces (fraction of the gap)")
        fig.update_annotations(font_size=11)
        fig.update_layout(width=1400, height=430)
        return fig

    def ranked_figure(self, readout: str = "answer_logprob") -> go.Figure:
        """Top-k heads by score minus k random heads (outside the top k), against k, with CIs."""
        s = self.summary[(self.summary["analysis"] == "ranked_minus_random") & (self.summary["readout"] == readout)]
        fig = make_subplots(rows=1, cols=2, subplot_titles=[f"{m}: {EFFECT_NAME[m]}" for m in ("denoise", "noise")], shared_yaxes=True)
        for c, mode in enumerate(("denoise", "noise"), start=1):
            for score, colour in (("coarse", PALETTE[0]), ("refine", PALETTE[3])):
                g = s[(s["mode"] == mode) & (s["score"] == score)].sort_values("k")
                if g.empty:
                    continue
                fig.add_trace(
                    go.Scatter(x=g["k"], y=g["value"], mode="lines+markers", name=f"top-k by {score.capitalize()}Score − random", line=dict(color=colour), showlegend=c == 1,
                               error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["value"], arrayminus=g["value"] - g["ci_low"])),
                    row=1, col=c,
                )
            fig.add_hline(y=0, line=dict(color="#999", dash="dot"), row=1, col=c)
        fig = themed(fig, f"Ranked heads against random heads ({readout.replace('_', ' ')}; paired over traces, 95% CI)", "heads patched (k)", "effect difference (fraction of the gap)")
        fig.update_layout(width=1000, height=450)
        return fig
