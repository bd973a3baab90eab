"""The ``isolate`` stage (``ctd isolate --run DIR``): can the phases be separated, and are they
complementary? (DESIGN §2)

Conditions, each read out as shortlist recall, answer micro-F1, P@1 and recall with bootstrap CIs
(``CONDITIONS`` describes each in words; the same words go into the result's meta):
- ``full_model``: the model's own trace, phase 1 and phase 2;
- ``phase1_only@tau`` and ``phase1_only@0.1`` ... ``@1.0``: the CoT cut at the estimated boundary
  or at a share of its length, then the answer forced (think close and answer marker appended);
- ``oracle_shortlist+phase2`` / ``retriever_shortlist+phase2`` / ``own_shortlist+phase2`` /
  ``other_shortlist+phase2``: a shortlist written in place of phase 1 (gold + near-misses; the
  MiniLM retriever's top-k; the model's own shortlist; another run's), then the model's phase 2;
- ``retriever_alone``: the retriever's top-n, n fixed from the training split (the median number of
  gold labels per training document), never from the model's answers;
- ``model_shortlist_reranked``: the model's shortlist re-ranked by the retriever, top-n likewise.

Complementarity (DESIGN §2): the full model (both phases) beats each phase's stand-alone
substitute: phase 1 alone (``phase1_only@tau``) and phase 2 alone (the model's phase 2 on the
retriever's shortlist, ``retriever_shortlist+phase2``), with paired bootstrap CIs of the F1
differences above zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.machinery.io import read_parquet
from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.methods.parsing import TraceParser
from analyses.methods.prompts import run_template
from analyses.models.organism.format import trace_format_of
from analyses.results.boundary import Boundary
from analyses.results.isolation import IsolationResult
from analyses.tasks.sources import Dataset, near_misses_of
from probes.errors import input_error

__all__ = ["IsolationResult", "compute", "shortlist_text", "continue_batch"]


CONDITIONS = {
    "full_model": "the model's own trace: its phase 1 and its phase 2",
    "phase1_only@tau": "phase 1 alone: the CoT cut at the internal boundary estimate, answer forced",
    "phase1_only@<share>": "the CoT cut at that share of its length, answer forced",
    "oracle_shortlist+phase2": "gold labels and as many near-misses (shuffled) written as phase 1, then the model's phase 2",
    "retriever_shortlist+phase2": "phase 2 alone: the retriever's top-k written as phase 1, then the model's phase 2",
    "own_shortlist+phase2": "the model's own shortlist re-written as phase 1, then its phase 2",
    "other_shortlist+phase2": "another run's shortlist written as phase 1, then this model's phase 2",
    "retriever_alone": "the retriever's top-n (n from the training split, not from the model)",
    "model_shortlist_reranked": "the model's shortlist re-ranked by the retriever, top-n",
}


def shortlist_text(label_ids: list[int], labels, trace_format: str = "v2") -> str:
    """The organism's phase-1 line for a candidate list (what injection writes in place of phase
    1): each code with its short description, as the organism writes them in ``trace_format``."""
    from analyses.models.organism.format import shortlist_line

    return shortlist_line(labels, label_ids, trace_format) + "\n"


def continue_batch(hf_model, tokenizer, prefixes: list[list[int]], max_new_tokens: int, batch_size: int = 32) -> list[list[int]]:
    """Greedy continuations of token prefixes, batched with left padding."""
    from probes.capture import pad_batch

    out: list[list[int]] = []
    eos = tokenizer.eos_token_id
    for start in range(0, len(prefixes), batch_size):
        chunk = prefixes[start : start + batch_size]
        ids, mask, _, _ = pad_batch(chunk, tokenizer.pad_token_id, "left")
        with torch.no_grad():
            gen = hf_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
        for row in gen[:, ids.shape[1] :].tolist():
            out.append(row[: row.index(eos)] if eos in row else row)
    return out


def _paired_diff_ci(a: np.ndarray, b: np.ndarray, gold: list[set], n_boot: int, seed: int) -> tuple[float, float, float]:
    """Micro-F1 difference of two prediction lists with a paired bootstrap over documents."""
    from analyses.tasks.metrics import set_metrics

    def f1(preds, idx):
        return set_metrics([gold[i] for i in idx], [preds[i] for i in idx])["micro_f1"]

    n = len(gold)
    rng = np.random.default_rng(seed)
    point = f1(a, range(n)) - f1(b, range(n))
    draws = []
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        draws.append(f1(a, idx) - f1(b, idx))
    return point, float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))


def compute(ctx: StageContext) -> IsolationResult:
    """The isolation conditions and the complementarity verdict on the run's traces, with the run's
    model and prompt template (``ctx.settings``: :class:`~analyses.machinery.settings.IsolateSettings`).
    The verdict also goes into the stage record.
    """
    from analyses.methods.retrieval import LabelRetriever
    from analyses.tasks.metrics import bootstrap_ci, set_metrics
    from probes.models import load_hf_model, load_tokenizer

    run_dir, settings, progress = Path(ctx.run_dir), ctx.settings, ctx.progress
    model_path, template = ctx.model_path, run_template(ctx.manifest)
    retriever_k, other_run, n_docs, n_boot, seed = settings.retriever_k, settings.other_run, settings.n_docs, settings.n_boot, settings.seed
    traces = read_parquet(run_dir / "traces.parquet")
    tau = Boundary.load(run_dir / "boundary.parquet").tau("internal")
    dataset = Dataset.load(run_dir)
    labels, by_id = dataset.labels, dataset.docs.set_index("doc_id")
    traces = traces[traces["well_formed"] & traces["doc_id"].isin(tau)]
    if n_docs is not None:
        traces = traces.head(n_docs)
    if traces.empty:
        raise input_error(run_dir / "traces.parquet", "no well-formed trace with a boundary estimate", "run `ctd characterize` first")
    other = None
    if other_run is not None:
        other = read_parquet(Path(other_run) / "traces.parquet", required=("doc_id", "shortlist")).set_index("doc_id")["shortlist"].to_dict()
    tokenizer = load_tokenizer(model_path)
    hf = load_hf_model(model_path, attn_implementation="sdpa")
    parser = TraceParser.for_template(labels, template)
    trace_format = trace_format_of(model_path)
    close = tokenizer.encode("\n" + template.think_close + "\n" + template.answer_open, add_special_tokens=False)
    retriever = LabelRetriever(labels)
    from analyses.methods.embed import embed_texts

    doc_vectors = embed_texts([by_id.loc[d]["text"] for d in traces["doc_id"]])
    ret_idx, _ = retriever.index.search(doc_vectors, max(retriever_k, 10))
    rng = np.random.default_rng(seed)

    gold = [set(int(g) for g in by_id.loc[d]["gold"]) for d in traces["doc_id"]]
    predictions: dict[str, list[list[int]]] = {"full_model": [list(a) for a in traces["answer"]]}
    shortlists: dict[str, list[list[int]]] = {"full_model": [list(s) for s in traces["shortlist"]]}
    prefixes: dict[str, list[list[int]]] = {}
    for i, t in enumerate(traces.itertuples()):
        prompt, output = list(t.prompt_ids), list(t.output_ids)
        cot_len = int(t.cot_end) - int(t.cot_start)
        cuts = {"phase1_only@tau": int(tau[t.doc_id]) - int(t.cot_start)}
        cuts.update({f"phase1_only@{d / 10:.1f}": int(round(d / 10 * cot_len)) for d in range(1, 11)})
        for name, cut in cuts.items():
            prefixes.setdefault(name, []).append(prompt + output[:cut] + close)
            shortlists.setdefault(name, []).append([m["label_id"] for m in t.mentions if int(m["token_start"]) < int(t.cot_start) + cut])
        doc = by_id.loc[t.doc_id]
        oracle = sorted(gold[i]) + near_misses_of(doc)[: len(gold[i])]
        injections = {"oracle_shortlist+phase2": [oracle[j] for j in rng.permutation(len(oracle))], "retriever_shortlist+phase2": [int(x) for x in ret_idx[i, :retriever_k]], "own_shortlist+phase2": list(dict.fromkeys(t.shortlist))}
        if other is not None and t.doc_id in other:
            injections["other_shortlist+phase2"] = list(dict.fromkeys(int(x) for x in other[t.doc_id]))
        for name, ids in injections.items():
            prefixes.setdefault(name, []).append(prompt + tokenizer.encode(shortlist_text(list(ids), labels, trace_format), add_special_tokens=False))
            shortlists.setdefault(name, []).append(ids)
    budget = int(max(len(o) for o in traces["output_ids"])) + 16
    for name, batch in prefixes.items():
        if progress:
            print(f"[isolate] {name}: {len(batch)} continuations", file=sys.stderr)
        cut = name.startswith("phase1_only")
        continuations = continue_batch(hf, tokenizer, batch, max_new_tokens=24 if cut else budget)
        predictions[name] = [parser.answer_of((template.answer_open if cut else "") + tokenizer.decode(c, skip_special_tokens=False)) for c in continuations]
    train_docs = dataset.split("train")
    size_source = train_docs if len(train_docs) else dataset.docs[~dataset.docs["doc_id"].isin(traces["doc_id"])]
    answer_size = max(1, int(np.median([len(g) for g in size_source["gold"]]))) if len(size_source) else 1
    predictions["retriever_alone"] = [[int(x) for x in ret_idx[i, :answer_size]] for i in range(len(gold))]
    shortlists["retriever_alone"] = [[int(x) for x in ret_idx[i, :retriever_k]] for i in range(len(gold))]
    rerank = []
    for i, sl in enumerate(shortlists["full_model"]):
        ordered = sorted(dict.fromkeys(sl), key=lambda x: -float(retriever.vectors[x] @ doc_vectors[i]))
        rerank.append(ordered[:answer_size])
    predictions["model_shortlist_reranked"] = rerank
    shortlists["model_shortlist_reranked"] = shortlists["full_model"]

    rows = []
    n = len(gold)
    for name, preds in predictions.items():
        per_doc = {
            "shortlist_recall": [len(set(s) & g) / len(g) for s, g in zip(shortlists[name], gold)],
            "p_at_1": [float(bool(p) and p[0] in g) for p, g in zip(preds, gold)],
            "recall": [len(set(p) & g) / len(g) for p, g in zip(preds, gold)],
        }
        for metric, values in per_doc.items():
            mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
            rows.append({"condition": name, "metric": metric, "value": mean, "ci_low": lo, "ci_high": hi, "n": n})
        f1_point, f1_lo, f1_hi = bootstrap_ci(lambda idx, p=preds: set_metrics([gold[i] for i in idx], [p[i] for i in idx])["micro_f1"], n=n, n_boot=n_boot, seed=seed)
        rows.append({"condition": name, "metric": "micro_f1", "value": f1_point, "ci_low": f1_lo, "ci_high": f1_hi, "n": n})
    full = predictions["full_model"]
    d_p1 = _paired_diff_ci(full, predictions["phase1_only@tau"], gold, n_boot, seed)
    d_p2 = _paired_diff_ci(full, predictions["retriever_shortlist+phase2"], gold, n_boot, seed)
    d_ret = _paired_diff_ci(full, predictions["retriever_alone"], gold, n_boot, seed)
    verdict = float(d_p1[1] > 0 and d_p2[1] > 0)
    rows += [
        {"condition": "complementarity", "metric": "f1_gain_over_phase1_alone", "value": d_p1[0], "ci_low": d_p1[1], "ci_high": d_p1[2], "n": n},
        {"condition": "complementarity", "metric": "f1_gain_over_phase2_alone", "value": d_p2[0], "ci_low": d_p2[1], "ci_high": d_p2[2], "n": n},
        {"condition": "complementarity", "metric": "f1_gain_over_retriever_alone", "value": d_ret[0], "ci_low": d_ret[1], "ci_high": d_ret[2], "n": n},
        {"condition": "complementarity", "metric": "verdict", "value": verdict, "ci_low": np.nan, "ci_high": np.nan, "n": n},
    ]
    meta = {
        "conditions": CONDITIONS,
        "combination": "full_model: the model's own phase 1 and phase 2",
        "stand_alone": {"phase 1": "phase1_only@tau (the CoT cut at the internal boundary, answer forced)", "phase 2": "retriever_shortlist+phase2 (the model's phase 2 on the retriever's shortlist instead of its own phase 1)"},
        "verdict_rule": "the full model's micro-F1 gain over each stand-alone substitute has a paired-bootstrap 95% CI above 0",
        "retriever": f"MiniLM cosine; shortlists top-{retriever_k}",
        "retriever_alone_size": f"{answer_size} (median gold labels per document of the {'training split' if len(train_docs) else 'non-evaluated documents'}, not the model's answers)",
        "n_traces": n,
    }
    result = IsolationResult(pd.DataFrame(rows), meta)
    ctx.record["complementarity"] = result.verdict()
    return result


register_stage(Stage("isolate", "isolate", ("boundary.parquet",), ("isolation.parquet",), compute, "truncation, injection, retriever baselines, complementarity"))
