import math

import numpy as np
import pytest
import scipy.sparse as sp
from sklearn.metrics import f1_score, precision_score, recall_score
from sklearn.preprocessing import MultiLabelBinarizer

from analyses.tasks.metrics import bootstrap_ci, inverse_propensity, set_metrics, top_k, xmc_metrics, xmc_metrics_ci
from probes.errors import CtdInputError


def test_hand_worked_precision_ndcg_recall():
    gold = np.array([[1, 0, 1, 0], [0, 1, 0, 0]])
    scores = np.array([[0.9, 0.8, 0.1, 0.0], [0.1, 0.2, 0.3, 0.4]])
    m = xmc_metrics(gold, scores, ks=(1, 2, 3))
    # Row 0 ranks 0 (hit), 1 (miss), 2 (hit); row 1 ranks 3, 2, 1 (hit at rank 3).
    assert m["P@1"] == pytest.approx((1 + 0) / 2)
    assert m["P@3"] == pytest.approx((2 / 3 + 1 / 3) / 2)
    assert m["R@2"] == pytest.approx((1 / 2 + 0) / 2)
    assert m["R@3"] == pytest.approx((1 + 1) / 2)
    d = lambda r: 1 / math.log2(r + 1)  # noqa: E731
    ndcg3_row0 = (d(1) + d(3)) / (d(1) + d(2))
    ndcg3_row1 = d(3) / d(1)
    assert m["nDCG@3"] == pytest.approx((ndcg3_row0 + ndcg3_row1) / 2)


def test_rows_without_gold_count_as_zero():
    gold = np.array([[1, 0, 0], [0, 0, 0]])
    scores = np.array([[1.0, 0.0, 0.0], [1.0, 0.5, 0.2]])
    m = xmc_metrics(gold, scores, ks=(1,), train_label_counts=[3, 1, 1], n_train=10)
    for key in ("P@1", "nDCG@1", "R@1"):
        assert m[key] == pytest.approx(0.5), key
    # PSP is a ratio of means (pyxclib): an empty row adds 0 to both, so a perfect row stays 1.
    assert m["PSP@1"] == pytest.approx(1.0) and m["PSnDCG@1"] == pytest.approx(1.0)


def test_fewer_than_k_scored_labels_count_as_misses():
    gold = sp.csr_matrix(np.array([[1, 1, 1, 0, 0, 0]]))
    scores = sp.csr_matrix(np.array([[0.9, 0.0, 0.0, 0.0, 0.0, 0.0]]))  # only label 0 is scored
    m = xmc_metrics(gold, scores, ks=(1, 5))
    assert m["P@1"] == 1.0
    assert m["P@5"] == pytest.approx(1 / 5)
    assert m["R@5"] == pytest.approx(1 / 3)
    idx, filled = top_k(scores, 5)
    assert filled.sum() == 1 and idx[0, 0] == 0


def test_label_seen_once_has_inverse_propensity_ln_n():
    for n in (10, 1000, 123456):
        w = inverse_propensity([1], n_train=n, A=0.55, B=1.5)
        assert w[0] == pytest.approx(math.log(n), rel=1e-12)
    # and the same holds for other A, B
    assert inverse_propensity([1], 500, A=0.6, B=2.6)[0] == pytest.approx(math.log(500))


