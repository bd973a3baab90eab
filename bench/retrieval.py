"""Approximate label index (usearch HNSW) against exact search: latency and recall@100, one run.

Usage: python bench/retrieval.py [--queries 200] [--synthetic 1000000] [--skip-icd]
                                [--expansion-search 256 512 1024] [--cache results/bench-retrieval]
Spaces: the full ICD-10-CM label space (74,719 labels, MiniLM embeddings of the descriptions,
queries = embeddings of generated notes) and a synthetic space of --synthetic random unit vectors
in 384 dimensions with clustered structure (queries = perturbed members).

Recall is reported two ways: by label id (the share of the exact top-k ids the index returns) and
tie-aware (the share of returned labels at least as similar as the exact k-th, the ann-benchmarks
convention), since labels with identical descriptions have identical vectors and any of them is a
correct k-th neighbour. The ICD label embeddings are cached as safetensors under --cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analyses.methods.retrieval import ApproximateIndex, ExactIndex, recall_at_k  # noqa: E402


def measure(name: str, vectors: np.ndarray, queries: np.ndarray, expansion_search: list[int], k: int = 100) -> list[dict]:
    exact = ExactIndex(vectors)
    exact.search(queries[:1], k)  # warm-up
    t1 = time.perf_counter()
    exact_idx, exact_sim = exact.search(queries, k)
    exact_s = time.perf_counter() - t1
    t0 = time.perf_counter()
    approx = ApproximateIndex(vectors)
    build_s = time.perf_counter() - t0
    rows = []
    for ef in expansion_search:
        approx.set_expansion_search(ef)
        approx.search(queries[:1], k)
        t1 = time.perf_counter()
        approx_idx, approx_sim = approx.search(queries, k)
        approx_s = time.perf_counter() - t1
        rows.append({
            "space": name,
            "labels": int(len(vectors)),
            "queries": int(len(queries)),
            "expansion_search": ef,
            "exact_ms_per_query": round(1000 * exact_s / len(queries), 3),
            "approx_ms_per_query": round(1000 * approx_s / len(queries), 3),
            "speedup": round(exact_s / approx_s, 1),
            "approx_build_s": round(build_s, 1),
            f"recall@{k}_ids": round(recall_at_k(approx_idx, exact_idx, k), 4),
            f"recall@{k}_tie_aware": round(recall_at_k(approx_idx, exact_idx, k, approx_sim, exact_sim), 4),
        })
        print(json.dumps(rows[-1]), flush=True)
    return rows


def icd_label_vectors(cache: Path, texts: list[str]) -> tuple[np.ndarray, float]:
    """MiniLM vectors of the label texts, cached (safetensors) keyed by a hash of the texts."""
    import hashlib

    from safetensors.numpy import load_file, save_file

    from analyses.methods.embed import embed_texts

    key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
    path = cache / f"icd10cm-minilm-{key}.safetensors"
    if path.exists():
        return load_file(str(path))["vectors"], 0.0
    t0 = time.perf_counter()
    vectors = embed_texts(texts, batch_size=256)
    seconds = time.perf_counter() - t0
    cache.mkdir(parents=True, exist_ok=True)
    save_file({"vectors": vectors}, str(path))
    return vectors, seconds


def clustered(n: int, d: int = 384, n_clusters: int = 2000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_clusters, d)).astype(np.float32)
    out = np.empty((n, d), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        out[start : start + m] = centres[rng.integers(0, n_clusters, m)] + 0.6 * rng.normal(size=(m, d)).astype(np.float32)
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--synthetic", type=int, default=1_000_000)
    parser.add_argument("--skip-icd", action="store_true")
    parser.add_argument("--expansion-search", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--cache", type=Path, default=Path("results/bench-retrieval"))
    args = parser.parse_args()
    results = []
    if not args.skip_icd:
        from analyses.methods.embed import embed_texts
        from analyses.tasks.icd10 import icd10cm_labels
        from analyses.tasks.notes import NoteConfig, NoteGenerator

        labels = icd10cm_labels()
        vectors, embed_s = icd_label_vectors(args.cache, labels.texts)
        n_identical = len(vectors) - len(np.unique(vectors.round(5), axis=0))
        notes = NoteGenerator(labels, NoteConfig(seed=5)).generate(args.queries)
        queries = embed_texts(list(notes["text"]))
        for r in measure("icd10cm (MiniLM)", vectors, queries, args.expansion_search):
            r["embed_labels_s"] = round(embed_s, 1)
            r["labels_with_an_identical_vector"] = int(n_identical)
            results.append(r)
    if args.synthetic:
        vectors = clustered(args.synthetic)
        rng = np.random.default_rng(1)
        queries = vectors[rng.integers(0, len(vectors), args.queries)] + 0.3 * rng.normal(size=(args.queries, vectors.shape[1])).astype(np.float32)
        results.extend(measure(f"synthetic {args.synthetic:,} (clustered, d=384)", vectors, queries, args.expansion_search))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
