"""The ``characterize`` stage (``ctd characterize --run DIR``): dynamics, phase boundary, head
scores, attribution, probes, logit lens.

Reads ``traces.parquet``, ``docs.parquet``, ``labels.parquet`` and the activation store of a run and
writes ``dynamics``, ``boundary``, ``head_scores``, ``attribution``, ``probes`` and ``lens`` parquet
files. Every choice the definitions leave open is written into each result's metadata.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from analyses.methods.boundary import estimate_boundaries, fit_constant_share, fit_phase_probe, fit_text_phase_probe, fit_token_phase_table, tune_internal
from analyses.methods.dynamics import GRID, compute_dynamics
from analyses.machinery.io import read_parquet
from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.machinery.settings import CharacterizeSettings
from analyses.methods.parsing import Region
from analyses.results.base import FrameResult
from analyses.results.characterize import Attribution, HeadScores, LensResult, ProbeResults
from analyses.tasks.metrics import bootstrap_ci
from analyses.tasks.sources import Dataset, near_misses_of
from probes.errors import input_error
from probes.heads import anchor_direction, coarse_terms, margin_gradient, margin_pairs, refine_terms
from probes.lens import lens_scores, readout_of
from probes.linear import ProbeProblem, fit_probe_bank, split_by_document
from probes.points import hook_name, reduction_name
from probes.store import open_store

__all__ = ["HeadScores", "Attribution", "ProbeResults", "LensResult", "compute", "tune_boundary_run", "compute_probes", "probe_table", "probe_examples", "token_identity_predict", "control_labels", "PROBE_TARGETS"]

N_TIME_BINS = 10
REGION_NAMES = {int(r): r.name.lower() for r in Region}


# ------------------------------------------------------------------------------------------------
# result types


# ------------------------------------------------------------------------------------------------
# helpers


def _code_tokens(tokenizer, code: str) -> list[int]:
    # Codes appear after a space inside traces; tokenise them the same way.
    return tokenizer.encode(" " + code, add_special_tokens=False)


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
        near = near_misses_of(doc)
        positions, final = store.read(doc_id, hook_name("resid_post", n_layers - 1))
        positions = positions.numpy()
        early = (positions >= cot_start) & (positions < boundary)
        late = (positions >= boundary) & (positions < cot_end)
        coarse_doc = np.full(n_layers * n_heads, np.nan)
        refine_doc = np.full(n_layers * n_heads, np.nan)
        direction = anchor_direction(w_u, anchors) if anchors else None
        pairs = margin_pairs(tokenizer, labels.codes, gold, near)
        grad = None
        if late.any() and pairs:
            _, grad = margin_gradient(final[late].float(), readout, pairs)
        for layer in range(n_layers):
            _, writes = store.read(doc_id, hook_name("head_out", layer))
            _, kurt = store.read(doc_id, reduction_name("doc_kurtosis", layer))
            _, mass = store.read(doc_id, reduction_name("region_mass", layer))
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
            pos, mass = store.read(doc_id, reduction_name("region_mass", layer))
            _, vmass = store.read(doc_id, reduction_name("value_mass", layer))
            _, kurt = store.read(doc_id, reduction_name("doc_kurtosis", layer))
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
# Phase probes bucket tokens by their distance to the trace's own boundary, measured within the
# token's own phase (0 at the boundary, 1 at the phase's far end): every bucket of every trace
# holds tokens of both phases, so no cell is single-class by construction, and position within
# the CoT cannot tell the classes apart inside a bucket.
N_POSITION_BUCKETS = 5


def bucket_names(target: str) -> list[str]:
    """Human-readable names of a target's buckets (index = bucket)."""
    n = N_POSITION_BUCKETS
    prefix = {"phase": "d", "decision": "in phase 2", "answer": "in phase 1", "gold": "t"}[target]
    return [f"{prefix} {b / n:.1f}–{(b + 1) / n:.1f}" for b in range(n)]


