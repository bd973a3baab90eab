"""Attention statistics under fused attention: no layer's T x T pattern exists at any time.

Long reasoning traces (4k-32k tokens) make eager attention's full pattern the wall of every
attention instrument. Capture only ever stores *reductions* of the pattern, and each has an exact
expression through fused attention:

- region masses and value-weighted region masses are attention outputs whose values are per-key
  numbers: the key's region indicator, and that indicator times ||v_k W_O^h||. They ride along in
  the same fused call as the model's own output, as extra value columns (one pass: the scores
  that produce the output produce the masses);
- the fused kernel also returns each query row's log-sum-exp (LSE), so any single weight is
  exp(q.k * scale - LSE): the document-key kurtosis reads only T x |document| scores;
- gpt-oss sinks join the softmax's denominator only: on the kernel the sink is one more key that
  every query sees (with a zero value), so the LSE, every weight and every gradient include it.

:func:`fused_attention` switches a TransformerBridge to this path for the duration of a ``with``
block: each attention component runs the Hugging Face module's own forward (the bridge's q/k/v/o
sub-bridges, hence ``hook_q``/``hook_z``/``hook_attn_out`` and the residual hooks, still fire),
whose attention function is :func:`fused_attention_forward`, registered with transformers'
``AttentionInterface``. ``hook_pattern`` and ``hook_attn_scores`` do not fire on this path (that is
its point); ask for eager attention where a pattern itself must be read or edited.

Left-padded (or right-padded) rows are attended one row at a time over their own tokens, so
padding never needs a T x T mask and every real token sees exactly what it would see alone.
On CPU the kernel is PyTorch's flash attention for CPU (it returns the LSE); elsewhere, and for
soft-capped logits, an exact blockwise computation in plain torch (memory linear in T).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from probes.attention import doc_kurtosis, head_value_norms
from probes.errors import CtdInputError

__all__ = ["AttentionStatsRequest", "fused_attention", "fused_attention_forward", "attention_with_lse", "returning_freed_memory", "run_decoder_stack", "STACK_POINTS", "FUSED_IMPLEMENTATION"]

FUSED_IMPLEMENTATION = "ctd_fused"
# Query rows per block where a block loop is needed (sliding windows, kurtosis, the exact path):
# keeps a block's scores near 16 MB in float32 for 16 heads over 16k keys.
_QUERY_BLOCK = 256

_state = threading.local()


@dataclass
class AttentionStatsRequest:
    """What capture wants of each layer's attention on one padded batch.

    Attributes:
        layers: layers whose statistics are computed; others run plain fused attention.
        query_index: [batch, nq] positions (padded-batch coordinates) whose statistics are kept.
        key_regions: [batch, key] region id of each key (-1: none, e.g. padding).
        document_mask: [batch, key] the document's keys (the kurtosis is taken over them).
        n_regions: number of region ids.
        grams: per layer, W_O^h (W_O^h)^T [head, d_head, d_head] for value-weighted masses (None:
            no value-weighted masses for that layer).
        results: filled per layer with ``region_mass`` [batch, nq, head, region], ``doc_kurtosis``
            [batch, nq, head] and, with a gram, ``value_mass`` [batch, nq, head, region] (float32).
    """

    layers: set[int]
    query_index: Int[Tensor, "batch nq"]
    key_regions: Int[Tensor, "batch key"]
    document_mask: Bool[Tensor, "batch key"]
    n_regions: int
    grams: dict[int, Tensor | None] = field(default_factory=dict)
    results: dict[int, dict[str, Tensor]] = field(default_factory=dict)
    on_layer: object = None  # optional callable(layer, results) run as soon as a layer is reduced


def _padding_passthrough(batch_size=None, q_length=None, kv_length=None, attention_mask=None, **kwargs):
    """Mask "creation" for the fused path: hand the 2D padding mask through as it is (a [batch, key]
    bool tensor or None). Rows are attended one at a time, so no 4D mask is ever built."""
    return attention_mask


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(FUSED_IMPLEMENTATION, fused_attention_forward)
    AttentionMaskInterface.register(FUSED_IMPLEMENTATION, _padding_passthrough)


def _repeat_heads(x: Tensor, n_heads: int) -> Tensor:
    """[kv_head, pos, d] -> [head, pos, d]: head h reads kv head h // group (grouped-query attention)."""
    group = n_heads // x.shape[0]
    return x if group == 1 else x.repeat_interleave(group, dim=0)


