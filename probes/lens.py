"""Logit lens on label tokens: how early each layer's residual stream already favours a label.

The stored residual of layer l is read out through the model's own final norm and unembedding
(``bridge.ln_final`` then ``bridge.unembed``: the same numerics as the model's logits, which a
parity test checks), giving the log-probability and the rank of chosen tokens at each position.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.typing import QueryResid

__all__ = ["readout_of", "lens_scores"]


def readout_of(bridge) -> Callable[[Tensor], Tensor]:
    """Final norm + unembedding of a TransformerBridge, as one function of [batch, pos, d_model]."""

    def readout(resid: Tensor) -> Tensor:
        return bridge.unembed(bridge.ln_final(resid))

    return readout


def lens_scores(
    resid: QueryResid,
    readout: Callable[[Tensor], Tensor],
    tokens: Sequence[int],
    chunk: int = 256,
) -> tuple[Float[Tensor, "query token"], Int[Tensor, "query token"]]:
    """Log-probability and rank (0 = top) of each of ``tokens`` at each query position."""
    logps, ranks = [], []
    index = torch.as_tensor(list(tokens), dtype=torch.long)
    with torch.no_grad():
        for start in range(0, resid.shape[0], chunk):
            logits = readout(resid[start : start + chunk].float().unsqueeze(0)).squeeze(0).float()
            lp = torch.log_softmax(logits, dim=-1)
            chosen = lp[:, index]
            logps.append(chosen)
            ranks.append((lp.unsqueeze(1) > chosen.unsqueeze(-1)).sum(-1))
    return torch.cat(logps), torch.cat(ranks)
