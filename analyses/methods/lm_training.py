"""What the three small-LM trainers share (the organism, the student base, distillation): encoding,
right-padded batches, the warm-up + cosine schedule, and one checked optimiser step."""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
import torch

from probes.errors import CtdNumericalError

__all__ = ["encode_examples", "right_padded_batch", "cosine_lr", "checked_step"]


def encode_examples(pairs: Iterable[tuple[str, str]], tokenizer, max_positions: int) -> list[tuple[np.ndarray, int]]:
    """``(ids, n_prompt)`` per ``(prompt, completion)`` pair, the completion ended by the end-of-text
    token; pairs longer than ``max_positions`` are left out (the caller counts what it keeps)."""
    eos = tokenizer.eos_token_id
    out = []
    for prompt, completion in pairs:
        p = tokenizer.encode(prompt, add_special_tokens=False) if prompt else []
        ids = np.asarray(p + tokenizer.encode(completion, add_special_tokens=False) + [eos], dtype=np.int64)
        if len(ids) <= max_positions:
            out.append((ids, len(p)))
    return out


def right_padded_batch(examples: list[tuple[np.ndarray, int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` (-100 on the prompt and the padding).
    Right padding: training only, nothing is generated from these batches."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(input_ids, -100)
    mask = torch.zeros_like(input_ids)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.from_numpy(ids)
        mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.from_numpy(ids[n_prompt:])
    return input_ids, mask, labels


def cosine_lr(step: int, elapsed: float, lr: float, warmup_steps: int, max_steps: int, time_budget_s: float, floor: float = 0.05) -> float:
    """Linear warm-up, then cosine decay to ``floor * lr`` over whichever runs out first, steps or
    the time budget, so a slower machine still ends training at a low learning rate."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    by_steps = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    frac = min(1.0, max(by_steps, elapsed / time_budget_s))
    return lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * frac)))


def checked_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, where: str, clip: float = 1.0) -> None:
    """Backward, clip and step, or a numerical error naming ``where`` when the loss is not finite."""
    if not torch.isfinite(loss):
        lr = optimizer.param_groups[0]["lr"]
        raise CtdNumericalError(f"{where}: loss is {loss.item()}; lower the learning rate (now {lr:.2e})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
