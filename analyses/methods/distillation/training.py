"""Training one student: from the student base, on the teacher's traces, under one condition."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import torch

from analyses.methods.distillation.data import collate
from analyses.methods.distillation.losses import TERMS, forward_with_heads, mechanistic_loss, next_token_loss
from analyses.methods.lm_training import checked_step

__all__ = ["CONDITIONS", "train_student", "load_student_base", "length_bucketed_batches"]

# condition -> which loss terms are on (phase-1 attn/write/int, phase-2 loop/write/int)
_ALL = dict.fromkeys(TERMS, True)
_NONE = dict.fromkeys(TERMS, False)
CONDITIONS: dict[str, dict[str, bool]] = {
    "standard": _NONE,
    "mechanistic": _ALL,
    # standard distillation given the mechanistic student's wall time (more steps, same compute)
    "standard_equal_compute": _NONE,
    "no_phase1": {**_ALL, "attn": False, "write1": False, "int1": False},
    "no_phase2": {**_ALL, "loop": False, "write2": False, "int2": False},
    "no_attn": {**_ALL, "attn": False},
    "no_loop": {**_ALL, "loop": False},
    "no_write": {**_ALL, "write1": False, "write2": False},
    "no_int": {**_ALL, "int1": False, "int2": False},
}


def load_student_base(path: str | Path, attn_implementation: str = "eager"):
    """The student base as a trainable float32 model (eager attention: the mechanistic losses read
    attention weights; ``sdpa`` where nothing does)."""
    from probes.models import load_hf_model

    model = load_hf_model(path, attn_implementation=attn_implementation)
    model.float()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def length_bucketed_batches(lengths: list[int], batch_size: int, steps: int, seed: int, pool: int = 32) -> list[list[int]]:
    """``steps`` batches of example indices: each epoch a seeded permutation, cut into pools of
    ``pool`` batches, each pool sorted by length and cut into batches, the batches shuffled. Traces
    are 228 tokens on average and 628 at most, so a random batch of 16 is about half padding; a
    bucketed one a few percent. Every condition of a seed gets the same batches."""
    rng = np.random.default_rng(seed)
    lengths = np.asarray(lengths)
    out: list[list[int]] = []
    while len(out) < steps:
        perm = rng.permutation(len(lengths))
        epoch = []
        for start in range(0, len(perm), batch_size * pool):
            chunk = perm[start : start + batch_size * pool]
            chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
            epoch += [chunk[i : i + batch_size].tolist() for i in range(0, len(chunk), batch_size)]
        out += [epoch[i] for i in rng.permutation(len(epoch))]
    return out[:steps]


def train_student(
    condition: str,
    seed: int,
    examples: list,
    teacher_rows: dict,
    pad_id: int,
    base: str | Path,
    steps: int,
    batch_size: int,
    lr: float,
    map1: dict,
    map2: dict,
    lambda1: float = 0.5,
    lambda2: float = 0.5,
    checkpoints: list[int] = (),
    on_checkpoint: Callable[[int, object], dict] | None = None,
    progress: bool = False,
    autocast: bool = True,
):
    """Train one student; returns (model, loss curve, checkpoint records, training seconds).

    Every condition of a seed sees the same data order. ``on_checkpoint(step, model)`` runs at
    step 0 (the base) and after each step in ``checkpoints``; its time is not training time.
    """
    from tqdm.auto import tqdm

    terms = CONDITIONS[condition]
    mech = any(terms.values())
    student = load_student_base(base, "eager" if mech else "sdpa")
    batches = length_bucketed_batches([len(e.ids) for e in examples], batch_size, steps, seed)
    optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(1, min(20, steps // 10))
    needed_layers = {sl for sl, _ in list(map1.values()) + list(map2.values())}
    curve, records = [], []
    trained = 0.0
    if on_checkpoint is not None:
        student.eval()
        records.append({"step": 0, **on_checkpoint(0, student)})
    bar = tqdm(range(steps), desc=f"{condition} s{seed}", disable=not progress, file=sys.stderr, leave=False)
    for step in bar:
        started = time.perf_counter()
        lr_now = lr * min(1.0, (step + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / max(steps, 1))))
        for group in optimizer.param_groups:
            group["lr"] = lr_now
        batch = [examples[i] for i in batches[step]]
        ids, mask, labels = collate(batch, pad_id)
        student.train()
        # bf16 autocast (as the organism and the student base were trained): 1.6x the steps per second
        # on this CPU; the losses themselves are computed in float32.
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if mech:
                out, z = forward_with_heads(student, ids, mask, needed_layers)
                ce = next_token_loss(student, out.last_hidden_state, labels)
                rows = [teacher_rows[e.doc_id] for e in batch]
                extra, parts = mechanistic_loss(student, batch, rows, out, z, map1, map2, terms, lambda1, lambda2)
                loss = ce + extra
            else:
                hidden = student.model(input_ids=ids, attention_mask=mask).last_hidden_state
                ce = next_token_loss(student, hidden, labels)
                parts, loss = {}, ce
        checked_step(student, optimizer, loss, f"distill {condition} seed {seed}, step {step}")
        trained += time.perf_counter() - started
        curve.append({"step": step + 1, "loss": loss.item(), "ce": ce.item(), "seconds": trained, **parts})
        if on_checkpoint is not None and step + 1 in checkpoints:
            student.eval()
            records.append({"step": step + 1, **on_checkpoint(step + 1, student)})
    student.eval()
    return student, pd.DataFrame(curve), records, trained
