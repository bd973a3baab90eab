import numpy as np
import pytest

from analyses.methods.retrieval import ApproximateIndex, ExactIndex, build_index, recall_at_k


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


def test_tie_aware_recall_counts_any_of_several_identical_kth_neighbours():
    from analyses.methods.retrieval import recall_at_k

    exact_ids = np.array([[0, 1, 2]])
    exact_sims = np.array([[0.9, 0.8, 0.7]])
    # Label 5 has the same vector as label 2: returning it instead is not a miss.
    approx_ids, approx_sims = np.array([[0, 1, 5]]), np.array([[0.9, 0.8, 0.7]])
    assert recall_at_k(approx_ids, exact_ids, 3) == pytest.approx(2 / 3)
    assert recall_at_k(approx_ids, exact_ids, 3, approx_sims, exact_sims) == 1.0
    # A genuinely worse third neighbour is a miss either way.
    assert recall_at_k(approx_ids, exact_ids, 3, np.array([[0.9, 0.8, 0.6]]), exact_sims) == pytest.approx(2 / 3)


def test_search_width_can_change_without_rebuilding():
    from analyses.methods.retrieval import ApproximateIndex, ExactIndex, recall_at_k

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(3000, 16)).astype(np.float32)
    queries = rng.normal(size=(20, 16)).astype(np.float32)
    index = ApproximateIndex(vectors, connectivity=4, expansion_add=8, expansion_search=10)
    exact, _ = ExactIndex(vectors).search(queries, 50)
    narrow = recall_at_k(index.search(queries, 50)[0], exact, 50)
    index.set_expansion_search(400)
    wide = recall_at_k(index.search(queries, 50)[0], exact, 50)
    assert wide >= narrow and wide > 0.95