def test_psp_perfect_prediction_is_one_and_hand_worked():
    gold = np.array([[1, 0, 1, 0], [0, 1, 0, 0]])
    counts, n = np.array([1, 50, 5, 0]), 100
    w = inverse_propensity(counts, n)
    perfect = gold * 1.0
    m = xmc_metrics(gold, perfect + np.array([0.5, 0, 0, 0]), ks=(1, 3), train_label_counts=counts, n_train=n)
    assert m["PSP@3"] == pytest.approx(1.0)
    assert m["PSnDCG@3"] == pytest.approx(1.0)
    # The same hits with the rarer label ranked second lose PSnDCG but not PSP.
    swapped = xmc_metrics(gold, perfect + np.array([0, 0, 0.5, 0]), ks=(3,), train_label_counts=counts, n_train=n)
    assert swapped["PSP@3"] == pytest.approx(1.0) and swapped["PSnDCG@3"] < 1.0
    scores = np.array([[0.1, 0.9, 0.8, 0.0], [0.0, 0.0, 0.0, 1.0]])
    m = xmc_metrics(gold, scores, ks=(1, 2), train_label_counts=counts, n_train=n)
    # @1: no hits. @2: row 0 hits label 2; best row 0 is w0 + w2, best row 1 is w1.
    assert m["PSP@1"] == 0.0
    assert m["PSP@2"] == pytest.approx((w[2] / 2) / ((w[0] + w[2]) / 2 + w[1] / 2))
    d2 = 1 / math.log2(3)
    num = (w[2] * d2) / (1 + d2)
    den = (w[0] + w[2] * d2) / (1 + d2) + w[1] / 1
    assert m["PSnDCG@2"] == pytest.approx(num / den)


def test_dense_and_csr_agree_and_ties_break_by_index():
    rng = np.random.default_rng(0)
    gold = (rng.random((30, 40)) < 0.1).astype(int)
    scores = np.round(rng.random((30, 40)), 1)  # many ties
    scores[scores < 0.3] = 0
    dense = xmc_metrics(gold, np.where(scores > 0, scores, -np.inf), ks=(1, 3, 5), train_label_counts=gold.sum(0), n_train=30)
    csr = xmc_metrics(sp.csr_matrix(gold), sp.csr_matrix(scores), ks=(1, 3, 5), train_label_counts=gold.sum(0), n_train=30)
    assert dense == pytest.approx(csr)
    idx, _ = top_k(np.array([[0.5, 0.7, 0.7, 0.5]]), 4)
    assert idx.tolist() == [[1, 2, 0, 3]]


def test_bad_shapes_are_input_errors():
    with pytest.raises(CtdInputError, match="shape"):
        xmc_metrics(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(CtdInputError, match="both"):
        xmc_metrics(np.zeros((2, 3)), np.zeros((2, 3)), train_label_counts=[1, 1, 1])


def test_set_metrics_match_scikit_learn():
    rng = np.random.default_rng(1)
    gold = [set(rng.choice(12, rng.integers(1, 4), replace=False).tolist()) for _ in range(40)]
    pred = [set(rng.choice(12, rng.integers(0, 4), replace=False).tolist()) for _ in range(40)]
    mlb = MultiLabelBinarizer(classes=list(range(12))).fit([range(12)])
    G, P = mlb.transform(gold), mlb.transform(pred)
    m = set_metrics(gold, pred)
    assert m["micro_f1"] == pytest.approx(f1_score(G, P, average="micro"))
    assert m["precision"] == pytest.approx(precision_score(G, P, average="micro"))
    assert m["recall"] == pytest.approx(recall_score(G, P, average="micro"))
    occurring = sorted(set().union(*gold, *pred))
    assert m["macro_f1"] == pytest.approx(f1_score(G[:, occurring], P[:, occurring], average="macro"))
    assert m["example_f1"] == pytest.approx(f1_score(G, P, average="samples", zero_division=1.0))
    assert set_metrics(G, P) == pytest.approx(m)  # matrices give the same answer as sets


def test_bootstrap_ci_is_seeded_and_brackets_the_estimate():
    values = np.random.default_rng(2).random(200)
    a = bootstrap_ci(values, seed=3)
    assert a == bootstrap_ci(values, seed=3)
    assert a[1] < a[0] < a[2]
    assert a[0] == pytest.approx(values.mean())
    with pytest.raises(CtdInputError, match="NaN"):
        bootstrap_ci([1.0, float("nan")])
    gold = np.eye(5)
    ci = xmc_metrics_ci(gold, gold, ks=(1,), n_boot=50)
    assert ci["P@1"] == (1.0, 1.0, 1.0)