def probe_examples(store, traces, docs, tau, n_layers: int) -> dict[tuple, list]:
    """(target, layer, bucket) -> rows of (features, label, doc, current token id, previous token id).

    ``phase``: every CoT token, label = after its trace's boundary, bucketed by its distance to the
    boundary as a share of its own phase's length (see :data:`N_POSITION_BUCKETS`).
    ``gold`` / ``decision`` / ``answer``: the first token of each label mention, label = the label
    is gold / is answered (mentions after the boundary) / is answered (mentions before it: early
    decoding of the answer), bucketed by normalised CoT position (``gold``) or by position within
    the phase they come from (``decision``: phase 2, ``answer``: phase 1).
    """
    by_id = docs.set_index("doc_id")
    data: dict[tuple, list] = {}
    for trace in traces.itertuples(index=False):
        doc_id = str(trace.doc_id)
        cot_start, cot_end = int(trace.cot_start), int(trace.cot_end)
        T = max(cot_end - cot_start, 1)
        boundary = tau[doc_id]
        ids = np.asarray(list(trace.prompt_ids) + list(trace.output_ids))
        gold = set(int(g) for g in by_id.loc[doc_id]["gold"])
        answer = set(int(a) for a in trace.answer)
        mention_first = {int(m["token_start"]): int(m["label_id"]) for m in trace.mentions if cot_start <= int(m["token_start"]) < cot_end}
        for layer in range(n_layers):
            pos, resid = store.read(doc_id, hook_name("resid_post", layer))
            pos = pos.numpy()
            resid = resid.float().numpy()
            for i in np.flatnonzero((pos >= cot_start) & (pos < cot_end)):
                p = int(pos[i])
                tokens = (int(ids[p]), int(ids[p - 1]))
                # within-phase distance: phase 1 spans [cot_start, boundary), phase 2 [boundary, cot_end)
                distance = (boundary - 1 - p) / max(boundary - cot_start, 1) if p < boundary else (p - boundary) / max(cot_end - boundary, 1)
                b = int(np.clip(distance * N_POSITION_BUCKETS, 0, N_POSITION_BUCKETS - 1))
                data.setdefault(("phase", layer, b), []).append((resid[i], int(p >= boundary), doc_id, *tokens))
                label = mention_first.get(p)
                if label is not None:
                    b = int(np.clip((p - cot_start) / T * N_POSITION_BUCKETS, 0, N_POSITION_BUCKETS - 1))
                    data.setdefault(("gold", layer, b), []).append((resid[i], int(label in gold), doc_id, *tokens))
                    if p >= boundary:
                        share, which = (p - boundary) / max(cot_end - boundary, 1), "decision"
                    else:
                        share, which = (p - cot_start) / max(boundary - cot_start, 1), "answer"
                    b = int(np.clip(share * N_POSITION_BUCKETS, 0, N_POSITION_BUCKETS - 1))
                    data.setdefault((which, layer, b), []).append((resid[i], int(label in answer), doc_id, *tokens))
    return data


def token_identity_predict(train_tokens: np.ndarray, train_labels: np.ndarray, test_tokens: np.ndarray) -> np.ndarray:
    """The token-identity baseline: the majority label of the (current, previous) token pair in
    the training rows, backing off to the current token alone, then to the training majority.

    ``*_tokens``: [n, 2] (current id, previous id)."""
    fallback = int(train_labels.mean() >= 0.5) if len(train_labels) else 0
    pair: dict[tuple[int, int], list[int]] = {}
    single: dict[int, list[int]] = {}
    for (cur, prev), y in zip(train_tokens.tolist(), train_labels.tolist()):
        pair.setdefault((cur, prev), [0, 0])[y] += 1
        single.setdefault(cur, [0, 0])[y] += 1
    out = np.empty(len(test_tokens), dtype=np.int64)
    for i, (cur, prev) in enumerate(test_tokens.tolist()):
        counts = pair.get((cur, prev)) or single.get(cur)
        out[i] = fallback if counts is None else int(counts[1] > counts[0] or (counts[1] == counts[0] and fallback == 1))
    return out


def control_labels(token_ids: np.ndarray, positive_rate: float, seed: int) -> np.ndarray:
    """Hewitt & Liang's control task: one random label per token type, drawn at the task's own
    positive rate (same output space and balance; only memorising token types can solve it)."""
    unique = np.unique(token_ids)
    rng = np.random.default_rng(seed)
    table = dict(zip(unique.tolist(), (rng.random(len(unique)) < positive_rate).astype(np.int64).tolist()))
    return np.array([table[t] for t in token_ids.tolist()], dtype=np.int64)


