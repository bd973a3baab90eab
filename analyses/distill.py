"""``ctd distill --run DIR``: standard versus mechanistic distillation, with ablations (DESIGN §2).

Students (Qwen3, fewer layers and a smaller width than the teacher, the teacher's tokenizer) are
trained on the teacher's own traces of training notes with equal step budgets:

- ``standard``: supervised fine-tuning on the teacher's CoT + answer (sequence-level KD);
- ``mechanistic``: standard + λ1 (L_attn + L_write + L_int) on phase-1 heads + λ2 (L_loop + L_write
  + L_int) on phase-2 heads, where teacher heads (top CoarseScore / RefineScore) are mapped to
  student heads by relative depth, then by attention similarity on a warm-up batch;
- ablations: without phase 1, without phase 2, without each term.

Each condition runs with several seeds and is evaluated on held-out notes: answer F1, P@1,
shortlist recall, Leakage-Adjusted Simulability and the distance between student and teacher
Focus/Confusion curves. Which method wins is whatever the numbers say, with paired CIs.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
import torch.nn.functional as F

from analyses.figures import PALETTE, themed
from analyses.io import Manifest, read_json, read_parquet, write_json, write_parquet
from analyses.parsing import Region
from analyses.results import FrameResult
from probes.errors import CtdNumericalError, input_error

__all__ = [
    "DistillConfig",
    "DistillResult",
    "CONDITIONS",
    "map_heads",
    "attention_kl",
    "write_alignment",
    "distill_run",
]

# condition -> which loss terms are on (phase-1 attn/write/int, phase-2 loop/write/int)
CONDITIONS: dict[str, dict[str, bool]] = {
    "standard": dict(attn=False, write1=False, int1=False, loop=False, write2=False, int2=False),
    "mechanistic": dict(attn=True, write1=True, int1=True, loop=True, write2=True, int2=True),
    "no_phase1": dict(attn=False, write1=False, int1=False, loop=True, write2=True, int2=True),
    "no_phase2": dict(attn=True, write1=True, int1=True, loop=False, write2=False, int2=False),
    "no_attn": dict(attn=False, write1=True, int1=True, loop=True, write2=True, int2=True),
    "no_loop": dict(attn=True, write1=True, int1=True, loop=False, write2=True, int2=True),
    "no_write": dict(attn=True, write1=False, int1=True, loop=True, write2=False, int2=True),
    "no_int": dict(attn=True, write1=True, int1=False, loop=True, write2=True, int2=False),
}


@dataclass
class DistillConfig:
    n_train_docs: int = 400
    n_eval_docs: int = 40
    # 24 students (8 conditions x 3 seeds) at 80 steps fit the 30-minute CPU budget of the default
    # study (a mechanistic step costs ~0.6 s on 2 cores, a standard one ~0.17 s; BENCHMARKS.md).
    steps: int = 80
    batch_size: int = 16
    lr: float = 2e-3
    seeds: tuple[int, ...] = (0, 1, 2)
    conditions: tuple[str, ...] = tuple(CONDITIONS)
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 384
    lambda1: float = 0.5
    lambda2: float = 0.5
    heads_per_phase: int = 3
    max_new_tokens: int = 200

    @classmethod
    def for_run(cls) -> "DistillConfig":
        """What `ctd run` uses: the two methods and both phase ablations, 3 seeds, sized to fit the
        run's budget (the per-term ablations are in `ctd distill`'s default study)."""
        return cls(n_train_docs=300, conditions=("standard", "mechanistic", "no_phase1", "no_phase2"))

    @classmethod
    def quick(cls) -> "DistillConfig":
        return cls(n_train_docs=64, n_eval_docs=12, steps=30, batch_size=8, seeds=(0, 1, 2), conditions=("standard", "mechanistic"), max_new_tokens=100)


class DistillResult(FrameResult):
    """``condition``, ``seed``, ``metric``, ``value`` (one row per student and metric), plus
    summary rows (``seed`` = -1) with ``ci_low``/``ci_high`` over seeds and paired differences."""

    REQUIRED = ("condition", "seed", "metric", "value")

    def figure(self, metric: str = "micro_f1") -> go.Figure:
        per_seed = self.frame[(self.frame["seed"] >= 0) & (self.frame["metric"] == metric)]
        summary = per_seed.groupby("condition", sort=False)["value"].agg(["mean", "std", "count"]).reset_index()
        fig = go.Figure(go.Bar(x=summary["condition"], y=summary["mean"], marker_color=[PALETTE[0] if c == "standard" else PALETTE[3] if c == "mechanistic" else PALETTE[5] for c in summary["condition"]], error_y=dict(type="data", array=summary["std"].fillna(0))))
        fig.add_trace(go.Scatter(x=per_seed["condition"], y=per_seed["value"], mode="markers", marker=dict(color="#333", size=6), name="seeds"))
        fig.update_layout(showlegend=False)
        return themed(fig, f"Distillation: {metric.replace('_', '-')} of students per condition (bars: mean ± SD over seeds)", "condition", metric.replace("_", "-"))

    def trajectory_figure(self) -> go.Figure:
        curves = self.meta.get("curves", {})
        fig = go.Figure()
        for i, (name, c) in enumerate(curves.items()):
            for metric, dash in (("focus", "solid"), ("confusion", "dot")):
                if metric in c:
                    fig.add_trace(go.Scatter(x=c["t"], y=c[metric], name=f"{name} {metric}", line=dict(color=PALETTE[i % len(PALETTE)], dash=dash)))
        return themed(fig, "Focus (solid) and Confusion (dotted): teacher versus students", "normalised CoT position t", "cosine similarity (MiniLM)")


# ------------------------------------------------------------------------------------------------
# loss terms


def attention_kl(teacher: torch.Tensor, student: torch.Tensor, key_mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """KL(teacher ∥ student) of attention restricted to ``key_mask`` keys and renormalised, per query.

    teacher, student: [q, k]; key_mask: [q, k] bool. Queries with no such key give 0.
    """
    m = key_mask.float()
    t = teacher * m
    s = student * m
    t_sum, s_sum = t.sum(-1, keepdim=True), s.sum(-1, keepdim=True)
    valid = (t_sum.squeeze(-1) > eps) & (m.sum(-1) > 0)
    t = t / t_sum.clamp(min=eps)
    s = s / s_sum.clamp(min=eps)
    kl = (t * (torch.log(t + eps) - torch.log(s + eps)) * m).sum(-1)
    return torch.where(valid, kl, torch.zeros_like(kl))


def write_alignment(writes: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    """1 − cos(write, direction) per query; writes [q, d], direction [d] or [q, d]."""
    return 1.0 - F.cosine_similarity(writes, direction.expand_as(writes), dim=-1, eps=1e-8)


def _kurtosis(weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    from probes.capture import doc_kurtosis

    return doc_kurtosis(weights, mask)


# ------------------------------------------------------------------------------------------------
# head map


def map_heads(teacher_heads: list[tuple[int, int]], teacher_layers: int, student_layers: int, student_heads: int, similarity: np.ndarray | None = None) -> dict[tuple[int, int], tuple[int, int]]:
    """Teacher head -> student head: same relative depth, then the most similar free student head.

    ``similarity[i, h]`` scores teacher head i against student head h of its depth-matched layer
    (higher is more similar); without it the lowest free head index is taken. Greedy in the order
    given (the teacher's ranking), never reusing a student head; deterministic.
    """
    used: set[tuple[int, int]] = set()
    mapping = {}
    for i, (layer, head) in enumerate(teacher_heads):
        s_layer = min(student_layers - 1, int(layer * student_layers / teacher_layers))
        order = list(range(student_heads)) if similarity is None else list(np.argsort(-similarity[i], kind="stable"))
        for s_head in order:
            if (s_layer, int(s_head)) not in used:
                mapping[(layer, head)] = (s_layer, int(s_head))
                used.add((s_layer, int(s_head)))
                break
        else:  # that layer is full: take the most similar free head of any layer
            free = [(l, h) for l in range(student_layers) for h in range(student_heads) if (l, h) not in used]
            if free:
                mapping[(layer, head)] = free[0]
                used.add(free[0])
    return mapping


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class _Example:
    ids: np.ndarray
    n_prompt: int
    cot_start: int
    cot_end: int
    tau: int
    regions: np.ndarray
    anchors: list[int]
    pairs: list


def _examples(traces: pd.DataFrame, docs: pd.DataFrame, labels, tokenizer, tau: dict[str, int]) -> list[_Example]:
    from analyses.characterize import _margin_pairs

    by_id = docs.set_index("doc_id")
    out = []
    for t in traces.itertuples():
        ids = np.asarray(list(t.prompt_ids) + list(t.output_ids) + [tokenizer.eos_token_id], dtype=np.int64)
        regions = np.asarray(list(t.regions) + [int(Region.AFTER)], dtype=np.int64)
        anchors = [int(ids[i]) for i in np.flatnonzero(regions == int(Region.ANCHOR))]
        doc = by_id.loc[t.doc_id]
        pairs = _margin_pairs(tokenizer, labels, [int(g) for g in doc["gold"]], [int(n) for n in doc["near_miss"]])
        out.append(_Example(ids, len(t.prompt_ids), int(t.cot_start), int(t.cot_end), int(tau.get(t.doc_id, (int(t.cot_start) + int(t.cot_end)) // 2)), regions, anchors, pairs))
    return out


def _collate(batch: list[_Example], pad: int):
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.from_numpy(e.ids)
        mask[i, : len(e.ids)] = 1
        labels[i, e.n_prompt : len(e.ids)] = torch.from_numpy(e.ids[e.n_prompt :])
    return ids, mask, labels


def _forward_with_heads(model, ids, mask, layers: set[int]):
    """HF forward of the model body: final hidden state, attentions, per-layer z (input of o_proj)."""
    z: dict[int, torch.Tensor] = {}
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
        # The body only: the LM head is applied where there are labels (``next_token_loss``).
        out = model.model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, z


def next_token_loss(model, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over labelled positions, with the LM head applied only there.

    The same value as the Hugging Face causal-LM loss; the prompt's positions (most of a note)
    never reach the vocabulary-sized product, which dominates a small student's step.
    """
    targets = labels[:, 1:]
    keep = targets != -100
    logits = model.lm_head(hidden[:, :-1][keep])
    return F.cross_entropy(logits.float(), targets[keep])


def _head_write(model, z: torch.Tensor, layer: int, head: int) -> torch.Tensor:
    """Student head write z_h W_O^h for all positions: z [b, pos, heads*d_head] -> [b, pos, d_model]."""
    attn = model.model.layers[layer].self_attn
    d_head = attn.head_dim
    w = attn.o_proj.weight[:, head * d_head : (head + 1) * d_head]  # [d_model, d_head]
    return z[..., head * d_head : (head + 1) * d_head] @ w.T


def mechanistic_loss(student, teacher_attn: dict, batch: list[_Example], out, z: dict, mapping1: dict, mapping2: dict, terms: dict[str, bool], lambda1: float, lambda2: float) -> tuple[torch.Tensor, dict[str, float]]:
    """λ1 (L_attn + L_write + L_int) over phase-1 pairs + λ2 (L_loop + L_write + L_int) over phase-2 pairs."""
    w_u = student.lm_head.weight  # [vocab, d_model]
    norm = student.model.norm
    parts = {k: torch.zeros((), dtype=out.last_hidden_state.dtype) for k in ("attn", "write1", "int1", "loop", "write2", "int2")}
    for b, e in enumerate(batch):
        n = len(e.ids)
        early = torch.arange(e.cot_start, min(e.tau, e.cot_end))
        late = torch.arange(max(e.tau, e.cot_start), e.cot_end)
        regions = torch.from_numpy(e.regions)
        doc_keys = (regions == int(Region.DOCUMENT)) | (regions == int(Region.ANCHOR))
        mention_keys = (regions == int(Region.MENTION_GOLD)) | (regions == int(Region.MENTION_NEAR_MISS)) | (regions == int(Region.MENTION_OTHER))
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        if len(early) and e.anchors:
            a_dir = w_u[e.anchors].mean(0)
            for (tl, th), (sl, sh) in mapping1.items():
                s_att = out.attentions[sl][b, sh, :n, :n]
                t_att = teacher_attn[(tl, th)][b][:n, :n]
                if terms["attn"]:
                    parts["attn"] = parts["attn"] + attention_kl(t_att[early], s_att[early], doc_keys.expand(len(early), n)).mean()
                write = _head_write(student, z[sl][b, :n], sl, sh)[early]
                if terms["write1"]:
                    parts["write1"] = parts["write1"] + write_alignment(write, a_dir).mean()
                if terms["int1"]:
                    kurt = _kurtosis(s_att[early], doc_keys.expand(len(early), n))
                    parts["int1"] = parts["int1"] - (torch.log1p(kurt) * F.cosine_similarity(write, a_dir.expand_as(write), dim=-1)).mean()
        if len(late) and e.pairs and (terms["loop"] or terms["write2"] or terms["int2"]):
            from probes.heads import margin_gradient

            resid = z["final"][b, late]  # the residual entering the final norm
            _, grad = margin_gradient(resid.detach(), lambda r: student.lm_head(norm(r)), e.pairs)
            for (tl, th), (sl, sh) in mapping2.items():
                s_att = out.attentions[sl][b, sh, :n, :n]
                t_att = teacher_attn[(tl, th)][b][:n, :n]
                keys = mention_keys.expand(len(late), n) & causal[late]
                if terms["loop"]:
                    parts["loop"] = parts["loop"] + attention_kl(t_att[late], s_att[late], keys).mean()
                write = _head_write(student, z[sl][b, :n], sl, sh)[late]
                if terms["write2"]:
                    parts["write2"] = parts["write2"] + write_alignment(write, grad).mean()
                if terms["int2"]:
                    gold_mass = (s_att[late] * (regions == int(Region.MENTION_GOLD)).float()).sum(-1)
                    near_mass = (s_att[late] * (regions == int(Region.MENTION_NEAR_MISS)).float()).sum(-1)
                    parts["int2"] = parts["int2"] - ((gold_mass - near_mass) * F.cosine_similarity(write, grad, dim=-1)).mean()
    scale = 1.0 / max(len(batch), 1)
    phase1 = (parts["attn"] + parts["write1"] + parts["int1"]) * scale / max(len(mapping1), 1)
    phase2 = (parts["loop"] + parts["write2"] + parts["int2"]) * scale / max(len(mapping2), 1)
    total = lambda1 * phase1 + lambda2 * phase2
    return total, {k: float(v.detach()) * scale for k, v in parts.items()}


# ------------------------------------------------------------------------------------------------
# training and evaluation


def _student(tokenizer, cfg: DistillConfig, teacher_config, seed: int):
    from transformers import Qwen3ForCausalLM

    from analyses.organism import small_qwen3_config

    torch.manual_seed(seed)
    config = small_qwen3_config(tokenizer, teacher_config.vocab_size, cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.d_mlp, teacher_config.max_position_embeddings, attn_implementation="eager")
    return Qwen3ForCausalLM(config)


def _similarity_map(teacher, student, warm: list[_Example], pad: int, heads: list[tuple[int, int]], cfg: DistillConfig, t_layers: int) -> np.ndarray:
    """similarity[i, h]: minus the mean KL between teacher head i and student head h (of i's depth-matched layer) over CoT queries."""
    ids, mask, _ = _collate(warm, pad)
    with torch.no_grad():
        t_out = teacher.model(input_ids=ids, attention_mask=mask, output_attentions=True)
        s_out = student.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    sim = np.zeros((len(heads), cfg.n_heads))
    for i, (tl, th) in enumerate(heads):
        sl = min(cfg.n_layers - 1, int(tl * cfg.n_layers / t_layers))
        for sh in range(cfg.n_heads):
            kls = []
            for b, e in enumerate(warm):
                n = len(e.ids)
                q = torch.arange(e.cot_start, e.cot_end)
                keys = torch.tril(torch.ones(n, n, dtype=torch.bool))[q]
                kls.append(attention_kl(t_out.attentions[tl][b, th, q, :n], s_out.attentions[sl][b, sh, q, :n], keys).mean())
            sim[i, sh] = -float(torch.stack(kls).mean())
    return sim


def train_student(condition: str, seed: int, examples: list[_Example], teacher, tokenizer, cfg: DistillConfig, phase1: list, phase2: list, progress: bool = False):
    """One student under one condition; returns (model, loss curve, head maps)."""
    from tqdm.auto import tqdm

    terms = CONDITIONS[condition]
    student = _student(tokenizer, cfg, teacher.config, seed)
    rng = np.random.default_rng(seed)  # same data order for every condition of a seed
    warm = [examples[i] for i in rng.permutation(len(examples))[: min(8, len(examples))]]
    t_layers = teacher.config.num_hidden_layers
    map1 = map_heads(phase1, t_layers, cfg.n_layers, cfg.n_heads, _similarity_map(teacher, student, warm, tokenizer.pad_token_id, phase1, cfg, t_layers) if phase1 else None)
    map2 = map_heads(phase2, t_layers, cfg.n_layers, cfg.n_heads, _similarity_map(teacher, student, warm, tokenizer.pad_token_id, phase2, cfg, t_layers) if phase2 else None)
    mech = any(terms.values())
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=0.01)
    order = rng.permutation(len(examples))
    curve = []
    needed_layers = {sl for sl, _ in list(map1.values()) + list(map2.values())}
    bar = tqdm(range(cfg.steps), desc=f"{condition} s{seed}", disable=not progress, file=sys.stderr, leave=False)
    for step in bar:
        idx = [order[(step * cfg.batch_size + j) % len(order)] for j in range(cfg.batch_size)]
        batch = [examples[i] for i in idx]
        ids, mask, labels = _collate(batch, tokenizer.pad_token_id)
        student.train()
        if mech:
            out, z = _forward_with_heads(student, ids, mask, needed_layers)
            ce = next_token_loss(student, out.last_hidden_state, labels)
            with torch.no_grad():  # only the teacher's attention is needed: its body, no LM head
                t_out = teacher.model(input_ids=ids, attention_mask=mask, output_attentions=True)
            teacher_attn = {(tl, th): t_out.attentions[tl][:, th] for (tl, th) in list(map1) + list(map2)}
            extra, parts = mechanistic_loss(student, teacher_attn, batch, out, z, map1, map2, terms, cfg.lambda1, cfg.lambda2)
            loss = ce + extra
        else:
            hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
            ce = next_token_loss(student, hidden, labels)
            parts, loss = {}, ce
        if not torch.isfinite(loss):
            raise CtdNumericalError(f"distill {condition} seed {seed}: loss is {loss.item()} at step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        curve.append({"step": step, "loss": loss.item(), "ce": ce.item(), **parts})
    student.eval()
    return student, pd.DataFrame(curve), {"phase1": {f"L{a}H{b}": f"L{c}H{d}" for (a, b), (c, d) in map1.items()}, "phase2": {f"L{a}H{b}": f"L{c}H{d}" for (a, b), (c, d) in map2.items()}}


def leakage_adjusted_simulability(doc_texts: list[str], explanations: list[str], outputs: np.ndarray, seed: int = 0) -> float:
    """LAS (Hase et al. 2020) with a frozen-embedding simulator (logistic regression on MiniLM).

    The simulator predicts the student's output (``outputs``, binary per document) from the note,
    and from the note plus the explanation (its CoT); LAS averages the gain over documents where
    the explanation alone leaks the output and where it does not. NaN when the output is constant.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from analyses.embed import embed_texts

    y = np.asarray(outputs).astype(int)
    if len(np.unique(y)) < 2 or np.bincount(y).min() < 3:
        return float("nan")
    x = embed_texts(doc_texts)
    e = embed_texts(explanations)
    folds = min(5, int(np.bincount(y).min()))
    model = LogisticRegression(C=1.0, max_iter=1000)
    acc_x = cross_val_predict(model, x, y, cv=folds) == y
    acc_xe = cross_val_predict(model, np.hstack([x, e]), y, cv=folds) == y
    leaking = cross_val_predict(model, e, y, cv=folds) == y
    gains = [float((acc_xe[g] - acc_x[g].astype(float)).mean()) for g in (leaking, ~leaking) if g.any()]
    return float(np.mean(gains))


def _curve_distance(student: pd.DataFrame, teacher: pd.DataFrame) -> dict[str, float]:
    out = {}
    for metric in ("focus", "confusion"):
        s = student[(student["metric"] == metric) & student["doc_id"].isna()].sort_values("t")["value"].to_numpy()
        t = teacher[(teacher["metric"] == metric) & teacher["doc_id"].isna()].sort_values("t")["value"].to_numpy()
        out[f"{metric}_curve_l1"] = float(np.abs(s - t).mean()) if len(s) == len(t) and len(s) else float("nan")
    return out


def distill_run(run_dir: str | Path, config: DistillConfig | None = None, progress: bool = True, manifest: Manifest | None = None) -> DistillResult:
    """The distillation study of a run (reads its head scores, boundary, traces and dynamics)."""
    from analyses.dynamics import Dynamics, compute_dynamics
    from analyses.tasks.metrics import set_metrics
    from analyses.tasks.sources import Dataset
    from analyses.traces import GenerationConfig, generate_traces
    from probes.models import load_hf_model, load_tokenizer

    cfg = config or DistillConfig()
    run_dir = Path(run_dir)
    manifest = Manifest.for_stage(run_dir, manifest)
    model_path = manifest.model_path()
    dataset = Dataset.load(run_dir)
    labels = dataset.labels
    scores = read_parquet(run_dir / "head_scores.parquet", required=("layer", "head", "score", "rank"))
    teacher_dynamics = Dynamics.load(run_dir / "dynamics.parquet").frame
    run_traces = read_parquet(run_dir / "traces.parquet")
    tokenizer = load_tokenizer(model_path)
    teacher = load_hf_model(model_path, attn_implementation="eager")
    template = manifest.data.get("stages", {}).get("traces", {}).get("config", {}).get("template")

    # Teacher traces of training notes (cached in the run directory).
    cache = run_dir / "distill_teacher_traces.parquet"
    train_docs = dataset.split("train").head(cfg.n_train_docs)
    if train_docs.empty:
        raise input_error(run_dir / "docs.parquet", "no training-split documents to distill on", "generate a dataset with a train split")
    if cache.exists() and len(pd.read_parquet(cache)) == len(train_docs):
        teacher_traces = pd.read_parquet(cache)
    else:
        teacher_traces = generate_traces(model_path, train_docs, labels, template_name=template, config=GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=32), progress=progress, tokenizer=tokenizer, hf_model=teacher)
        write_parquet(teacher_traces, cache)  # atomic: a kill never leaves a half-written cache
    teacher_traces = teacher_traces[teacher_traces["well_formed"]].reset_index(drop=True)
    if teacher_traces.empty:
        raise input_error(cache, "the teacher wrote no well-formed trace on the training notes", "check the model and template (a think close and an answer are needed), then delete this file and rerun")
    tau = {str(t.doc_id): int(t.true_boundary) if not pd.isna(t.true_boundary) else (int(t.cot_start) + int(t.cot_end)) // 2 for t in teacher_traces.itertuples()}
    # The teacher's boundary on its training traces: the internal estimator needs a capture, so
    # the organism's known boundary is used when present, else the midpoint; recorded below.
    examples = _examples(teacher_traces, dataset.docs, labels, tokenizer, tau)
    phase1 = [(int(r.layer), int(r.head)) for r in scores[scores["score"] == "coarse"].nsmallest(cfg.heads_per_phase, "rank").itertuples()]
    phase2 = [(int(r.layer), int(r.head)) for r in scores[scores["score"] == "refine"].nsmallest(cfg.heads_per_phase, "rank").itertuples()]

    eval_docs = dataset.docs.set_index("doc_id").loc[list(run_traces["doc_id"].head(cfg.n_eval_docs))].reset_index()
    gold = [set(int(g) for g in d) for d in eval_docs["gold"]]
    first_gold = [int(list(d)[0]) for d in eval_docs["gold"]]
    rows, maps, curves = [], {}, {}
    teacher_mean = teacher_dynamics[teacher_dynamics["doc_id"].isna()]
    curves["teacher"] = {"t": sorted(teacher_mean["t"].unique().tolist()), **{m: teacher_mean[teacher_mean["metric"] == m].sort_values("t")["value"].tolist() for m in ("focus", "confusion")}}
    students_dir = run_dir / "students"
    started = time.perf_counter()
    for seed in cfg.seeds:
        for condition in cfg.conditions:
            folder = students_dir / f"{condition}-seed{seed}"
            done = _finished_student(folder, cfg)
            if done is not None:  # a rerun after an interruption keeps every finished student
                maps[f"{condition}/seed{seed}"] = done["head_map"]
                if seed == cfg.seeds[0] and done.get("curve"):
                    curves[condition] = done["curve"]
                rows += [{"condition": condition, "seed": seed, "metric": k, "value": v} for k, v in done["metrics"].items()]
                continue
            student, curve, head_map = train_student(condition, seed, examples, teacher, tokenizer, cfg, phase1, phase2, progress)
            maps[f"{condition}/seed{seed}"] = head_map
            student.save_pretrained(folder)
            tokenizer.save_pretrained(folder / "tokenizer")
            curve.to_parquet(folder / "loss_curve.parquet", index=False)
            traces = generate_traces(folder, eval_docs, labels, template_name=template or "organism", config=GenerationConfig(max_new_tokens=cfg.max_new_tokens, batch_size=32), progress=False, hf_model=student, tokenizer=tokenizer)
            answers = [set(a) for a in traces["answer"]]
            m = set_metrics(gold, answers)
            recall = [len(set(s) & g) / len(g) for s, g in zip(traces["shortlist"], gold)]
            p1 = [float(bool(a) and a[0] in g) for a, g in zip(traces["answer"], gold)]
            las = leakage_adjusted_simulability(list(eval_docs["text"]), [t.split("</think>")[0] for t in traces["text"]], np.array([fg in a for fg, a in zip(first_gold, answers)]), seed=seed)
            dyn = compute_dynamics(traces, eval_docs, labels, tokenizer, n_boot=100, seed=seed, progress=False)
            dist = _curve_distance(dyn.frame, teacher_dynamics)
            if seed == cfg.seeds[0]:
                mean = dyn.frame[dyn.frame["doc_id"].isna()]
                curves[condition] = {"t": sorted(mean["t"].unique().tolist()), **{k: mean[mean["metric"] == k].sort_values("t")["value"].tolist() for k in ("focus", "confusion")}}
            metrics = {"micro_f1": m["micro_f1"], "example_f1": m["example_f1"], "p_at_1": float(np.mean(p1)), "shortlist_recall": float(np.mean(recall)), "well_formed": float(traces["well_formed"].mean()), "las": las, "final_loss": float(curve["loss"].tail(10).mean()), **dist}
            rows += [{"condition": condition, "seed": seed, "metric": k, "value": v} for k, v in metrics.items()]
            write_json([sorted(a) for a in answers], folder / "predictions.json")
            # Written last: its presence (with this config) marks the student as finished.
            write_json({"config": asdict(cfg), "head_map": head_map, "metrics": metrics, "curve": curves.get(condition) if seed == cfg.seeds[0] else None}, folder / "student.json")
    frame = pd.DataFrame(rows)
    frame["ci_low"] = np.nan
    frame["ci_high"] = np.nan
    frame = pd.concat([frame, _paired_rows(students_dir, cfg, gold), _paired_seed_rows(frame, cfg)], ignore_index=True)
    write_json({"maps": maps, "phase1_teacher_heads": [f"L{l}H{h}" for l, h in phase1], "phase2_teacher_heads": [f"L{l}H{h}" for l, h in phase2]}, run_dir / "head_map.json")
    meta = {
        "config": asdict(cfg),
        "seconds": round(time.perf_counter() - started, 1),
        "phase_split_on_training_traces": "the organism's known boundary token (midpoint when unknown)",
        "head_map": "relative depth, then minimal attention KL on a warm-up batch at the student's initialisation; saved in head_map.json",
        "L_int": "phase 1: -log(1+kurtosis)·cos(write, anchor direction); phase 2: -(mass gold - mass near-miss)·cos(write, ∇margin)",
        "las": "binary output = the student's answer contains the note's first gold code; simulator = logistic regression on MiniLM embeddings, 5-fold",
        "paired": "mechanistic − standard micro-F1: bootstrap over seeds and documents (same seed = same data order)",
        "curves": curves,
    }
    return DistillResult(frame, meta)


def _finished_student(folder: Path, cfg: DistillConfig) -> dict | None:
    """The record of a student finished under this config, or None (absent, partial or other settings)."""
    marker = folder / "student.json"
    if not marker.is_file() or not (folder / "predictions.json").is_file():
        return None
    record = read_json(marker)
    # JSON turns the config's tuples into lists: compare in that form
    return record if record.get("config") == json.loads(json.dumps(asdict(cfg))) else None


PAIRED_PER_STUDENT = ("focus_curve_l1", "confusion_curve_l1", "well_formed", "shortlist_recall")


def _paired_seed_rows(frame: pd.DataFrame, cfg: DistillConfig, n_boot: int = 1000) -> pd.DataFrame:
    """Summary rows for per-student metrics: condition minus standard, paired by seed, CI by
    resampling seeds (coarse with 3 seeds; the metric is one number per student)."""
    rows = []
    if "standard" not in cfg.conditions:
        return pd.DataFrame(rows)
    per_seed = frame[frame["seed"] >= 0].pivot_table(index=["condition", "seed"], columns="metric", values="value")
    rng = np.random.default_rng(0)
    seeds = list(cfg.seeds)
    for condition in cfg.conditions:
        if condition == "standard":
            continue
        for metric in PAIRED_PER_STUDENT:
            if metric not in per_seed.columns:
                continue
            diffs = np.array([per_seed.loc[(condition, s), metric] - per_seed.loc[("standard", s), metric] for s in seeds], dtype=float)
            if not np.isfinite(diffs).all():
                continue
            draws = [diffs[rng.integers(0, len(diffs), len(diffs))].mean() for _ in range(n_boot)]
            rows.append({"condition": condition, "seed": -1, "metric": f"{metric}_minus_standard", "value": float(diffs.mean()), "ci_low": float(np.quantile(draws, 0.025)), "ci_high": float(np.quantile(draws, 0.975))})
    return pd.DataFrame(rows)


def _paired_rows(students_dir: Path, cfg: DistillConfig, gold: list[set], n_boot: int = 1000) -> pd.DataFrame:
    """Summary rows: each condition's micro-F1 minus standard's, paired by seed, CI over seeds x documents."""
    from analyses.tasks.metrics import set_metrics

    preds = {}
    for condition in cfg.conditions:
        for seed in cfg.seeds:
            path = students_dir / f"{condition}-seed{seed}" / "predictions.json"
            preds[(condition, seed)] = [set(p) for p in json.loads(path.read_text())]
    rows = []
    if "standard" not in cfg.conditions:
        return pd.DataFrame(rows)
    rng = np.random.default_rng(0)
    n = len(gold)
    seeds = list(cfg.seeds)
    for condition in cfg.conditions:
        if condition == "standard":
            continue

        def diff(seed_sample, idx):
            g = [gold[i] for i in idx]
            return float(np.mean([set_metrics(g, [preds[(condition, s)][i] for i in idx])["micro_f1"] - set_metrics(g, [preds[("standard", s)][i] for i in idx])["micro_f1"] for s in seed_sample]))

        point = diff(seeds, range(n))
        draws = [diff([seeds[j] for j in rng.integers(0, len(seeds), len(seeds))], rng.integers(0, n, n)) for _ in range(n_boot)]
        rows.append({"condition": condition, "seed": -1, "metric": "micro_f1_minus_standard", "value": point, "ci_low": float(np.quantile(draws, 0.025)), "ci_high": float(np.quantile(draws, 0.975))})
    return pd.DataFrame(rows)
