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


def test_auto_takes_the_faster_path_for_the_device_and_says_so():
    problems, test_masks = _problems(groups=3)
    train = [~m for m in test_masks]
    fit = fit_probe_bank(problems, train, device="cpu")
    assert fit.solver.startswith("sklearn")  # measured faster than the batched Newton bank on CPUs
    reference = evaluate_bank(fit_sklearn(problems, train, n_jobs=1), problems, test_masks)
    for a, b in zip(evaluate_bank(fit, problems, test_masks), reference):
        assert a["accuracy"] == b["accuracy"]  # threads change nothing but the wall time
    assert fit_probe_bank(problems, train, solver="newton", device="cpu").solver == "newton (cpu)"


def test_token_identity_baseline_and_control_task():
    from analyses.stages.characterize import control_labels, token_identity_predict

    rng = np.random.default_rng(0)
    cur = rng.integers(0, 30, size=400)
    prev = rng.integers(0, 30, size=400)
    tokens = np.stack([cur, prev], axis=1)
    # a label that is a function of the current token alone: the lookup recovers it exactly
    y = (cur % 3 == 0).astype(int)
    pred = token_identity_predict(tokens[:300], y[:300], tokens[300:])
    assert (pred == y[300:]).mean() == 1.0
    # a label that depends on the pair: the pair lookup wins over the current token's majority
    y_pair = ((cur + prev) % 2).astype(int)
    seen = token_identity_predict(tokens, y_pair, tokens)
    assert (seen == y_pair).mean() > 0.95
    # an unseen token backs off to the training majority
    assert token_identity_predict(tokens[:10], np.ones(10, int), np.array([[999, 998]]))[0] == 1
    # control task: one label per token type, at the requested rate
    labels = control_labels(cur, 0.3, seed=1)
    for t in np.unique(cur):
        assert len(set(labels[cur == t])) == 1
    assert 0.1 < labels.mean() < 0.5
    assert (control_labels(cur, 0.3, seed=1) == labels).all()
