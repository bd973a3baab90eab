"""Shared read-only fixtures: a small label space, notes, a tokenizer and tiny random models."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def heart_labels():
    from analyses.tasks.icd10 import icd10cm_labels

    return icd10cm_labels(blocks=["I30-I5A"])


@pytest.fixture(scope="session")
def heart_notes(heart_labels):
    from analyses.tasks.notes import NoteConfig, NoteGenerator

    return NoteGenerator(heart_labels, NoteConfig(seed=3)).generate(120)


@pytest.fixture(scope="session")
def tiny_tokenizer(heart_labels, heart_notes):
    from analyses.organism import build_corpus, train_tokenizer

    corpus = build_corpus(heart_notes, heart_labels)
    return train_tokenizer(list(corpus["prompt"] + corpus["trace"]) + heart_labels.texts, vocab_size=600)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tiny_tokenizer):
    """Folders of tiny random Qwen2, Qwen3 and Llama models, each with its tokenizer sub-folder."""
    from probes.models import build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {family: build_tiny_model(family, root / family, tiny_tokenizer, seed=i) for i, family in enumerate(("qwen2", "qwen3", "llama"))}
