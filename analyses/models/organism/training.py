"""Training the organism from scratch (``ctd organism train``) and checking it on held-out notes.

The checkpoint is an ordinary Hugging Face folder (config, safetensors, tokenizer in ``tokenizer/``)
loaded through the same code path as any real model; ``ctd_organism.json`` beside it records how it
was trained and what it reaches.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.models.organism.format import ORGANISM_LABEL_CHAPTERS, build_corpus, dictionary_corpus
from analyses.models.organism.tokenizer import train_tokenizer
from analyses.tasks.labels import LabelSpace
from analyses.methods.lm_training import checked_step, cosine_lr, encode_examples, right_padded_batch
from probes.errors import input_error

__all__ = ["OrganismConfig", "train_organism", "evaluate_organism", "organism_notes", "small_qwen3_config", "TRAINING_NOTE_SEED_OFFSET"]


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
    # v2 marks phase 2 with a line-initial "Check"; v3 writes the switch with no marker word.
    trace_format: str = "v2"

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
    corpus = build_corpus(docs, labels, config.trace_format)
    train_corpus = corpus[corpus["split"] == "train"]
    tokenizer = train_tokenizer(list(train_corpus["prompt"] + train_corpus["trace"]) + labels.texts, vocab_size=config.vocab_size, label_codes=labels.codes)
    sequences = pd.concat([train_corpus, dictionary_corpus(labels, config.dictionary_repeats, config.trace_format)])
    examples = encode_examples(zip(sequences["prompt"], sequences["trace"]), tokenizer, config.max_positions)
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
        input_ids, mask, target = right_padded_batch(pool.pop(), tokenizer.pad_token_id)
        lr = cosine_lr(step, time.perf_counter() - started, config.lr, config.warmup_steps, config.max_steps, config.time_budget_s)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.bf16_autocast):
            logits = model(input_ids=input_ids, attention_mask=mask).logits[:, :-1]
        loss = _weighted_loss(logits, target[:, 1:], code_ids, config.code_loss_weight)
        checked_step(model, optimizer, loss, f"organism training, step {step}")
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
    from analyses.models.generation import generate_traces

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
        **_boundary_shares(traces),
    }


def _boundary_shares(traces: pd.DataFrame) -> dict:
    """Where the true boundary falls in the CoT (share of its tokens): quartiles and range."""
    found = traces.dropna(subset=["true_boundary"])
    share = ((found["true_boundary"] - found["cot_start"]) / (found["cot_end"] - found["cot_start"]).clip(lower=1)).to_numpy(float)
    if not len(share):
        return {}
    q = np.quantile(share, [0.0, 0.25, 0.5, 0.75, 1.0])
    return {"boundary_share_min": round(float(q[0]), 4), "boundary_share_q1": round(float(q[1]), 4), "boundary_share_median": round(float(q[2]), 4), "boundary_share_q3": round(float(q[3]), 4), "boundary_share_max": round(float(q[4]), 4)}
