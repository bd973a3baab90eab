"""The embedded reasoning model: trace teacher, BPE tokenizer, a small Qwen3 trained from scratch.

The organism reads a generated clinical note and writes a two-phase chain of thought:

    <think>
    Candidates: I50.21, I10, I50.22.            <- phase 1: shortlist (gold mixed with near-misses)
    Check I50.21: acute not noted -> drop.      <- phase 2: one check per candidate, with the
    Check I10: denied -> drop.                     deciding evidence
    Check I50.22: chronic -> keep.
    </think>
    <answer>I50.22</answer>

The true phase boundary is the first token of the first ``Check``. The checkpoint is an ordinary
Hugging Face folder (config, safetensors, tokenizer in ``tokenizer/``) loaded through the same code
path as any real model; ``ctd_organism.json`` beside it records how it was trained and what it reaches.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.prompts import get_template
from analyses.tasks.labels import LabelSpace, lower_first, normalize_text, short_description
from probes.errors import CtdNumericalError, input_error

__all__ = [
    "OrganismConfig",
    "teacher_trace",
    "build_corpus",
    "train_tokenizer",
    "train_organism",
    "evaluate_organism",
    "default_organism_path",
    "ORGANISM_LABEL_CHAPTERS",
    "boundary_char",
]

ORGANISM_LABEL_CHAPTERS = ("9",)
SPECIAL_TOKENS = ("<|endoftext|>", "<think>", "</think>", "<answer>", "</answer>", "<note>", "</note>")
_ASSETS = Path(__file__).resolve().parent / "assets" / "organism"
_KIND_EVIDENCE = {"negated": "denied", "history": "history only", "family": "family history"}


def default_organism_path() -> Path:
    """The shipped checkpoint (``analyses/assets/organism``)."""
    return _ASSETS


# ------------------------------------------------------------------------------------------------
# the trace teacher


# Words that name no distinguishing modifier: a gold code decided only by these ("unspecified",
# "other") is a residual code, and every more specific sibling must be checked and ruled out.
_GENERIC_WORDS = frozenset("unspecified other specified elsewhere classified not of the and in to or a an by for as".split())
# How many further siblings a residual code is checked against in phase 2 (beyond the listed one).
MAX_EXTRA_CHECKS = 6
PHASE2_MARKER = "Check "


def label_mention(labels: LabelSpace, label_id: int) -> str:
    """A code as the CoT names it: the code followed by its short description."""
    return f"{labels.codes[label_id]} {short_description(labels.texts[label_id])}"


def _ranked_siblings(row, labels: LabelSpace, gold: int) -> list[int]:
    # The note records each gold code's siblings ranked by text similarity (closest first).
    parent = labels.parents[gold]
    near = [int(j) for j in row["near_miss"]] if "near_miss" in row and row["near_miss"] is not None else []
    ranked = [j for j in near if parent is not None and labels.parents[j] == parent and j != gold]
    contrast = next((int(e["contrast"]) for e in row["evidence"] if int(e["label_id"]) == gold), -1)
    if contrast >= 0 and contrast not in ranked and labels.parents[contrast] == parent:
        ranked.insert(0, contrast)
    return ranked


def teacher_trace(row, labels: LabelSpace, max_extra: int = MAX_EXTRA_CHECKS) -> str:
    """The trace (text after the prompt's ``<think>\n``) for one generated note ``row``.

    Phase 1 (shortlisting) walks the note's findings in order. A gold finding lists its code and
    its closest sibling (code order, so position does not reveal gold); a negated or family-history
    finding is ruled out at once; a past-history finding is listed for checking. Phase 2
    (fine-grained) begins at the first ``Check`` and walks the findings again:

    - a gold code whose evidence names a distinguishing modifier ("acute", "left") is kept on it;
    - a residual gold code ("unspecified", "other") is checked against its listed sibling and up to
      ``max_extra`` further siblings, each ruled out by the modifier it needs, and kept on the
      quoted evidence;
    - a past-history finding is dropped.

    So phase-1 length grows with the findings and distractors, phase-2 length with how much
    checking each gold code needs: the boundary's share of the CoT varies from note to note.
    Every code carries its short description, as R1-style traces write it.
    """
    gold = [int(g) for g in row["gold"]]
    gold_set = set(gold)
    evidence = {int(e["label_id"]): e for e in row["evidence"]}
    distractors = {int(d["label_id"]): d["kind"] for d in row["distractors"]}
    findings = sorted([(int(a["start"]), int(a["label_id"])) for a in row["anchors"]] + [(int(d["start"]), int(d["label_id"])) for d in row["distractors"]])
    findings += [(10**9, g) for g in gold if g not in {lab for _, lab in findings}]  # a gold without a span (never in generated notes)
    mention = lambda c: label_mention(labels, c)  # noqa: E731
    by_code = lambda ids: sorted(ids, key=lambda c: labels.codes[c])  # noqa: E731
    phase1: list[str] = []
    phase2: list[str] = []
    used: set[int] = set(gold)
    seen: set[int] = set()
    for _, label in findings:
        if label in seen:
            continue
        seen.add(label)
        if label in gold_set:
            ev = evidence[label]
            ranked = [j for j in _ranked_siblings(row, labels, label) if j not in used]
            group = by_code([label] + ranked[:1])
            used.update(group)
            phase1.append("Candidates: " + "; ".join(mention(c) for c in group) + ".")
            explicit = [w for w in ev["decisive"] if w not in _GENERIC_WORDS]
            phrase_words = set(normalize_text(ev["phrase"]).split())
            if explicit or len(group) == 1 and not ranked[1:]:
                why = " ".join(explicit[:3]) if explicit else f'"{ev["phrase"]}"'
                phase2.append(f"{PHASE2_MARKER}{mention(label)}: {why} noted -> keep.")
                continue
            extra = ranked[1 : 1 + max_extra]
            used.update(extra)
            for c in by_code(group + extra):
                if c == label:
                    phase2.append(f'{PHASE2_MARKER}{mention(c)}: "{ev["phrase"]}" noted, nothing more specific -> keep.')
                else:
                    needs = [w for w in normalize_text(short_description(labels.texts[c])).split() if w not in phrase_words][:4] or ["more detail"]
                    phase2.append(f"{PHASE2_MARKER}{mention(c)}: needs {' '.join(needs)}, not noted -> drop.")
        elif label not in used:
            used.add(label)
            kind = distractors[label]
            if kind == "history":
                phase1.append(f"Candidates: {mention(label)}.")
                phase2.append(f"{PHASE2_MARKER}{mention(label)}: history only, resolved -> drop.")
            else:
                phase1.append(f"Ruled out: {mention(label)} ({_KIND_EVIDENCE[kind]}).")
    answer = ", ".join(labels.codes[c] for c in dict.fromkeys(label for _, label in findings) if c in gold_set)
    return "\n".join(phase1 + phase2) + "\n</think>\n<answer>" + answer + "</answer>"


def boundary_char(trace_text: str) -> int | None:
    """Character index where checking begins (the true phase boundary), or None."""
    at = trace_text.find(PHASE2_MARKER)
    while at > 0 and trace_text[at - 1] != "\n":
        at = trace_text.find(PHASE2_MARKER, at + 1)
    return None if at < 0 else at


def dictionary_corpus(labels: LabelSpace, repeats: int = 3) -> pd.DataFrame:
    """One-finding mini-notes per label text variant, traced by the teacher: a cheap way to learn
    each code, its short description and the siblings it is told apart from."""
    from analyses.tasks.labels import text_variants as _variants
    from analyses.tasks.notes import NoteGenerator

    template = get_template("organism")
    generator = NoteGenerator(labels)
    variants = [_variants(labels.texts[i], labels.aliases[i]) for i in range(len(labels))]
    owners: dict[str, int] = {}
    for vs in variants:
        for v in vs:
            owners[normalize_text(v)] = owners.get(normalize_text(v), 0) + 1
    prompts, traces = [], []
    for i in range(len(labels)):
        near, closest = generator.near_misses([i])
        contrast = closest.get(i)
        for phrase in (v for v in variants[i] if owners[normalize_text(v)] == 1):  # unambiguous only
            phrase = lower_first(phrase)
            prompt, _ = template.render(f"Presents with {phrase}.")
            row = {
                "gold": [i],
                "near_miss": near,
                "evidence": [{"label_id": i, "phrase": phrase, "contrast": -1 if contrast is None else contrast, "decisive": generator.decisive_words(i, contrast, phrase)}],
                "anchors": [{"label_id": i, "start": len("Presents with "), "end": len("Presents with ") + len(phrase)}],
                "distractors": [],
            }
            trace = teacher_trace(row, labels)
            prompts += [prompt] * repeats
            traces += [trace] * repeats
    return pd.DataFrame({"doc_id": None, "split": "train", "prompt": prompts, "trace": traces})


def build_corpus(docs: pd.DataFrame, labels: LabelSpace) -> pd.DataFrame:
    """Prompt text and teacher trace per note."""
    template = get_template("organism")
    prompts, traces = [], []
    for _, row in docs.iterrows():
        prompt, _ = template.render(row["text"])
        prompts.append(prompt)
        traces.append(teacher_trace(row, labels))
    return pd.DataFrame({"doc_id": docs["doc_id"], "split": docs["split"], "prompt": prompts, "trace": traces})


# ------------------------------------------------------------------------------------------------
# tokenizer


def train_tokenizer(texts, vocab_size: int = 3000, label_codes: list[str] | None = None):
    """A byte-level BPE tokenizer trained on ``texts`` with the organism's special tokens.

    ``label_codes`` become whole tokens (matched as single words only): each label is then one
    output token, so the organism's label choice is one classification step, and the logit lens
    and the label margin read one well-defined token per label.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
    )
    fast.padding_side = "left"
    if label_codes:
        from tokenizers import AddedToken

        fast.add_tokens([AddedToken(code, single_word=True, normalized=False) for code in label_codes])
    return fast