def _allowed(q_pos: Tensor, k_pos: Tensor, window: int | None) -> Tensor:
    """Causal (and sliding-window) visibility of keys ``k_pos`` from queries ``q_pos``, both in the
    row's own coordinates: HF's convention keeps keys with q - window < k <= q."""
    ok = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        ok &= k_pos[None, :] > q_pos[:, None] - window
    return ok


def attention_with_lse(
    q: Float[Tensor, "head q d"],
    k: Float[Tensor, "head k d"],
    v: Float[Tensor, "head k dv"],
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    exact: bool = False,
    sinks: Float[Tensor, "head"] | None = None,
) -> tuple[Float[Tensor, "head q dv"], Float[Tensor, "head q"]]:
    """Causal attention of one sequence (queries and keys at the same positions) and each query's
    log-sum-exp over its visible keys (and its sink), without a [q, k] tensor of the whole sequence.

    ``sinks``: a per-head logit that joins every row's softmax with a zero value (gpt-oss). On the
    kernel it is one more key that every query sees, reached through one more dimension (query 1,
    key sink / scale), so its gradient flows like any key's. The CPU flash kernel serves when it
    can (no soft-cap, ``exact`` off); otherwise query rows are taken in blocks, each against the
    keys it can see. Differentiable either way (the kernel's backward recomputes the weights).
    """
    n, h = q.shape[1], q.shape[0]
    d, dv = q.shape[-1], v.shape[-1]
    flash = q.device.type == "cpu" and softcap is None and not exact
    if not flash:
        outs, lses = [], []
        for i0 in range(0, n, _QUERY_BLOCK):
            i1 = min(n, i0 + _QUERY_BLOCK)
            j0 = 0 if window is None else max(0, i0 - window + 1)
            scores = torch.matmul(q[:, i0:i1].float(), k[:, j0:i1].float().transpose(-1, -2)) * scale
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            ok = _allowed(torch.arange(i0, i1, device=q.device), torch.arange(j0, i1, device=q.device), window)
            scores = scores.masked_fill(~ok, float("-inf"))
            lse = torch.logsumexp(scores, -1)
            if sinks is not None:
                lse = torch.logaddexp(lse, sinks.float()[:, None])
            outs.append(torch.matmul(torch.exp(scores - lse[..., None]), v[:, j0:i1].float()).to(v.dtype))
            lses.append(lse)
        return torch.cat(outs, 1), torch.cat(lses, 1)
    # the CPU kernel wants one head size for q, k and v: zero columns change no score
    extra = 1 if sinks is not None else 0
    # a multiple of 16: the kernel's fast path (measured at 4k, 12 heads: 128 or 160 wide 0.07 s, 146 wide 0.15 s)
    width = -(-max(d + extra, dv) // 16) * 16
    qp = q if width == d else torch.nn.functional.pad(q, (0, width - d))
    kp = k if width == d else torch.nn.functional.pad(k, (0, width - d))
    vp = v if width == dv else torch.nn.functional.pad(v, (0, width - dv))
    if sinks is not None:  # every query reads 1 in column d; the sink key holds sink / scale there
        qp = qp.index_fill(-1, torch.tensor([d], device=q.device), 1.0)
        sink_key = torch.zeros(h, 1, width, dtype=kp.dtype, device=kp.device)
        sink_key[:, 0, d] = (sinks.float() / scale).to(kp.dtype)
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if window is None or n <= window:
        if sinks is None:
            out, lse = op(qp[None], kp[None], vp[None], 0.0, True, scale=scale)
            return out[0, ..., :dv], lse[0]
        # the sink as key 0 and a dummy query 0: causal alignment then gives query i keys 0..i+1
        q1 = torch.cat([torch.zeros_like(qp[:, :1]), qp], 1)
        k1 = torch.cat([sink_key, kp], 1)
        v1 = torch.cat([torch.zeros_like(vp[:, :1]), vp], 1)
        out, lse = op(q1[None], k1[None], v1[None], 0.0, True, scale=scale)
        return out[0, :, 1:, :dv], lse[0, :, 1:]
    outs, lses = [], []
    for i0 in range(0, n, _QUERY_BLOCK):
        i1 = min(n, i0 + _QUERY_BLOCK)
        j0 = max(0, i0 - window + 1)
        ok = _allowed(torch.arange(i0, i1, device=q.device), torch.arange(j0, i1, device=q.device), window)
        keys, values = kp[:, j0:i1], vp[:, j0:i1]
        if sinks is not None:
            ok = torch.cat([torch.ones_like(ok[:, :1]), ok], 1)
            keys = torch.cat([sink_key, keys], 1)
            values = torch.cat([torch.zeros_like(values[:, :1]), values], 1)
        bias = torch.zeros(ok.shape, dtype=q.dtype, device=q.device).masked_fill_(~ok, float("-inf"))
        out, lse = op(qp[None, :, i0:i1], keys[None], values[None], 0.0, False, attn_mask=bias[None, None], scale=scale)
        outs.append(out[0, ..., :dv])
        lses.append(lse[0])
    return torch.cat(outs, 1), torch.cat(lses, 1)


def _row_extent(row_mask: Tensor | None, n: int) -> tuple[int, int]:
    """First and one-past-last real token of a padded row; the real tokens must be contiguous."""
    if row_mask is None:
        return 0, n
    real = row_mask.nonzero().flatten()
    if not len(real):
        return n, n
    start, stop = int(real[0]), int(real[-1]) + 1
    if stop - start != len(real):
        raise CtdInputError("fused attention: a row's tokens must be contiguous (left or right padding only); use eager attention for other masks")
    return start, stop


def _kurtosis_all_visible(weights: Float[Tensor, "... key"]) -> Float[Tensor, "..."]:
    """:func:`probes.attention.doc_kurtosis` over every key, in place on ``weights`` (six passes
    instead of a dozen: this is most of what the statistics add to a fused forward)."""
    mean = weights.mean(-1, keepdim=True)
    squared = weights.sub_(mean).square_()
    m2 = squared.mean(-1)
    m4 = squared.square_().mean(-1)
    kurt = m4 / m2.square().clamp(min=1e-30)
    flat = m2 <= (1e-6 * mean.squeeze(-1).abs()).square() + 1e-30  # variance below rounding of the mean
    return torch.where(flat, torch.zeros_like(kurt), kurt)


def _row_stats(
    q: Tensor, k_rep: Tensor, lse: Tensor, masses: Tensor, scale: float, window: int | None, softcap: float | None,
    local_q: Tensor, regions: Tensor, document: Tensor, n_regions: int, with_values: bool,
) -> dict[str, Tensor]:
    """One row's statistics at its query positions ``local_q`` (row coordinates)."""
    picked = masses[:, local_q].float()  # [head, nq, columns]
    out = {"region_mass": picked[..., :n_regions].transpose(0, 1)}
    if with_values:
        out["value_mass"] = picked[..., n_regions : 2 * n_regions].transpose(0, 1)
    doc_keys = document.nonzero().flatten()
    kurt = torch.zeros(q.shape[0], len(local_q), dtype=torch.float32, device=q.device)
    if len(doc_keys) > 1:
        k_doc = k_rep[:, doc_keys].float().transpose(-1, -2)
        valid = torch.ones(len(doc_keys), dtype=torch.bool, device=q.device)
        last_doc_key = int(doc_keys.max())
        block = 4 * _QUERY_BLOCK
        for s in range(0, len(local_q), block):
            rows = local_q[s : s + block]
            scores = torch.matmul(q[:, rows].float(), k_doc).mul_(scale)
            if softcap is not None:
                scores = torch.tanh(scores / softcap) * softcap
            weights = scores.sub_(lse[:, rows, None]).exp_()
            if window is None and int(rows.min()) > last_doc_key:  # the usual case: every document key is visible
                kurt[:, s : s + len(rows)] = _kurtosis_all_visible(weights)
            else:
                kurt[:, s : s + len(rows)] = doc_kurtosis(weights * _allowed(rows, doc_keys, window), valid)
    out["doc_kurtosis"] = kurt.transpose(0, 1)
    return out


def fused_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling: float | None = None, sliding_window: int | None = None, s_aux: Tensor | None = None, softcap: float | None = None, **kwargs):
    """transformers attention function (``AttentionInterface``): query [batch, head, pos, d] after
    rotary embeddings, key/value [batch, kv_head, pos, d] (grouped heads not repeated), the 2D
    padding mask. Returns the output [batch, pos, head, dv] and no weights, and fills the active
    :class:`AttentionStatsRequest` for this layer if it asks for one."""
    if attention_mask is not None and attention_mask.dim() != 2:
        raise CtdInputError("fused attention receives the 2D padding mask; a prepared 4D mask needs eager attention")
    b, n_heads, n, _ = query.shape
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    softcap = softcap if softcap is not None else getattr(module, "attn_logit_softcapping", None)
    request: AttentionStatsRequest | None = getattr(_state, "request", None)
    layer = getattr(module, "layer_idx", None)
    wants = request is not None and layer in request.layers
    exact = getattr(_state, "exact", False)
    dv = value.shape[-1]
    out = torch.zeros(b, n_heads, n, dv, dtype=query.dtype, device=query.device)
    stats: dict[str, list[Tensor]] = {}
    mask = attention_mask.bool() if attention_mask is not None else None
    plain = not wants and s_aux is None and softcap is None and not exact and sliding_window is None
    for i in range(b):
        start, stop = _row_extent(None if mask is None else mask[i, -n:], n)
        if start == stop:
            continue
        if plain:  # no statistic and no sink: the stock fused kernel, grouped keys not repeated
            out[i, :, start:stop] = torch.nn.functional.scaled_dot_product_attention(
                query[i : i + 1, :, start:stop], key[i : i + 1, :, start:stop], value[i : i + 1, :, start:stop], is_causal=True, scale=scale, enable_gqa=key.shape[1] != n_heads
            )[0]
            continue
        q = query[i, :, start:stop]
        k_rep = _repeat_heads(key[i, :, start:stop], n_heads)
        v_rep = _repeat_heads(value[i, :, start:stop], n_heads)
        extra = None
        if wants:
            regions = request.key_regions[i, start:stop]
            onehot = torch.zeros(stop - start, request.n_regions, dtype=query.dtype, device=query.device)
            valid = regions >= 0
            onehot[valid.nonzero().flatten(), regions[valid]] = 1
            extra = onehot.expand(n_heads, -1, -1)
            gram = request.grams.get(layer)
            if gram is not None:
                norms = head_value_norms(value[i : i + 1, :, start:stop].transpose(1, 2), None, gram)[0]  # [head, pos]
                extra = torch.cat([extra, norms.to(query.dtype)[..., None] * onehot], -1)
            v_rep = torch.cat([v_rep, extra], -1)
        o, lse = attention_with_lse(q, k_rep, v_rep, scale, sliding_window, softcap, exact, None if s_aux is None else s_aux.to(q.device))
        out[i, :, start:stop] = o[..., :dv]
        if wants:
            local = request.query_index[i].to(query.device) - start
            if (local < 0).any() or (local >= stop - start).any():
                raise CtdInputError("fused attention: a requested query position lies in the padding")
            row = _row_stats(q, k_rep, lse, o[..., dv:], scale, sliding_window, softcap, local, request.key_regions[i, start:stop], request.document_mask[i, start:stop], request.n_regions, request.grams.get(layer) is not None)
            for name, t in row.items():
                stats.setdefault(name, []).append(t)
    if wants:
        result = {name: torch.stack(ts) for name, ts in stats.items()}
        request.results[layer] = result
        if callable(request.on_layer):
            request.on_layer(layer, result)
    return out.transpose(1, 2).contiguous(), None


