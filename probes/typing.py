"""Tensor shape aliases, defined once and used in every public signature (STYLE §2)."""

from __future__ import annotations

from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "TokenIds",
    "AttentionMask",
    "Logits",
    "Pattern",
    "KeyMask",
    "QueryResid",
    "QueryHead",
    "QueryHeadWrite",
    "QueryVocab",
]

# a batch of sequences
TokenIds = Int[Tensor, "batch pos"]
AttentionMask = Int[Tensor, "batch pos"]
Logits = Float[Tensor, "batch pos vocab"]
Pattern = Float[Tensor, "batch head query key"]
KeyMask = Bool[Tensor, "batch key"]
# the queries (CoT positions) of one trace
QueryResid = Float[Tensor, "query d_model"]
QueryHead = Float[Tensor, "query head"]
QueryHeadWrite = Float[Tensor, "query head d_model"]
QueryVocab = Float[Tensor, "query vocab"]
