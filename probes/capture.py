"""Teacher-forced replay of prompt + trace with hooks that store and reduce activations in place.

One forward pass per batch (the trace is finished, so for a causal model this is exactly what hooks
would see during generation). Hooks gather the requested points at the requested positions only,
and reduce each layer's attention pattern inside the hook to per-(query, head, key-region) mass,
per-(query, head) kurtosis over document keys and value-weighted region mass; the full pattern is
dropped as soon as the hook returns, so no layer's attention outlives its own hook.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import Tensor
from transformer_lens.model_bridge.exceptions import StopAtLayerException

from probes.attention import attention_reductions, head_value_norms, heads_view, value_gram
from probes.distributed import barrier, merge_rank_stores, rank_and_world, shard_for_rank
from probes.errors import CtdInputError, CtdNumericalError
from probes.fused import STACK_POINTS, AttentionStatsRequest, fused_attention, run_decoder_stack
from probes.points import REDUCTIONS, hook_name, point_of_hook
from probes.store import DTYPES, SEP, STORE_DIR, ShardWriter
from probes.typing import AttentionMask, TokenIds

__all__ = [
    "CaptureRequest",
    "CaptureConfig",
    "capture",
    "forward_path",
    "pad_batch",
]


@dataclass
class CaptureRequest:
    """One sequence to replay.

    Attributes:
        doc_id: the document's id (unique in the capture).
        token_ids: prompt + output token ids.
        positions: absolute positions whose activations are stored (and used as attention queries).
        regions: per token, an int region id (key regions of the attention reductions); -1 = ignore.
        document_mask: per token, whether it is a document key (kurtosis is taken over these).
        norm_origin, norm_length: normalised position = (position - norm_origin) / norm_length.
    """

    doc_id: str
    token_ids: Sequence[int]
    positions: np.ndarray
    regions: np.ndarray
    document_mask: np.ndarray
    norm_origin: int = 0
    norm_length: int = 1

    def __post_init__(self):
        n = len(self.token_ids)
        self.positions = np.asarray(self.positions, dtype=np.int64)
        self.regions = np.asarray(self.regions, dtype=np.int64)
        self.document_mask = np.asarray(self.document_mask, dtype=bool)
        if len(self.regions) != n or len(self.document_mask) != n:
            raise CtdInputError(f"capture request {self.doc_id!r}: regions/document_mask must have one entry per token ({n})")
        if len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= n):
            raise CtdInputError(f"capture request {self.doc_id!r}: positions must lie in [0, {n})")


@dataclass
class CaptureConfig:
    """What to capture. ``points`` are TransformerLens hook names (see ``probes.points``)."""

    points: list[str] = field(default_factory=list)
    attention_layers: list[int] = field(default_factory=list)
    # Heads whose full attention rows are kept: per captured query, its weights over the trace's
    # own keys (stored as ``blocks.{l}.attn.hook_pattern:rows@h{h}``, [query, key]). Only for a
    # few heads of short traces: what distillation reads of its teacher.
    pattern_heads: list[tuple[int, int]] = field(default_factory=list)
    n_regions: int = 9
    batch_size: int = 8
    padding: str = "left"
    dtype: str = "float16"
    # ``auto``: fused attention (no T x T pattern, see probes.fused) unless pattern rows are kept;
    # ``eager``: the bridge's own attention and hook_pattern; ``fused``: insist on fused.
    attention: str = "auto"

    @property
    def attention_path(self) -> str:
        """The path capture takes: ``fused`` or ``eager``."""
        return "eager" if self.attention == "eager" or (self.attention == "auto" and self.pattern_heads) else "fused"

    @property
    def forward_path(self) -> str:
        """What runs the forward: ``decoder_stack`` (the Hugging Face layers alone, when every
        point is in the residual stream and attention runs fused) or ``bridge`` (its hook points)."""
        only_residual = all(point_of_hook(name)[0] in STACK_POINTS for name in self.points)
        return "decoder_stack" if self.attention_path == "fused" and only_residual and not self.pattern_heads else "bridge"

    def __post_init__(self):
        if self.attention not in ("auto", "fused", "eager"):
            raise CtdInputError(f"attention={self.attention!r}: use 'auto', 'fused' or 'eager'")
        if self.attention == "fused" and self.pattern_heads:
            raise CtdInputError("pattern rows (pattern_heads) are read from the full pattern: use attention='auto' or 'eager'")
        if self.padding not in ("left", "right"):
            raise CtdInputError(f"padding={self.padding!r}: use 'left' or 'right'")
        if self.dtype not in DTYPES:
            raise CtdInputError(f"dtype={self.dtype!r}: use one of {sorted(DTYPES)}")


def forward_path(bridge, config: CaptureConfig) -> str:
    """The forward capture runs for ``config`` on ``bridge``: ``config.forward_path``, except that
    hooks a user attached to the bridge (steering, ablation) keep the bridge's path, where they fire."""
    hooked = any(point.fwd_hooks for point in bridge.hook_dict.values())
    return "bridge" if hooked else config.forward_path