# ------------------------------------------------------------------------------------------------
# training


@dataclass
class OrganismConfig:
    """How the organism is trained; saved into ``ctd_organism.json``."""

    chapters: tuple[str, ...] = ORGANISM_LABEL_CHAPTERS
    n_train_docs: int = 40000
    n_eval_docs: int = 200
    vocab_size: int = 4000
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4
    d_mlp: int = 768
    # RoPE positions cost nothing; room for the longest prompt plus a full generation budget.
    max_positions: int = 1024
    batch_size: int = 32
    lr: float = 1.5e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_steps: int = 6000
    # The loop's budget counts from the start (corpus and tokenizer take about 2 minutes): <= 60 in all.
    time_budget_s: float = 56 * 60
    dictionary_repeats: int = 6
    # bf16 matmuls under autocast (fp32 master weights): 1.65x the steps per second of fp32 on
    # a 2-core AVX512-BF16 CPU, at no cost in loss we could measure.
    bf16_autocast: bool = True
    # Label codes are a few tokens of a long trace but carry every decision (which sibling is
    # listed, kept, answered); their cross-entropy counts this many times the other tokens'.
    code_loss_weight: float = 3.0
    seed: int = 0
    threads: int = 2
    quick: bool = False

    @classmethod
    def quick_config(cls) -> "OrganismConfig":
        return cls(
            n_train_docs=3000,
            n_eval_docs=50,
            vocab_size=1200,
            d_model=96,
            n_layers=2,
            n_heads=4,
            n_kv_heads=2,
            d_mlp=256,
            batch_size=16,
            lr=2e-3,
            max_steps=200,
            warmup_steps=20,
            time_budget_s=4 * 60,
            quick=True,
        )


