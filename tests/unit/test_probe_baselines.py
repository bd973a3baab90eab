"""The probe baselines of ``characterize`` on synthetic examples whose answers are known: the
control task is fixed per token type (Hewitt & Liang), its positive rate comes from the training
rows alone, and the selectivity CI is the paired document bootstrap of probe minus control."""

import numpy as np
import pytest

import analyses.stages.characterize as characterize
from probes.linear import split_by_document

KEY = ("phase", 0, 0)
SEED = 0


def _data(features, labels, docs, tokens, previous=None):
    """One cell of examples in probe_examples' layout (features, label, doc, current id, previous id).
    The previous ids are drawn independently of the current ones (a control task keyed on the
    previous token would then not be memorisable from features that carry the current one)."""
    if previous is None:
        previous = np.random.default_rng(99).integers(1000, 1050, len(tokens))
    return {KEY: [(f, int(y), d, int(t), int(p)) for f, y, d, t, p in zip(features, labels, docs, tokens, previous)]}


def _cell(result):
    row = result.frame.set_index(["target", "layer", "bucket"]).loc[KEY]
    assert row["status"] == "fitted"
    return row


def _documents(n_docs, rows_per_doc):
    return np.repeat([f"doc{i:02d}" for i in range(n_docs)], rows_per_doc)


def test_control_task_is_memorisable_when_features_carry_the_token_type():
    # Features = one-hot of the token type: a label fixed per type is read off them on held-out
    # documents, a label drawn per row is not (it would score near 0.5).
    rng = np.random.default_rng(1)
    docs = _documents(30, 20)
    n_types = 20
    tokens = rng.integers(0, n_types, len(docs))
    features = np.eye(n_types, dtype=np.float32)[tokens] + 0.01 * rng.standard_normal((len(docs), n_types)).astype(np.float32)
    labels = rng.random(len(docs)) < 0.5
    row = _cell(characterize.probe_table(_data(features, labels, docs, tokens), n_layers=1, n_boot=50, seed=SEED))
    assert row["control_value"] > 0.95


def test_selectivity_ci_is_the_paired_document_bootstrap(monkeypatch):
    # The label is a feature direction and the features carry no token type: the probe is good, the
    # control task is at chance, so selectivity is clearly positive.
    rng = np.random.default_rng(2)
    docs = _documents(30, 20)
    tokens = rng.integers(0, 50, len(docs))
    features = rng.standard_normal((len(docs), 8)).astype(np.float32)
    labels = (features[:, 0] + 0.5 * rng.standard_normal(len(docs)) > 0).astype(np.int64)
    fits = []
    real_fit = characterize.fit_probe_bank
    monkeypatch.setattr(characterize, "fit_probe_bank", lambda problems, masks, **kw: fits.append(real_fit(problems, masks, **kw)) or fits[-1])
    n_boot = 200
    row = _cell(characterize.probe_table(_data(features, labels, docs, tokens), n_layers=1, n_boot=n_boot, seed=SEED))
    probe_fit, control_fit = fits  # the probe bank, then the control task's bank

    # every row, scored independently of the table's code path
    test = split_by_document(docs, 0.3, SEED)
    control = characterize.control_labels(tokens, labels[~test].mean(), SEED)
    probe_ok = ((probe_fit.decision(0, features[test]) > 0) == labels[test]).astype(float)
    control_ok = ((control_fit.decision(0, features[test]) > 0) == control[test]).astype(float)
    assert row["value"] == pytest.approx(probe_ok.mean()) and row["control_value"] == pytest.approx(control_ok.mean())
    assert row["selectivity"] == pytest.approx(probe_ok.mean() - control_ok.mean())
    # paired bootstrap over test documents: the same draws as bootstrap_ci (seeded, documents sorted)
    unique, which = np.unique(docs[test], return_inverse=True)
    sums = np.bincount(which, weights=probe_ok - control_ok)
    counts = np.bincount(which).astype(float)
    draw = np.random.default_rng(SEED)
    stats = [sums[idx].sum() / counts[idx].sum() for idx in (draw.integers(0, len(unique), len(unique)) for _ in range(n_boot))]
    low, high = np.quantile(stats, [0.025, 0.975])

    lo, hi, sel = row["selectivity_ci_low"], row["selectivity_ci_high"], row["selectivity"]
    assert np.isfinite([lo, hi]).all()
    assert (lo, hi) == pytest.approx((low, high))
    assert 0 < lo <= sel <= hi and hi - lo > 0.01  # selective, and not a degenerate interval
    assert probe_ok.mean() > 0.75 and control_ok.mean() < 0.7


