"""``ctd characterize --run DIR``: dynamics, phase boundary, head scores, attribution, probes, logit lens.

Reads ``traces.parquet``, ``docs.parquet``, ``labels.parquet`` and the activation store of a run and
writes ``dynamics``, ``boundary``, ``head_scores``, ``attribution``, ``probes`` and ``lens`` parquet
files. Every choice the definitions leave open is written into each result's metadata.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analyses.boundary import Boundary, estimate_boundaries
from analyses.dynamics import GRID, Dynamics, compute_dynamics
from analyses.figures import PALETTE, themed
from analyses.io import Manifest, read_parquet
from analyses.parsing import Region
from analyses.results import FrameResult
from analyses.tasks.metrics import bootstrap_ci
from analyses.tasks.sources import Dataset
from probes.errors import input_error
from probes.heads import anchor_direction, coarse_terms, distinguishing_tokens, margin_gradient, refine_terms
from probes.lens import lens_scores, readout_of
from probes.linear import ProbeProblem, evaluate_bank, fit_probe_bank, split_by_document
from probes.store import open_store

__all__ = ["HeadScores", "Attribution", "ProbeResults", "LensResult", "characterize_run", "PROBE_TARGETS"]

N_TIME_BINS = 10
REGION_NAMES = {int(r): r.name.lower() for r in Region}


# ------------------------------------------------------------------------------------------------
# result types


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
    """``target``, ``layer``, ``bucket``, ``metric``, ``value``, ``control_value``, ``ci_low``, ``ci_high``."""

    REQUIRED = ("target", "layer", "bucket", "metric", "value", "control_value", "ci_low", "ci_high")

    def figure(self, target: str | None = None) -> go.Figure:
        f = self.frame[self.frame["metric"] == "accuracy"]
        targets = [target] if target else list(dict.fromkeys(f["target"]))
        fig = make_subplots(rows=2, cols=len(targets), subplot_titles=[f"{t}: probe" for t in targets] + [f"{t}: shuffled-label control" for t in targets], vertical_spacing=0.18)
        for c, t in enumerate(targets, start=1):
            g = f[f["target"] == t]
            for r, column in ((1, "value"), (2, "control_value")):
                table = g.pivot_table(index="layer", columns="bucket", values=column)
                n_buckets = int(self.meta.get("n_buckets", 5))
                names = [f"{b / n_buckets:.1f}–{(b + 1) / n_buckets:.1f}" for b in table.columns]
                fig.add_trace(go.Heatmap(z=table.values, x=names, y=[f"L{l}" for l in table.index], zmin=0.5, zmax=1.0, colorscale="Viridis", coloraxis="coloraxis"), row=r, col=c)
        fig = themed(fig, "Linear probe accuracy per layer and CoT position (test documents; controls: shuffled labels)", "normalised CoT position", "layer")
        fig.update_xaxes(type="category")
        fig.update_layout(coloraxis=dict(colorscale="Viridis", cmin=0.5, cmax=1.0, colorbar=dict(title="accuracy")), width=max(700, 330 * len(targets)), height=620)
        return fig


class LensResult(FrameResult):
    """``layer``, ``t``, ``metric`` (logprob, rank), ``value``, ``ci_low``, ``ci_high``."""

    REQUIRED = ("layer", "t", "metric", "value", "ci_low", "ci_high")

    def figure(self) -> go.Figure:
        f = self.frame[self.frame["metric"] == "logprob"]
        table = f.pivot_table(index="layer", columns="t", values="value")
        fig = go.Figure(go.Heatmap(z=table.values, x=[f"{t:.2f}" for t in table.columns], y=[f"L{l}" for l in table.index], colorscale="Viridis", colorbar=dict(title="log p")))
        return themed(fig, "Logit lens: log-probability of the answer labels' distinguishing tokens", "normalised CoT position t (bin centre)", "layer (residual stream read out)")


# ------------------------------------------------------------------------------------------------
# helpers


def _code_tokens(tokenizer, code: str) -> list[int]:
    # Codes appear after a space inside traces; tokenise them the same way.
    return tokenizer.encode(" " + code, add_special_tokens=False)


def _margin_pairs(tokenizer, labels, gold: list[int], near: list[int]) -> list[list[tuple[int, int]]]:
    cache: dict[int, list[int]] = {}

    def toks(i: int) -> list[int]:
        if i not in cache:
            cache[i] = _code_tokens(tokenizer, labels.codes[i])
        return cache[i]

    pairs = []
    for g in gold:
        gp = [p for n in near if (p := distinguishing_tokens(toks(g), toks(n))) is not None]
        if gp:
            pairs.append(gp)
    return pairs


def _bin_of(norm: np.ndarray, n_bins: int = N_TIME_BINS) -> np.ndarray:
    return np.clip((norm * n_bins).astype(int), 0, n_bins - 1)


def _ci_rows(per_doc: np.ndarray, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and bootstrap CI over documents for each column of [docs, k]."""
    rng = np.random.default_rng(seed)
    n = len(per_doc)
    mean = np.nanmean(per_doc, axis=0)
    draws = np.stack([np.nanmean(per_doc[rng.integers(0, n, n)], axis=0) for _ in range(n_boot)])
    return mean, np.nanquantile(draws, 0.025, axis=0), np.nanquantile(draws, 0.975, axis=0)


