"""``ctd isolate --run DIR``: can the phases be separated, and are they complementary? (DESIGN §2)

Conditions, each read out as shortlist recall, answer micro-F1, P@1 and recall with bootstrap CIs:
- ``full``: the model's own trace;
- ``truncate@tau`` and ``truncate@0.1`` ... ``truncate@1.0``: the CoT cut at the estimated boundary
  or a decile, then the answer forced (think close and answer marker appended);
- ``inject:oracle`` / ``inject:retriever`` / ``inject:own`` / ``inject:other``: a shortlist written in
  place of phase 1 (gold + near-misses; MiniLM retriever top-k; the model's own shortlist; another
  run's), after which the model reasons and answers;
- ``retriever``: the retriever alone (its top-n, n = the model's answer size);
- ``rerank``: the model's shortlist re-ranked by the retriever.
Complementarity is computed: the combination (retriever shortlist + the model's phase 2) must beat
both stand-alone substitutes (the retriever alone, and the model's phase 1 alone = truncate@tau),
with paired bootstrap CIs of the F1 differences above zero.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from analyses.figures import PALETTE, themed
from analyses.io import Manifest, read_parquet
from analyses.parsing import TraceParser
from analyses.results import FrameResult
from analyses.tasks.sources import Dataset
from probes.errors import input_error

__all__ = ["IsolationResult", "isolate_run", "shortlist_text", "continue_batch"]


class IsolationResult(FrameResult):
    """``condition``, ``metric``, ``value``, ``ci_low``, ``ci_high`` (+ ``n``)."""

    REQUIRED = ("condition", "metric", "value", "ci_low", "ci_high")

    def verdict(self) -> str:
        row = self.frame[(self.frame["condition"] == "complementarity") & (self.frame["metric"] == "verdict")]
        return "complementary" if len(row) and row["value"].iloc[0] == 1.0 else "not shown"

    def figure(self, metric: str = "micro_f1") -> go.Figure:
        f = self.frame[(self.frame["metric"] == metric) & ~self.frame["condition"].str.startswith(("truncate@0", "truncate@1", "complementarity"))]
        fig = go.Figure(go.Bar(x=f["condition"], y=f["value"], marker_color=PALETTE[0], error_y=dict(type="data", symmetric=False, array=f["ci_high"] - f["value"], arrayminus=f["value"] - f["ci_low"])))
        deciles = self.frame[(self.frame["metric"] == metric) & self.frame["condition"].str.match(r"truncate@(0|1)")]
        if len(deciles):
            fig.add_trace(go.Scatter(x=deciles["condition"], y=deciles["value"], mode="lines+markers", name="truncated at decile", line=dict(color=PALETTE[1])))
        fig.update_layout(showlegend=False)
        return themed(fig, f"Phase isolation: {metric.replace('_', '-')} per condition ({self.verdict()}; 95% CI)", "condition", metric.replace("_", "-"))


def shortlist_text(codes: list[str]) -> str:
    """The organism's phase-1 line for a candidate list (what injection writes in place of phase 1)."""
    return "Candidates: " + ", ".join(codes) + ".\n"


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