def _attention_components(bridge) -> list:
    comps = [block.attn for block in bridge.blocks]
    for comp in comps:
        if getattr(comp, "original_component", None) is None:
            raise CtdInputError(f"fused attention: {type(comp).__name__} wraps no Hugging Face attention module")
    return comps


@contextlib.contextmanager
def returning_freed_memory(threshold: int = 128 * 1024):
    """Within the block glibc serves allocations over ``threshold`` bytes from mmap, so freed
    activations go back to the system at once; on exit the threshold is fixed at glibc's largest
    adaptive value (32 MiB). glibc's default threshold adapts upward after large frees, after which
    a long trace's transient blocks stay resident: at 4k tokens on a 1.5B shape attribution held
    6.3 GB of RSS with the default and 2.8 GB inside this block. The price is a page fault per
    fresh block (about 18% of an sdpa forward's time at 4k), so only attribution, whose backward
    frees and allocates a block's activations per layer, uses it. A no-op off glibc."""
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        libc = None
    if libc is not None:
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(-3, 32 * 1024 * 1024)


def _direct_norms(bridge) -> list:
    """The bridge's normalisation components compute a float32 copy of the norm for their
    ``hook_scale``/``hook_normalized`` before calling the Hugging Face norm, hooks or not (0.9 s of
    a 10 s forward at 4k tokens on a 1.5B shape). Within the fused block, a norm whose two inner
    hooks have no hook attached calls the Hugging Face norm alone: the same output, bit for bit."""
    out = []
    for module in bridge.modules():
        method = getattr(type(module), "_hf_autograd_forward_with_hooks", None)
        if method is None or not hasattr(module, "hook_scale") or not hasattr(module, "hook_normalized"):
            continue

        def direct(x, module=module, method=method):
            if module.hook_scale.fwd_hooks or module.hook_normalized.fwd_hooks or module.hook_scale.bwd_hooks or module.hook_normalized.bwd_hooks:
                return method(module, x)
            result = module.original_component(x)
            return result if result.dtype == x.dtype else result.to(x.dtype)

        object.__setattr__(module, "_hf_autograd_forward_with_hooks", direct)
        out.append(module)
    return out


