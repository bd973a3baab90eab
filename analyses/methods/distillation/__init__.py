"""What the distillation study is made of (DESIGN §1, question 3; the study itself is the
``distill`` stage, its table :class:`analyses.results.DistillResult`):

- :mod:`.losses`: the loss terms; :mod:`.head_map`: teacher heads and their student heads;
- :mod:`.data`: training notes, examples, teacher signals from the capture store;
- :mod:`.training`: one student; :mod:`.evaluation`: what a student can do.
"""

from analyses.methods.distillation.data import Example, build_examples, choose_training_notes, collate
from analyses.methods.distillation.head_map import choose_teacher_heads, map_heads
from analyses.methods.distillation.losses import attention_kl, forward_with_heads, mechanistic_loss, next_token_loss, write_alignment
from analyses.methods.distillation.training import CONDITIONS, train_student

__all__ = [
    "CONDITIONS",
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
]