# ------------------------------------------------------------------------------------------------
# head scores


def compute_head_scores(store, bridge, traces: pd.DataFrame, docs: pd.DataFrame, labels, tau: dict[str, int], n_boot: int, seed: int) -> HeadScores:
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    tokenizer = bridge.tokenizer
    readout = readout_of(bridge)
    w_u = bridge.W_U.detach()
    by_id = docs.set_index("doc_id")
    coarse_rows, refine_rows = [], []
    for trace in traces.itertuples(index=False):
        doc_id = str(trace.doc_id)
        cot_start, cot_end, boundary = int(trace.cot_start), int(trace.cot_end), tau[doc_id]
        ids = list(trace.prompt_ids) + list(trace.output_ids)
        regions = np.asarray(trace.regions)
        anchors = [ids[i] for i in np.flatnonzero(regions == int(Region.ANCHOR))]
        doc = by_id.loc[doc_id]
        gold = [int(g) for g in doc["gold"]]
        near = [int(n) for n in doc["near_miss"]] if "near_miss" in doc and doc["near_miss"] is not None else []
        positions, final = store.read(doc_id, f"blocks.{n_layers - 1}.hook_resid_post")
        positions = positions.numpy()
        early = (positions >= cot_start) & (positions < boundary)
        late = (positions >= boundary) & (positions < cot_end)
        coarse_doc = np.full(n_layers * n_heads, np.nan)
        refine_doc = np.full(n_layers * n_heads, np.nan)
        direction = anchor_direction(w_u, anchors) if anchors else None
        pairs = _margin_pairs(tokenizer, labels, gold, near)
        grad = None
        if late.any() and pairs:
            _, grad = margin_gradient(final[late].float(), readout, pairs)
        for layer in range(n_layers):
            _, writes = store.read(doc_id, f"blocks.{layer}.attn.hook_result")
            _, kurt = store.read(doc_id, f"blocks.{layer}.attn.hook_pattern:doc_kurtosis")
            _, mass = store.read(doc_id, f"blocks.{layer}.attn.hook_pattern:region_mass")
            span = slice(layer * n_heads, (layer + 1) * n_heads)
            if direction is not None and early.any():
                coarse_doc[span] = coarse_terms(kurt[early], writes[early].float(), direction).mean(0).numpy()
            if grad is not None:
                terms = refine_terms(mass[late][..., int(Region.MENTION_GOLD)], mass[late][..., int(Region.MENTION_NEAR_MISS)], writes[late].float(), grad)
                refine_doc[span] = terms.mean(0).numpy()
        coarse_rows.append(coarse_doc)
        refine_rows.append(refine_doc)
    rows = []
    for score, per_doc in (("coarse", np.array(coarse_rows)), ("refine", np.array(refine_rows))):
        valid = per_doc[~np.isnan(per_doc).all(axis=1)]
        if len(valid) == 0:
            continue
        mean, lo, hi = _ci_rows(valid, n_boot, seed)
        order = np.argsort(-mean, kind="stable")
        rank = np.empty(len(mean), dtype=int)
        rank[order] = np.arange(1, len(mean) + 1)
        for i in range(len(mean)):
            rows.append({"layer": i // n_heads, "head": i % n_heads, "score": score, "value": float(mean[i]), "ci_low": float(lo[i]), "ci_high": float(hi[i]), "rank": int(rank[i]), "n_traces": int(len(valid))})
    meta = {
        "phase_split": "per trace at the internal boundary estimate (early = [cot_start, tau), late = [tau, cot_end))",
        "anchor_direction": "mean unembedding vector of the document's anchor tokens",
        "margin": "mean over gold labels of min over near-misses of log p(a) - log p(b), a/b = first tokens where the codes' tokenisations differ",
        "gold_mentions": "attention mass to CoT tokens that mention gold labels (region mention_gold)",
        "ci": f"bootstrap over traces, {n_boot} draws",
    }
    return HeadScores(pd.DataFrame(rows), meta)


# ------------------------------------------------------------------------------------------------
# attribution


def compute_attribution(store, traces: pd.DataFrame, n_layers: int, n_heads: int) -> Attribution:
    sums: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    for trace in traces.itertuples(index=False):
        doc_id = str(trace.doc_id)
        cot_start, cot_end = int(trace.cot_start), int(trace.cot_end)
        for layer in range(n_layers):
            pos, mass = store.read(doc_id, f"blocks.{layer}.attn.hook_pattern:region_mass")
            _, vmass = store.read(doc_id, f"blocks.{layer}.attn.hook_pattern:value_mass")
            _, kurt = store.read(doc_id, f"blocks.{layer}.attn.hook_pattern:doc_kurtosis")
            keep = ((pos >= cot_start) & (pos < cot_end)).numpy()
            if not keep.any():
                continue
            bins = _bin_of((pos.numpy()[keep] - cot_start) / max(cot_end - cot_start, 1))
            m, v, k = mass.numpy()[keep], vmass.numpy()[keep], kurt.numpy()[keep]
            v = v / np.clip(v.sum(-1, keepdims=True), 1e-12, None)  # share of the value-weighted write
            for b in np.unique(bins):
                sel = bins == b
                for h in range(n_heads):
                    key = (layer, h, int(b), "kurtosis", "")
                    sums[key] = sums.get(key, 0.0) + float(k[sel, h].sum())
                    counts[key] = counts.get(key, 0) + int(sel.sum())
                    for r in range(m.shape[-1]):
                        for measure, arr in (("mass", m), ("value_mass", v)):
                            key = (layer, h, int(b), measure, REGION_NAMES[r])
                            sums[key] = sums.get(key, 0.0) + float(arr[sel, h, r].sum())
                            counts[key] = counts.get(key, 0) + int(sel.sum())
    rows = [{"layer": l, "head": h, "t": (b + 0.5) / N_TIME_BINS, "measure": measure, "region": region, "value": sums[key] / counts[key]} for key in sums for (l, h, b, measure, region) in [key]]
    meta = {"time_bins": N_TIME_BINS, "value_mass": "share of sum over region keys of a_qk * ||v_k W_O^h|| (Kobayashi et al. 2020 style)", "kurtosis": "Pearson, over document keys"}
    return Attribution(pd.DataFrame(rows), meta)


# ------------------------------------------------------------------------------------------------
# probes

PROBE_TARGETS = ("phase", "decision", "gold", "answer")


def _probe_rows(store, traces, docs, tau, n_layers: int, n_buckets: int):
    """Yield (target, layer, bucket, features, label, doc) examples for the four probe targets."""
    by_id = docs.set_index("doc_id")
    data: dict[tuple, list] = {}
    for trace in traces.itertuples(index=False):
        doc_id = str(trace.doc_id)
        cot_start, cot_end = int(trace.cot_start), int(trace.cot_end)
        boundary = tau[doc_id]
        gold = set(int(g) for g in by_id.loc[doc_id]["gold"])
        answer = set(int(a) for a in trace.answer)
        mention_first = {int(m["token_start"]): int(m["label_id"]) for m in trace.mentions if cot_start <= int(m["token_start"]) < cot_end}
        for layer in range(n_layers):
            pos, resid = store.read(doc_id, f"blocks.{layer}.hook_resid_post")
            pos = pos.numpy()
            resid = resid.float().numpy()
            in_cot = (pos >= cot_start) & (pos < cot_end)
            buckets = np.clip(((pos - cot_start) / max(cot_end - cot_start, 1) * n_buckets).astype(int), 0, n_buckets - 1)
            for i in np.flatnonzero(in_cot):
                b = int(buckets[i])
                data.setdefault(("phase", layer, b), []).append((resid[i], int(pos[i] >= boundary), doc_id))
                label = mention_first.get(int(pos[i]))
                if label is not None:
                    data.setdefault(("gold", layer, b), []).append((resid[i], int(label in gold), doc_id))
                    if pos[i] >= boundary:
                        data.setdefault(("decision", layer, b), []).append((resid[i], int(label in answer), doc_id))
                    else:
                        data.setdefault(("answer", layer, b), []).append((resid[i], int(label in answer), doc_id))
    return data


def compute_probes(store, traces, docs, tau, n_layers: int, n_buckets: int = 5, n_boot: int = 500, seed: int = 0, min_rows: int = 20) -> ProbeResults:
    data = _probe_rows(store, traces, docs, tau, n_layers, n_buckets)
    problems, train_masks, test_masks, controls = [], [], [], []
    rng = np.random.default_rng(seed)
    for key, rows in sorted(data.items()):
        labels = np.array([r[1] for r in rows])
        if len(rows) < min_rows or len(np.unique(labels)) < 2:
            continue
        documents = np.array([r[2] for r in rows])
        features = np.stack([r[0] for r in rows])
        test = split_by_document(documents, 0.3, seed)
        if test.all() or not test.any():
            continue
        problems.append(ProbeProblem(key, features, labels, documents))
        train_masks.append(~test)
        test_masks.append(test)
        # Control: the same problem with training labels shuffled across documents' rows.
        shuffled = labels.copy()
        shuffled[~test] = rng.permutation(labels[~test])
        controls.append(ProbeProblem(key, features, shuffled, documents))
    if not problems:
        return ProbeResults(pd.DataFrame(columns=list(ProbeResults.REQUIRED)), {"note": "too few probe examples"})
    fit = fit_probe_bank(problems, train_masks)
    control_fit = fit_probe_bank(controls, train_masks)
    # Controls are scored on the true test labels.
    real = evaluate_bank(fit, problems, test_masks)
    ctrl = evaluate_bank(control_fit, problems, test_masks)
    rows = []
    for r, c in zip(real, ctrl):
        target, layer, bucket = r["key"]
        per_doc = np.array(list(r["per_doc"].values()))
        _, lo, hi = bootstrap_ci(per_doc, n_boot=n_boot, seed=seed)
        rows.append({"target": target, "layer": layer, "bucket": bucket, "metric": "accuracy", "value": r["accuracy"], "control_value": c["accuracy"], "ci_low": lo, "ci_high": hi, "majority": r["majority"], "selectivity": r["accuracy"] - c["accuracy"], "n_test": r["n_test"]})
    meta = {
        "split": "by document, 30% of documents held out (seeded)",
        "control": "training labels permuted; scored on true test labels",
        "buckets": f"{n_buckets} equal bins of normalised CoT position",
        "n_buckets": n_buckets,
        "phase_labels": "true boundary where known (organism), else the internal estimate",
        "solver": f"batched Newton, {fit.iterations} iterations, C=1 on standardised features",
        "ci": "bootstrap over test documents of per-document accuracy",
    }
    return ProbeResults(pd.DataFrame(rows), meta)


# ------------------------------------------------------------------------------------------------
# logit lens


def compute_lens(store, bridge, traces, docs, labels, n_boot: int, seed: int) -> LensResult:
    n_layers = bridge.cfg.n_layers
    readout = readout_of(bridge)
    tokenizer = bridge.tokenizer
    by_id = docs.set_index("doc_id")
    per_doc = {("logprob", l, b): [] for l in range(n_layers) for b in range(N_TIME_BINS)}
    per_doc.update({("rank", l, b): [] for l in range(n_layers) for b in range(N_TIME_BINS)})
    for trace in traces.itertuples(index=False):
        doc_id = str(trace.doc_id)
        doc = by_id.loc[doc_id]
        near = [int(n) for n in doc["near_miss"]] if "near_miss" in doc and doc["near_miss"] is not None else []
        tokens = []
        for a in trace.answer:
            pairs = _margin_pairs(tokenizer, labels, [int(a)], near)
            tokens.append(pairs[0][0][0] if pairs else _code_tokens(tokenizer, labels.codes[int(a)])[-1])
        if not tokens:
            continue
        cot_start, cot_end = int(trace.cot_start), int(trace.cot_end)
        for layer in range(n_layers):
            pos, resid = store.read(doc_id, f"blocks.{layer}.hook_resid_post")
            keep = ((pos >= cot_start) & (pos < cot_end)).numpy()
            if not keep.any():
                continue
            logp, rank = lens_scores(resid[keep], readout, tokens)
            bins = _bin_of((pos.numpy()[keep] - cot_start) / max(cot_end - cot_start, 1))
            for b in np.unique(bins):
                sel = bins == b
                per_doc[("logprob", layer, int(b))].append(float(logp[sel].mean()))
                per_doc[("rank", layer, int(b))].append(float(rank[sel].float().mean()))
    rows = []
    for (metric, layer, b), values in per_doc.items():
        if values:
            mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            rows.append({"layer": layer, "t": (b + 0.5) / N_TIME_BINS, "metric": metric, "value": mean, "ci_low": lo, "ci_high": hi})
    meta = {"label_token": "the first token where the answer label's code tokenisation differs from a near-miss's", "readout": "bridge.ln_final then bridge.unembed (the model's own numerics)"}
    return LensResult(pd.DataFrame(rows), meta)


# ------------------------------------------------------------------------------------------------
# the stage


def characterize_run(run_dir: str | Path, n_boot: int = 1000, seed: int = 0, progress: bool = True, model=None, manifest: Manifest | None = None) -> dict[str, FrameResult]:
    """Compute and write every characterisation result of a run; returns them by file stem."""
    from sklearn.decomposition import PCA

    from probes.models import load_model

    run_dir = Path(run_dir)
    manifest = Manifest.for_stage(run_dir, manifest)
    model_path = manifest.model_path()
    dataset = Dataset.load(run_dir)
    traces = read_parquet(run_dir / "traces.parquet", required=("doc_id", "output_ids", "cot_start", "cot_end", "regions", "mentions"))
    traces = traces[traces["cot_end"] - traces["cot_start"] >= 8].reset_index(drop=True)  # too short to split
    if traces.empty:
        raise input_error(run_dir / "traces.parquet", "no trace has a CoT of 8 tokens or more", "generate longer traces")
    store = open_store(run_dir)
    bridge = model if model is not None else load_model(model_path)
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    timings: dict[str, float] = {}
    results: dict[str, FrameResult] = {}
    with manifest.stage("characterize", config={"n_boot": n_boot, "seed": seed}, seed=seed) as record:
        t0 = time.perf_counter()
        dynamics = compute_dynamics(traces, dataset.docs, dataset.labels, bridge.tokenizer, n_boot=n_boot, seed=seed, progress=progress)
        results["dynamics"] = dynamics
        timings["dynamics"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        per_trace = dynamics.frame.dropna(subset=["doc_id"])
        dyn_rows = {doc: {m: g[g["metric"] == m].sort_values("t")["value"].to_numpy() for m in ("focus", "confusion")} for doc, g in per_trace.groupby("doc_id")}
        last = f"blocks.{n_layers - 1}.hook_resid_post"
        sample = []
        for trace in traces.itertuples(index=False):
            pos, resid = store.read(str(trace.doc_id), last)
            keep = ((pos >= int(trace.cot_start)) & (pos < int(trace.cot_end))).numpy()
            sample.append(resid.float().numpy()[keep])
        pca = PCA(n_components=min(3, bridge.cfg.d_model), random_state=seed).fit(np.concatenate(sample))
        boundary = estimate_boundaries(traces, dynamics_rows=dyn_rows, grid=GRID, store=store, layers=list(range(n_layers)), pca=pca)
        boundary.meta["internal_channels"] = "per layer: mean over heads of the attention mass to the document, to the model's own output (CoT and its mentions) and to the prompt scaffolding (no text markers, no truth)"
        results["boundary"] = boundary
        timings["boundary"] = time.perf_counter() - t0
        internal = boundary.frame[boundary.frame["estimator"] == "internal"].set_index("doc_id")["tau_token"].to_dict()
        truth = {str(t.doc_id): int(t.true_boundary) for t in traces.itertuples(index=False) if not pd.isna(t.true_boundary)}
        phase_tau = {doc: truth.get(doc, internal[doc]) for doc in internal}

        t0 = time.perf_counter()
        results["head_scores"] = compute_head_scores(store, bridge, traces, dataset.docs, dataset.labels, internal, n_boot, seed)
        timings["head_scores"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["attribution"] = compute_attribution(store, traces, n_layers, n_heads)
        timings["attribution"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["probes"] = compute_probes(store, traces, dataset.docs, phase_tau, n_layers, n_boot=max(200, n_boot // 2), seed=seed)
        timings["probes"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        results["lens"] = compute_lens(store, bridge, traces, dataset.docs, dataset.labels, n_boot, seed)
        timings["lens"] = time.perf_counter() - t0
        for stem, result in results.items():
            result.save(run_dir / f"{stem}.parquet")
        record["outputs"] = [f"{stem}.parquet" for stem in results]
        record["timings"] = {k: round(v, 2) for k, v in timings.items()}
        record["boundary_errors"] = results["boundary"].errors().to_dict(orient="records")
    if progress:
        print(f"[characterize] wrote {', '.join(f'{s}.parquet' for s in results)} to {run_dir}", file=sys.stderr)
    return results
