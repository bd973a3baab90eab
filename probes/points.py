"""The one table of activation points the suite reads (STYLE §1), named as TransformerLens hooks.

``POINTS`` maps a short key to a :class:`Point`: the TransformerLens hook name pattern (used on disk
too), the shape of what the hook carries, and what one stored row holds per token. ``head_out`` has
no hook of its own on the bridge: it is derived from ``hook_z`` as z_h · W_O^h and stored under
TransformerLens' name for it, ``blocks.{layer}.attn.hook_result``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from probes.errors import CtdInputError

__all__ = ["Point", "POINTS", "resolve_points", "hook_name", "reduction_name", "point_of_hook", "REDUCTIONS"]


@dataclass(frozen=True)
class Point:
    key: str
    hook: str  # TransformerLens hook name, with {layer} where the point has a layer index
    hook_shape: str  # what the hook carries
    row_shape: str  # what one stored row (one token) holds
    per_layer: bool = True
    derived_from: str | None = None  # hook that is read when the point has no hook of its own
    description: str = ""


POINTS: dict[str, Point] = {
    p.key: p
    for p in (
        Point("embed", "hook_embed", "batch pos d_model", "d_model", per_layer=False, description="token embeddings"),
        Point("resid_pre", "blocks.{layer}.hook_resid_pre", "batch pos d_model", "d_model", description="residual stream entering the block"),
        Point("resid_mid", "blocks.{layer}.hook_resid_mid", "batch pos d_model", "d_model", description="residual stream after attention"),
        Point("resid_post", "blocks.{layer}.hook_resid_post", "batch pos d_model", "d_model", description="residual stream leaving the block"),
        Point("attn_out", "blocks.{layer}.hook_attn_out", "batch pos d_model", "d_model", description="attention output (all heads)"),
        Point("mlp_out", "blocks.{layer}.hook_mlp_out", "batch pos d_model", "d_model", description="MLP output"),
        Point("z", "blocks.{layer}.attn.hook_z", "batch pos head d_head", "head d_head", description="per-head attention-weighted values"),
        Point(
            "head_out",
            "blocks.{layer}.attn.hook_result",
            "batch pos head d_model",
            "head d_model",
            derived_from="blocks.{layer}.attn.hook_z",
            description="per-head write to the residual stream, z_h · W_O^h",
        ),
        Point("q", "blocks.{layer}.attn.hook_q", "batch pos head d_head", "head d_head", description="queries"),
        Point("k", "blocks.{layer}.attn.hook_k", "batch pos kv_head d_head", "kv_head d_head", description="keys (grouped heads)"),
        Point("v", "blocks.{layer}.attn.hook_v", "batch pos kv_head d_head", "kv_head d_head", description="values (grouped heads)"),
        Point(
            "pattern",
            "blocks.{layer}.attn.hook_pattern",
            "batch head query key",
            "head key",
            description="attention weights; stored only as reductions (see REDUCTIONS)",
        ),
    )
}

# Reductions of the attention pattern computed inside the hook; stored per query token.
REDUCTIONS = {
    "region_mass": ("blocks.{layer}.attn.hook_pattern:region_mass", "head region", "attention mass per key region"),
    "doc_kurtosis": ("blocks.{layer}.attn.hook_pattern:doc_kurtosis", "head", "Pearson kurtosis of the weights over document keys"),
    "value_mass": (
        "blocks.{layer}.attn.hook_pattern:value_mass",
        "head region",
        "value-weighted mass: sum over region keys of a_qk * ||v_k W_O^h||",
    ),
}

_LAYERED = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_name(key: str, layer: int | None = None) -> str:
    point = POINTS[key]
    if point.per_layer:
        if layer is None:
            raise CtdInputError(f"point {key!r} needs a layer index")
        return point.hook.format(layer=layer)
    return point.hook


def reduction_name(key: str, layer: int) -> str:
    """Stored name of an attention reduction: ``reduction_name("region_mass", 3)`` ->
    ``"blocks.3.attn.hook_pattern:region_mass"``."""
    if key not in REDUCTIONS:
        raise CtdInputError(f"unknown attention reduction {key!r}; known: {sorted(REDUCTIONS)}")
    return REDUCTIONS[key][0].format(layer=layer)


def point_of_hook(name: str) -> tuple[str, int | None]:
    """Inverse of :func:`hook_name`: ``"blocks.3.hook_resid_post" -> ("resid_post", 3)``."""
    m = _LAYERED.match(name)
    for key, point in POINTS.items():
        if m and point.per_layer and point.hook == "blocks.{layer}." + m.group(2):
            return key, int(m.group(1))
        if not point.per_layer and point.hook == name:
            return key, None
    raise CtdInputError(f"unknown activation point {name!r}; known points: {sorted(POINTS)}")


def resolve_points(spec: list[str] | None, n_layers: int) -> list[str]:
    """Hook names for a spec: keys (``resid_post`` = every layer), ``key@3``, or full hook names.

    The default is the residual stream after every block.
    """
    spec = spec or ["resid_post"]
    names: list[str] = []
    for item in spec:
        if item in POINTS:
            point = POINTS[item]
            if point.key == "pattern":
                raise CtdInputError("'pattern' is stored only as reductions; ask for attention statistics instead")
            names += [hook_name(item, layer) for layer in range(n_layers)] if point.per_layer else [point.hook]
        elif "@" in item:
            key, layer = item.split("@", 1)
            if key not in POINTS or not layer.isdigit() or int(layer) >= n_layers:
                raise CtdInputError(f"point {item!r}: use KEY@LAYER with KEY in {sorted(POINTS)} and LAYER < {n_layers}")
            names.append(hook_name(key, int(layer)))
        else:
            key, layer = point_of_hook(item)
            if layer is not None and layer >= n_layers:
                raise CtdInputError(f"point {item!r}: the model has {n_layers} layers")
            names.append(item)
    return list(dict.fromkeys(names))
