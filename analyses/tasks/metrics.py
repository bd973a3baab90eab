"""XMC and set metrics with pyxclib conventions (DESIGN §2), and bootstrap CIs over documents.

Conventions, as pyxclib computes them:
- every row counts, including rows without gold (they score 0 on every ranking metric);
- P@k divides by k even when fewer than k labels were scored (missing ranks are misses);
- nDCG@k normalises each row by the ideal DCG over min(k, |gold|) positions;
- PSP@k and PSnDCG@k weight hits by the inverse propensity
  w_l = 1 + C (N_l + B)^-A with C = (ln N - 1)(B + 1)^A, and divide the mean over rows by the mean of
  the best achievable value (gold labels ranked by weight).
Ties in score are broken by the lower label index, so results are deterministic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import scipy.sparse as sp

from probes.errors import CtdInputError

__all__ = ["xmc_metrics", "set_metrics", "inverse_propensity", "top_k", "bootstrap_ci", "xmc_metrics_ci"]


def inverse_propensity(train_label_counts, n_train: int, A: float = 0.55, B: float = 1.5) -> np.ndarray:
    """Jain et al. (2016) inverse propensity per label: 1 + C (N_l + B)^-A, C = (ln N - 1)(B + 1)^A."""
    counts = np.asarray(train_label_counts, dtype=np.float64).ravel()
    if n_train < 1:
        raise CtdInputError(f"n_train={n_train}: propensities need at least one training point")
    if (counts < 0).any():
        raise CtdInputError("train_label_counts has negative entries; pass the number of training points per label")
    c = (np.log(n_train) - 1.0) * (B + 1.0) ** A
    return 1.0 + c * (counts + B) ** (-A)


def _as_csr(matrix, name: str) -> sp.csr_matrix:
    if sp.issparse(matrix):
        return sp.csr_matrix(matrix)
    arr = np.asarray(matrix)
    if arr.ndim != 2:
        raise CtdInputError(f"{name} must be a 2-D [docs, labels] matrix, got shape {arr.shape}")
    return sp.csr_matrix(arr)


def top_k(scores, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` label indices per row, best first, and a mask of which ranks were filled.

    Dense input: every finite entry ranks (NaN and -inf never do). CSR input: only stored entries
    rank. Returns ``(indices [n, k] int64, filled [n, k] bool)``; unfilled ranks hold index 0.
    """
    if sp.issparse(scores):
        csr = sp.csr_matrix(scores)
        csr.sort_indices()
        n = csr.shape[0]
        rows = np.repeat(np.arange(n), np.diff(csr.indptr))
        cols, data = csr.indices.astype(np.int64), csr.data.astype(np.float64)
    else:
        dense = np.asarray(scores, dtype=np.float64)
        n, m = dense.shape
        rows = np.repeat(np.arange(n), m)
        cols = np.tile(np.arange(m, dtype=np.int64), n)
        data = dense.ravel()
    finite = ~np.isnan(data) & (data != -np.inf)
    rows, cols, data = rows[finite], cols[finite], data[finite]
    order = np.lexsort((cols, -data, rows))  # by row, then score descending, then label index
    rows, cols = rows[order], cols[order]
    starts = np.searchsorted(rows, np.arange(n))
    rank = np.arange(len(rows)) - starts[rows]
    keep = rank < k
    indices = np.zeros((n, k), dtype=np.int64)
    filled = np.zeros((n, k), dtype=bool)
    indices[rows[keep], rank[keep]] = cols[keep]
    filled[rows[keep], rank[keep]] = True
    return indices, filled


def _check_pair(gold, scores) -> tuple[sp.csr_matrix, object]:
    gold_csr = _as_csr(gold, "gold")
    shape = scores.shape if sp.issparse(scores) else np.shape(scores)
    if tuple(shape) != tuple(gold_csr.shape):
        raise CtdInputError(f"gold has shape {gold_csr.shape} but scores {tuple(shape)}; they must be the same [docs, labels]")
    if gold_csr.nnz and not np.all(np.isin(gold_csr.data, (0, 1))):
        raise CtdInputError("gold must be a 0/1 matrix")
    gold_csr.eliminate_zeros()
    return gold_csr, scores


