import numpy as np

from analyses.retrieval import ApproximateIndex, ExactIndex, build_index, recall_at_k


def test_exact_search_is_exact():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(500, 16)).astype(np.float32)
    queries = rng.normal(size=(7, 16)).astype(np.float32)
    idx, sims = ExactIndex(vectors, chunk=3).search(queries, 10)
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    ref = np.argsort(-(q @ unit.T), axis=1)[:, :10]
    assert (idx == ref).all()
    assert np.all(np.diff(sims, axis=1) <= 1e-6)


def test_approximate_index_keeps_recall():
    rng = np.random.default_rng(1)
    centres = rng.normal(size=(50, 32))
    vectors = (centres[rng.integers(0, 50, 20_000)] + 0.5 * rng.normal(size=(20_000, 32))).astype(np.float32)
    queries = vectors[:50] + 0.1 * rng.normal(size=(50, 32)).astype(np.float32)
    exact, _ = ExactIndex(vectors).search(queries, 100)
    approx, _ = ApproximateIndex(vectors).search(queries, 100)
    assert recall_at_k(approx, exact, 100) >= 0.95
    assert isinstance(build_index(vectors), ExactIndex)
    assert recall_at_k(exact, exact, 100) == 1.0
