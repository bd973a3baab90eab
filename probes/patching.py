"""Activation patching of attention heads: every head's effect, by sweep or by attribution (DESIGN §2).

A clean run x and a corrupted run x' of the same trace have the same token count (the corruption
swaps tokens one for one), so positions line up. A head is patched by writing the other run's
``hook_z`` (its output before W_O) or ``hook_pattern`` rows at chosen positions:

- denoise: clean activations written into the corrupted run; recovery = (patched - corrupt) / (clean - corrupt);
- noise: corrupted activations written into the clean run; damage = (clean - patched) / (clean - corrupt).

Read-outs (:class:`TokenReadout`) are teacher-forced log-probabilities at chosen positions, so one
forward scores every trace of a batch. Patching every head's ``z`` at every position recovers the
clean run exactly at positions that were not corrupted (a tested invariant); patterns are
different (values at corrupted positions still differ).

Two ways to get every head's effect:

- :func:`head_sweep`: one head at a time, one batched forward per head and mode (exact);
- :func:`attribution_patching`: activation difference x gradient (Nanda 2023; Syed et al. 2023),
  one forward and one backward per run and read-out for all heads at once (for models too large
  to sweep); optionally averaged over points between the runs (``steps`` > 1, integrated gradients).

Patching ``z`` runs under fused attention (:mod:`probes.fused`): no layer's T x T pattern is built,
and attribution's backward goes through the fused kernel (which recomputes the pattern) with each
block's activations recomputed rather than kept, so its memory grows linearly with the trace.
Patching ``pattern`` needs the pattern itself, so it runs eager.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float
from torch import Tensor

from probes.attention import heads_view
from probes.typing import AttentionMask, Logits, TokenIds
from probes.errors import CtdInputError
from probes.fused import fused_attention, returning_freed_memory
from probes.points import hook_name

__all__ = [
    "Head",
    "HeadSet",
    "PatchInputs",
    "TokenReadout",
    "head_activations",
    "patch_hooks",
    "readout_values",
    "head_sweep",
    "head_masks",
    "head_set_effects",
    "attribution_patching",
    "patched_generate",
    "head_output_means",
    "ablated_generate",
    "control_head_sets",
    "ks_for_heads",
    "normalised_effect",
    "PATCH_TARGETS",
    "MODES",
]

Head = tuple[int, int]
MODES = ("denoise", "noise")
PATCH_TARGETS = {"z": "z", "pattern": "pattern"}


@dataclass(frozen=True)
class HeadSet:
    """A named set of heads to patch: ``name`` in (ranked, random-<draw>, lowest)."""

    name: str
    k: int
    heads: tuple[Head, ...]


def ks_for_heads(n_heads_total: int) -> list[int]:
    """The k grid for comparing a ranked head set with random sets, scaled to the model.

    Up to 64 heads: k = 1, 2, 3, 4 (a small share of the heads, so ranked and random sets differ);
    larger models: 0.06%, 0.2%, 0.5%, 1% and 2% of the heads (DESIGN §2).
    """
    if n_heads_total <= 64:
        return [k for k in (1, 2, 3, 4) if 2 * k < n_heads_total]
    return sorted({max(1, int(round(f * n_heads_total))) for f in (0.0006, 0.002, 0.005, 0.01, 0.02)})


def control_head_sets(ranking: Sequence[Head], k: int, n_random: int = 3, seed: int = 0) -> list[HeadSet]:
    """The top-k heads of ``ranking`` (best first), ``n_random`` seeded draws of k heads from the
    heads outside the top k (a random set never contains a ranked head), and the k lowest-ranked."""
    ranking = list(ranking)
    if 2 * k > len(ranking):
        raise CtdInputError(f"k={k} but only {len(ranking)} heads are ranked: ranked and lowest sets would overlap")
    top, rest = ranking[:k], ranking[k:]
    sets = [HeadSet("ranked", k, tuple(top))]
    for draw in range(n_random):
        rng = np.random.default_rng([seed, k, draw])
        pick = rng.choice(len(rest), size=k, replace=False)
        sets.append(HeadSet(f"random-{draw}", k, tuple(rest[i] for i in sorted(pick))))
    sets.append(HeadSet("lowest", k, tuple(ranking[-k:])))
    return sets


@dataclass
class PatchInputs:
    """Clean and corrupted token ids of the same traces, left-padded into one batch.

    ``offsets[b]`` is where trace b's first token sits in the padded row; each trace's clean and
    corrupted sequences have the same length (the corruption swaps tokens one for one).
    """

    clean: TokenIds
    corrupt: TokenIds
    attention_mask: AttentionMask
    position_ids: TokenIds
    offsets: np.ndarray
    lengths: np.ndarray

    @classmethod
    def from_sequences(cls, clean: Sequence[Sequence[int]], corrupt: Sequence[Sequence[int]], pad_id: int) -> "PatchInputs":
        if len(clean) != len(corrupt) or any(len(a) != len(b) for a, b in zip(clean, corrupt)):
            raise CtdInputError("patching: each clean and corrupted sequence must have the same length (swap tokens one for one)")
        width = max(len(s) for s in clean)
        ids = {name: torch.full((len(clean), width), pad_id, dtype=torch.long) for name in ("clean", "corrupt")}
        mask = torch.zeros((len(clean), width), dtype=torch.long)
        offsets = np.zeros(len(clean), dtype=np.int64)
        for i, (a, b) in enumerate(zip(clean, corrupt)):
            o = width - len(a)
            ids["clean"][i, o:] = torch.as_tensor(list(a))
            ids["corrupt"][i, o:] = torch.as_tensor(list(b))
            mask[i, o:] = 1
            offsets[i] = o
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        return cls(ids["clean"], ids["corrupt"], mask, position_ids, offsets, np.array([len(s) for s in clean]))

    def select(self, rows: Sequence[int]) -> "PatchInputs":
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        return PatchInputs(self.clean[idx], self.corrupt[idx], self.attention_mask[idx], self.position_ids[idx], self.offsets[list(rows)], self.lengths[list(rows)])

    def position_mask(self, positions: Sequence[Sequence[int]] | None = None) -> Bool[Tensor, "batch pos"]:
        """Where patches apply: per trace, positions in its own (unpadded) coordinates; None = every real token."""
        if positions is None:
            return self.attention_mask.bool()
        mask = torch.zeros_like(self.attention_mask, dtype=torch.bool)
        for b, pos in enumerate(positions):
            if len(pos):
                mask[b, torch.as_tensor(np.asarray(pos, dtype=np.int64) + self.offsets[b])] = True
        return mask


@dataclass
class TokenReadout:
    """A teacher-forced read-out: per trace, the mean over its items of
    ``sum log p(target tokens) - max over competitors of sum log p(competitor tokens)``.

    ``items[b]`` lists, for trace b, tuples ``(positions, targets, competitors)``: ``positions``
    are the (unpadded) positions whose next-token distribution is read, ``targets`` the tokens
    expected there, ``competitors`` a list of alternative token tuples of the same length (empty:
    the read-out is the targets' log-probability). A trace with no item reads NaN.
    """

    name: str
    items: list[list[tuple[tuple[int, ...], tuple[int, ...], tuple[tuple[int, ...], ...]]]] = field(default_factory=list)

    def value(self, logprob_at: Callable[[int, int, int], Tensor], batch_size: int) -> Float[Tensor, "batch"]:
        out = []
        for b in range(batch_size):
            values = []
            for positions, targets, competitors in self.items[b]:
                score = sum(logprob_at(b, p, t) for p, t in zip(positions, targets))
                if competitors:
                    score = score - torch.stack([sum(logprob_at(b, p, t) for p, t in zip(positions, c)) for c in competitors]).max()
                values.append(score)
            out.append(torch.stack(values).mean() if values else torch.tensor(float("nan")))
        return torch.stack(out)


def _needed(readouts: Sequence[TokenReadout], offsets: np.ndarray) -> dict[int, list[int]]:
    rows: dict[int, set[int]] = {}
    for r in readouts:
        for b, items in enumerate(r.items):
            for positions, _, _ in items:
                rows.setdefault(b, set()).update(int(p) + int(offsets[b]) for p in positions)
    return {b: sorted(p) for b, p in rows.items()}


def readout_values(logits: Logits | Callable[[int, list[int]], Tensor], readouts: Sequence[TokenReadout], offsets: np.ndarray) -> dict[str, Float[Tensor, "batch"]]:
    """Each read-out per trace; log-softmax is taken only at the positions read (vocabularies are large).

    ``logits``: [batch, pos, vocab], or a function ``(row, padded positions) -> [n, vocab]`` that
    computes the logits of those positions only (no [pos, vocab] tensor for the whole trace)."""
    needed = _needed(readouts, offsets)
    rows_of = logits if callable(logits) else (lambda b, padded: logits[b, padded])
    table: dict[tuple[int, int], Tensor] = {}
    for b, padded in needed.items():
        lp = torch.log_softmax(rows_of(b, padded).float(), dim=-1)
        for j, p in enumerate(padded):
            table[(b, p)] = lp[j]

    def logprob_at(b: int, p: int, t: int) -> Tensor:
        return table[(b, int(p) + int(offsets[b]))][t]

    return {r.name: r.value(logprob_at, len(offsets)) for r in readouts}


def _hook(what: str, layer: int) -> str:
    return hook_name("z" if what == "z" else "pattern", layer)


def _attention(bridge, what: str):
    """Head outputs are patched under fused attention; patterns need the eager pattern."""
    return fused_attention(bridge) if what == "z" else contextlib.nullcontext()


def head_activations(bridge, tokens: TokenIds, inputs: PatchInputs, layers: Sequence[int], what: str = "z") -> dict[int, Tensor]:
    """``hook_z`` [batch, pos, head, d_head] (or ``hook_pattern`` [batch, head, q, k]) of each layer."""
    if what not in PATCH_TARGETS:
        raise CtdInputError(f"patch target {what!r}: use one of {sorted(PATCH_TARGETS)}")
    out: dict[int, Tensor] = {}

    def grab(layer: int):
        def hook(tensor, hook):
            out[layer] = tensor.detach().clone()

        return hook

    with torch.no_grad(), _attention(bridge, what):
        bridge.run_with_hooks(tokens, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, fwd_hooks=[(_hook(what, l), grab(l)) for l in layers], return_type=None)
    return out


def patch_hooks(source: dict[int, Tensor], heads: dict[int, Bool[Tensor, "batch head"] | Bool[Tensor, "head"]], positions: Bool[Tensor, "batch pos"], what: str = "z", prefix_length: int | None = None) -> list[tuple[str, Callable]]:
    """Hooks that write ``source`` into the chosen heads at the chosen positions.

    ``heads[layer]``: which heads to patch, for every trace ([head]) or per trace ([batch, head]).
    ``prefix_length``: patch only forward passes over exactly this many positions.
    """

    def make(layer: int, head_mask: Tensor):
        def hook(tensor, hook):
            if what == "z":
                if prefix_length is not None and tensor.shape[1] != prefix_length:
                    return tensor
                hm = head_mask if head_mask.dim() == 2 else head_mask.expand(tensor.shape[0], -1)
                where = positions[:, :, None] & hm[:, None, :]  # [batch, pos, head]
                z = heads_view(tensor, hm.shape[1])
                src = heads_view(source[layer].to(tensor.dtype), hm.shape[1])
                return torch.where(where[..., None], src, z).reshape(tensor.shape)
            if prefix_length is not None and tensor.shape[2] != prefix_length:
                return tensor
            if source[layer].shape != tensor.shape:
                raise CtdInputError("pattern patching needs runs of equal length")
            hm = head_mask if head_mask.dim() == 2 else head_mask.expand(tensor.shape[0], -1)
            where = hm[:, :, None] & positions[:, None, :]  # [batch, head, query]
            return torch.where(where[..., None], source[layer].to(tensor.dtype), tensor)

        return hook

    return [(_hook(what, layer), make(layer, mask)) for layer, mask in heads.items() if bool(mask.any())]


def _forward(bridge, tokens: Tensor, inputs: PatchInputs, hooks, what: str = "z") -> Tensor:
    with _attention(bridge, what):
        return bridge.run_with_hooks(tokens, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, fwd_hooks=hooks)


def head_masks(heads: Sequence[Head], n_layers: int, n_heads: int) -> dict[int, Bool[Tensor, "head"]]:
    """Per layer, which of its heads are in ``heads``."""
    masks = {layer: torch.zeros(n_heads, dtype=torch.bool) for layer in range(n_layers)}
    for layer, head in heads:
        masks[layer][head] = True
    return masks


def normalised_effect(mode: str, clean: np.ndarray, corrupt: np.ndarray, patched: np.ndarray) -> np.ndarray:
    """Per trace: recovery (denoise) or damage (noise), 1 = the whole clean-corrupt gap."""
    gap = clean - corrupt
    with np.errstate(divide="ignore", invalid="ignore"):
        return (patched - corrupt) / gap if mode == "denoise" else (clean - patched) / gap


@dataclass
class _Runs:
    """Unpatched read-outs and the activations of both runs (computed once per batch)."""

    clean: dict[str, np.ndarray]
    corrupt: dict[str, np.ndarray]
    acts: dict[str, dict[int, Tensor]]


def _baselines(bridge, inputs: PatchInputs, readouts: Sequence[TokenReadout], what: str) -> _Runs:
    layers = range(bridge.cfg.n_layers)
    values, acts = {}, {}
    with torch.no_grad():
        for run in ("clean", "corrupt"):
            tokens = getattr(inputs, run)
            acts[run] = head_activations(bridge, tokens, inputs, layers, what)
            logits = _forward(bridge, tokens, inputs, [], what)
            values[run] = {k: v.numpy() for k, v in readout_values(logits, readouts, inputs.offsets).items()}
    return _Runs(values["clean"], values["corrupt"], acts)


def head_set_effects(bridge, inputs: PatchInputs, readouts: Sequence[TokenReadout], head_sets: Sequence[Sequence[Head]], positions: Bool[Tensor, "batch pos"] | None = None, what: str = "z", runs: _Runs | None = None, modes: Sequence[str] = ("denoise", "noise")) -> tuple[_Runs, list[dict[str, dict[str, np.ndarray]]]]:
    """Patch each set of heads together, in each of ``modes``: per set, per mode, per read-out, the patched value per trace."""
    runs = runs or _baselines(bridge, inputs, readouts, what)
    positions = inputs.position_mask() if positions is None else positions
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    out = []
    with torch.no_grad():
        for heads in head_sets:
            masks = head_masks(heads, n_layers, n_heads)
            per_mode = {}
            for mode, (target, source) in {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}.items():
                if mode not in modes:
                    continue
                logits = _forward(bridge, getattr(inputs, target), inputs, patch_hooks(runs.acts[source], masks, positions, what), what)
                per_mode[mode] = {k: v.numpy() for k, v in readout_values(logits, readouts, inputs.offsets).items()}
            out.append(per_mode)
    return runs, out


def head_sweep(bridge, inputs: PatchInputs, readouts: Sequence[TokenReadout], positions: Bool[Tensor, "batch pos"] | None = None, what: str = "z", progress: bool = False, runs: _Runs | None = None, modes: Sequence[str] = ("denoise", "noise")) -> tuple[_Runs, dict[tuple[int, int, str], dict[str, np.ndarray]]]:
    """Every head alone, in each of ``modes``, batched across traces: ``{(layer, head, mode): {readout: patched value per trace}}``."""
    from tqdm.auto import tqdm

    heads = [(l, h) for l in range(bridge.cfg.n_layers) for h in range(bridge.cfg.n_heads)]
    runs, effects = head_set_effects(bridge, inputs, readouts, [], positions, what, runs)
    out = {}
    for head in tqdm(heads, desc="head sweep", disable=not progress):
        _, (per_mode,) = head_set_effects(bridge, inputs, readouts, [[head]], positions, what, runs, modes)
        for mode, values in per_mode.items():
            out[(head[0], head[1], mode)] = values
    return runs, out


def _output_projections(hf_model) -> list:
    """Each layer's attention output projection (its input is the heads' z, concatenated)."""
    layers = getattr(getattr(hf_model, "model", hf_model), "layers", None)
    if layers is None or not all(hasattr(layer, "self_attn") and hasattr(layer.self_attn, "o_proj") for layer in layers):
        raise CtdInputError(f"{type(hf_model).__name__}: no layers[i].self_attn.o_proj to patch head outputs at; use the teacher-forced read-outs")
    return [layer.self_attn.o_proj for layer in layers]


def _greedy_with_hooks(hf_model, tokens: TokenIds, attention_mask: AttentionMask, hooks: dict, max_new_tokens: int, pad_id: int, eos_ids: Sequence[int], keep_stop: bool) -> list[list[int]]:
    """Greedy HF ``generate`` with forward pre-hooks (module -> hook) attached for the call; each
    row's new tokens up to its first stop token (kept with ``keep_stop``)."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.items()]
    try:
        with torch.no_grad():
            out = hf_model.generate(input_ids=tokens, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id, eos_token_id=list(eos_ids))
    finally:
        for h in handles:
            h.remove()
    result = []
    for row in out[:, tokens.shape[1] :].tolist():
        stop = next((i for i, t in enumerate(row) if t in set(eos_ids)), len(row))
        result.append(row[: stop + 1] if keep_stop else row[:stop])
    return result


