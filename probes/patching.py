"""Activation patching of chosen attention heads: denoise and noise, with controls (DESIGN §2).

Clean run x and corrupted run x' have the same token count (the corruption swaps anchor tokens for
another document's, token for token), so every position lines up. A head is patched by replacing
its ``hook_z`` (head output) or its ``hook_pattern`` rows at chosen positions with the other run's:

- denoise: clean activations of the chosen heads written into the corrupted run;
- noise: corrupted activations of the chosen heads written into the clean run.

Patches apply to the positions of the teacher-forced prefix only; tokens generated after the
patched point run unpatched, so "regenerating from the patched point" shows what the patched
computation leads the model to write.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from probes.errors import CtdInputError

__all__ = ["HeadSet", "collect_head_activations", "patched", "patched_logits", "patched_generate", "control_head_sets", "ks_for"]

Head = tuple[int, int]


@dataclass(frozen=True)
class HeadSet:
    """A named set of heads to patch: ``name`` in (ranked, random-<seed>, lowest)."""

    name: str
    k: int
    heads: tuple[Head, ...]


def ks_for(n_heads_total: int, ks: Sequence[int] = (3, 8, 16, 40, 100)) -> list[int]:
    """The k grid capped at the number of heads (duplicates after capping removed)."""
    return sorted({min(k, n_heads_total) for k in ks})


def control_head_sets(ranking: Sequence[Head], k: int, n_random: int = 3, seed: int = 0) -> list[HeadSet]:
    """The top-k heads of ``ranking`` (best first), ``n_random`` seeded draws of k heads without
    replacement, and the k lowest-ranked heads."""
    ranking = list(ranking)
    if k > len(ranking):
        raise CtdInputError(f"k={k} but only {len(ranking)} heads are ranked")
    sets = [HeadSet("ranked", k, tuple(ranking[:k]))]
    for draw in range(n_random):
        rng = np.random.default_rng([seed, k, draw])
        pick = rng.choice(len(ranking), size=k, replace=False)
        sets.append(HeadSet(f"random-{draw}", k, tuple(ranking[i] for i in sorted(pick))))
    sets.append(HeadSet("lowest", k, tuple(ranking[-k:])))
    return sets


def collect_head_activations(bridge, token_ids: Int[Tensor, "1 pos"], layers: Sequence[int], what: str = "z") -> dict[int, Tensor]:
    """``hook_z`` [pos, head, d_head] or ``hook_pattern`` [head, q, k] of each layer, batch of one."""
    name = {"z": "attn.hook_z", "pattern": "attn.hook_pattern"}[what]
    out: dict[int, Tensor] = {}

    def grab(layer):
        def hook(tensor, hook):
            out[layer] = tensor[0].detach().clone()

        return hook

    with torch.no_grad():
        bridge.run_with_hooks(token_ids, fwd_hooks=[(f"blocks.{l}.{name}", grab(l)) for l in layers], return_type=None)
    return out


@contextmanager
def patched(bridge, heads: Sequence[Head], source: dict[int, Tensor], positions: Sequence[int] | Tensor, what: str = "z", prefix_length: int | None = None) -> Iterator[None]:
    """Within the context, the given heads' ``z`` (or pattern rows) at ``positions`` come from ``source``.

    ``prefix_length``: patch only forward passes that see exactly this many positions (the
    teacher-forced prefix), so cached decoding steps of a generation run unpatched.
    """
    by_layer: dict[int, list[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, []).append(head)
    pos = torch.as_tensor(list(positions), dtype=torch.long)
    name = {"z": "attn.hook_z", "pattern": "attn.hook_pattern"}[what]

    def make(layer: int, head_list: list[int]):
        idx = torch.as_tensor(head_list, dtype=torch.long)

        def hook(tensor, hook):
            if what == "z":
                if prefix_length is not None and tensor.shape[1] != prefix_length:
                    return tensor
                patched_t = tensor.clone()
                src = source[layer].to(tensor.dtype)
                patched_t[:, pos[:, None], idx[None, :]] = src[pos[:, None], idx[None, :]]
                return patched_t
            if prefix_length is not None and tensor.shape[2] != prefix_length:
                return tensor
            if source[layer].shape[-1] != tensor.shape[-1]:
                raise CtdInputError("pattern patching needs runs of equal length")
            patched_t = tensor.clone()
            src = source[layer].to(tensor.dtype)
            patched_t[:, idx[:, None], pos[None, :], :] = src[idx[:, None], pos[None, :], :]
            return patched_t

        return hook

    hooks = [(f"blocks.{l}.{name}", make(l, hs)) for l, hs in by_layer.items()]
    with bridge.hooks(fwd_hooks=hooks):
        yield


def patched_logits(bridge, token_ids: Int[Tensor, "1 pos"], heads: Sequence[Head], source: dict[int, Tensor], positions, what: str = "z") -> Float[Tensor, "pos vocab"]:
    """Logits of a teacher-forced run with the heads patched."""
    with torch.no_grad(), patched(bridge, heads, source, positions, what):
        return bridge(token_ids)[0]


def patched_generate(bridge, prefix_ids: Int[Tensor, "1 pos"], heads: Sequence[Head], source: dict[int, Tensor], positions, max_new_tokens: int, eos_token_id: int | None = None, what: str = "z") -> list[int]:
    """Greedy continuation of ``prefix_ids`` with the heads patched over the prefix (KV-cached)."""
    with torch.no_grad(), patched(bridge, heads, source, positions, what, prefix_length=prefix_ids.shape[1]):
        out = bridge.generate(prefix_ids, max_new_tokens=max_new_tokens, do_sample=False, use_past_kv_cache=True, stop_at_eos=eos_token_id is not None, eos_token_id=eos_token_id, verbose=False, return_type="tokens")
    new = out[0, prefix_ids.shape[1] :].tolist()
    if eos_token_id is not None and eos_token_id in new:
        new = new[: new.index(eos_token_id)]
    return new
