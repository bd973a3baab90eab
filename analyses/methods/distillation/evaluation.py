"""What a student can do, measured on held-out notes and held-out teacher traces."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from analyses.methods.distillation.data import collate
from analyses.methods.distillation.losses import attention_kl
from analyses.methods.parsing import Region

__all__ = ["teacher_forced_metrics", "answer_metrics", "mechanism_transfer", "leakage_adjusted_simulability", "paired_trajectory_distance"]


def teacher_forced_metrics(model, examples: list, readout_items: list[list], pad_id: int, batch_size: int = 32) -> pd.DataFrame:
    """Per held-out teacher trace: the gold answer codes' log-probability (mean over codes, all
    their tokens) and the cross-entropy of the teacher's tokens in phase 1 (CoT before the
    boundary), phase 2 (CoT from the boundary) and the answer."""
    rows = []
    with torch.no_grad():
        for b0 in range(0, len(examples), batch_size):
            batch = examples[b0 : b0 + batch_size]
            ids, mask, _ = collate(batch, pad_id)
            logits = model(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits, -1)
            for i, e in enumerate(batch):
                n = len(e.ids)
                token_lp = logp[i, : n - 1].gather(1, ids[i, 1:n, None]).squeeze(1)  # log p(token t+1 | ..t)
                def ce(a: int, b: int) -> float:
                    # tokens a..b-1 are predicted at positions a-1..b-2
                    return float(-token_lp[a - 1 : b - 1].mean()) if b > a else float("nan")
                items = readout_items[b0 + i]
                gold_lp = [float(sum(logp[i, p, t] for p, t in zip(positions, targets))) for positions, targets, _ in items]
                rows.append({
                    "doc_id": e.doc_id,
                    "gold_logprob": float(np.mean(gold_lp)) if gold_lp else float("nan"),
                    "ce_phase1": ce(e.cot_start, e.tau),
                    "ce_phase2": ce(e.tau, e.cot_end),
                    "ce_answer": ce(e.cot_end, n),
                })
    return pd.DataFrame(rows)


def answer_metrics(traces: pd.DataFrame, gold: list[set]) -> dict[str, float]:
    """Answer micro-F1, example-F1, P@1, recall, shortlist recall and well-formed share of generated traces."""
    from analyses.tasks.metrics import set_metrics

    answers = [set(a) for a in traces["answer"]]
    m = set_metrics(gold, answers)
    return {
        "micro_f1": float(m["micro_f1"]),
        "example_f1": float(m["example_f1"]),
        "p_at_1": float(np.mean([float(bool(a) and a[0] in g) for a, g in zip(traces["answer"], gold)])),
        "recall": float(np.mean([len(set(a) & g) / max(len(g), 1) for a, g in zip(traces["answer"], gold)])),
        "shortlist_recall": float(np.mean([len(set(s) & g) / max(len(g), 1) for s, g in zip(traces["shortlist"], gold)])),
        "well_formed": float(traces["well_formed"].mean()),
    }


def mechanism_transfer(model, examples: list, teacher_rows: dict, map1: dict, map2: dict, pad_id: int, batch_size: int = 16) -> pd.DataFrame:
    """Per held-out teacher trace and mapped head pair: KL(teacher head's attention || student
    head's), phase-1 pairs at early CoT queries over the document, phase-2 pairs at late CoT
    queries over earlier label mentions (the keys each loss targets)."""
    rows = []
    implementation = model.config._attn_implementation
    if implementation != "eager":  # sdpa returns no attention weights (students trained without attention losses)
        model.set_attn_implementation("eager")
    try:
        _transfer_rows(model, examples, teacher_rows, map1, map2, pad_id, batch_size, rows)
    finally:
        if implementation != "eager":
            model.set_attn_implementation(implementation)
    return pd.DataFrame(rows)


def _transfer_rows(model, examples, teacher_rows, map1, map2, pad_id, batch_size, rows) -> None:
    with torch.no_grad():
        for b0 in range(0, len(examples), batch_size):
            batch = examples[b0 : b0 + batch_size]
            ids, mask, _ = collate(batch, pad_id)
            out = model.model(input_ids=ids, attention_mask=mask, output_attentions=True)
            for i, e in enumerate(batch):
                n = len(e.ids)
                regions = torch.from_numpy(e.regions)
                doc_keys = (regions == int(Region.DOCUMENT)) | (regions == int(Region.ANCHOR))
                mention_keys = (regions == int(Region.MENTION_GOLD)) | (regions == int(Region.MENTION_NEAR_MISS)) | (regions == int(Region.MENTION_OTHER))
                for phase, mapping, queries, keys in (
                    ("phase1", map1, torch.arange(e.cot_start, min(e.tau, e.cot_end)), doc_keys),
                    ("phase2", map2, torch.arange(max(e.tau, e.cot_start), e.cot_end), mention_keys),
                ):
                    if not len(queries):
                        continue
                    key_mask = keys.expand(len(queries), n) & (torch.arange(n)[None, :] <= queries[:, None])
                    for (tl, th), (sl, sh) in mapping.items():
                        t = teacher_rows[e.doc_id][(tl, th)][queries - e.cot_start, :n]
                        s = out.attentions[sl][i, sh, queries, :n].float()
                        kl = attention_kl(t, s, key_mask)
                        valid = key_mask.any(-1)
                        if valid.any():
                            rows.append({"doc_id": e.doc_id, "phase": phase, "teacher_head": f"L{tl}H{th}", "student_head": f"L{sl}H{sh}", "kl": float(kl[valid].mean())})


def leakage_adjusted_simulability(doc_texts: list[str], explanations: list[str], outputs: np.ndarray, seed: int = 0) -> float:
    """LAS (Hase et al. 2020) with a frozen-embedding simulator (logistic regression on MiniLM).

    The simulator predicts the student's binary output from the note, and from the note plus the
    explanation (its CoT); LAS averages the gain over documents where the explanation alone leaks
    the output and where it does not. NaN when the output does not vary (then nothing is simulated).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_predict

    from analyses.methods.embed import embed_texts

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


def paired_trajectory_distance(student: pd.DataFrame, teacher: pd.DataFrame) -> pd.DataFrame:
    """Per note present in both: mean |student - teacher| over the grid, for Focus and Confusion.

    ``student`` and ``teacher`` are per-trace dynamics frames of traces of the *same* notes."""
    rows = []
    s = student[student["doc_id"].notna()]
    t = teacher[teacher["doc_id"].notna()]
    for metric in ("focus", "confusion"):
        a = s[s["metric"] == metric].pivot_table(index="doc_id", columns="t", values="value")
        b = t[t["metric"] == metric].pivot_table(index="doc_id", columns="t", values="value")
        common = a.index.intersection(b.index)
        if len(common):
            dist = (a.loc[common] - b.loc[common, a.columns]).abs().mean(axis=1)
            rows += [{"doc_id": d, "metric": f"{metric}_curve_l1", "value": float(v)} for d, v in dist.items()]
    return pd.DataFrame(rows)
