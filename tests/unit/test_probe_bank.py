import numpy as np
import pytest

from probes.linear import ProbeProblem, evaluate_bank, fit_probe_bank, fit_sklearn, split_by_document


def _problems(seed=0, groups=6, n_docs=40, per_doc=12, d=24, noise=2.0):
    rng = np.random.default_rng(seed)
    problems, masks = [], []
    for g in range(groups):
        docs = np.repeat(np.arange(n_docs), per_doc).astype(str)
        w = rng.normal(size=d)
        x = rng.normal(size=(len(docs), d)).astype(np.float32) * rng.uniform(0.1, 10, size=d).astype(np.float32)
        y = ((x / x.std(0)) @ w + rng.normal(scale=noise, size=len(docs)) > 0.3).astype(int)
        problems.append(ProbeProblem((g,), x, y, docs))
        masks.append(split_by_document(docs, 0.3, seed=g))
    return problems, masks


def test_split_is_by_document():
    docs = np.repeat(np.array(["a", "b", "c", "d", "e"]), 7)
    test = split_by_document(docs, 0.4, seed=1)
    for d in np.unique(docs):
        assert len(set(test[docs == d])) == 1
    assert 0 < test.sum() < len(docs)


@pytest.mark.parametrize("solver", ["newton", "lbfgs"])
def test_probe_bank_matches_scikit_learn(solver):
    problems, test_masks = _problems()
    train = [~m for m in test_masks]
    bank = evaluate_bank(fit_probe_bank(problems, train, solver=solver), problems, test_masks)
    ref = evaluate_bank(fit_sklearn(problems, train), problems, test_masks)
    for a, b in zip(bank, ref):
        assert abs(a["accuracy"] - b["accuracy"]) <= 0.01
        assert a["accuracy"] > a["majority"]


def test_shuffled_labels_control_sits_at_chance():
    problems, test_masks = _problems(seed=1, noise=0.5)
    rng = np.random.default_rng(0)
    controls = []
    for p, m in zip(problems, test_masks):
        y = p.labels.copy()
        y[~m] = rng.permutation(y[~m])
        controls.append(ProbeProblem(p.key, p.features, y, p.documents))
    train = [~m for m in test_masks]
    real = evaluate_bank(fit_probe_bank(problems, train), problems, test_masks)
    ctrl = evaluate_bank(fit_probe_bank(controls, train), problems, test_masks)
    assert np.mean([r["accuracy"] for r in real]) > 0.85
    chance = np.mean([max(p.labels[m].mean(), 1 - p.labels[m].mean()) for p, m in zip(problems, test_masks)])
    assert np.mean([c["accuracy"] for c in ctrl]) < chance + 0.1


def test_non_finite_features_are_refused_with_the_group():
    from probes.errors import CtdNumericalError
    from probes.linear import ProbeProblem

    features = np.ones((4, 3), np.float32)
    features[2, 1] = np.inf
    with pytest.raises(CtdNumericalError, match=r"probe group \('phase', 2, 0\): features contain NaN or inf"):
        ProbeProblem(("phase", 2, 0), features, np.array([0, 1, 0, 1]), np.array(["a", "a", "b", "b"]))


def test_more_features_than_rows_still_solves_and_matches_scikit_learn():
    # Low-precision Hessians of rank-deficient groups can lose definiteness; the solve must recover.
    rng = np.random.default_rng(3)
    problems, masks = [], []
    for g in range(6):
        n, d = 40, 120
        x = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.1, 50, size=d).astype(np.float32)
        y = (x[:, 0] + x[:, 1] > 0).astype(int)
        problems.append(ProbeProblem(("p", g, 0), x, y, np.repeat(np.arange(n // 2), 2).astype(str)))
        masks.append(np.ones(n, bool))
    bank = fit_probe_bank(problems, masks)
    reference = fit_sklearn(problems, masks)
    for g, p in enumerate(problems):
        ours = (bank.decision(g, p.features) > 0).astype(int)
        theirs = (reference.decision(g, p.features) > 0).astype(int)
        assert (ours == theirs).mean() >= 0.99
