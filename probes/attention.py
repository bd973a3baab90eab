"""Attention statistics computed once, for capture, scores and losses alike.

- :func:`doc_kurtosis`: Pearson kurtosis of a head's weights over the document's keys;
- :func:`attention_reductions`: attention mass per key region, document-key kurtosis and
  value-weighted mass, read from a full pattern at chosen queries (inside a capture hook);
- :func:`value_gram` / :func:`head_value_norms`: ||v_k W_O^h|| per key without forming the write.
"""

from __future__ import annotations

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probes.errors import CtdInputError
from probes.typing import KeyMask, Pattern

__all__ = ["doc_kurtosis", "attention_reductions", "value_gram", "head_value_norms", "heads_view"]

# Pattern elements per block of query rows in attention_reductions: 16 MB as float32, fastest of
# 4-32 MB measured at a 1.5B shape on 4k tokens (2 CPU cores).
_BLOCK_ELEMENTS = 1 << 22


def heads_view(z: Tensor, n_heads: int) -> Tensor:
    """``hook_z`` as [batch, pos, head, d_head]. The bridge shapes it by its config's head size,
    which for latent attention (DeepSeek-V3: value heads wider than rope heads) is not the value
    head size; the heads are the leading split of the concatenated output, as W_O reads them."""
    return z.reshape(*z.shape[:2], n_heads, -1)


def doc_kurtosis(weights: Float[Tensor, "... key"], key_mask: Bool[Tensor, "... key"]) -> Float[Tensor, "..."]:
    """Pearson kurtosis (normal = 3) of ``weights`` over the keys where ``key_mask`` is set.

    Flat weights (zero variance) and fewer than two keys give 0: no sharp focus.
    """
    m = key_mask.to(weights.dtype)
    n = m.sum(-1).clamp(min=1)
    mean = (weights * m).sum(-1) / n
    centred = (weights - mean.unsqueeze(-1)) * m
    m2 = centred.pow(2).sum(-1) / n
    m4 = centred.pow(4).sum(-1) / n
    kurt = m4 / m2.pow(2).clamp(min=1e-30)
    # Variance below float rounding of the mean counts as flat.
    flat = m2 <= (1e-6 * mean.abs()).pow(2) + 1e-30
    return torch.where(~flat & (m.sum(-1) > 1), kurt, torch.zeros_like(kurt))


def attention_reductions(
    pattern: Pattern,
    query_index: Int[Tensor, "batch nq"],
    key_regions: Int[Tensor, "batch key"],
    document_mask: KeyMask,
    n_regions: int,
    value_norms: Float[Tensor, "batch head key"] | None = None,
    query_window: int | None = None,
) -> dict[str, Tensor]:
    """Reduce a full attention pattern at chosen queries (indices into the padded batch).

    Returns ``region_mass`` [batch, nq, head, region], ``doc_kurtosis`` [batch, nq, head] and,
    with ``value_norms``, ``value_mass`` [batch, nq, head, region].

    ``query_window=w`` says every query lies in the last ``w`` positions (output tokens under left
    padding): the reductions then read that slice of the pattern in place; otherwise the query rows
    are gathered one block at a time. Region sums and value-weighted sums are matrix products of
    the rows with per-key indicator columns; the kurtosis reads only the document's keys. Both run
    over blocks of query rows, so the float32 copy of a block stays in cache and the extra memory
    does not grow with the square of the trace's length.
    """
    b, h, n_queries, k = pattern.shape
    if query_window is not None:
        start = n_queries - query_window
        rows = pattern[:, :, start:, :]  # a view: no copy of the pattern
        if bool((query_index < start).any()):
            raise CtdInputError(f"attention_reductions: a query lies before the window of the last {query_window} positions")
        local_index = query_index - start
        n_rows = rows.shape[2]
    else:  # the query rows are gathered one block at a time
        rows, local_index, n_rows = None, None, query_index.shape[1]
    onehot = torch.zeros(b, k, n_regions, dtype=torch.float32, device=pattern.device)
    valid = key_regions >= 0
    onehot[valid.nonzero(as_tuple=True) + (key_regions[valid],)] = 1.0
    columns = onehot[:, None].expand(b, h, k, n_regions)
    if value_norms is not None:
        columns = torch.cat([columns, value_norms.float().unsqueeze(-1) * onehot[:, None]], dim=-1)
    # the document's keys, first in position order, padded to the longest document of the batch
    n_doc = document_mask.sum(-1)
    width = int(n_doc.max()) if b else 0
    doc_keys = torch.sort((~document_mask).to(torch.int8), dim=-1, stable=True).indices[:, :width]
    doc_valid = (torch.arange(width, device=pattern.device)[None] < n_doc[:, None])[:, None, None, :]
    sums = torch.empty(b, h, n_rows, columns.shape[-1], dtype=torch.float32, device=pattern.device)
    kurt = torch.empty(b, h, n_rows, dtype=torch.float32, device=pattern.device)
    step = max(1, _BLOCK_ELEMENTS // max(h * k, 1))
    for s in range(0, n_rows, step):
        if rows is not None:
            block = rows[:, :, s : s + step]
        else:
            picked = query_index[:, s : s + step]
            block = pattern.gather(2, picked[:, None, :, None].expand(b, h, picked.shape[1], k))
        torch.matmul(block.float(), columns, out=sums[:, :, s : s + step])
        on_doc = block.gather(3, doc_keys[:, None, None, :].expand(b, h, block.shape[2], width)).float()
        kurt[:, :, s : s + step] = doc_kurtosis(on_doc, doc_valid)
    out = {"region_mass": sums[..., :n_regions].permute(0, 2, 1, 3), "doc_kurtosis": kurt.permute(0, 2, 1)}
    if value_norms is not None:
        out["value_mass"] = sums[..., n_regions:].permute(0, 2, 1, 3)
    if local_index is not None:  # back to one entry per requested query
        out = {name: t.gather(1, local_index.view(b, -1, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:])) for name, t in out.items()}
    return out


def value_gram(w_o: Float[Tensor, "head d_head d_model"]) -> Float[Tensor, "head d_head d_head"]:
    """W_O^h (W_O^h)^T per head: ||v W_O^h||^2 = v^T G_h v without forming the d_model-wide write."""
    w = w_o.float()
    return torch.einsum("hdm,hem->hde", w, w)


def head_value_norms(v: Float[Tensor, "batch pos kv_head d_head"], w_o: Float[Tensor, "head d_head d_model"], gram: Tensor | None = None) -> Float[Tensor, "batch head pos"]:
    """||v_k W_O^h|| per head and key: what head h would write if it attended only to key k."""
    gram = value_gram(w_o) if gram is None else gram
    n_heads, d_head = gram.shape[0], gram.shape[1]
    b, p, n_kv, _ = v.shape
    group = n_heads // n_kv  # grouped-query attention: head h reads kv head h // group
    vf = v.float()
    projected = torch.einsum("bpkd,kgde->bpkge", vf, gram.view(n_kv, group, d_head, d_head))
    squared = torch.einsum("bpkge,bpke->bkgp", projected, vf).reshape(b, n_heads, p)
    return squared.clamp(min=0).sqrt()