def patched_generate(hf_model, tokens: TokenIds, attention_mask: AttentionMask, source: dict[int, Tensor], heads: dict[int, Bool[Tensor, "head"]], positions: Bool[Tensor, "batch pos"], max_new_tokens: int, pad_id: int, eos_ids: Sequence[int]) -> list[list[int]]:
    """Greedy continuation of a left-padded prefix with chosen heads' ``z`` patched at chosen
    prefix positions (Hugging Face ``generate`` with its KV cache: the decoding steps run unpatched
    and read the patched prefix). ``source[layer]``: [batch, pos, head, d_head], aligned with ``tokens``."""
    projections = _output_projections(hf_model)
    width = tokens.shape[1]

    def make(layer: int, head_mask: Tensor):
        def pre_hook(module, args):
            x = args[0]
            if x.shape[1] != width:  # a decoding step: unpatched
                return None
            b, n, hd = x.shape
            src = source[layer].to(x.dtype).reshape(b, n, hd)
            d_head = hd // head_mask.shape[0]
            cols = head_mask.repeat_interleave(d_head)  # [heads * d_head]
            where = positions[:, :, None] & cols[None, None, :]
            return (torch.where(where, src, x),) + tuple(args[1:])

        return pre_hook

    hooks = {projections[layer]: make(layer, mask) for layer, mask in heads.items() if bool(mask.any())}
    return _greedy_with_hooks(hf_model, tokens, attention_mask, hooks, max_new_tokens, pad_id, eos_ids, keep_stop=True)


