"""Tensor shape aliases, defined once and used in every public signature (STYLE §2)."""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "TokenIds",
    "AttentionMask",
    "Logits",
    "Resid",
    "HeadZ",
    "Pattern",
    "HeadWrite",
    "PerHeadQuery",
]

TokenIds = Int[Tensor, "batch pos"]
AttentionMask = Int[Tensor, "batch pos"]
Logits = Float[Tensor, "batch pos vocab"]
Resid = Float[Tensor, "batch pos d_model"]
HeadZ = Float[Tensor, "batch pos head d_head"]
Pattern = Float[Tensor, "batch head query key"]
HeadWrite = Float[Tensor, "batch pos head d_model"]
PerHeadQuery = Float[Tensor, "batch head query"]
KeyMask = Bool[Tensor, "batch key"]