@contextlib.contextmanager
def fused_attention(bridge, request: AttentionStatsRequest | None = None, exact: bool = False):
    """Within the block, ``bridge``'s attention runs fused (see the module docstring); ``request``
    (optional) collects statistics per layer. ``exact``: use the blockwise torch path even where
    the CPU kernel would serve (a reference for tests)."""
    _register()
    hf_model = bridge.original_model
    norms = _direct_norms(bridge)
    config = hf_model.config
    comps = _attention_components(bridge)
    saved_impl = config._attn_implementation
    patched = []
    try:
        for comp in comps:
            hf_attn = comp.original_component
            hf_forward = type(hf_attn).forward

            def forward(*args, comp=comp, hf_attn=hf_attn, hf_forward=hf_forward, **kwargs):
                if "hidden_states" in kwargs:
                    hidden = kwargs.pop("hidden_states")
                else:
                    hidden, args = args[0], args[1:]
                output = hf_forward(hf_attn, comp.hook_in(hidden), *args, **kwargs)
                return (comp.hook_out(output[0]),) + tuple(output[1:])

            # bridge components forward attribute writes to the wrapped module: set it on the component itself
            object.__setattr__(comp, "forward", forward)
            patched.append(comp)
            sub_config = getattr(hf_attn, "config", None)
            if sub_config is not None and sub_config is not config:
                sub_config._attn_implementation = FUSED_IMPLEMENTATION
        config._attn_implementation = FUSED_IMPLEMENTATION
        _state.request, _state.exact = request, exact
        yield request
    finally:
        _state.request, _state.exact = None, False
        for norm in norms:
            norm.__dict__.pop("_hf_autograd_forward_with_hooks", None)
        for comp in patched:
            comp.__dict__.pop("forward", None)
            sub_config = getattr(comp.original_component, "config", None)
            if sub_config is not None:
                sub_config._attn_implementation = saved_impl
        config._attn_implementation = saved_impl