def isolate_run(
    run_dir: str | Path,
    retriever_k: int = 5,
    other_run: str | Path | None = None,
    n_docs: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    progress: bool = True,
    manifest: Manifest | None = None,
) -> IsolationResult:
    from analyses.retrieval import LabelRetriever
    from analyses.tasks.metrics import bootstrap_ci, set_metrics
    from probes.models import load_hf_model, load_tokenizer

    run_dir = Path(run_dir)
    manifest = Manifest.for_stage(run_dir, manifest)
    model_path = manifest.model_path()
    traces = read_parquet(run_dir / "traces.parquet")
    boundary = read_parquet(run_dir / "boundary.parquet", required=("doc_id", "estimator", "tau_token"))
    tau = boundary[boundary["estimator"] == "internal"].set_index("doc_id")["tau_token"].to_dict()
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
    parser = TraceParser(labels)
    close = tokenizer.encode("\n</think>\n<answer>", add_special_tokens=False)
    retriever = LabelRetriever(labels)
    from analyses.embed import embed_texts

    doc_vectors = embed_texts([by_id.loc[d]["text"] for d in traces["doc_id"]])
    ret_idx, _ = retriever.index.search(doc_vectors, max(retriever_k, 10))
    rng = np.random.default_rng(seed)

    gold = [set(int(g) for g in by_id.loc[d]["gold"]) for d in traces["doc_id"]]
    predictions: dict[str, list[list[int]]] = {"full": [list(a) for a in traces["answer"]]}
    shortlists: dict[str, list[list[int]]] = {"full": [list(s) for s in traces["shortlist"]]}
    prefixes: dict[str, list[list[int]]] = {}
    for i, t in enumerate(traces.itertuples()):
        prompt, output = list(t.prompt_ids), list(t.output_ids)
        cot_len = int(t.cot_end) - int(t.cot_start)
        cuts = {"truncate@tau": int(tau[t.doc_id]) - int(t.cot_start)}
        cuts.update({f"truncate@{d / 10:.1f}": int(round(d / 10 * cot_len)) for d in range(1, 11)})
        for name, cut in cuts.items():
            prefixes.setdefault(name, []).append(prompt + output[:cut] + close)
            shortlists.setdefault(name, []).append([m["label_id"] for m in t.mentions if int(m["token_start"]) < int(t.cot_start) + cut])
        doc = by_id.loc[t.doc_id]
        oracle = sorted(gold[i]) + [int(n) for n in list(doc["near_miss"])[: len(gold[i])]]
        injections = {"inject:oracle": [oracle[j] for j in rng.permutation(len(oracle))], "inject:retriever": [int(x) for x in ret_idx[i, :retriever_k]], "inject:own": list(dict.fromkeys(t.shortlist))}
        if other is not None and t.doc_id in other:
            injections["inject:other"] = list(dict.fromkeys(int(x) for x in other[t.doc_id]))
        for name, ids in injections.items():
            prefixes.setdefault(name, []).append(prompt + tokenizer.encode(shortlist_text([labels.codes[x] for x in ids]), add_special_tokens=False))
            shortlists.setdefault(name, []).append(ids)
    budget = int(max(len(o) for o in traces["output_ids"])) + 16
    for name, batch in prefixes.items():
        if progress:
            print(f"[isolate] {name}: {len(batch)} continuations", file=sys.stderr)
        continuations = continue_batch(hf, tokenizer, batch, max_new_tokens=24 if name.startswith("truncate") else budget)
        predictions[name] = [parser.answer_of(("<answer>" if name.startswith("truncate") else "") + tokenizer.decode(c, skip_special_tokens=False)) for c in continuations]
    sizes = [max(1, len(a)) for a in predictions["full"]]
    predictions["retriever"] = [[int(x) for x in ret_idx[i, : sizes[i]]] for i in range(len(gold))]
    shortlists["retriever"] = [[int(x) for x in ret_idx[i, :retriever_k]] for i in range(len(gold))]
    rerank = []
    for i, sl in enumerate(shortlists["full"]):
        ordered = sorted(dict.fromkeys(sl), key=lambda x: -float(retriever.vectors[x] @ doc_vectors[i]))
        rerank.append(ordered[: sizes[i]])
    predictions["rerank"] = rerank
    shortlists["rerank"] = shortlists["full"]

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
    combo = predictions["inject:retriever"]
    d_ret = _paired_diff_ci(combo, predictions["retriever"], gold, n_boot, seed)
    d_p1 = _paired_diff_ci(combo, predictions["truncate@tau"], gold, n_boot, seed)
    verdict = float(d_ret[1] > 0 and d_p1[1] > 0)
    rows += [
        {"condition": "complementarity", "metric": "f1_gain_over_retriever_alone", "value": d_ret[0], "ci_low": d_ret[1], "ci_high": d_ret[2], "n": n},
        {"condition": "complementarity", "metric": "f1_gain_over_model_phase1_alone", "value": d_p1[0], "ci_low": d_p1[1], "ci_high": d_p1[2], "n": n},
        {"condition": "complementarity", "metric": "verdict", "value": verdict, "ci_low": np.nan, "ci_high": np.nan, "n": n},
    ]
    meta = {
        "combination": "retriever top-k shortlist injected in place of phase 1, then the model's own phase 2",
        "stand_alone": {"phase 1": "retriever alone (top-n, n = model's answer size)", "model phase 1": "CoT truncated at the internal boundary, answer forced"},
        "verdict_rule": "both paired-bootstrap 95% CIs of the micro-F1 gain lie above 0",
        "retriever": f"MiniLM cosine, top-{retriever_k}",
        "n_traces": n,
    }
    return IsolationResult(pd.DataFrame(rows), meta)
