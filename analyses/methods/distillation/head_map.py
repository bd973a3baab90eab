"""Which teacher heads the mechanistic losses copy, and which student heads copy them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.methods.distillation.losses import attention_kl

__all__ = ["choose_teacher_heads", "map_heads", "similarity_map"]

Head = tuple[int, int]


def choose_teacher_heads(run_dir: Path, k: int) -> tuple[list[Head], list[Head], str]:
    """Phase-1 and phase-2 teacher heads, and how they were chosen: the top CoarseScore /
    RefineScore heads on dev traces. Never the patch stage's sweeps, which ran on the test notes
    the students are scored on; a run without dev head scores stops with the fix.
    """
    from analyses.machinery.io import read_parquet

    source = run_dir / "dev_head_scores.parquet"
    if not source.exists():  # never the test traces' scores: the students are scored on test notes
        from probes.errors import input_error

        raise input_error(source, "no head scores on dev traces to choose the teacher heads with", "run `ctd traces` with --n-dev-docs N (N > 0), then `ctd capture` and `ctd characterize`")
    scores = read_parquet(source, required=("layer", "head", "score", "rank"))
    phase1 = [(int(r.layer), int(r.head)) for r in scores[scores["score"] == "coarse"].nsmallest(k, "rank").itertuples()]
    phase2 = [(int(r.layer), int(r.head)) for r in scores[scores["score"] == "refine"].nsmallest(k, "rank").itertuples()]
    return phase1, phase2, f"phase scores on dev traces: top CoarseScore / RefineScore heads ({source.name})"


def map_heads(teacher_heads: list[Head], teacher_layers: int, student_layers: int, student_heads: int, similarity: np.ndarray | None = None) -> dict[Head, Head]:
    """Teacher head -> student head: same relative depth, then the most similar free student head.

    ``similarity[i, h]`` scores teacher head i against student head h of its depth-matched layer
    (higher is more similar); without it the lowest free head index is taken. Greedy in the order
    given (the teacher's ranking), never reusing a student head; deterministic.
    """
    used: set[Head] = set()
    mapping = {}
    for i, (layer, head) in enumerate(teacher_heads):
        s_layer = min(student_layers - 1, int(layer * student_layers / teacher_layers))
        order = list(range(student_heads)) if similarity is None else list(np.argsort(-similarity[i], kind="stable"))
        for s_head in order:
            if (s_layer, int(s_head)) not in used:
                mapping[(layer, head)] = (s_layer, int(s_head))
                used.add((s_layer, int(s_head)))
                break
        else:  # that layer is full: the first free head of any layer
            free = [(l, h) for l in range(student_layers) for h in range(student_heads) if (l, h) not in used]
            if free:
                mapping[(layer, head)] = free[0]
                used.add(free[0])
    return mapping


def similarity_map(student, examples, teacher_rows: dict, heads: list[Head], teacher_layers: int, pad: int) -> np.ndarray:
    """``similarity[i, h]``: minus the mean KL between teacher head i (cached rows) and student head
    h of i's depth-matched layer, over the CoT queries of ``examples`` (on the student base, not
    on random weights)."""
    from analyses.methods.distillation.data import collate

    n_layers = student.config.num_hidden_layers
    n_heads = student.config.num_attention_heads
    ids, mask, _ = collate(examples, pad)
    with torch.no_grad():
        out = student.model(input_ids=ids, attention_mask=mask, output_attentions=True)
    sim = np.zeros((len(heads), n_heads))
    for i, (tl, th) in enumerate(heads):
        sl = min(n_layers - 1, int(tl * n_layers / teacher_layers))
        for sh in range(n_heads):
            kls = []
            for b, e in enumerate(examples):
                n = len(e.ids)
                q = torch.arange(e.cot_start, e.cot_end)
                keys = torch.arange(n)[None, :] <= q[:, None]
                kls.append(attention_kl(teacher_rows[e.doc_id][(tl, th)][:, :n], out.attentions[sl][b, sh, q, :n], keys).mean())
            sim[i, sh] = -float(torch.stack(kls).mean())
    return sim