# Points that lie between the decoder layers of the Hugging Face model itself.
STACK_POINTS = ("resid_pre", "resid_post")


class _StackDone(Exception):
    """Raised by the last layer a read needs: nothing after it is computed."""


@contextlib.contextmanager
def _without_bridge(hf_model):
    """Within the block the Hugging Face model's tree holds its own modules again: the bridge
    replaces each wrapped submodule by its component in place, so calling the model would run
    every component's wrapper and hook points."""
    from transformer_lens.model_bridge.generalized_components.base import GeneralizedComponent

    swapped = []

    def restore(module):
        for name, child in list(module._modules.items()):
            if isinstance(child, GeneralizedComponent) and getattr(child, "original_component", None) is not None:
                module._modules[name] = child.original_component
                swapped.append((module, name, child))
                restore(child.original_component)
            elif child is not None:
                restore(child)

    restore(hf_model)
    try:
        yield
    finally:
        for module, name, child in reversed(swapped):
            module._modules[name] = child


def _decoder_layers(hf_model, n_layers: int) -> torch.nn.ModuleList:
    base = hf_model.base_model
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) == n_layers:
            return layers
    raise CtdInputError(f"decoder stack: {type(base).__name__} has no list of {n_layers} decoder layers; capture through the bridge (points other than the residual stream)")