def _encode_corpus(corpus: pd.DataFrame, tokenizer, max_positions: int) -> list[tuple[np.ndarray, int]]:
    eos = tokenizer.eos_token_id
    out = []
    for prompt, trace in zip(corpus["prompt"], corpus["trace"]):
        p = tokenizer.encode(prompt, add_special_tokens=False)
        t = tokenizer.encode(trace, add_special_tokens=False) + [eos]
        ids = np.asarray(p + t, dtype=np.int64)
        if len(ids) <= max_positions:
            out.append((ids, len(p)))
    return out


def _batch(examples: list[tuple[np.ndarray, int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Right padding for training (no generation here); loss only on trace tokens.
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), length), dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.from_numpy(ids)
        mask[i, : len(ids)] = 1
        labels[i, n_prompt : len(ids)] = torch.from_numpy(ids[n_prompt:])
    return input_ids, mask, labels


def _weighted_loss(logits: torch.Tensor, target: torch.Tensor, code_ids: torch.Tensor, code_weight: float) -> torch.Tensor:
    """Next-token cross-entropy over labelled positions, code tokens weighted ``code_weight``."""
    keep = target != -100
    ce = torch.nn.functional.cross_entropy(logits[keep].float(), target[keep], reduction="none")
    weight = torch.where(torch.isin(target[keep], code_ids), code_weight, 1.0)
    return (ce * weight).sum() / weight.sum()


def small_qwen3_config(tokenizer, vocab_size: int, d_model: int, n_layers: int, n_heads: int, n_kv_heads: int, d_mlp: int, max_positions: int, **extra):
    """A from-scratch Qwen3 config for the organism and its students (untied unembedding)."""
    from transformers import Qwen3Config

    return Qwen3Config(
        vocab_size=vocab_size,
        hidden_size=d_model,
        intermediate_size=d_mlp,
        num_hidden_layers=n_layers,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_model // n_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
        rope_theta=10000.0,
        **extra,
    )


# Training notes come from their own seed range, so notes a user generates with small seeds (the
# default run uses seed 0) are never notes the organism was trained on.
TRAINING_NOTE_SEED_OFFSET = 1_000_003


def organism_notes(config: "OrganismConfig") -> tuple[LabelSpace, pd.DataFrame]:
    """The label space and the notes the organism is trained (train split) and checked (test split) on."""
    from analyses.tasks.icd10 import icd10cm_labels
    from analyses.tasks.notes import NoteConfig, NoteGenerator

    labels = icd10cm_labels(chapters=list(config.chapters))
    n_total = config.n_train_docs + 2 * config.n_eval_docs
    fractions = (config.n_train_docs / n_total, config.n_eval_docs / n_total, config.n_eval_docs / n_total)
    note_config = NoteConfig(n_docs=n_total, seed=TRAINING_NOTE_SEED_OFFSET + config.seed, split_fractions=fractions)
    return labels, NoteGenerator(labels, note_config).generate()


def train_organism(out: str | Path, config: OrganismConfig = OrganismConfig(), progress: bool = True) -> Path:
    """Train the organism and save it to ``out`` as a Hugging Face folder with its metadata."""
    from tqdm.auto import tqdm
    from transformers import Qwen3ForCausalLM

    out = Path(out)
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    labels, docs = organism_notes(config)
    corpus = build_corpus(docs, labels)
    train_corpus = corpus[corpus["split"] == "train"]
    tokenizer = train_tokenizer(list(train_corpus["prompt"] + train_corpus["trace"]) + labels.texts, vocab_size=config.vocab_size, label_codes=labels.codes)
    examples = _encode_corpus(pd.concat([train_corpus, dictionary_corpus(labels, config.dictionary_repeats)]), tokenizer, config.max_positions)
    if not examples:
        raise input_error(None, "no training sequence fits max_positions", "raise max_positions")
    model = Qwen3ForCausalLM(small_qwen3_config(tokenizer, len(tokenizer), config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.d_mlp, config.max_positions))
    model.train()
    code_ids = torch.tensor(sorted(tokenizer.convert_tokens_to_ids(labels.codes)))
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr,
        betas=(0.9, 0.98),
    )

    def lr_at(step: int, elapsed: float) -> float:
        if step < config.warmup_steps:
            return config.lr * (step + 1) / config.warmup_steps
        # Cosine decay over whichever runs out first, steps or the time budget, so a slower
        # machine still ends training at a low learning rate.
        by_steps = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
        progress_frac = min(1.0, max(by_steps, elapsed / config.time_budget_s))
        return config.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress_frac)))

    rng = np.random.default_rng(config.seed)
    # Length-bucketed batches: sort a shuffled pool by length so padding stays small.
    losses: list[tuple[int, float, float]] = []
    step = 0
    bar = tqdm(total=config.max_steps, desc="organism", disable=not progress, file=sys.stderr)
    pool: list[list[tuple[np.ndarray, int]]] = []
    while step < config.max_steps:
        if not pool:
            order = rng.permutation(len(examples))
            chunk = 50 * config.batch_size
            for c0 in range(0, len(order), chunk):
                idx = sorted(order[c0 : c0 + chunk], key=lambda i: len(examples[i][0]))
                batches = [[examples[i] for i in idx[b : b + config.batch_size]] for b in range(0, len(idx), config.batch_size)]
                pool.extend(batches[j] for j in rng.permutation(len(batches)))
            pool.reverse()
        input_ids, mask, target = _batch(pool.pop(), tokenizer.pad_token_id)
        lr = lr_at(step, time.perf_counter() - started)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        loss = _weighted_loss(logits, target[:, 1:], code_ids, config.code_loss_weight)
        if not torch.isfinite(loss):
            raise CtdNumericalError(f"organism training: loss is {loss.item()} at step {step}; lower lr (now {lr:.2e})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        elapsed = time.perf_counter() - started
        losses.append((step, loss.item(), elapsed))
        step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
        if elapsed > config.time_budget_s:
            print(f"[organism] time budget of {config.time_budget_s:.0f}s reached at step {step}", file=sys.stderr)
            break
    bar.close()
    train_seconds = time.perf_counter() - started

    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.eval()
    # bf16 on disk keeps the committed checkpoint small; it is loaded back as float32.
    model.to(torch.bfloat16).save_pretrained(tmp)
    model.to(torch.float32)
    tokenizer.save_pretrained(tmp / "tokenizer")
    labels.save(tmp / "labels.parquet")
    pd.DataFrame(losses, columns=["step", "loss", "seconds"]).to_parquet(tmp / "loss_curve.parquet", index=False)
    meta = {
        "kind": "ctd-organism",
        "template": "organism",
        "label_space": labels.name,
        "n_labels": len(labels),
        "config": asdict(config),
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(np.mean([l for _, l, _ in losses[-20:]])),
        "n_train_sequences": len(examples),
        "note_seed": TRAINING_NOTE_SEED_OFFSET + config.seed,
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }
    (tmp / "ctd_organism.json").write_text(json.dumps(meta, indent=2) + "\n")
    eval_docs = docs[docs["split"] == "test"].reset_index(drop=True)
    # The held-out notes travel with the checkpoint, so its targets can be re-checked anywhere.
    eval_docs.to_parquet(tmp / "heldout_docs.parquet", index=False)
    metrics = evaluate_organism(tmp, eval_docs, labels, progress=progress)
    meta["heldout"] = metrics
    (tmp / "ctd_organism.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out


def evaluate_organism(model_dir: str | Path, docs: pd.DataFrame, labels: LabelSpace, batch_size: int = 50, progress: bool = True) -> dict:
    """Greedy traces on ``docs``: answer micro-F1, shortlist recall, well-formed rate, boundary presence."""
    from analyses.tasks.metrics import set_metrics
    from analyses.traces import generate_traces

    traces = generate_traces(model_dir, docs, labels, template_name="organism", batch_size=batch_size, progress=progress)
    gold = [set(map(int, g)) for g in docs["gold"]]
    answers = [set(a) for a in traces["answer"]]
    recall = [len(set(s) & g) / len(g) for s, g in zip(traces["shortlist"], gold) if g]
    m = set_metrics(gold, answers)
    return {
        "n_docs": int(len(docs)),
        "answer_micro_f1": round(m["micro_f1"], 4),
        "answer_example_f1": round(m["example_f1"], 4),
        "shortlist_recall": round(float(np.mean(recall)), 4),
        "well_formed": round(float(traces["well_formed"].mean()), 4),
        "with_boundary": round(float(traces["true_boundary"].notna().mean()), 4),
    }
