"""Head scores, attention attribution, probe cells and the logit lens: tables and figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from analyses.results.theme import PALETTE, themed
from analyses.results.base import FrameResult

__all__ = ["HeadScores", "Attribution", "ProbeResults", "LensResult"]


class HeadScores(FrameResult):
    """``layer``, ``head``, ``score`` (coarse/refine), ``value``, ``ci_low``, ``ci_high``, ``rank`` (1 = top)."""

    REQUIRED = ("layer", "head", "score", "value", "ci_low", "ci_high", "rank")

    def top(self, score: str, k: int = 5) -> pd.DataFrame:
        return self.frame[self.frame["score"] == score].nsmallest(k, "rank")

    def figure(self, k: int = 15) -> go.Figure:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("CoarseScore (phase 1: shortlisting)", "RefineScore (phase 2: fine-grained)"))
        for col, (score, colour) in enumerate((("coarse", PALETTE[0]), ("refine", PALETTE[3])), start=1):
            top = self.top(score, k).iloc[::-1]
            labels = [f"L{int(l)}H{int(h)}" for l, h in zip(top["layer"], top["head"])]
            fig.add_trace(
                go.Bar(
                    x=top["value"], y=labels, orientation="h", marker_color=colour, name=score,
                    error_x=dict(type="data", symmetric=False, array=top["ci_high"] - top["value"], arrayminus=top["value"] - top["ci_low"]),
                ),
                row=1, col=col,
            )
        fig = themed(fig, f"Top {k} heads per phase score (bootstrap 95% CI over traces)", "score (kurtosis·cos, mass difference·cos)", "head")
        fig.update_layout(showlegend=False, height=560, width=1000)
        fig.update_xaxes(title_text="CoarseScore (κ · cos to anchor direction)", row=1, col=1)
        fig.update_xaxes(title_text="RefineScore (Δmass · cos to ∇margin)", row=1, col=2)
        return fig


class Attribution(FrameResult):
    """``layer``, ``head``, ``t`` (bin centre), ``measure`` (mass, value_mass, kurtosis), ``region``, ``value``."""

    REQUIRED = ("layer", "head", "t", "measure", "region", "value")

    def kurtosis_figure(self) -> go.Figure:
        k = self.frame[self.frame["measure"] == "kurtosis"]
        table = k.pivot_table(index=["layer", "head"], columns="t", values="value")
        labels = [f"L{l}H{h}" for l, h in table.index]
        fig = go.Figure(go.Heatmap(z=table.values, x=[f"{t:.2f}" for t in table.columns], y=labels, colorscale="Viridis", colorbar=dict(title="κ")))
        fig = themed(fig, "Attention kurtosis over document keys (normal = 3)", "normalised CoT position t (bin centre)", "head (layer, head)")
        fig.update_layout(height=max(420, 12 * len(labels)))
        return fig

    def figure(self, measure: str = "mass") -> go.Figure:
        """Attention to regions over normalised CoT position, averaged over heads and layers."""
        f = self.frame[(self.frame["measure"] == measure) & (self.frame["region"] != "")]
        mean = f.groupby(["region", "t"])["value"].mean().reset_index()
        fig = go.Figure()
        for i, (region, group) in enumerate(mean.groupby("region")):
            fig.add_trace(go.Scatter(x=group["t"], y=group["value"], mode="lines+markers", name=region.replace("_", " "), line=dict(color=PALETTE[i % len(PALETTE)])))
        what = "attention mass" if measure == "mass" else "value-weighted mass ‖α·v·W_O‖"
        return themed(fig, f"Where heads attend across the CoT ({what}, mean over heads)", "normalised CoT position t (bin centre)", f"{what} (per query)")


class ProbeResults(FrameResult):
    """One row per (``target``, ``layer``, ``bucket``) cell: ``value`` (probe accuracy on test
    documents) with ``ci_low``/``ci_high``, ``control_value`` (Hewitt & Liang control task),
    ``majority``, ``token_baseline`` (current + previous token identity), ``minus_tokens`` (probe
    minus token identity, with its CI), ``selectivity`` (probe minus control task) and ``status``
    (``fitted``, or why the cell could not be fitted: such cells are kept, never dropped)."""

    REQUIRED = ("target", "layer", "bucket", "metric", "value", "control_value", "ci_low", "ci_high")

    def beats_tokens(self) -> pd.DataFrame:
        """Per target: fitted cells, and cells where the probe beats token identity (CI above 0)."""
        f = self.frame
        fitted = f[f.get("status", "fitted") == "fitted"]
        out = fitted.groupby("target").agg(cells=("value", "size"), beats_tokens=("beats_tokens", "sum"), best_minus_tokens=("minus_tokens", "max"))
        out["not_fitted"] = f[f.get("status", "fitted") != "fitted"].groupby("target").size().reindex(out.index).fillna(0).astype(int)
        return out.reset_index()

    def figure(self, target: str | None = None) -> go.Figure:
        """Per target: probe accuracy (cells annotated with the token-identity and control-task
        accuracies) and probe minus token identity (annotated with its CI; * where the CI is above 0)."""
        f = self.frame[self.frame["metric"] == "accuracy"]
        targets = [target] if target else list(dict.fromkeys(f["target"]))
        fig = make_subplots(rows=2, cols=len(targets), subplot_titles=[f"{t}: probe accuracy" for t in targets] + [f"{t}: probe − token identity" for t in targets], vertical_spacing=0.2, horizontal_spacing=0.06)
        for c, t in enumerate(targets, start=1):
            g = f[f["target"] == t].sort_values(["layer", "bucket"])
            layers = sorted(g["layer"].unique())
            names = list(dict.fromkeys(g.sort_values("bucket")["bucket_name"])) if "bucket_name" in g else sorted(g["bucket"].unique())
            acc = g.pivot_table(index="layer", columns="bucket", values="value", dropna=False).reindex(index=layers)
            diff = g.pivot_table(index="layer", columns="bucket", values="minus_tokens", dropna=False).reindex(index=layers) if "minus_tokens" in g else acc * np.nan
            text_acc, text_diff = [], []
            for layer in layers:
                row_acc, row_diff = [], []
                for cell in g[g["layer"] == layer].sort_values("bucket").itertuples():
                    if getattr(cell, "status", "fitted") != "fitted":
                        row_acc.append("n/f")
                        row_diff.append(str(cell.status).replace("not fitted: ", "n/f: "))
                        continue
                    row_acc.append(f"{cell.value:.2f}<br>tok {cell.token_baseline:.2f} · ctl {cell.control_value:.2f}")
                    star = "*" if cell.beats_tokens else ""
                    row_diff.append(f"{cell.minus_tokens:+.2f}{star}<br>[{cell.minus_tokens_ci_low:+.2f}, {cell.minus_tokens_ci_high:+.2f}]")
                text_acc.append(row_acc)
                text_diff.append(row_diff)
            ylabels = [f"L{l}" for l in layers]
            fig.add_trace(go.Heatmap(z=acc.values, x=names, y=ylabels, text=text_acc, texttemplate="%{text}", textfont=dict(size=9), zmin=0.5, zmax=1.0, coloraxis="coloraxis"), row=1, col=c)
            fig.add_trace(go.Heatmap(z=diff.values, x=names, y=ylabels, text=text_diff, texttemplate="%{text}", textfont=dict(size=9), zmin=-0.3, zmax=0.3, coloraxis="coloraxis2"), row=2, col=c)
        fig = themed(fig, "Linear probes on the residual stream beside their baselines (test documents; * = probe beats token identity, 95% CI)", "bucket (phase: distance to the boundary within the phase; others: CoT position)", "layer")
        fig.update_xaxes(type="category", tickangle=30)
        fig.update_layout(
            coloraxis=dict(colorscale="Viridis", cmin=0.5, cmax=1.0, colorbar=dict(title="accuracy", y=0.78, len=0.42)),
            coloraxis2=dict(colorscale="RdBu", cmin=-0.3, cmax=0.3, colorbar=dict(title="probe − tokens", y=0.22, len=0.42)),
            width=max(800, 380 * len(targets)), height=760,
        )
        return fig


class LensResult(FrameResult):
    """``layer``, ``t``, ``metric`` (logprob, rank), ``value``, ``ci_low``, ``ci_high``."""

    REQUIRED = ("layer", "t", "metric", "value", "ci_low", "ci_high")

    def figure(self) -> go.Figure:
        f = self.frame[self.frame["metric"] == "logprob"]
        table = f.pivot_table(index="layer", columns="t", values="value")
        fig = go.Figure(go.Heatmap(z=table.values, x=[f"{t:.2f}" for t in table.columns], y=[f"L{l}" for l in table.index], colorscale="Viridis", colorbar=dict(title="log p")))
        return themed(fig, "Logit lens: log-probability of the answer labels' distinguishing tokens", "normalised CoT position t (bin centre)", "layer (residual stream read out)")
