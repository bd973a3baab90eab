"""The student base: a small pretrained language model that distillation starts from (DESIGN §2).

Real distillation studies start from a small pretrained LM, not from random weights. The embedded
analogue is a small Qwen3 with the teacher's tokenizer, trained (``ctd student train``) on language
that holds no task format: clinical notes alone (no answers, no traces) and the code dictionary
(each code with its description and inclusion terms, in both directions). It knows the words and
the codes; it has never seen a chain of thought. Before any distillation its held-out perplexity
and its task metrics when prompted like the teacher are measured and saved in ``ctd_student.json``
(expected: near-zero task metrics, no well-formed two-phase trace).

The shipped base lives in ``analyses/assets/student_base`` (an ordinary Hugging Face folder, loaded
through :func:`probes.models.load_model` like any model); users of real models pass their own
student folder (``ctd distill --student PATH``).
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.tasks.labels import LabelSpace, lower_first, short_description, text_variants
from analyses.methods.lm_training import checked_step, cosine_lr, encode_examples, right_padded_batch
from probes.errors import input_error

__all__ = ["StudentBaseConfig", "student_base_corpus", "train_student_base", "default_student_base_path", "evaluate_student_base"]

_ASSETS = Path(__file__).resolve().parents[1] / "assets" / "student_base"  # analyses/assets
# Notes for the base come from their own seed range: never the organism's training notes (1,000,003+),
# never a default run's (small seeds).
STUDENT_NOTE_SEED_OFFSET = 2_000_003


def default_student_base_path() -> Path:
    """The shipped student base (``analyses/assets/student_base``)."""
    return _ASSETS


@dataclass
class StudentBaseConfig:
    """How the student base is trained; saved into ``ctd_student.json``."""

    n_notes: int = 30000
    n_heldout_notes: int = 200
    dictionary_repeats: int = 4
    d_model: int = 128
    n_layers: int = 3
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 384
    max_positions: int = 1024
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 100
    max_steps: int = 20000
    time_budget_s: float = 25 * 60
    bf16_autocast: bool = True
    seed: int = 0
    threads: int = 2

    @classmethod
    def quick(cls) -> "StudentBaseConfig":
        return cls(n_notes=600, n_heldout_notes=20, dictionary_repeats=1, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=128, max_steps=40, time_budget_s=60)


def student_base_corpus(labels: LabelSpace, notes: pd.DataFrame, dictionary_repeats: int = 4, seed: int = 0) -> list[str]:
    """Texts of the base's corpus: each note's text, and dictionary lines for every label.

    Dictionary lines name a code with its description or an inclusion term, in both directions
    ("I50.21: acute systolic heart failure." / "Acute systolic heart failure: I50.21."), so the
    base can read a code and write one; nothing in them is a trace, a shortlist or an answer.
    """
    rng = np.random.default_rng(seed)
    texts = list(notes["text"])
    for _ in range(dictionary_repeats):
        for i in range(len(labels)):
            code = labels.codes[i]
            for variant in text_variants(labels.texts[i], labels.aliases[i]):
                phrase = lower_first(variant)
                texts.append(f"{code}: {phrase}." if rng.random() < 0.5 else f"{phrase[:1].upper()}{phrase[1:]}: {code}.")
            texts.append(f"{code} {short_description(labels.texts[i])}.")
    order = rng.permutation(len(texts))
    return [texts[i] for i in order]


def _encode(texts: list[str], tokenizer, max_positions: int) -> list[tuple[np.ndarray, int]]:
    return encode_examples((("", t) for t in texts), tokenizer, max_positions)


def _notes(config: StudentBaseConfig, labels: LabelSpace) -> pd.DataFrame:
    from analyses.tasks.notes import NoteConfig, NoteGenerator

    n = config.n_notes + config.n_heldout_notes
    note_config = NoteConfig(n_docs=n, seed=STUDENT_NOTE_SEED_OFFSET + config.seed, split_fractions=(config.n_notes / n, 0.0, config.n_heldout_notes / n))
    return NoteGenerator(labels, note_config).generate()


def heldout_perplexity(model, tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Token-level perplexity of ``texts`` (each followed by the end-of-text token)."""
    examples = _encode(texts, tokenizer, 10**9)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in range(0, len(examples), batch_size):
            ids, mask, labels = right_padded_batch(examples[b : b + batch_size], tokenizer.pad_token_id)
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = labels[:, 1:]
            keep = target != -100
            total += float(torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum"))
            count += int(keep.sum())
    return float(math.exp(total / max(count, 1)))


def evaluate_student_base(folder: str | Path, teacher_dir: str | Path, labels: LabelSpace, heldout_texts: list[str], task_docs: pd.DataFrame, progress: bool = False) -> dict:
    """What the base can do before distillation: held-out perplexity, and the teacher's task
    (prompted with the teacher's template, greedy): answer micro-F1, shortlist recall, well-formed."""
    from analyses.tasks.metrics import set_metrics
    from analyses.models.generation import GenerationConfig, generate_traces
    from probes.models import load_hf_model, load_tokenizer

    tokenizer = load_tokenizer(folder)
    model = load_hf_model(folder, attn_implementation="sdpa")
    ppl = heldout_perplexity(model, tokenizer, heldout_texts)
    traces = generate_traces(folder, task_docs, labels, template_name="organism", config=GenerationConfig(max_new_tokens=256, batch_size=50), progress=progress, hf_model=model, tokenizer=tokenizer)
    gold = [set(map(int, g)) for g in task_docs["gold"]]
    m = set_metrics(gold, [set(a) for a in traces["answer"]])
    recall = [len(set(s) & g) / len(g) for s, g in zip(traces["shortlist"], gold)]
    return {
        "heldout_notes": len(heldout_texts),
        "heldout_perplexity": round(ppl, 3),
        "task_docs": int(len(task_docs)),
        "task_answer_micro_f1": round(float(m["micro_f1"]), 4),
        "task_shortlist_recall": round(float(np.mean(recall)), 4),
        "task_well_formed": round(float(traces["well_formed"].mean()), 4),
        "task_with_boundary": round(float(traces["true_boundary"].notna().mean()), 4),
    }


def train_student_base(out: str | Path, teacher_dir: str | Path | None = None, config: StudentBaseConfig = StudentBaseConfig(), progress: bool = True) -> Path:
    """Train the student base with the teacher's tokenizer and save it (with its metrics) to ``out``."""
    from tqdm.auto import tqdm
    from transformers import Qwen3ForCausalLM

    from analyses.models.organism import default_organism_path, small_qwen3_config
    from probes.models import load_tokenizer

    out = Path(out)
    teacher_dir = Path(teacher_dir) if teacher_dir is not None else default_organism_path()
    if not (teacher_dir / "labels.parquet").exists():
        raise input_error(teacher_dir, "the teacher folder has no labels.parquet", "pass the organism's folder (it records its label space)")
    torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    tokenizer = load_tokenizer(teacher_dir)
    labels = LabelSpace.load(teacher_dir / "labels.parquet")
    notes = _notes(config, labels)
    train_notes = notes[notes["split"] == "train"]
    heldout = notes[notes["split"] == "test"]
    examples = _encode(student_base_corpus(labels, train_notes, config.dictionary_repeats, config.seed), tokenizer, config.max_positions)
    model = Qwen3ForCausalLM(small_qwen3_config(tokenizer, len(tokenizer), config.d_model, config.n_layers, config.n_heads, config.n_kv_heads, config.d_mlp, config.max_positions))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr, betas=(0.9, 0.98))
    rng = np.random.default_rng(config.seed)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i][0]))  # length buckets: little padding
    batches = [order[b : b + config.batch_size] for b in range(0, len(order), config.batch_size)]
    losses, step = [], 0
    bar = tqdm(total=config.max_steps, desc="student base", disable=not progress, file=sys.stderr)
    model.train()
    while step < config.max_steps:
        for j in rng.permutation(len(batches)):
            elapsed = time.perf_counter() - started
            if step >= config.max_steps or elapsed > config.time_budget_s:
                break
            lr = cosine_lr(step, elapsed, config.lr, config.warmup_steps, config.max_steps, config.time_budget_s)
            for group in optimizer.param_groups:
                group["lr"] = lr
            ids, mask, target = right_padded_batch([examples[i] for i in batches[j]], tokenizer.pad_token_id)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
                loss = model(input_ids=ids, attention_mask=mask, labels=target).loss
            checked_step(model, optimizer, loss, f"student base training, step {step}")
            losses.append((step, loss.item(), time.perf_counter() - started))
            step += 1
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1][1]:.3f}")
        else:
            continue
        break
    bar.close()
    train_seconds = time.perf_counter() - started
    tmp = out.with_name(out.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.eval()
    model.to(torch.bfloat16).save_pretrained(tmp)  # bf16 on disk keeps the shipped base small
    tokenizer.save_pretrained(tmp / "tokenizer")
    labels.save(tmp / "labels.parquet")
    pd.DataFrame(losses, columns=["step", "loss", "seconds"]).to_parquet(tmp / "loss_curve.parquet", index=False)
    heldout.to_parquet(tmp / "heldout_notes.parquet", index=False)
    task_docs = pd.read_parquet(teacher_dir / "heldout_docs.parquet") if (teacher_dir / "heldout_docs.parquet").exists() else heldout
    meta = {
        "kind": "ctd-student-base",
        "teacher": "analyses/assets/organism (the shipped organism)" if teacher_dir.resolve() == default_organism_path().resolve() else str(teacher_dir),
        "tokenizer": "the teacher's (copied into tokenizer/)",
        "corpus": "generated notes (text only: no answers, no traces) and the code dictionary (code <-> description and inclusion terms, both directions)",
        "config": asdict(config),
        "steps": step,
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(np.mean([l for _, l, _ in losses[-20:]])),
        "n_train_sequences": len(examples),
        "note_seed": STUDENT_NOTE_SEED_OFFSET + config.seed,
        "n_params": int(sum(p.numel() for p in model.parameters())),
    }
    (tmp / "ctd_student.json").write_text(json.dumps(meta, indent=2) + "\n")
    meta["before_distillation"] = evaluate_student_base(tmp, teacher_dir, labels, list(heldout["text"]), task_docs, progress=progress)
    (tmp / "ctd_student.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