def _pooled_ci(correct: dict[str, np.ndarray], docs: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Accuracy over test rows (``correct`` per name, one value per row) and its bootstrap CI over documents."""
    unique = np.unique(docs)
    index = {d: i for i, d in enumerate(unique)}
    which = np.array([index[d] for d in docs])
    sums = np.bincount(which, weights=correct.astype(float), minlength=len(unique))
    counts = np.bincount(which, minlength=len(unique)).astype(float)
    return bootstrap_ci(lambda idx: float(sums[idx].sum() / max(counts[idx].sum(), 1)), n=len(unique), n_boot=n_boot, seed=seed)


def compute_probes(store, traces, docs, tau, n_layers: int, n_boot: int = 500, seed: int = 0, min_rows: int = 20, tau_source: str = "true boundary") -> ProbeResults:
    """Every (target, layer, bucket) cell: probe accuracy with a CI, beside the majority rate, the
    token-identity baseline and the control task; cells that cannot be fitted are kept with a status."""
    return probe_table(probe_examples(store, traces, docs, tau, n_layers), n_layers, n_boot, seed, min_rows, tau_source)


def probe_table(data: dict[tuple, list], n_layers: int, n_boot: int = 500, seed: int = 0, min_rows: int = 20, tau_source: str = "true boundary") -> ProbeResults:
    """:func:`compute_probes` on examples already read: ``data`` as :func:`probe_examples` returns
    it, (target, layer, bucket) -> rows of (features [d], label, doc, current token id, previous
    token id); cells absent from ``data`` are kept as not fitted."""
    cells = [(t, layer, b) for t in PROBE_TARGETS for layer in range(n_layers) for b in range(len(bucket_names(t)))]
    problems, controls, train_masks, test_masks, fitted = [], [], [], [], []
    rows = []
    for key in cells:
        target, layer, bucket = key
        base = {"target": target, "layer": layer, "bucket": bucket, "bucket_name": bucket_names(target)[bucket], "metric": "accuracy"}
        examples = data.get(key, [])
        labels = np.array([r[1] for r in examples], dtype=np.int64)
        status = None
        if len(examples) < min_rows:
            status = f"not fitted: {len(examples)} rows (< {min_rows})"
        elif len(np.unique(labels)) < 2:
            status = f"not fitted: single class ({int(labels[0])} only)"
        if status is None:
            documents = np.array([r[2] for r in examples])
            test = split_by_document(documents, 0.3, seed)
            train_y = labels[~test]
            if test.all() or not test.any():
                status = "not fitted: too few documents to hold some out"
            elif len(np.unique(train_y)) < 2:
                status = "not fitted: single class in the training documents"
        if status is not None:
            rows.append({**base, "value": np.nan, "control_value": np.nan, "ci_low": np.nan, "ci_high": np.nan, "status": status, "n_rows": len(examples)})
            continue
        features = np.stack([r[0] for r in examples])
        tokens = np.array([(r[3], r[4]) for r in examples], dtype=np.int64)
        problems.append(ProbeProblem(key, features, labels, documents))
        # the control task's rate from the training rows alone: the held-out labels must not shape it
        controls.append(ProbeProblem(key, features, control_labels(tokens[:, 0], float(train_y.mean()), seed), documents))
        train_masks.append(~test)
        test_masks.append(test)
        fitted.append((base, tokens, len(examples)))
    solver = "none"
    if problems:
        fit = fit_probe_bank(problems, train_masks)
        control_fit = fit_probe_bank(controls, train_masks)
        solver = fit.solver
        for g, (base, tokens, n_rows) in enumerate(fitted):
            p, c, test = problems[g], controls[g], test_masks[g]
            y, docs_test = p.labels[test], p.documents[test]
            probe_ok = (fit.decision(g, p.features[test]) > 0).astype(np.int64) == y
            control_ok = (control_fit.decision(g, c.features[test]) > 0).astype(np.int64) == c.labels[test]
            token_ok = token_identity_predict(tokens[~test], p.labels[~test], tokens[test]) == y
            majority_class = int(p.labels[~test].mean() >= 0.5)
            value, lo, hi = _pooled_ci(probe_ok, docs_test, n_boot, seed)
            token_value, token_lo, token_hi = _pooled_ci(token_ok, docs_test, n_boot, seed)
            diff, diff_lo, diff_hi = _pooled_ci(probe_ok.astype(float) - token_ok, docs_test, n_boot, seed)
            control_value = float(control_ok.mean())
            # paired per test row (the probe and the control task score the same rows), CI over documents
            _, sel_lo, sel_hi = _pooled_ci(probe_ok.astype(float) - control_ok, docs_test, n_boot, seed)
            rows.append(
                {
                    **base, "value": value, "control_value": control_value, "ci_low": lo, "ci_high": hi,
                    "majority": float((y == majority_class).mean()), "token_baseline": token_value, "token_ci_low": token_lo, "token_ci_high": token_hi,
                    "minus_tokens": diff, "minus_tokens_ci_low": diff_lo, "minus_tokens_ci_high": diff_hi, "beats_tokens": bool(diff_lo > 0),
                    "selectivity": value - control_value, "selectivity_ci_low": sel_lo, "selectivity_ci_high": sel_hi, "n_train": int((~test).sum()), "n_test": int(test.sum()), "n_rows": n_rows, "status": "fitted",
                }
            )
    frame = pd.DataFrame(rows)
    meta = {
        "split": "by document, 30% of documents held out (seeded); every baseline is fitted on the same training rows",
        "baselines": {
            "majority": "the training majority class, scored on the test rows",
            "token_identity": "majority label of the (current, previous) token-id pair in training rows, backing off to the current token, then the majority",
            "control_task": "Hewitt & Liang (2019): a random label fixed per token type, drawn at the positive rate of the cell's training rows (training documents only); a probe of the same form trained and scored on it; selectivity = probe - control task",
        },
        "buckets": {"phase": f"{N_POSITION_BUCKETS} equal bins of the distance to the trace's own boundary as a share of the token's own phase (0 = at the boundary, 1 = the phase's far end): every bucket holds both phases of every trace", "gold": f"{N_POSITION_BUCKETS} equal bins of normalised CoT position", "decision / answer": f"{N_POSITION_BUCKETS} equal bins of position within phase 2 / phase 1"},
        "n_buckets": N_POSITION_BUCKETS,
        "phase_labels": tau_source,
        "solver": f"{solver}, C=1 on standardised features",
        "ci": f"bootstrap over test documents ({n_boot} draws) of the pooled accuracy, of probe minus token identity and of probe minus the control task (both paired by row)",
        "not_fitted": int((frame["status"] != "fitted").sum()) if len(frame) else 0,
    }
    return ProbeResults(frame, meta)


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
        near = near_misses_of(doc)
        tokens = []
        for a in trace.answer:
            pairs = margin_pairs(tokenizer, labels.codes, [int(a)], near)
            tokens.append(pairs[0][0][0] if pairs else _code_tokens(tokenizer, labels.codes[int(a)])[-1])
        if not tokens:
            continue
        cot_start, cot_end = int(trace.cot_start), int(trace.cot_end)
        for layer in range(n_layers):
            pos, resid = store.read(doc_id, hook_name("resid_post", layer))
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


def _final_layer_pca(store, traces: pd.DataFrame, n_layers: int, d_model: int, seed: int):
    from sklearn.decomposition import PCA

    last = hook_name("resid_post", n_layers - 1)
    sample = []
    for trace in traces.itertuples(index=False):
        pos, resid = store.read(str(trace.doc_id), last)
        keep = ((pos >= int(trace.cot_start)) & (pos < int(trace.cot_end))).numpy()
        sample.append(resid.float().numpy()[keep])
    return PCA(n_components=min(3, d_model), random_state=seed).fit(np.concatenate(sample))


def _dev_split_of(run_dir: Path) -> str | None:
    """The split the run's dev traces were drawn from, as the traces stage recorded it."""
    from analyses.machinery.io import Manifest

    try:
        return Manifest(run_dir).data.get("stages", {}).get("traces", {}).get("dev_split")
    except Exception:  # a run directory without a manifest (tests build some by hand)
        return None


def _usable_traces(path: Path) -> pd.DataFrame:
    traces = read_parquet(path, required=("doc_id", "output_ids", "cot_start", "cot_end", "regions", "mentions"))
    return traces[traces["cot_end"] - traces["cot_start"] >= 8].reset_index(drop=True)  # too short to split


def compute(ctx: StageContext) -> dict[str, FrameResult]:
    """Every characterisation result of a run, by file stem (the runner saves them).

    Reads ``traces.parquet`` and the run's activation store (``dev_traces.parquet``, when present,
    fits the ``constant`` boundary estimator and the internal one's probe). ``ctx.settings``:
    bootstrap draws, seed, and the internal estimator's choices (made on dev traces by ``ctd
    characterize --tune-boundary``); ``ctx.model``: a loaded bridge to reuse. Timings and boundary
    errors go into the stage record.
    """
    from probes.models import load_model

    run_dir, model_path, settings, progress, model, record = Path(ctx.run_dir), ctx.model_path, ctx.settings, ctx.progress, ctx.model, ctx.record
    n_boot, seed, internal = settings.n_boot, settings.seed, settings.internal
    dataset = Dataset.load(run_dir)
    traces = _usable_traces(run_dir / "traces.parquet")
    if traces.empty:
        raise input_error(run_dir / "traces.parquet", "no trace has a CoT of 8 tokens or more", "generate longer traces")
    dev_path = run_dir / "dev_traces.parquet"
    constant_share = fit_constant_share(_usable_traces(dev_path)) if dev_path.exists() else None
    store = open_store(run_dir)
    bridge = model if model is not None else load_model(model_path)
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    timings: dict[str, float] = {}
    results: dict[str, FrameResult] = {}
    t0 = time.perf_counter()
    dynamics = compute_dynamics(traces, dataset.docs, dataset.labels, bridge.tokenizer, n_boot=n_boot, seed=seed, progress=progress)
    timings["dynamics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    per_trace = dynamics.frame.dropna(subset=["doc_id"])
    dyn_rows = {doc: {m: g[g["metric"] == m].sort_values("t")["value"].to_numpy() for m in ("focus", "confusion")} for doc, g in per_trace.groupby("doc_id")}
    pca = _final_layer_pca(store, traces, n_layers, bridge.cfg.d_model, seed)
    dev = _usable_traces(dev_path) if dev_path.exists() else None
    dev_in_store = dev is not None and len(dev) and set(dev["doc_id"].astype(str)) <= set(store.doc_ids)
    probe = fit_phase_probe(dev, store, list(range(n_layers)), internal.C) if internal.channels == "probe" and dev_in_store else None
    token_table = fit_token_phase_table(dev) if dev is not None and len(dev) else None
    text_probe = fit_text_phase_probe(dev, seed) if dev is not None and len(dev) else None
    boundary = estimate_boundaries(traces, dynamics_rows=dyn_rows, grid=GRID, store=store, layers=list(range(n_layers)), pca=pca, constant_share=constant_share, internal=internal, phase_probe=probe, token_table=token_table, text_probe=text_probe, progress=progress)
    boundary.meta["constant_fitted_on"] = f"{dev_path.name}: {len(_usable_traces(dev_path))} dev traces" if constant_share is not None else "not fitted: no dev traces with a known boundary"
    boundary.meta["n_boot"] = n_boot
    results["boundary"] = boundary
    timings["boundary"] = time.perf_counter() - t0
    internal_tau = boundary.tau("internal")
    phase_tau = boundary.tau("internal", prefer_truth=True)
    known = int(boundary.frame[boundary.frame["estimator"] == "internal"]["true_token"].notna().sum())
    tau_source = "the true boundary (known for every trace)" if known == len(internal_tau) else "the true boundary where known, else the internal estimate"
    lengths = {str(t.doc_id): (int(t.cot_start), max(int(t.cot_end) - int(t.cot_start), 1)) for t in traces.itertuples(index=False)}
    results["dynamics"] = dynamics.with_phase_changes({d: (tau - lengths[d][0]) / lengths[d][1] for d, tau in phase_tau.items()}, source=tau_source, n_boot=n_boot, seed=seed)

    t0 = time.perf_counter()
    results["head_scores"] = compute_head_scores(store, bridge, traces, dataset.docs, dataset.labels, internal_tau, n_boot, seed)
    if dev_in_store:
        # Rankings that later stages act on (patching, distillation) come from dev traces, so the
        # test traces they are measured on never chose the heads. Dev traces split at their true
        # boundary where it is known (it is no test trace's), else at the unsupervised estimate.
        # The unsupervised estimate's projection is fitted on the dev traces too: nothing of the
        # test traces reaches the dev ranking.
        dev_pca = _final_layer_pca(store, dev, n_layers, bridge.cfg.d_model, seed)
        dev_tau = estimate_boundaries(dev, estimators=("internal_unsupervised",), store=store, layers=list(range(n_layers)), pca=dev_pca, internal=internal).tau("internal_unsupervised", prefer_truth=True)
        dev_scores = compute_head_scores(store, bridge, dev, dataset.docs, dataset.labels, dev_tau, n_boot, seed)
        drawn_from = _dev_split_of(run_dir)
        dev_scores.meta["traces"] = f"{len(dev)} dev traces ({dev_path.name}" + (f", drawn from the {drawn_from} split" if drawn_from not in (None, "dev") else "") + ")"
        dev_scores.meta["split"] = drawn_from or "dev"
        dev_scores.meta["doc_ids"] = sorted(dev["doc_id"].astype(str))
        results["dev_head_scores"] = dev_scores
    timings["head_scores"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["attribution"] = compute_attribution(store, traces, n_layers, n_heads)
    timings["attribution"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["probes"] = compute_probes(store, traces, dataset.docs, phase_tau, n_layers, n_boot=max(200, n_boot // 2), seed=seed, tau_source=tau_source)
    timings["probes"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    results["lens"] = compute_lens(store, bridge, traces, dataset.docs, dataset.labels, n_boot, seed)
    timings["lens"] = time.perf_counter() - t0
    record["timings"] = {k: round(v, 2) for k, v in timings.items()}
    record["boundary_errors"] = results["boundary"].errors(n_boot=n_boot, seed=seed).to_dict(orient="records")
    if progress:
        print(f"[characterize] {', '.join(f'{s}.parquet' for s in results)} -> {run_dir}", file=sys.stderr)
    return results


def tune_boundary_run(run_dir: str | Path, progress: bool = True, model=None, seed: int = 0) -> pd.DataFrame:
    """``ctd characterize --run R --tune-boundary``: choose the internal estimator's channels and
    smoothing on the run's dev traces only.

    The dev traces (``dev_traces.parquet``, written by the traces stage and captured beside the test
    traces by the capture stage) are scored against their true boundary for every choice of
    :data:`~analyses.methods.boundary.SMOOTHING_GRID` x channels; the table (best first) is written to
    ``R/boundary_tuning.parquet``. Test traces are never read.
    """
    from analyses.machinery.io import write_parquet
    from probes.models import load_model

    from analyses.machinery.io import Manifest

    run_dir = Path(run_dir)
    manifest = Manifest(run_dir)
    manifest.verify_complete()
    dev_path = run_dir / "dev_traces.parquet"
    if not dev_path.exists():
        raise input_error(dev_path, "no dev traces to tune on", "run the traces stage into a new --out with --n-dev-docs 100")
    store = open_store(run_dir)
    traces = _usable_traces(dev_path)
    missing = sorted(set(traces["doc_id"].astype(str)) - set(store.doc_ids))
    if missing:
        raise input_error(run_dir / "activations", f"{len(missing)} dev traces are not in the activation store (e.g. {missing[0]})", "rerun `ctd capture --run R` (it captures dev_traces.parquet too)")
    bridge = model if model is not None else load_model(manifest.model_path())
    n_layers = bridge.cfg.n_layers
    pca = _final_layer_pca(store, traces, n_layers, bridge.cfg.d_model, seed)
    table = tune_internal(traces, store, list(range(n_layers)), pca=pca, progress=progress)
    shipped = CharacterizeSettings().internal
    same_c = np.isclose(table["C"].fillna(-1), shipped.C if shipped.channels == "probe" else -1)
    table["shipped_default"] = (table["channels"] == shipped.channels) & np.isclose(table["smoothing"], shipped.smoothing) & same_c
    table["shipped_unsupervised"] = (table["channels"] == shipped.unsupervised_channels) & np.isclose(table["smoothing"], shipped.unsupervised_smoothing)
    best = table.iloc[0]
    best_unsupervised = table[table["channels"] != "probe"].iloc[0]
    meta = {
        "dev_traces": int(len(traces)),
        "selected": {"channels": str(best["channels"]), "smoothing": float(best["smoothing"]), "C": None if pd.isna(best["C"]) else float(best["C"])},
        "selected_unsupervised": {"channels": str(best_unsupervised["channels"]), "smoothing": float(best_unsupervised["smoothing"])},
        "shipped": {"channels": shipped.channels, "smoothing": shipped.smoothing, "C": shipped.C, "unsupervised_channels": shipped.unsupervised_channels, "unsupervised_smoothing": shipped.unsupervised_smoothing},
        "metric": "median |estimated - true boundary| / CoT length over dev traces",
        "probe": table.attrs.get("cross_fitted"),
    }
    write_parquet(table, run_dir / "boundary_tuning.parquet", metadata={"ctd_meta": json.dumps(meta)})
    return table


register_stage(Stage("characterize", "characterize", ("traces.parquet", "activations/"), ("dynamics.parquet", "boundary.parquet", "head_scores.parquet", "dev_head_scores.parquet?", "attribution.parquet", "probes.parquet", "lens.parquet"), compute, "dynamics, boundary, head scores, attribution, probes, logit lens"))