def _row_metrics(gold: sp.csr_matrix, scores, ks: Sequence[int], weights: np.ndarray | None) -> dict[str, np.ndarray]:
    """Per-row numerators (and per-row ideal values for the propensity-scored metrics)."""
    kmax = max(ks)
    indices, filled = top_k(scores, kmax)
    n = gold.shape[0]
    hits = np.asarray(gold[np.repeat(np.arange(n), kmax), indices.ravel()]).reshape(n, kmax) * filled
    n_gold = np.diff(gold.indptr)
    discount = 1.0 / np.log2(np.arange(kmax) + 2.0)
    cumulative = np.concatenate([[0.0], np.cumsum(discount)])
    if weights is not None:
        # Best achievable: each row's gold labels ranked by weight.
        weighted_gold = sp.csr_matrix((weights[gold.indices], gold.indices, gold.indptr), shape=gold.shape)
        best_idx, best_filled = top_k(weighted_gold, kmax)
        best_all = weights[best_idx] * best_filled
    out: dict[str, np.ndarray] = {}
    for k in ks:
        h = hits[:, :k]
        idcg = cumulative[np.minimum(k, n_gold)]
        out[f"P@{k}"] = h.sum(1) / k
        with np.errstate(invalid="ignore", divide="ignore"):
            out[f"nDCG@{k}"] = np.where(n_gold > 0, (h * discount[:k]).sum(1) / idcg, 0.0)
            out[f"R@{k}"] = np.where(n_gold > 0, h.sum(1) / np.maximum(n_gold, 1), 0.0)
        if weights is not None:
            gain = h * weights[indices[:, :k]]
            best = best_all[:, :k]
            norm = np.where(idcg > 0, idcg, 1.0)
            out[f"_psp_num@{k}"] = gain.sum(1) / k
            out[f"_psp_den@{k}"] = best.sum(1) / k
            out[f"_psn_num@{k}"] = (gain * discount[:k]).sum(1) / norm
            out[f"_psn_den@{k}"] = (best * discount[:k]).sum(1) / norm
    return out


def _aggregate(rows: dict[str, np.ndarray], ks: Sequence[int], idx: np.ndarray | None = None) -> dict[str, float]:
    pick = (lambda a: a) if idx is None else (lambda a: a[idx])
    result: dict[str, float] = {}
    for k in ks:
        for name in (f"P@{k}", f"nDCG@{k}", f"R@{k}"):
            result[name] = float(pick(rows[name]).mean()) if len(rows[name]) else 0.0
    for k in ks:
        if f"_psp_num@{k}" in rows:
            for name, num, den in ((f"PSP@{k}", "_psp_num", "_psp_den"), (f"PSnDCG@{k}", "_psn_num", "_psn_den")):
                d = pick(rows[f"{den}@{k}"]).sum()
                result[name] = float(pick(rows[f"{num}@{k}"]).sum() / d) if d > 0 else 0.0
    return result


def _prepare(gold, scores, ks, train_label_counts, n_train, A, B):
    """Checked inputs: gold as CSR, ks as positive ints, inverse propensities (or None)."""
    gold_csr, scores = _check_pair(gold, scores)
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise CtdInputError(f"ks={ks}: every k must be a positive integer")
    weights = None
    if train_label_counts is not None or n_train is not None:
        if train_label_counts is None or n_train is None:
            raise CtdInputError("propensity-scored metrics need both train_label_counts and n_train")
        weights = inverse_propensity(train_label_counts, n_train, A, B)
        if len(weights) != gold_csr.shape[1]:
            raise CtdInputError(f"train_label_counts has {len(weights)} entries for {gold_csr.shape[1]} labels")
    return gold_csr, scores, ks, weights


def xmc_metrics(
    gold,
    scores,
    ks: Sequence[int] = (1, 3, 5),
    train_label_counts=None,
    n_train: int | None = None,
    A: float = 0.55,
    B: float = 1.5,
) -> dict[str, float]:
    """Ranking metrics of ``scores`` against ``gold`` (both [docs, labels], dense or CSR).

    Returns ``P@k``, ``nDCG@k``, ``R@k`` for each k, and ``PSP@k``, ``PSnDCG@k`` when
    ``train_label_counts`` and ``n_train`` are given. Higher scores rank first; absent CSR entries,
    NaN and -inf never rank.
    """
    gold_csr, scores, ks, weights = _prepare(gold, scores, ks, train_label_counts, n_train, A, B)
    return _aggregate(_row_metrics(gold_csr, scores, ks, weights), ks)