def pad_batch(sequences: list[Sequence[int]], pad_id: int, side: str = "left") -> tuple[TokenIds, AttentionMask, TokenIds, np.ndarray]:
    """Token ids, attention mask and position ids of a padded batch, plus each row's offset.

    With left padding the position ids count from each sequence's first real token, so every
    real token sees exactly what it would see alone.
    """
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    offsets = np.zeros(len(sequences), dtype=np.int64)
    for i, seq in enumerate(sequences):
        offset = width - len(seq) if side == "left" else 0
        ids[i, offset : offset + len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, offset : offset + len(seq)] = 1
        offsets[i] = offset
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions, offsets


def _stop_forward(tensor, hook):
    # Fires after every other hook of the last block read (hooks on one point run in the order
    # they were added); the bridge's forward catches this exception as its own ``stop_at_layer``.
    raise StopAtLayerException(tensor)


def capture(
    bridge,
    requests: list[CaptureRequest],
    run_dir: str | Path,
    config: CaptureConfig,
    settings: dict | None = None,
    progress: bool = True,
    on_batch: Callable[[int], None] | None = None,
    store_dir: str = STORE_DIR,
) -> Path:
    """Capture ``requests`` into ``<run_dir>/<store_dir>``; resumes a capture that was interrupted.

    ``settings`` (model path, ...) join the config in the store's identity: a store made with
    other settings is never resumed into. ``on_batch(i)`` runs before batch i (tests use it to
    interrupt a capture at a chosen point).
    Under ``torchrun`` each rank captures its share of the documents (see :mod:`probes.distributed`).
    """
    root = Path(run_dir) / store_dir
    ids = [r.doc_id for r in requests]
    if len(set(ids)) != len(ids):
        raise CtdInputError("capture: document ids must be unique")
    n_layers = bridge.cfg.n_layers
    for name in config.points:
        key, layer = point_of_hook(name)
        if key == "pattern":
            raise CtdInputError("capture: the attention pattern is stored only as reductions (attention_layers)")
        if layer is not None and layer >= n_layers:
            raise CtdInputError(f"capture: point {name!r} but the model has {n_layers} layers")
    bad_heads = [h for h in config.pattern_heads if not (0 <= h[0] < n_layers and 0 <= h[1] < bridge.cfg.n_heads)]
    if bad_heads:
        raise CtdInputError(f"capture: pattern heads {bad_heads} out of range ({n_layers} layers x {bridge.cfg.n_heads} heads)")
    bad_layers = [l for l in config.attention_layers if not 0 <= l < n_layers]
    if bad_layers:
        raise CtdInputError(f"capture: attention layers {bad_layers} out of range (the model has {n_layers})")
    identity = {**(settings or {}), "config": asdict(config), "docs": ids}
    rank, world = rank_and_world()
    if world > 1:  # torchrun: this rank's share into its own store, then rank 0 merges them
        merged = root / "shards.json"
        normal = json.loads(json.dumps(identity, default=str))
        if merged.exists() and json.loads(merged.read_text()).get("complete") and json.loads(merged.read_text()).get("settings") == normal:
            return root
        mine = shard_for_rank(requests)
        _capture_local(bridge, mine, root / f"rank-{rank}", config, {**identity, "docs": [r.doc_id for r in mine], "rank": rank}, progress, on_batch)
        barrier()
        if rank == 0:
            merge_rank_stores(root, world, normal)
        barrier()
        return root
    return _capture_local(bridge, requests, root, config, identity, progress, on_batch)


