"""``ctd patch --run DIR``: causal tests of the phase-1 and phase-2 heads, with controls.

For each trace, the corrupted prompt swaps the document's anchor tokens for the anchor tokens of an
unrelated document (one sharing no gold label), token for token, so both runs line up. For each
score (coarse: phase-1 heads, refine: phase-2 heads), each k and each head set (ranked, random
draws, lowest-ranked), the heads are patched (denoise: clean into corrupted; noise: corrupted into
clean) over the teacher-forced prefix, and the model regenerates from the patched point: from the
phase boundary for phase-1 heads (the checks and the answer are written anew), from the answer
marker for phase-2 heads. Read-outs: the label margin over the late CoT (teacher-forced), the
regenerated answer's P@1 and recall against gold, and Focus/Confusion of the regenerated text.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from analyses.figures import PALETTE, themed
from analyses.io import Manifest, read_parquet
from analyses.parsing import Region, TraceParser
from analyses.results import FrameResult
from analyses.tasks.sources import Dataset
from probes.errors import input_error
from probes.heads import label_margin
from probes.patching import collect_head_activations, control_head_sets, ks_for, patched_generate, patched_logits

__all__ = ["PatchingResult", "patch_run", "corrupt_prompt"]


class PatchingResult(FrameResult):
    """``mode``, ``score``, ``k``, ``head_set``, ``metric``, ``value`` per trace (``doc_id``) and summary rows
    (``doc_id`` null) with ``ci_low``/``ci_high``."""

    REQUIRED = ("doc_id", "mode", "score", "k", "head_set", "metric", "value", "ci_low", "ci_high")

    @property
    def summary(self) -> pd.DataFrame:
        return self.frame[self.frame["doc_id"].isna()]

    def figure(self, metric: str = "margin") -> go.Figure:
        s = self.summary[self.summary["metric"] == metric].copy()
        s["family"] = s["head_set"].str.replace(r"-\d+$", "", regex=True)
        s = s.groupby(["mode", "score", "k", "family"], as_index=False).agg(value=("value", "mean"), ci_low=("ci_low", "mean"), ci_high=("ci_high", "mean"))
        panels = [(m, sc) for m in ("denoise", "noise") for sc in ("coarse", "refine")]
        fig = make_subplots(rows=2, cols=2, subplot_titles=[f"{m}: {'phase-1 (coarse)' if sc == 'coarse' else 'phase-2 (refine)'} heads" for m, sc in panels], shared_yaxes=True)
        colours = {"ranked": PALETTE[0], "random": PALETTE[1], "lowest": PALETTE[2]}
        for i, (mode, score) in enumerate(panels):
            r, c = divmod(i, 2)
            for family, colour in colours.items():
                g = s[(s["mode"] == mode) & (s["score"] == score) & (s["family"] == family)].sort_values("k")
                if g.empty:
                    continue
                fig.add_trace(
                    go.Scatter(x=g["k"], y=g["value"], mode="lines+markers", name={"ranked": "top-k by score", "random": "k random heads", "lowest": "k lowest-ranked"}[family], line=dict(color=colour), showlegend=i == 0,
                               error_y=dict(type="data", symmetric=False, array=g["ci_high"] - g["value"], arrayminus=g["value"] - g["ci_low"])),
                    row=r + 1, col=c + 1,
                )
        label = {"margin": "gold − near-miss log-prob margin (nats)", "p_at_1": "answer P@1", "recall": "answer recall", "focus": "Focus of regenerated CoT", "confusion": "Confusion of regenerated CoT"}.get(metric, metric)
        fig = themed(fig, f"Head patching: {label} by number of patched heads (95% CI)", "heads patched (k)", label)
        fig.update_layout(width=1000, height=700)
        return fig


def corrupt_prompt(prompt_ids: list[int], regions: np.ndarray, donor_anchor_tokens: list[int]) -> tuple[list[int], list[int]]:
    """Swap the prompt's anchor tokens for the donor's, cycled to the same count. Returns (ids, swapped positions)."""
    anchor_positions = [i for i in range(len(prompt_ids)) if regions[i] == int(Region.ANCHOR)]
    if not anchor_positions or not donor_anchor_tokens:
        return list(prompt_ids), []
    corrupted = list(prompt_ids)
    for j, i in enumerate(anchor_positions):
        corrupted[i] = donor_anchor_tokens[j % len(donor_anchor_tokens)]
    return corrupted, anchor_positions


def _anchor_tokens(trace) -> list[int]:
    regions = np.asarray(trace.regions)
    return [int(trace.prompt_ids[i]) for i in range(len(trace.prompt_ids)) if regions[i] == int(Region.ANCHOR)]


def patch_run(
    run_dir: str | Path,
    n_docs: int = 10,
    ks: tuple[int, ...] = (3, 8, 16, 40, 100),
    n_random: int = 2,
    seed: int = 0,
    n_boot: int = 500,
    progress: bool = True,
    model=None,
    manifest: Manifest | None = None,
) -> PatchingResult:
    from tqdm.auto import tqdm

    from analyses.characterize import _margin_pairs
    from analyses.embed import embed_texts
    from analyses.tasks.metrics import bootstrap_ci
    from probes.models import load_model

    run_dir = Path(run_dir)
    manifest = Manifest.for_stage(run_dir, manifest)
    model_path = manifest.model_path()
    scores = read_parquet(run_dir / "head_scores.parquet", required=("layer", "head", "score", "rank"))
    boundary = read_parquet(run_dir / "boundary.parquet", required=("doc_id", "estimator", "tau_token"))
    traces = read_parquet(run_dir / "traces.parquet")
    dataset = Dataset.load(run_dir)
    labels, by_id = dataset.labels, dataset.docs.set_index("doc_id")
    bridge = model if model is not None else load_model(model_path)
    tok = bridge.tokenizer
    template_close = "\n</think>\n<answer>"
    parser = TraceParser(labels)
    tau = boundary[boundary["estimator"] == "internal"].set_index("doc_id")["tau_token"].to_dict()
    usable = traces[traces["well_formed"] & traces["doc_id"].isin(tau)]
    usable = usable[[bool(_anchor_tokens(t)) for t in usable.itertuples()]].head(n_docs)
    if usable.empty:
        raise input_error(run_dir / "traces.parquet", "no well-formed trace with anchors to patch", "generate more traces")
    donors = list(traces.itertuples())
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    ranking = {s: [(int(r.layer), int(r.head)) for r in scores[scores["score"] == s].sort_values("rank").itertuples()] for s in ("coarse", "refine")}
    ks_used = ks_for(n_layers * n_heads, ks)
    rows = []
    rng = np.random.default_rng(seed)
    bar = tqdm(total=len(usable), desc="patch", disable=not progress, file=sys.stderr)
    for trace in usable.itertuples():
        doc = by_id.loc[trace.doc_id]
        gold = set(int(g) for g in doc["gold"])
        near = [int(n) for n in doc["near_miss"]]
        donor_pool = [d for d in donors if d.doc_id != trace.doc_id and not gold & set(int(g) for g in by_id.loc[d.doc_id]["gold"]) and _anchor_tokens(d)]
        donor = donor_pool[int(rng.integers(len(donor_pool)))]
        clean_prompt = list(trace.prompt_ids)
        corrupted_prompt, _ = corrupt_prompt(clean_prompt, np.asarray(trace.regions), _anchor_tokens(donor))
        output = list(trace.output_ids)
        cot_len = int(trace.cot_end) - int(trace.cot_start)
        runs = {"clean": torch.tensor([clean_prompt + output]), "corrupt": torch.tensor([corrupted_prompt + output])}
        acts = {name: collect_head_activations(bridge, ids, range(n_layers)) for name, ids in runs.items()}
        boundary_offset = int(tau[trace.doc_id]) - int(trace.cot_start)
        late = list(range(int(tau[trace.doc_id]), int(trace.cot_end)))
        pairs = _margin_pairs(tok, labels, sorted(gold), near)
        close_ids = tok.encode(template_close, add_special_tokens=False)
        near_vec = None
        regenerated_texts = []
        keys = []
        for mode, (target, source) in {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}.items():
            for score in ("coarse", "refine"):
                if not ranking[score]:
                    continue
                for k in ks_used:
                    for head_set in control_head_sets(ranking[score], k, n_random=n_random, seed=seed):
                        ids = runs[target]
                        logits = patched_logits(bridge, ids, head_set.heads, acts[source], range(ids.shape[1]))
                        margin = float(label_margin(torch.log_softmax(logits[late].float(), -1), pairs).mean()) if pairs and late else float("nan")
                        prompt = clean_prompt if target == "clean" else corrupted_prompt
                        if score == "coarse":
                            prefix = prompt + output[:boundary_offset]
                            budget = cot_len - boundary_offset + 24
                        else:
                            prefix = prompt + output[:cot_len] + close_ids
                            budget = 24
                        prefix_t = torch.tensor([prefix])
                        new = patched_generate(bridge, prefix_t, head_set.heads, acts[source], range(len(prefix)), max_new_tokens=budget, eos_token_id=tok.eos_token_id)
                        text = tok.decode((output[:boundary_offset] if score == "coarse" else output[:cot_len] + close_ids) + new, skip_special_tokens=False)
                        answer = parser.answer_of(text)
                        p1 = float(bool(answer) and answer[0] in gold)
                        recall = len(set(answer) & gold) / len(gold) if gold else 0.0
                        base = {"doc_id": trace.doc_id, "mode": mode, "score": score, "k": k, "head_set": head_set.name}
                        rows += [{**base, "metric": "margin", "value": margin}, {**base, "metric": "p_at_1", "value": p1}, {**base, "metric": "recall", "value": recall}]
                        regenerated_texts.append(text.split("</think>")[0])
                        keys.append(base)
        vectors = embed_texts(regenerated_texts + [doc["text"]] + [labels.texts[j] for j in near])
        doc_vec = vectors[len(regenerated_texts)]
        if near:
            near_vec = vectors[len(regenerated_texts) + 1 :].mean(0)
            near_vec /= np.linalg.norm(near_vec) + 1e-12
        for base, vec in zip(keys, vectors[: len(regenerated_texts)]):
            rows.append({**base, "metric": "focus", "value": float(vec @ doc_vec)})
            rows.append({**base, "metric": "confusion", "value": float(vec @ near_vec) if near_vec is not None else float("nan")})
        bar.update(1)
    bar.close()
    frame = pd.DataFrame(rows)
    frame["ci_low"] = np.nan
    frame["ci_high"] = np.nan
    summary = []
    for key, group in frame.groupby(["mode", "score", "k", "head_set", "metric"]):
        values = group["value"].dropna().to_numpy()
        if len(values) == 0:
            continue
        mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, seed=seed)
        summary.append(dict(zip(["mode", "score", "k", "head_set", "metric"], key), doc_id=None, value=mean, ci_low=lo, ci_high=hi))
    frame = pd.concat([frame, pd.DataFrame(summary)], ignore_index=True)
    meta = {
        "corruption": "anchor tokens swapped token-for-token with an unrelated document's (no shared gold label)",
        "patched": "head output hook_z at every prefix position",
        "regeneration": "coarse: from the internal boundary estimate; refine: from the answer marker; greedy",
        "margin": "teacher-forced, mean over CoT positions after the boundary",
        "ks": ks_used,
        "random_draws": n_random,
        "n_traces": int(len(usable)),
    }
    return PatchingResult(frame, meta)
