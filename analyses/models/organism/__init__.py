"""The embedded reasoning model (DESIGN §5): its trace format, tokenizer and training.

- :mod:`.format`: the trace teacher, the true boundary, the training corpus;
- :mod:`.tokenizer`: the byte-level BPE tokenizer (every label code one token);
- :mod:`.training`: ``ctd organism train`` and the held-out check.
"""

from analyses.models.organism.format import (
    ORGANISM_LABEL_CHAPTERS,
    PHASE2_MARKER,
    SPECIAL_TOKENS,
    boundary_char,
    build_corpus,
    default_organism_path,
    dictionary_corpus,
    label_mention,
    teacher_trace,
)
from analyses.models.organism.tokenizer import train_tokenizer

__all__ = [
    "teacher_trace",
    "label_mention",
    "boundary_char",
    "build_corpus",
    "dictionary_corpus",
    "default_organism_path",
    "train_tokenizer",
    "OrganismConfig",
    "train_organism",
    "evaluate_organism",
    "organism_notes",
    "small_qwen3_config",
    "ORGANISM_LABEL_CHAPTERS",
    "SPECIAL_TOKENS",
    "PHASE2_MARKER",
]


_TRAINING = {"OrganismConfig", "train_organism", "evaluate_organism", "organism_notes", "small_qwen3_config", "TRAINING_NOTE_SEED_OFFSET"}


def __getattr__(name):
    # Training pulls in torch and transformers: imported only when asked for.
    if name in _TRAINING:
        import importlib

        return getattr(importlib.import_module("analyses.models.organism.training"), name)
    raise AttributeError(f"module 'analyses.models.organism' has no attribute {name!r}")
