"""Loss terms of standard and mechanistic distillation (DESIGN §2).

Standard: next-token cross-entropy on the teacher's CoT and answer. Mechanistic adds, for mapped
head pairs (teacher head -> student head):

- phase 1, early CoT queries: L_attn = KL(teacher attention over the document || student's);
  L_write = 1 - cos(student head write, anchor direction); L_int = -log(1 + kurtosis) . cos(write,
  anchor direction) (CoarseScore's product);
- phase 2, late CoT queries: L_loop = KL of attention over earlier label mentions; L_write = 1 -
  cos(student write, student gradient of the gold-vs-near-miss margin); L_int = -(mass on gold
  mentions - mass on near-miss mentions) . cos(write, gradient) (RefineScore's product).

Directions (the anchor direction, the margin gradient) are detached: the unembedding never moves
towards the heads. Precisely, L_write of student head (l, h) has a gradient on exactly: the head's
own columns of W_O and rows of W_Q, the rows of W_K and W_V of its key/value group, layer l's q/k
norms and input norm, and everything upstream of layer l (the embeddings and earlier layers: the
stream the head reads); on nothing else (not the unembedding or final norm, not layer l's MLP or
later layers, not another head's W_O columns or W_Q rows). tests/integration/test_distill.py checks
exactly this set.
Teacher attention comes from cached rows (:mod:`analyses.methods.distillation.data`), never a teacher forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float
from torch import Tensor

from analyses.methods.parsing import Region

__all__ = ["attention_kl", "write_alignment", "next_token_loss", "forward_with_heads", "head_write", "mechanistic_loss", "TERMS"]

TERMS = ("attn", "write1", "int1", "loop", "write2", "int2")


def attention_kl(teacher: Float[Tensor, "q k"], student: Float[Tensor, "q k"], key_mask: Bool[Tensor, "q k"], eps: float = 1e-8) -> Float[Tensor, "q"]:
    """KL(teacher || student) of attention restricted to ``key_mask`` keys and renormalised, per query.
    Queries with no such key (or no teacher mass on them) give 0."""
    m = key_mask.float()
    t = teacher * m
    s = student * m
    t_sum, s_sum = t.sum(-1, keepdim=True), s.sum(-1, keepdim=True)
    valid = (t_sum.squeeze(-1) > eps) & (m.sum(-1) > 0)
    t = t / t_sum.clamp(min=eps)
    s = s / s_sum.clamp(min=eps)
    kl = (t * (torch.log(t + eps) - torch.log(s + eps)) * m).sum(-1)
    return torch.where(valid, kl, torch.zeros_like(kl))


def write_alignment(writes: Float[Tensor, "q d"], direction: Float[Tensor, "d"] | Float[Tensor, "q d"]) -> Float[Tensor, "q"]:
    """1 - cos(write, direction) per query."""
    return 1.0 - F.cosine_similarity(writes, direction.expand_as(writes), dim=-1, eps=1e-8)


def next_token_loss(model, hidden: Float[Tensor, "batch pos d"], labels) -> Tensor:
    """Mean next-token cross-entropy over labelled positions, with the LM head applied only there
    (the same value as the Hugging Face causal-LM loss; prompts never reach the vocabulary product)."""
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def forward_with_heads(model, ids, mask, layers: set[int], attentions: bool = True):
    """HF forward of the model body: output (with attentions) and ``z[layer]`` (the input of
    ``o_proj``, [batch, pos, heads * d_head]) plus ``z["final"]`` (the residual entering the final norm)."""
    z: dict = {}
    handles = []
    for layer in layers:
        attn = model.model.layers[layer].self_attn

        def pre_hook(module, args, layer=layer):
            z[layer] = args[0]

        handles.append(attn.o_proj.register_forward_pre_hook(pre_hook))

    def norm_hook(module, args):
        z["final"] = args[0]

    handles.append(model.model.norm.register_forward_pre_hook(norm_hook))
    try:
        out = model.model(input_ids=ids, attention_mask=mask, output_attentions=attentions)
    finally:
        for h in handles:
            h.remove()
    return out, z


def head_write(model, z: Tensor, layer: int, head: int) -> Tensor:
    """Student head write z_h W_O^h: z [..., heads * d_head] -> [..., d_model]."""
    attn = model.model.layers[layer].self_attn
    d_head = attn.head_dim
    w = attn.o_proj.weight[:, head * d_head : (head + 1) * d_head]
    return z[..., head * d_head : (head + 1) * d_head] @ w.T


def _kurtosis(weights: Tensor, mask: Tensor) -> Tensor:
    from probes.attention import doc_kurtosis

    return doc_kurtosis(weights, mask)


def mechanistic_loss(student, batch, teacher_rows, out, z: dict, map1: dict, map2: dict, terms: dict[str, bool], lambda1: float, lambda2: float) -> tuple[Tensor, dict[str, float]]:
    """λ1 (L_attn + L_write + L_int) over phase-1 head pairs + λ2 (L_loop + L_write + L_int) over phase-2 pairs.

    ``teacher_rows[b][(layer, head)]``: the teacher head's attention rows for example b's CoT
    queries ([cot_end - cot_start, n_tokens]); ``out``/``z`` from :func:`forward_with_heads`.
    """
    from probes.heads import margin_gradient

    w_u = student.lm_head.weight
    norm = student.model.norm
    # Terms in float32 whatever the forward's precision (bf16 autocast rounds attention to 3 digits).
    parts = {k: torch.zeros((), dtype=torch.float32) for k in TERMS}
    for b, e in enumerate(batch):
        n = len(e.ids)
        early = torch.arange(e.cot_start, min(e.tau, e.cot_end))
        late = torch.arange(max(e.tau, e.cot_start), e.cot_end)
        regions = torch.from_numpy(e.regions)
        doc_keys = (regions == int(Region.DOCUMENT)) | (regions == int(Region.ANCHOR))
        mention_keys = (regions == int(Region.MENTION_GOLD)) | (regions == int(Region.MENTION_NEAR_MISS)) | (regions == int(Region.MENTION_OTHER))
        rows = teacher_rows[b]
        if len(early) and e.anchors and map1:
            # The direction is a target, not a parameter path: detached.
            a_dir = w_u[e.anchors].mean(0).detach().float()
            for (tl, th), (sl, sh) in map1.items():
                s_att = out.attentions[sl][b, sh, early, :n].float()
                t_att = rows[(tl, th)][early - e.cot_start, :n].float()
                keys = doc_keys.expand(len(early), n)
                if terms["attn"]:
                    parts["attn"] = parts["attn"] + attention_kl(t_att, s_att, keys).mean()
                write = head_write(student, z[sl][b, early], sl, sh).float()
                if terms["write1"]:
                    parts["write1"] = parts["write1"] + write_alignment(write, a_dir).mean()
                if terms["int1"]:
                    kurt = _kurtosis(s_att, keys)
                    parts["int1"] = parts["int1"] - (torch.log1p(kurt) * F.cosine_similarity(write, a_dir.expand_as(write), dim=-1)).mean()
        if len(late) and e.pairs and map2 and (terms["loop"] or terms["write2"] or terms["int2"]):
            resid = z["final"][b, late].float()
            _, grad = margin_gradient(resid.detach(), lambda r: student.lm_head(norm(r)), e.pairs)  # detached
            causal = torch.arange(n)[None, :] <= late[:, None]
            for (tl, th), (sl, sh) in map2.items():
                s_att = out.attentions[sl][b, sh, late, :n].float()
                t_att = rows[(tl, th)][late - e.cot_start, :n].float()
                keys = mention_keys.expand(len(late), n) & causal
                if terms["loop"]:
                    parts["loop"] = parts["loop"] + attention_kl(t_att, s_att, keys).mean()
                write = head_write(student, z[sl][b, late], sl, sh).float()
                if terms["write2"]:
                    parts["write2"] = parts["write2"] + write_alignment(write, grad).mean()
                if terms["int2"]:
                    gold_mass = (s_att * (regions == int(Region.MENTION_GOLD)).float()).sum(-1)
                    near_mass = (s_att * (regions == int(Region.MENTION_NEAR_MISS)).float()).sum(-1)
                    parts["int2"] = parts["int2"] - ((gold_mass - near_mass) * F.cosine_similarity(write, grad, dim=-1)).mean()
    scale = 1.0 / max(len(batch), 1)
    phase1 = (parts["attn"] + parts["write1"] + parts["int1"]) * scale / max(len(map1), 1)
    phase2 = (parts["loop"] + parts["write2"] + parts["int2"]) * scale / max(len(map2), 1)
    total = lambda1 * phase1 + lambda2 * phase2
    return total, {k: float(v.detach()) * scale for k, v in parts.items()}
