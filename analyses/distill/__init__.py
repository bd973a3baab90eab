"""Distillation (DESIGN §1, question 3): standard versus mechanistic, from a student base.

- :mod:`.losses`: the loss terms; :mod:`.head_map`: teacher heads and their student heads;
- :mod:`.data`: training notes, examples, teacher signals from the capture store;
- :mod:`.training`: one student; :mod:`.evaluation`: what a student can do;
- :mod:`.stage`: the study (``ctd distill``); its table and figures are :class:`analyses.results.DistillResult`.
"""

from analyses.methods.distillation.data import Example, build_examples, choose_training_notes, collate
from analyses.methods.distillation.head_map import choose_teacher_heads, map_heads
from analyses.methods.distillation.losses import attention_kl, forward_with_heads, mechanistic_loss, next_token_loss, write_alignment
from analyses.results.distill import DistillResult
from analyses.distill.stage import DistillConfig, distill_run, holm
from analyses.methods.distillation.training import CONDITIONS, train_student

__all__ = [
    "CONDITIONS",
    "DistillConfig",
    "DistillResult",
    "distill_run",
    "train_student",
    "map_heads",
    "choose_teacher_heads",
    "choose_training_notes",
    "attention_kl",
    "write_alignment",
    "mechanistic_loss",
    "next_token_loss",
    "forward_with_heads",
    "build_examples",
    "collate",
    "Example",
    "holm",
]
