"""The ``ablate`` stage (``ctd ablate --run DIR``): heads ablated while the model reasons.

Teacher-forced patching reads a trace the model already wrote, so the answer can copy the CoT's
codes and route around the heads that wrote them. Here the model regenerates its whole CoT and
answer from each test prompt with a head set mean-ablated at every position (each head's output
replaced by its mean over dev traces' CoT tokens): whatever the heads did, the model now reasons
without it. Head sets per score (CoarseScore, RefineScore; ranked on dev traces) and k:

- ``ranked``: the top k;
- ``random``: k heads drawn outside the top k (``n_random`` seeded draws, averaged per trace);
- ``lowest``: the k lowest-ranked.

Each regeneration is parsed exactly as the run's traces and read as shortlist recall, the share of
near-misses the CoT mentions that reach the answer, answer micro-F1 and the boundary's share of
the CoT (where the template marks a true boundary); each against the unablated regeneration of the
same prompts, paired per trace, with a bootstrap 95% CI over traces.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.machinery.io import read_parquet
from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.methods.prompts import run_template
from analyses.models.generation import GenerationConfig, generate_traces
from analyses.results.ablation import AblationResult
from analyses.results.characterize import HeadScores
from analyses.tasks.metrics import set_metrics
from analyses.tasks.sources import Dataset, near_misses_of
from probes.errors import input_error
from probes.patching import ablated_generate, control_head_sets, head_output_means, ks_for_heads

__all__ = ["compute", "AblationResult", "trace_metrics"]


def trace_metrics(traces: pd.DataFrame, docs: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per trace: shortlist recall, near-misses kept (of those the CoT mentions, the share in the
    answer; NaN when it mentions none), the boundary's share of the CoT (NaN without one), and the
    answers and gold sets for a pooled micro-F1."""
    by_id = docs.set_index("doc_id")
    recall, kept, share, answers, golds = [], [], [], [], []
    for t in traces.itertuples(index=False):
        doc = by_id.loc[t.doc_id]
        gold = {int(g) for g in doc["gold"]}
        shortlist, answer = {int(x) for x in t.shortlist}, {int(x) for x in t.answer}
        recall.append(len(shortlist & gold) / len(gold) if gold else np.nan)
        near = set(near_misses_of(doc)) & shortlist
        kept.append(len(near & answer) / len(near) if near else np.nan)
        length = int(t.cot_end) - int(t.cot_start)
        share.append((int(t.true_boundary) - int(t.cot_start)) / length if not pd.isna(t.true_boundary) and length > 0 else np.nan)
        answers.append(answer)
        golds.append(gold)
    return {"shortlist_recall": np.array(recall, float), "near_miss_kept": np.array(kept, float), "boundary_share": np.array(share, float), "answers": answers, "gold": golds}


def _paired(clean: dict, ablated: dict, metric: str, idx_draws: np.ndarray) -> tuple[float, float, float, float, float, int]:
    """(ablated - clean, CI low, CI high, clean level, ablated level, traces) for one metric."""
    if metric == "answer_micro_f1":
        def f1(m, idx):
            return set_metrics([m["gold"][i] for i in idx], [m["answers"][i] for i in idx])["micro_f1"]

        n = len(clean["gold"])
        point = f1(ablated, range(n)) - f1(clean, range(n))
        draws = np.array([f1(ablated, idx) - f1(clean, idx) for idx in idx_draws])
        return point, *np.quantile(draws, [0.025, 0.975]).tolist(), f1(clean, range(n)), f1(ablated, range(n)), n
    a, c = ablated[metric], clean[metric]
    ok = np.isfinite(a) & np.isfinite(c)
    if not ok.any():
        return (np.nan,) * 5 + (0,)
    diff = a - c
    draws = np.array([np.nanmean(np.where(ok[idx], diff[idx], np.nan)) for idx in idx_draws])
    draws = draws[np.isfinite(draws)]
    return float(diff[ok].mean()), float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975)), float(c[ok].mean()), float(a[ok].mean()), int(ok.sum())