def test_control_rate_comes_from_training_rows(monkeypatch):
    # Held-out rows all positive, training rows 10% positive: the control task must be drawn at 0.1,
    # not at the rate of all rows (0.37 here), which would let the test labels shape the baseline.
    rng = np.random.default_rng(3)
    docs = _documents(40, 15)
    test = split_by_document(docs, 0.3, SEED)
    labels = np.ones(len(docs), dtype=np.int64)
    labels[~test] = (np.arange((~test).sum()) % 10 == 0).astype(np.int64)
    tokens = rng.integers(0, 300, len(docs))
    features = rng.standard_normal((len(docs), 4)).astype(np.float32)
    calls = []
    real_labels = characterize.control_labels
    monkeypatch.setattr(characterize, "control_labels", lambda ids, rate, seed: calls.append((rate, real_labels(ids, rate, seed))) or calls[-1][1])
    result = characterize.probe_table(_data(features, labels, docs, tokens), n_layers=1, n_boot=20, seed=SEED)
    _cell(result)
    ((rate, control),) = calls
    assert rate == pytest.approx(labels[~test].mean()) and rate == pytest.approx(0.1, abs=0.01)
    assert control[~test].mean() < 0.2  # the control labels themselves sit near 0.1 on training rows
    assert "training" in result.meta["baselines"]["control_task"]


def test_every_baseline_is_fitted_on_the_training_documents_only(monkeypatch):
    """The probe, the control task and the token baseline learn from the training documents'
    rows and are scored on the held-out documents' rows, never fitted on them."""
    rng = np.random.default_rng(3)
    docs = _documents(30, 20)
    tokens = rng.integers(0, 20, len(docs))
    features = rng.standard_normal((len(docs), 8)).astype(np.float32)
    labels = (features[:, 0] > 0).astype(np.int64)
    test = split_by_document(docs, 0.3, SEED)
    masks, token_fits = [], []
    real_fit, real_tokens = characterize.fit_probe_bank, characterize.token_identity_predict
    monkeypatch.setattr(characterize, "fit_probe_bank", lambda problems, train, **kw: masks.append([np.asarray(m).copy() for m in train]) or real_fit(problems, train, **kw))
    monkeypatch.setattr(characterize, "token_identity_predict", lambda train_tokens, train_labels, test_tokens: token_fits.append((len(train_tokens), len(test_tokens))) or real_tokens(train_tokens, train_labels, test_tokens))
    _cell(characterize.probe_table(_data(features, labels, docs, tokens), n_layers=1, n_boot=20, seed=SEED))
    assert len(masks) == 2  # the probe bank and the control task's bank
    for bank in masks:
        np.testing.assert_array_equal(bank[0], ~test)
    assert token_fits == [(int((~test).sum()), int(test.sum()))]


def test_token_baseline_reads_training_labels_not_held_out_ones():
    # Held-out rows carry the opposite label of the training rows of the same token: a baseline fitted
    # on training rows is always wrong on them; one that saw the held-out labels would be right.
    docs = _documents(30, 20)
    test = split_by_document(docs, 0.3, SEED)
    tokens = np.arange(len(docs)) % 10
    labels = (tokens % 2 == 0).astype(np.int64)
    labels[test] = 1 - labels[test]
    rng = np.random.default_rng(4)
    features = rng.standard_normal((len(docs), 4)).astype(np.float32)
    row = _cell(characterize.probe_table(_data(features, labels, docs, tokens), n_layers=1, n_boot=20, seed=SEED))
    assert row["token_baseline"] == 0.0