def run_decoder_stack(
    bridge,
    input_ids: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None,
    position_ids: Int[Tensor, "batch pos"] | None,
    reads: dict[str, object],
    request: AttentionStatsRequest | None = None,
) -> None:
    """Run the Hugging Face model inside ``bridge`` under fused attention, layer by layer, up to
    the last layer a read needs, with no bridge component in the way.

    ``reads`` maps residual hook names (``blocks.L.hook_resid_pre`` / ``blocks.L.hook_resid_post``)
    to callables given that tensor [batch, pos, d_model]; ``request`` collects attention
    statistics as under :func:`fused_attention`. The values are the bridge's hook values (tested
    per family against the eager bridge): its per-component wrappers and hook points cost about 20%
    of a forward at 4k tokens on a 1.5B shape, so a capture that reads only the residual stream and
    attention statistics skips them."""
    from probes.points import point_of_hook

    _register()
    hf_model = bridge.original_model
    before: dict[int, list] = {}
    after: dict[int, list] = {}
    for name, read in reads.items():
        key, layer = point_of_hook(name)
        if key not in STACK_POINTS:
            raise CtdInputError(f"decoder stack: {name!r} is not a residual-stream point; capture it through the bridge")
        (before if key == "resid_pre" else after).setdefault(layer, []).append(read)
    last = max([*before, *after, *(request.layers if request is not None else ())], default=-1)
    if last < 0:
        return

    with _without_bridge(hf_model):
        _run_layers(hf_model, _decoder_layers(hf_model, bridge.cfg.n_layers), before, after, last, input_ids, attention_mask, position_ids, request)


def _run_layers(hf_model, layers, before, after, last, input_ids, attention_mask, position_ids, request) -> None:
    def pre_hook(module, args, kwargs, layer):
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        for read in before.get(layer, ()):
            read(hidden)

    def post_hook(module, args, kwargs, output, layer):
        hidden = output[0] if isinstance(output, tuple) else output
        for read in after.get(layer, ()):
            read(hidden)
        if layer == last:
            raise _StackDone

    configs = {id(hf_model.config): hf_model.config}
    for module in hf_model.modules():
        sub = getattr(module, "config", None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            configs[id(sub)] = sub
    saved = {key: config._attn_implementation for key, config in configs.items()}
    handles = []
    try:
        for layer in range(last + 1):
            if layer in before:
                handles.append(layers[layer].register_forward_pre_hook(lambda m, a, k, layer=layer: pre_hook(m, a, k, layer), with_kwargs=True))
            handles.append(layers[layer].register_forward_hook(lambda m, a, k, o, layer=layer: post_hook(m, a, k, o, layer), with_kwargs=True))
        for config in configs.values():
            config._attn_implementation = FUSED_IMPLEMENTATION
        _state.request, _state.exact = request, False
        try:
            hf_model.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
        except _StackDone:
            pass
    finally:
        _state.request, _state.exact = None, False
        for handle in handles:
            handle.remove()
        for key, config in configs.items():
            config._attn_implementation = saved[key]
