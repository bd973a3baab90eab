"""Label retrieval by embedding similarity: exact search, and an approximate index for large spaces.

The retriever scores labels by cos(e(document), e(label text)) with the packaged MiniLM. Exact
search is one matrix product (chunked); for label spaces of 100k labels and more an HNSW index
(usearch) answers top-k queries in sub-linear time. ``recall_at_k`` measures how much of the exact
top-k the index returns.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from probes.errors import CtdInputError

__all__ = ["ExactIndex", "ApproximateIndex", "build_index", "recall_at_k", "LabelRetriever"]

APPROXIMATE_FROM = 100_000


def _unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.clip(np.linalg.norm(x, axis=1, keepdims=True), 1e-12, None)


@dataclass
class ExactIndex:
    """Brute-force cosine top-k over unit vectors (chunked so memory stays bounded)."""

    vectors: np.ndarray
    chunk: int = 1024

    def __post_init__(self):
        self.vectors = _unit(self.vectors)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(indices [n, k], scores [n, k])``, best first."""
        queries = _unit(np.atleast_2d(queries))
        k = min(k, len(self.vectors))
        out_idx = np.zeros((len(queries), k), dtype=np.int64)
        out_sim = np.zeros((len(queries), k), dtype=np.float32)
        for start in range(0, len(queries), self.chunk):
            sims = queries[start : start + self.chunk] @ self.vectors.T
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
            part = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-part, axis=1, kind="stable")
            out_idx[start : start + len(sims)] = np.take_along_axis(top, order, axis=1)
            out_sim[start : start + len(sims)] = np.take_along_axis(part, order, axis=1)
        return out_idx, out_sim


@dataclass
class ApproximateIndex:
    """HNSW (usearch) cosine index; ``expansion_search`` trades speed for recall."""

    vectors: np.ndarray
    connectivity: int = 32
    expansion_add: int = 128
    expansion_search: int = 512
    threads: int = 0
    _index: object = field(init=False, repr=False)

    def __post_init__(self):
        from usearch.index import Index

        vectors = _unit(self.vectors)
        self._index = Index(ndim=vectors.shape[1], metric="cos", dtype="f32", connectivity=self.connectivity, expansion_add=self.expansion_add, expansion_search=self.expansion_search)
        self._index.add(np.arange(len(vectors), dtype=np.uint64), vectors, threads=self.threads)
        self.size = len(vectors)

    def set_expansion_search(self, expansion_search: int) -> None:
        """Change the search-time beam width without rebuilding the graph."""
        self.expansion_search = expansion_search
        self._index.expansion_search = expansion_search

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        queries = _unit(np.atleast_2d(queries))
        k = min(k, self.size)
        matches = self._index.search(queries, k, threads=self.threads)
        keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(queries), -1)
        sims = 1.0 - np.asarray(matches.distances, dtype=np.float32).reshape(len(queries), -1)
        return keys[:, :k], sims[:, :k]


def build_index(vectors: np.ndarray, kind: str = "auto", **options):
    """``exact`` below 100k vectors, ``approximate`` (HNSW) from 100k, unless ``kind`` says otherwise."""
    if kind == "auto":
        kind = "approximate" if len(vectors) >= APPROXIMATE_FROM else "exact"
    if kind == "exact":
        return ExactIndex(vectors)
    if kind == "approximate":
        return ApproximateIndex(vectors, **options)
    raise CtdInputError(f"unknown index kind {kind!r}; use exact, approximate or auto")


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int, approx_scores: np.ndarray | None = None, exact_scores: np.ndarray | None = None, tolerance: float = 1e-5) -> float:
    """Mean fraction of each query's exact top-k that the approximate top-k contains.

    With scores, ties count (the ann-benchmarks convention): a returned label is a hit when its
    similarity reaches the exact k-th similarity, so any of several labels with identical vectors
    is a correct k-th neighbour.
    """
    if approx_scores is None or exact_scores is None:
        hits = [len(set(a[:k].tolist()) & set(e[:k].tolist())) / k for a, e in zip(approx, exact)]
        return float(np.mean(hits))
    kth = np.asarray(exact_scores)[:, k - 1 : k]
    return float(np.mean((np.asarray(approx_scores)[:, :k] >= kth - tolerance).sum(axis=1) / k))


class LabelRetriever:
    """Top-k labels of a label space for document texts (MiniLM embeddings, exact or HNSW)."""

    def __init__(self, labels, kind: str = "auto", label_vectors: np.ndarray | None = None):
        from analyses.methods.embed import embed_texts

        self.labels = labels
        self.vectors = label_vectors if label_vectors is not None else embed_texts(labels.texts)
        self.index = build_index(self.vectors, kind)
