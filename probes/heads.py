"""Head writes, CoarseScore and RefineScore terms, and label-margin gradients (DESIGN §2).

- Head write Δ_h(q) = z_h(q) · W_O^h, the head's addition to the residual stream at q.
- CoarseScore(h) = mean over early-phase queries of κ(h, q) · cos(Δ_h(q), anchor direction).
- RefineScore(h) = mean over late-phase queries of (attention mass to gold-label mentions −
  mass to near-miss mentions) · cos(Δ_h(q), ∇_{r_final(q)} margin(q)).

The functions here take tensors for one document and return per-(query, head) terms; averaging
over queries, documents and bootstrap draws happens in the analysis that calls them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from probes.errors import CtdNumericalError
from probes.typing import QueryHead, QueryHeadWrite, QueryResid, QueryVocab

__all__ = [
    "margin_pairs",
    "coarse_terms",
    "refine_terms",
    "label_margin",
    "margin_gradient",
    "anchor_direction",
    "distinguishing_tokens",
]


def _cos(a: Float[Tensor, "... d"], b: Float[Tensor, "... d"]) -> Float[Tensor, "..."]:
    return torch.nn.functional.cosine_similarity(a.float(), b.float().expand_as(a), dim=-1, eps=1e-12)


def coarse_terms(
    kurtosis: QueryHead,
    writes: QueryHeadWrite,
    direction: Float[Tensor, "d_model"],
) -> QueryHead:
    """κ(h, q) · cos(Δ_h(q), anchor direction) per early-phase query and head."""
    return kurtosis.float() * _cos(writes, direction)


def refine_terms(
    mass_gold: QueryHead,
    mass_near_miss: QueryHead,
    writes: QueryHeadWrite,
    margin_grad: QueryResid,
) -> QueryHead:
    """(mass to gold mentions − mass to near-miss mentions) · cos(Δ_h(q), ∇ margin(q))."""
    return (mass_gold.float() - mass_near_miss.float()) * _cos(writes, margin_grad[:, None, :])


def anchor_direction(w_u: Float[Tensor, "d_model vocab"], anchor_tokens: Sequence[int]) -> Float[Tensor, "d_model"]:
    """Mean unembedding vector of the anchor tokens: the direction that raises their logits."""
    if len(anchor_tokens) == 0:
        raise CtdNumericalError("anchor_direction: the document has no anchor tokens")
    return w_u[:, list(anchor_tokens)].float().mean(dim=1)


def distinguishing_tokens(gold: Sequence[int], other: Sequence[int]) -> tuple[int, int] | None:
    """The first position where two label tokenisations differ: (gold token, other token).

    Codes such as I50.22 and I50.21 share their first tokens ("ĠI", "50", "."): the margin between
    them is only visible where they part. None when one is a prefix of the other.
    """
    for a, b in zip(gold, other):
        if a != b:
            return int(a), int(b)
    return None


def margin_pairs(tokenizer, codes: Sequence[str], gold: Sequence[int], near: Sequence[int]) -> list[list[tuple[int, int]]]:
    """Per gold label, one (gold token, near-miss token) pair per near-miss: the first tokens where
    their codes' tokenisations (as written after a space) part (see :func:`distinguishing_tokens`).
    Gold labels with no distinguishable near-miss are left out."""
    cache: dict[int, list[int]] = {}

    def tokens(i: int) -> list[int]:
        if i not in cache:
            cache[i] = tokenizer.encode(" " + codes[i], add_special_tokens=False)
        return cache[i]

    pairs = []
    for g in gold:
        found = [p for n in near if (p := distinguishing_tokens(tokens(g), tokens(n))) is not None]
        if found:
            pairs.append(found)
    return pairs


def label_margin(
    log_probs: QueryVocab,
    pairs: Sequence[Sequence[tuple[int, int]]],
) -> Float[Tensor, "query"]:
    """margin(q) = mean over gold labels of min over their near-misses of [log p(a) − log p(b)].

    ``pairs[g]`` lists, for gold label g, one (a, b) per near-miss: the tokens where the two labels'
    tokenisations first differ (see :func:`distinguishing_tokens`). The min picks the strongest
    near-miss at each query.
    """
    terms = []
    for gold_pairs in pairs:
        if not gold_pairs:
            continue
        a = torch.as_tensor([p[0] for p in gold_pairs], device=log_probs.device)
        b = torch.as_tensor([p[1] for p in gold_pairs], device=log_probs.device)
        terms.append((log_probs[:, a] - log_probs[:, b]).min(dim=1).values)
    if not terms:
        return torch.zeros(log_probs.shape[0], dtype=log_probs.dtype, device=log_probs.device)
    return torch.stack(terms).mean(0)


def margin_gradient(
    final_resid: QueryResid,
    readout: Callable[[Tensor], Tensor],
    pairs: Sequence[Sequence[tuple[int, int]]],
) -> tuple[Float[Tensor, "query"], QueryResid]:
    """margin(q) and ∇_{r_final(q)} margin(q), by autograd through ``readout`` (final norm + unembed).

    Queries are independent (the readout acts per position), so one backward pass of the summed
    margin gives every query's gradient.
    """
    resid = final_resid.detach().float().clone().requires_grad_(True)
    with torch.enable_grad():
        logits = readout(resid.unsqueeze(0)).squeeze(0)
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        margin = label_margin(log_probs, pairs)
        (grad,) = torch.autograd.grad(margin.sum(), resid, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(resid)
    if not torch.isfinite(grad).all():
        raise CtdNumericalError("margin_gradient: non-finite gradient; check the final residuals")
    return margin.detach(), grad.detach()