def _heads_of(hf_model) -> int:
    config = getattr(hf_model.config, "text_config", None) or hf_model.config
    return int(config.num_attention_heads)


def head_output_means(hf_model, sequences: Sequence[Sequence[int]], positions: Sequence[Sequence[int]], pad_id: int, batch_size: int = 16) -> dict[int, Float[Tensor, "head d_head"]]:
    """Each head's mean output ``z`` (its slice of the attention output projection's input) over
    ``positions[i]`` of ``sequences[i]``: what a mean-ablated head writes instead of its own."""
    from probes.capture import pad_batch

    projections = _output_projections(hf_model)
    n_heads = _heads_of(hf_model)
    sums = {layer: torch.zeros(proj.in_features, dtype=torch.float64) for layer, proj in enumerate(projections)}
    count = 0
    handles, chosen = [], {}

    def make(layer: int):
        def pre_hook(module, args):
            sums[layer] += (args[0].double() * chosen["mask"][..., None]).sum((0, 1)).cpu()

        return pre_hook

    for layer, proj in enumerate(projections):
        handles.append(proj.register_forward_pre_hook(make(layer)))
    try:
        for start in range(0, len(sequences), batch_size):
            chunk = [list(x) for x in sequences[start : start + batch_size]]
            ids, mask, position_ids, offsets = pad_batch(chunk, pad_id, "left")
            keep = torch.zeros(ids.shape, dtype=torch.float64)
            for b, picked in enumerate(positions[start : start + batch_size]):
                keep[b, torch.as_tensor(list(picked), dtype=torch.long) + int(offsets[b])] = 1.0
            chosen["mask"] = keep.to(next(hf_model.parameters()).device)
            count += int(keep.sum())
            with torch.no_grad():
                hf_model(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise CtdInputError("head_output_means: no position to average over")
    return {layer: (total / count).float().reshape(n_heads, -1) for layer, total in sums.items()}


def ablated_generate(hf_model, tokens: TokenIds, attention_mask: AttentionMask, means: dict[int, Tensor], heads: dict[int, Bool[Tensor, "head"]], max_new_tokens: int, pad_id: int, eos_ids: Sequence[int]) -> list[list[int]]:
    """Greedy generation from a left-padded prompt with chosen heads mean-ablated at every position,
    the prompt's and each generated token's: the model reasons without them, so the chain of
    thought cannot route around them. ``means[layer]``: [head, d_head] (:func:`head_output_means`)."""
    projections = _output_projections(hf_model)

    def make(layer: int, head_mask: Tensor):
        mean = means[layer]
        cols = head_mask.repeat_interleave(mean.shape[1])

        def pre_hook(module, args):
            x = args[0]
            return (torch.where(cols.to(x.device), mean.reshape(-1).to(x.device, x.dtype), x),) + tuple(args[1:])

        return pre_hook

    hooks = {projections[layer]: make(layer, mask) for layer, mask in heads.items() if bool(mask.any())}
    return _greedy_with_hooks(hf_model, tokens, attention_mask, hooks, max_new_tokens, pad_id, eos_ids, keep_stop=False)


class _GradientsOn:
    """Parameters require grad inside the block (``on``), so every activation is on the autograd
    graph, or none does (``on=False``), so the graph holds only what depends on the activations
    asked about (``autograd.grad`` asks for activation gradients only; no parameter gradient is stored)."""

    def __init__(self, module, on: bool = True):
        self.on = on
        self.params = [p for p in module.parameters() if p.requires_grad != on]

    def __enter__(self):
        for p in self.params:
            p.requires_grad_(self.on)

    def __exit__(self, *exc):
        for p in self.params:
            p.requires_grad_(not self.on)


@contextlib.contextmanager
def _recomputed_blocks(bridge, blocks):
    """Each of ``blocks`` keeps only its input for the backward and recomputes the rest there
    (activation checkpointing): the graph holds one residual stream per block, and the backward
    one block's activations at a time. The forward runs without a KV cache (a cache would grow
    again when a block is recomputed)."""
    from torch.utils.checkpoint import checkpoint

    patched = []
    try:
        for block in blocks:
            forward = block.forward

            def recomputed(*args, forward=forward, **kwargs):
                return checkpoint(forward, *args, use_reentrant=False, **kwargs)

            object.__setattr__(block, "forward", recomputed)  # on the component itself, not the wrapped module
            patched.append(block)
        yield
    finally:
        for block in patched:
            block.__dict__.pop("forward", None)


def _final_residual(bridge, tokens: Tensor, inputs: PatchInputs) -> Tensor:
    """The residual stream after the last block [batch, pos, d_model]; the unembedding is left to
    :func:`readout_values` at the positions it reads."""
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    seen: dict[str, Tensor] = {}

    def stop(tensor, hook):
        seen["resid"] = tensor
        raise StopAtLayerException(tensor)  # the bridge's forward ends here, before the unembedding

    last = bridge.cfg.n_layers - 1
    with bridge.hooks(fwd_hooks=[(hook_name("resid_post", last), stop)], reset_hooks_end=True):
        try:
            bridge(tokens, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids, return_type=None, use_cache=False)  # a KV cache would grow again when the backward recomputes attention
        except StopAtLayerException:
            pass
    if "resid" not in seen:
        raise CtdInputError("attribution patching: the forward did not reach the last block's residual stream")
    return seen["resid"]


def attribution_patching(bridge, inputs: PatchInputs, readouts: Sequence[TokenReadout], positions: Bool[Tensor, "batch pos"] | None = None, what: str = "z", recompute: bool = True) -> dict[tuple[str, str], Float[Tensor, "batch layer head"]]:
    """Linear estimates of every head's patched-minus-unpatched read-out, all heads at once.

    Denoise: (a_clean - a_corrupt) . dR/da at the corrupted run; noise: (a_corrupt - a_clean) .
    dR/da at the clean run. dR/da is the total derivative (through every later layer), the
    product is summed over the patched positions and the head's dimensions. One forward and one
    backward per run and read-out. Returns ``{(mode, readout): [batch, layer, head]}`` in the
    read-out's units.

    For ``z``, dR/da is the gradient of a zero offset added to each layer's ``hook_z`` (only the
    offsets require grad, never a weight), the attention is fused, the logits are formed only at
    the positions read, and with ``recompute`` every block but the last recomputes its
    activations in the backward: working memory linear in the trace's length.
    """
    n_layers = bridge.cfg.n_layers
    positions = inputs.position_mask() if positions is None else positions
    if what == "z":
        with returning_freed_memory():
            return _attribution_at_z(bridge, inputs, readouts, positions, recompute)
    with torch.no_grad():
        acts = {run: head_activations(bridge, getattr(inputs, run), inputs, range(n_layers), what) for run in ("clean", "corrupt")}
    out: dict[tuple[str, str], Tensor] = {}
    for mode, (target, source) in {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}.items():
        live: dict[int, Tensor] = {}

        def make(layer: int):
            def hook(tensor, hook):
                live[layer] = tensor
                return tensor

            return hook

        with torch.enable_grad(), _GradientsOn(bridge):
            logits = _forward(bridge, getattr(inputs, target), inputs, [(_hook(what, l), make(l)) for l in range(n_layers)], what)
            values = readout_values(logits, readouts, inputs.offsets)
            for i, r in enumerate(readouts):
                total = torch.nan_to_num(values[r.name]).sum()
                grads = torch.autograd.grad(total, [live[l] for l in range(n_layers)], retain_graph=i < len(readouts) - 1, allow_unused=True)
                out[(mode, r.name)] = _attribution_products(grads, acts, source, target, positions, what, bridge.cfg.n_heads)
    return out


def _attribution_at_z(bridge, inputs: PatchInputs, readouts: Sequence[TokenReadout], positions: Tensor, recompute: bool) -> dict[tuple[str, str], Tensor]:
    """Attribution at head outputs: one forward and backward per run, each run's ``z`` recorded in
    its own forward (the other mode's forward is the other run), products formed at the end."""
    n_layers = bridge.cfg.n_layers
    acts: dict[str, dict[int, Tensor]] = {}
    grads_of: dict[tuple[str, str], list] = {}
    runs = {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}
    for mode, (target, _) in runs.items():
        offsets: dict[int, Tensor] = {}
        seen: dict[int, Tensor] = {}

        def add(layer: int):
            def hook(tensor, hook):
                if layer not in seen:  # the first pass; a recomputation in the backward sees the same values
                    seen[layer] = tensor.detach().clone()
                    offsets[layer] = torch.zeros_like(seen[layer], requires_grad=True)
                return tensor + offsets[layer].to(tensor.dtype)

            return hook

        blocks = list(bridge.blocks)[:-1] if recompute else []  # the last block ends the forward (_final_residual)
        hooks = [(_hook("z", l), add(l)) for l in range(n_layers)]
        # Weights are constants here: only the offsets require grad, so the graph starts at layer 0's
        # z and keeps no weight (nor any cast copy of one) for a weight gradient nobody asks for.
        with torch.enable_grad(), _GradientsOn(bridge, on=False), fused_attention(bridge), _recomputed_blocks(bridge, blocks), bridge.hooks(fwd_hooks=hooks, reset_hooks_end=True):
            resid = _final_residual(bridge, getattr(inputs, target), inputs)

            def logits_at(b: int, padded: list[int]) -> Tensor:
                return bridge.unembed(bridge.ln_final(resid[b : b + 1, padded]))[0]

            values = readout_values(logits_at, readouts, inputs.offsets)
            for i, r in enumerate(readouts):
                total = torch.nan_to_num(values[r.name]).sum()
                grads = torch.autograd.grad(total, [offsets[l] for l in range(n_layers)], retain_graph=i < len(readouts) - 1, allow_unused=True)
                grads_of[(mode, r.name)] = [None if g is None else g.detach() for g in grads]
        acts[target] = seen
    return {key: _attribution_products(grads, acts, runs[key[0]][1], runs[key[0]][0], positions, "z", bridge.cfg.n_heads) for key, grads in grads_of.items()}


def _attribution_products(grads, acts, source: str, target: str, positions: Tensor, what: str, n_heads: int) -> Tensor:
    """(a_source - a_target) . gradient, summed over patched positions and each head's dimensions: [batch, layer, head]."""
    per_layer = []
    for layer, g in enumerate(grads):
        delta = acts[source][layer] - acts[target][layer]
        product = delta * (g.detach() if g is not None else torch.zeros_like(delta))
        if what == "z":  # [batch, pos, head, d_head]
            product = heads_view(product, n_heads)
            per_layer.append((product * positions[:, :, None, None]).sum((1, 3)))
        else:  # [batch, head, q, k]
            per_layer.append((product * positions[:, None, :, None]).sum((2, 3)))
    return torch.stack(per_layer, dim=1)