def compute(ctx: StageContext) -> AblationResult:
    """Regenerate the first ``n_docs`` well-formed test traces' CoT and answer with each head set
    ablated (``ctx.settings``: :class:`~analyses.machinery.settings.AblateSettings`)."""
    from probes.models import load_hf_model, load_tokenizer

    run_dir, settings, progress = Path(ctx.run_dir), ctx.settings, ctx.progress
    model_path, template = ctx.model_path, run_template(ctx.manifest)
    scores_path = run_dir / "dev_head_scores.parquet"
    if not scores_path.exists():
        raise input_error(scores_path, "no head scores on dev traces to rank heads with (ablation never ranks on the test traces it measures)", "run `ctd traces` with --n-dev-docs N (N > 0), then `ctd capture` and `ctd characterize`")
    scores = HeadScores.load(scores_path).frame
    ranking = {s: [(int(r.layer), int(r.head)) for r in scores[scores["score"] == s].sort_values("rank").itertuples()] for s in ("coarse", "refine")}
    traces = read_parquet(run_dir / "traces.parquet")
    traces = traces[traces["well_formed"]].head(settings.n_docs)
    dev = read_parquet(run_dir / "dev_traces.parquet") if (run_dir / "dev_traces.parquet").exists() else None
    if traces.empty:
        raise input_error(run_dir / "traces.parquet", "no well-formed trace to regenerate", "generate more traces (ctd traces --n-docs)")
    if dev is None or dev.empty:
        raise input_error(run_dir / "dev_traces.parquet", "no dev traces to take each head's mean output from", "run `ctd traces` with --n-dev-docs N (N > 0)")
    dataset = Dataset.load(run_dir)
    docs = dataset.docs.set_index("doc_id").loc[traces["doc_id"]].reset_index()
    tokenizer = load_tokenizer(model_path)
    hf = load_hf_model(model_path, attn_implementation="sdpa")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dev = dev.head(settings.n_dev_docs)
    sequences = [list(t.prompt_ids) + list(t.output_ids) for t in dev.itertuples(index=False)]
    positions = [range(int(t.cot_start), int(t.cot_end)) for t in dev.itertuples(index=False)]
    means = head_output_means(hf, sequences, positions, pad_id)
    n_layers, n_heads = len(means), next(iter(means.values())).shape[0]
    budget = int(max(len(o) for o in traces["output_ids"])) + 32
    config = replace(GenerationConfig(), max_new_tokens=budget, batch_size=settings.batch_size, do_sample=False)

    def regenerate(heads: tuple) -> dict:
        masks = {}
        for layer, head in heads:
            masks.setdefault(layer, torch.zeros(n_heads, dtype=torch.bool))[head] = True

        def generate(input_ids, attention_mask, max_new_tokens):
            return ablated_generate(hf, input_ids, attention_mask, means, masks, max_new_tokens, pad_id, [tokenizer.eos_token_id])

        frame = generate_traces(model_path, docs, dataset.labels, template.name, config, hf_model=hf, tokenizer=tokenizer, progress=False, generate=generate)
        return trace_metrics(frame, docs)

    ks = list(settings.ks) if settings.ks else ks_for_heads(n_layers * n_heads)
    sets = [(score, hs) for score in ("coarse", "refine") if ranking[score] for k in ks for hs in control_head_sets(ranking[score], k, settings.n_random, settings.seed)]
    if progress:
        print(f"[ablate] {len(traces)} test prompts regenerated {len(sets) + 1} times (unablated, then {len(sets)} head sets)", file=sys.stderr)
    clean = regenerate(())
    from tqdm.auto import tqdm

    results: dict[tuple, list[dict]] = {}
    for score, hs in tqdm(sets, desc="ablate", disable=not progress, file=sys.stderr):
        kind = "random" if hs.name.startswith("random") else hs.name
        results.setdefault((score, hs.k, kind), []).append(regenerate(hs.heads))
    idx_draws = np.random.default_rng(settings.seed).integers(0, len(traces), size=(settings.n_boot, len(traces)))
    rows = []
    for (score, k, kind), runs in results.items():
        if len(runs) == 1:
            ablated = runs[0]
        else:  # random draws: per-trace means of the numeric metrics; micro-F1 pools every draw's answers
            ablated = {m: np.nanmean(np.stack([r[m] for r in runs]), axis=0) for m in ("shortlist_recall", "near_miss_kept", "boundary_share")}
            ablated["answers"], ablated["gold"] = runs[0]["answers"], runs[0]["gold"]
        for metric in ("shortlist_recall", "near_miss_kept", "answer_micro_f1", "boundary_share"):
            if metric == "answer_micro_f1" and len(runs) > 1:
                draws = [_paired(clean, r, metric, idx_draws) for r in runs]
                value, lo, hi, c, a, n = (float(np.mean([d[j] for d in draws])) for j in range(6))
            else:
                value, lo, hi, c, a, n = _paired(clean, ablated, metric, idx_draws)
            rows.append({"score": score, "k": int(k), "head_set": kind, "metric": metric, "value": value, "ci_low": lo, "ci_high": hi, "clean": c, "ablated": a, "n": int(n), "draws": len(runs)})
    meta = {
        "ablation": "mean ablation: each ablated head's output (z, its slice of the output projection's input) replaced at every position, prompt and generated tokens, by its mean over the CoT tokens of the first dev traces",
        "mean_over": f"{len(dev)} dev traces (dev_traces.parquet), {sum(len(p) for p in positions)} CoT tokens",
        "ranked_on": {"file": scores_path.name, "split": "dev"},
        "measured_on": f"{len(traces)} test prompts (traces.parquet, well-formed, first {settings.n_docs})",
        "regeneration": f"greedy, up to {budget} new tokens, parsed as the run's traces",
        "value": "ablated minus the unablated regeneration of the same prompts, paired per trace; bootstrap 95% CI over traces (micro-F1 pooled per resample; random sets: the mean over draws of each draw's difference and CI ends)",
        "metrics": {
            "shortlist_recall": "share of gold codes the CoT mentions",
            "near_miss_kept": "of the note's near-misses the CoT mentions, the share that reach the answer (traces mentioning none left out)",
            "answer_micro_f1": "pooled micro-F1 of the answers",
            "boundary_share": "the true boundary's share of the CoT (traces without one left out)",
        },
        "random_sets": f"{settings.n_random} seeded draw(s) of k heads outside the ranked top k",
        "n_traces": len(traces),
        "ks": ks,
    }
    return AblationResult(pd.DataFrame(rows), meta)


register_stage(Stage("ablate", "ablate", ("dev_head_scores.parquet", "traces.parquet"), ("ablation.parquet",), compute, "heads mean-ablated while the model regenerates its CoT and answer"))