def _capture_local(bridge, requests: list[CaptureRequest], root: Path, config: CaptureConfig, identity: dict, progress: bool, on_batch) -> Path:
    """One process's capture of ``requests`` into the store at ``root``."""
    from tqdm.auto import tqdm

    writer = ShardWriter(root, identity)
    store_dtype = DTYPES[config.dtype]
    pad_id = bridge.tokenizer.pad_token_id if bridge.tokenizer.pad_token_id is not None else 0
    batches = [requests[i : i + config.batch_size] for i in range(0, len(requests), config.batch_size)]
    device = bridge.cfg.device
    # Nothing after the last block that a point reads is needed: the forward stops there (on the
    # organism the bridge's unembedding took 18% of a capture's CPU time).
    layers_read = [point_of_hook(name)[1] for name in config.points] + list(config.attention_layers) + [l for l, _ in config.pattern_heads]
    last_block = max(layers_read) if layers_read and None not in layers_read else None
    with torch.no_grad():
        grams = {layer: value_gram(bridge.blocks[layer].attn.W_O.detach()) for layer in config.attention_layers}
    fused = config.attention_path == "fused"
    stack = forward_path(bridge, config) == "decoder_stack"

    bar = tqdm(total=len(requests), desc="capture", disable=not progress, file=sys.stderr)
    for shard_id, batch in enumerate(batches):
        if writer.done(shard_id):
            bar.update(len(batch))
            continue
        if on_batch is not None:
            on_batch(shard_id)
        token_ids, mask, position_ids, offsets = pad_batch([r.token_ids for r in batch], pad_id, config.padding)
        width = token_ids.shape[1]
        n_q = max(len(r.positions) for r in batch)
        # Padded query index per row; rows with fewer positions repeat their last one (trimmed later).
        query_index = torch.zeros((len(batch), max(n_q, 1)), dtype=torch.long)
        key_regions = torch.full((len(batch), width), -1, dtype=torch.long)
        document_mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for i, r in enumerate(batch):
            p = torch.as_tensor(r.positions + offsets[i])
            if len(p):
                query_index[i, : len(p)] = p
                query_index[i, len(p) :] = p[-1]
            key_regions[i, offsets[i] : offsets[i] + len(r.token_ids)] = torch.tensor(r.regions)
            document_mask[i, offsets[i] : offsets[i] + len(r.token_ids)] = torch.tensor(r.document_mask)
        lengths = [len(r.positions) for r in batch]
        # Output tokens under left padding: every row's queries are a run ending at the last column.
        window = max(lengths) if all(n and np.array_equal(r.positions + offsets[i], np.arange(width - n, width)) for i, (r, n) in enumerate(zip(batch, lengths))) else None
        query_index, key_regions, document_mask = query_index.to(device), key_regions.to(device), document_mask.to(device)
        gathered: dict[str, Tensor] = {}
        value_norms: dict[int, Tensor] = {}
        rows_of: dict[str, Tensor] = {}  # attention rows [batch, nq, key] of chosen heads

        same_window = window is not None and len(set(lengths)) == 1  # every row's queries are the same last columns

        def store_point(name: str, derive: Callable[[Tensor], Tensor] | None = None):
            def hook(tensor, hook):
                if same_window:  # a view of the last columns: no gathered copy
                    rows = tensor[:, tensor.shape[1] - window :]
                else:
                    rows = tensor.gather(1, query_index.view(*query_index.shape, *([1] * (tensor.dim() - 2))).expand(-1, -1, *tensor.shape[2:]))
                gathered[name] = (derive(rows) if derive else rows).detach().to("cpu", store_dtype)

            return hook

        hooks = []
        for name in config.points:
            key, layer = point_of_hook(name)
            if key == "head_out":
                w_o = bridge.blocks[layer].attn.W_O.detach()
                hooks.append((hook_name("z", layer), store_point(name, lambda z, w=w_o: torch.einsum("bqhd,hdm->bqhm", heads_view(z, w.shape[0]), w))))
            else:
                hooks.append((name, store_point(name)))
        def keep_reductions(layer: int, reduced: dict[str, Tensor]) -> None:
            for what, tensor in reduced.items():
                gathered[REDUCTIONS[what][0].format(layer=layer)] = tensor.to("cpu", torch.float32)

        request = None
        if fused:  # statistics from q, k and v inside the fused attention function
            request = AttentionStatsRequest(set(config.attention_layers), query_index, key_regions, document_mask, config.n_regions, grams, on_layer=keep_reductions)
        for layer in config.attention_layers if not fused else ():
            w_o = bridge.blocks[layer].attn.W_O.detach()

            def v_hook(v, hook, layer=layer, w_o=w_o):
                if v.dim() == 4 and v.shape[1] != width and v.shape[2] == width:  # latent attention's bridge: [batch, head, pos, d]
                    v = v.transpose(1, 2)
                value_norms[layer] = head_value_norms(v.detach(), w_o, grams[layer])

            def pattern_hook(pattern, hook, layer=layer):
                keep_reductions(layer, attention_reductions(pattern.detach(), query_index, key_regions, document_mask, config.n_regions, value_norms.pop(layer, None), window))

            hooks += [(hook_name("v", layer), v_hook), (hook_name("pattern", layer), pattern_hook)]
        for layer in sorted({l for l, _ in config.pattern_heads}):
            heads_here = [h for l, h in config.pattern_heads if l == layer]

            def rows_hook(pattern, hook, layer=layer, heads_here=heads_here):
                for h in heads_here:
                    picked = pattern[:, h].gather(1, query_index[:, :, None].expand(-1, -1, pattern.shape[-1]))
                    rows_of[f"{hook_name('pattern', layer)}:rows@h{h}"] = picked.detach().to("cpu", store_dtype)

            hooks.append((hook_name("pattern", layer), rows_hook))
        if last_block is not None:
            hooks.append((hook_name("resid_post", last_block), _stop_forward))

        if stack:
            with torch.no_grad():
                reads = {name: (lambda tensor, keep=keep: keep(tensor, None)) for name, keep in hooks if keep is not _stop_forward}
                run_decoder_stack(bridge, token_ids.to(device), mask.to(device), position_ids.to(device), reads, request)
        else:
            with torch.no_grad(), fused_attention(bridge, request) if fused else contextlib.nullcontext():
                bridge.run_with_hooks(
                    token_ids.to(device),
                    attention_mask=mask.to(device),
                    position_ids=position_ids.to(device),
                    fwd_hooks=hooks,
                    return_type=None,
                )
        for name, value in list(gathered.items()) + list(rows_of.items()):  # one check per point; locate only on failure
            if not bool(torch.isfinite(value).all()):
                for i, r in enumerate(batch):
                    finite = torch.isfinite(value[i, : len(r.positions)].float()).reshape(len(r.positions), -1).all(-1)
                    if not bool(finite.all()):
                        bad = int((~finite).nonzero()[0, 0])
                        raise CtdNumericalError(f"capture: non-finite values in {name} for {r.doc_id!r} at position {int(r.positions[bad])}; check the model's dtype and weights")
        tensors: dict[str, Tensor] = {}
        for i, r in enumerate(batch):
            n = len(r.positions)
            tensors[f"{r.doc_id}{SEP}positions"] = torch.as_tensor(r.positions, dtype=torch.int64)
            for name, value in gathered.items():
                tensors[f"{r.doc_id}{SEP}{name}"] = value[i, :n]  # a contiguous slice: no copy
            for name, value in rows_of.items():  # keys: the trace's own tokens, not the padding
                tensors[f"{r.doc_id}{SEP}{name}"] = value[i, :n, offsets[i] : offsets[i] + len(r.token_ids)].contiguous()
        writer.write(shard_id, tensors, [r.doc_id for r in batch])
        bar.update(len(batch))
    bar.close()

    index_rows = []
    shard_of = {doc: int(sid) for sid, docs in writer.shard_docs.items() for doc in docs}
    for r in requests:
        norm = (r.positions - r.norm_origin) / max(r.norm_length, 1)
        index_rows.append(
            pd.DataFrame(
                {
                    "doc_id": r.doc_id,
                    "position": r.positions,
                    "norm_position": norm.astype(np.float32),
                    "region": r.regions[r.positions].astype(np.int8) if len(r.positions) else np.zeros(0, np.int8),
                    "shard": shard_of[r.doc_id],
                }
            )
        )
    writer.finish(pd.concat(index_rows, ignore_index=True) if index_rows else pd.DataFrame())
    return root