def xmc_metrics_ci(
    gold,
    scores,
    ks: Sequence[int] = (1, 3, 5),
    train_label_counts=None,
    n_train: int | None = None,
    A: float = 0.55,
    B: float = 1.5,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, tuple[float, float, float]]:
    """Like :func:`xmc_metrics`, each value with a bootstrap CI over documents: ``(value, low, high)``."""
    gold_csr, scores, ks, weights = _prepare(gold, scores, ks, train_label_counts, n_train, A, B)
    rows = _row_metrics(gold_csr, scores, ks, weights)
    point = _aggregate(rows, ks)
    n = gold_csr.shape[0]
    rng = np.random.default_rng(seed)
    draws = [_aggregate(rows, ks, rng.integers(0, n, n)) for _ in range(n_boot)]
    alpha = (1 - level) / 2
    return {
        name: (value, float(np.quantile([d[name] for d in draws], alpha)), float(np.quantile([d[name] for d in draws], 1 - alpha)))
        for name, value in point.items()
    }


def _as_sets(rows, name: str) -> list[set]:
    if sp.issparse(rows) or (isinstance(rows, np.ndarray) and rows.ndim == 2 and rows.dtype != object):
        csr = _as_csr(rows, name)
        csr.eliminate_zeros()
        return [set(csr.indices[csr.indptr[i] : csr.indptr[i + 1]].tolist()) for i in range(csr.shape[0])]
    return [set(r) for r in rows]


def set_metrics(gold, predicted) -> dict[str, float]:
    """Set-valued predictions against gold: lists of label sets or 0/1 matrices [docs, labels].

    ``micro_f1``, ``precision`` and ``recall`` pool all (doc, label) decisions; ``macro_f1`` is the
    mean per-label F1 over the labels that occur in gold or predictions; ``example_f1`` is the mean
    per-document F1, where a document with empty gold and empty prediction scores 1.
    """
    gold_sets, pred_sets = _as_sets(gold, "gold"), _as_sets(predicted, "predicted")
    if len(gold_sets) != len(pred_sets):
        raise CtdInputError(f"gold has {len(gold_sets)} documents but predictions {len(pred_sets)}")
    tp = sum(len(g & p) for g, p in zip(gold_sets, pred_sets))
    n_pred = sum(len(p) for p in pred_sets)
    n_gold = sum(len(g) for g in gold_sets)
    precision = tp / n_pred if n_pred else 0.0
    recall = tp / n_gold if n_gold else 0.0
    micro = 2 * tp / (n_pred + n_gold) if (n_pred + n_gold) else 0.0
    per_label: dict[object, list[int]] = {}
    for g, p in zip(gold_sets, pred_sets):
        for label in g | p:
            counts = per_label.setdefault(label, [0, 0, 0])  # tp, fp, fn
            if label in g and label in p:
                counts[0] += 1
            elif label in p:
                counts[1] += 1
            else:
                counts[2] += 1
    macro = float(np.mean([2 * t / (2 * t + f + m) for t, f, m in per_label.values()])) if per_label else 0.0
    example = [1.0 if not g and not p else 2 * len(g & p) / (len(g) + len(p)) for g, p in zip(gold_sets, pred_sets)]
    return {
        "micro_f1": float(micro),
        "macro_f1": macro,
        "example_f1": float(np.mean(example)) if example else 0.0,
        "precision": float(precision),
        "recall": float(recall),
    }


def bootstrap_ci(
    values_or_statistic,
    n: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Percentile bootstrap over documents: ``(estimate, low, high)``.

    Pass per-document values (the statistic is their mean), or a function ``idx -> float`` that
    computes any statistic on the documents ``idx`` together with ``n``, the number of documents.
    """
    if callable(values_or_statistic):
        if n is None:
            raise ValueError("bootstrap_ci with a statistic function needs n, the number of documents")
        statistic: Callable[[np.ndarray], float] = values_or_statistic
    else:
        values = np.asarray(values_or_statistic, dtype=np.float64)
        if not np.isfinite(values).all():
            raise CtdInputError("bootstrap_ci: values contain NaN or inf; drop or fix those documents first")
        n = len(values)
        statistic = lambda idx: float(values[idx].mean())  # noqa: E731
    if n == 0:
        return (float("nan"), float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    estimate = statistic(np.arange(n))
    draws = np.array([statistic(rng.integers(0, n, n)) for _ in range(n_boot)])
    alpha = (1 - level) / 2
    return float(estimate), float(np.quantile(draws, alpha)), float(np.quantile(draws, 1 - alpha))
