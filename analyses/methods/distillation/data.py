"""Distillation data: training notes chosen to cover the evaluation labels, examples, and the
teacher's signals read once from a capture store (DESIGN §2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.methods.parsing import Region
from analyses.tasks.sources import near_misses_of

__all__ = ["Example", "build_examples", "collate", "choose_training_notes", "capture_teacher_rows", "load_teacher_rows", "TEACHER_STORE"]

TEACHER_STORE = "distill_teacher"


@dataclass
class Example:
    """One teacher trace as a training (or held-out) sequence: ids end with end-of-text."""

    doc_id: str
    ids: np.ndarray
    n_prompt: int
    cot_start: int
    cot_end: int
    tau: int
    regions: np.ndarray
    anchors: list[int]
    pairs: list
    gold: list[int]
    near: list[int]


def build_examples(traces: pd.DataFrame, docs: pd.DataFrame, labels, tokenizer, tau: dict[str, int]) -> list[Example]:
    from probes.heads import margin_pairs

    by_id = docs.set_index("doc_id")
    out = []
    for t in traces.itertuples():
        ids = np.asarray(list(t.prompt_ids) + list(t.output_ids) + [tokenizer.eos_token_id], dtype=np.int64)
        regions = np.asarray(list(t.regions) + [int(Region.AFTER)], dtype=np.int64)
        anchors = [int(ids[i]) for i in np.flatnonzero(regions == int(Region.ANCHOR))]
        doc = by_id.loc[t.doc_id]
        gold = [int(g) for g in doc["gold"]]
        near = near_misses_of(doc)
        pairs = margin_pairs(tokenizer, labels.codes, gold, near)
        out.append(Example(str(t.doc_id), ids, len(t.prompt_ids), int(t.cot_start), int(t.cot_end), int(tau.get(t.doc_id, (int(t.cot_start) + int(t.cot_end)) // 2)), regions, anchors, pairs, gold, near))
    return out


def collate(batch: list[Example], pad: int):
    """Right-padded ids, attention mask and labels (loss on everything after the prompt)."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.ids)] = torch.from_numpy(e.ids)
        mask[i, : len(e.ids)] = 1
        labels[i, e.n_prompt : len(e.ids)] = torch.from_numpy(e.ids[e.n_prompt :])
    return ids, mask, labels


def choose_training_notes(train_docs: pd.DataFrame, cover_docs: pd.DataFrame | None, n: int, seed: int = 0, eval_docs: pd.DataFrame | None = None) -> tuple[pd.DataFrame, dict]:
    """``n`` training notes chosen without reading the notes the students are scored on: a greedy
    set cover of the gold codes of ``cover_docs`` (the dev notes; None: every code of the training
    split, the label space the notes reach), then a seeded random fill.

    Returns the notes and the coverage record. ``eval_docs`` (the scored notes) are read only after
    the choice, to report which of their gold codes the chosen notes happen to cover: a measured
    fact, never a target.
    """
    golds = [set(int(g) for g in gs) for gs in train_docs["gold"]]
    wanted = {int(g) for gs in cover_docs["gold"] for g in gs} if cover_docs is not None and len(cover_docs) else set().union(*golds) if golds else set()
    chosen: list[int] = []
    covered: set[int] = set()
    candidates = set(range(len(train_docs)))
    while len(chosen) < n:
        best, gain = None, 0
        for i in sorted(candidates):
            g = len((golds[i] & wanted) - covered)
            if g > gain:
                best, gain = i, g
        if best is None:
            break
        chosen.append(best)
        candidates.discard(best)
        covered |= golds[best] & wanted
    rng = np.random.default_rng(seed)
    rest = [i for i in rng.permutation(len(train_docs)) if i in candidates]
    chosen += rest[: max(0, n - len(chosen))]
    picked = train_docs.iloc[sorted(chosen)].reset_index(drop=True)
    seen = {int(g) for gs in picked["gold"] for g in gs}
    record = {
        "training_notes": int(len(picked)),
        "chosen_by": ("greedy cover of the dev notes' gold codes" if cover_docs is not None and len(cover_docs) else "greedy cover of the training split's codes (no dev notes)") + ", then a seeded random fill; the scored notes are never read for the choice",
        "cover_codes": len(wanted),
        "share_of_cover_codes_seen": round(len(wanted & seen) / max(len(wanted), 1), 4),
    }
    if eval_docs is not None:  # measured after the choice
        scored = {int(g) for gs in eval_docs["gold"] for g in gs}
        available = {int(g) for gs in train_docs["gold"] for g in gs}
        occurrences = [int(g) for gs in eval_docs["gold"] for g in gs]
        record.update(
            {
                "eval_gold_codes": len(scored),
                "share_seen_in_training_traces": round(len(scored & seen) / max(len(scored), 1), 4),
                "share_of_occurrences_seen": round(float(np.mean([g in seen for g in occurrences])) if occurrences else 0.0, 4),
                "share_in_whole_training_split": round(len(scored & available) / max(len(scored), 1), 4),
                "mean_training_occurrences_per_eval_code": round(float(np.mean([sum(g in gs for gs in (set(map(int, x)) for x in picked["gold"])) for g in scored])) if scored else 0.0, 3),
            }
        )
    return picked, record


def capture_teacher_rows(run_dir: Path, bridge, traces: pd.DataFrame, heads: list[tuple[int, int]], batch_size: int = 8, progress: bool = True) -> Path:
    """Capture the teacher heads' attention rows at CoT queries of ``traces`` into
    ``<run>/distill_teacher`` (resumable, checksummed: the capture store)."""
    from analyses.methods.replay import capture_requests
    from probes.capture import CaptureConfig, capture

    import shutil

    from probes.errors import CtdInputError

    requests = capture_requests(traces, "cot")
    config = CaptureConfig(points=[], attention_layers=[], pattern_heads=[tuple(map(int, h)) for h in heads], batch_size=batch_size, dtype="float16")
    settings = {"purpose": "distillation teacher signals"}
    try:
        return capture(bridge, requests, run_dir, config, settings=settings, progress=progress, store_dir=TEACHER_STORE)
    except CtdInputError as exc:
        if "other settings" not in str(exc):
            raise
    # A cache of an earlier study (other traces or heads): this study's own signals replace it.
    shutil.rmtree(Path(run_dir) / TEACHER_STORE)
    return capture(bridge, requests, run_dir, config, settings=settings, progress=progress, store_dir=TEACHER_STORE)


def load_teacher_rows(run_dir: Path, examples: list[Example], heads: list[tuple[int, int]]) -> dict[str, dict[tuple[int, int], torch.Tensor]]:
    """Per example: each head's rows [cot_end - cot_start, n_tokens] (read once; the end-of-text
    key the examples append gets no teacher weight)."""
    from probes.points import hook_name
    from probes.store import open_store

    store = open_store(run_dir, TEACHER_STORE)
    out: dict[str, dict[tuple[int, int], torch.Tensor]] = {}
    for e in examples:
        rows = {}
        for layer, head in heads:
            positions, values = store.read(e.doc_id, f"{hook_name('pattern', layer)}:rows@h{head}")
            full = torch.zeros((e.cot_end - e.cot_start, len(e.ids)), dtype=torch.float32)
            full[positions.numpy() - e.cot_start, : values.shape[1]] = values.float()
            rows[(layer, head)] = full
        out[e.doc_id] = rows
    return out
