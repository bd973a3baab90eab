"""The ``patch`` stage (``ctd patch --run DIR``): every head's causal effect, and whether the phase
scores point at it.

For each test trace the corrupted prompt swaps the document's anchor tokens for those of an
unrelated document (no shared gold label), token for token, so clean and corrupted runs line up.
The chain of thought is teacher-forced in both runs (the clean one), so read-outs sit at the answer:

- ``answer_logprob`` and ``answer_margin`` (:mod:`analyses.methods.readouts`): the gold answer codes'
  log-probability, and its margin over the strongest near-miss's, mean over codes;
- ``p_at_1`` / ``recall``: the answer regenerated greedily from the answer marker (head sets only).

Per trace the clean and corrupt values are stored beside every patched value, so any effect is
normalised: recovery (denoise) = (patched - corrupt) / (clean - corrupt), damage (noise) =
(clean - patched) / (clean - corrupt), pooled over traces as a ratio of sums.

What is measured:

1. every head alone, both modes (a batched sweep), at all positions and at each phase's positions;
2. attribution patching (activation difference x gradient) for every head, checked against the sweep;
3. heads ranked by CoarseScore and RefineScore on *dev* traces, patched as top-k sets against k
   random heads outside the top k and the k lowest, on *test* traces (paired differences with CIs);
4. how well each score predicts each causal map: Spearman and top-k overlap, bootstrap CIs over
   traces and permutation p-values;
5. the invariant: every head at every position recovers (and damages) the whole gap.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from analyses.machinery.io import read_parquet
from analyses.machinery.protocol import Stage, StageContext, register_stage
from analyses.methods.parsing import Region, TraceParser
from analyses.methods.prompts import run_template
from analyses.methods.readouts import READOUTS, answer_readouts, cot_readouts, find_tokens
from analyses.results.boundary import Boundary
from analyses.results.characterize import HeadScores
from analyses.results.patching import PatchingResult
from analyses.tasks.sources import Dataset, near_misses_of
from probes.errors import input_error
from probes.patching import (
    HeadSet,
    PatchInputs,
    TokenReadout,
    attribution_patching,
    control_head_sets,
    head_set_effects,
    head_masks,
    head_sweep,
    ks_for_heads,
    normalised_effect,
    patched_generate,
)

__all__ = ["PatchingResult", "compute", "corrupt_prompt"]

GENERATED = ("p_at_1", "recall")


# ------------------------------------------------------------------------------------------------
# corruption


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


# ------------------------------------------------------------------------------------------------
# regeneration under a patch


def _shifted_source(source: dict[int, torch.Tensor], inputs: PatchInputs, offsets: np.ndarray, width: int, prefix_lengths: np.ndarray) -> tuple[dict[int, torch.Tensor], torch.Tensor]:
    """Re-pad the z source of each trace's prefix to a new left-padded width; and the prefix mask."""
    out = {}
    mask = torch.zeros((len(offsets), width), dtype=torch.bool)
    for layer, acts in source.items():
        new = torch.zeros((acts.shape[0], width, *acts.shape[2:]), dtype=acts.dtype)
        for b in range(acts.shape[0]):
            n = int(prefix_lengths[b])
            new[b, offsets[b] : offsets[b] + n] = acts[b, inputs.offsets[b] : inputs.offsets[b] + n]
            mask[b, offsets[b] : offsets[b] + n] = True
        out[layer] = new
    return out, mask


# ------------------------------------------------------------------------------------------------
# statistics


def _pooled(mode: str, clean: np.ndarray, corrupt: np.ndarray, patched: np.ndarray, idx: np.ndarray):
    """Pooled recovery/damage over the traces ``idx`` ([n]: a float; [draws, n]: one per draw)."""
    gap = np.nansum(clean[idx] - corrupt[idx], axis=-1)
    change = np.nansum(patched[idx] - corrupt[idx], axis=-1) if mode == "denoise" else np.nansum(clean[idx] - patched[idx], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(gap != 0, change / np.where(gap != 0, gap, 1.0), np.nan)
    return float(out) if out.ndim == 0 else out


def _boot_indices(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _ci(draws: np.ndarray) -> tuple[float, float]:
    draws = draws[np.isfinite(draws)]
    return (float(np.quantile(draws, 0.025)), float(np.quantile(draws, 0.975))) if len(draws) else (float("nan"), float("nan"))


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else float("nan")


# ------------------------------------------------------------------------------------------------
# the stage


def _phase_positions(trace, tau: int) -> dict[str, list[int]]:
    cot_start, cot_end = int(trace.cot_start), int(trace.cot_end)
    n = len(trace.prompt_ids) + len(trace.output_ids)
    return {"all": list(range(n)), "phase1": list(range(cot_start, tau)), "phase2": list(range(tau, cot_end))}


def compute(ctx: StageContext) -> PatchingResult:
    """Every head's causal effect on the run's test traces and the scores' agreement with it.

    Reads a run with traces, boundary and (dev) head scores, with the run's model and prompt
    template. ``ctx.settings``: :class:`~analyses.machinery.settings.PatchSettings`; ``ctx.model``: a
    loaded bridge to reuse.
    """
    from tqdm.auto import tqdm

    from probes.models import load_hf_model, load_model

    run_dir, settings, progress, model = Path(ctx.run_dir), ctx.settings, ctx.progress, ctx.model
    model_path, template = ctx.model_path, run_template(ctx.manifest)
    # Heads are ranked on dev traces only: ranking on the test traces they are patched on would make
    # "do the scores find the causal heads?" circular, so there is no fallback to them.
    dev_scores_path = run_dir / "dev_head_scores.parquet"
    if not dev_scores_path.exists():
        raise input_error(dev_scores_path, "no head scores on dev traces to rank heads with (the patch stage never ranks on the test traces it measures)", "run `ctd traces` with --n-dev-docs N (N > 0; the default draws 50), then `ctd capture` and `ctd characterize`")
    dev_scores = HeadScores.load(dev_scores_path)
    scores, ranked_on = dev_scores.frame, dev_scores.meta.get("traces") or "dev traces"
    boundary = Boundary.load(run_dir / "boundary.parquet")
    traces = read_parquet(run_dir / "traces.parquet")
    dataset = Dataset.load(run_dir)
    labels, by_id = dataset.labels, dataset.docs.set_index("doc_id")
    bridge = model if model is not None else load_model(model_path, device_map=settings.device_map)
    tok = bridge.tokenizer
    n_layers, n_heads = bridge.cfg.n_layers, bridge.cfg.n_heads
    tau = boundary.tau("internal")
    phase_tau = boundary.tau("internal", prefer_truth=True)

    # Traces to patch, each with a donor and read-out items.
    candidates = traces[traces["well_formed"] & traces["doc_id"].isin(tau)]
    rng = np.random.default_rng(settings.seed)
    chosen, clean_seqs, corrupt_seqs, items = [], [], [], {r: [] for r in READOUTS}
    donors = [d for d in traces.itertuples() if _anchor_tokens(d)]
    for trace in candidates.itertuples():
        if len(chosen) == settings.n_docs:
            break
        anchors = _anchor_tokens(trace)
        if not anchors:
            continue
        doc = by_id.loc[trace.doc_id]
        gold = [int(g) for g in doc["gold"] if int(g) in set(int(a) for a in trace.answer)]
        near = near_misses_of(doc)
        ids = list(trace.prompt_ids) + list(trace.output_ids)
        readouts = answer_readouts(tok, labels, ids, np.asarray(trace.regions), gold, near)
        if not readouts["answer_logprob"]:
            continue
        readouts.update(cot_readouts(tok, labels, ids, trace.mentions, phase_tau.get(trace.doc_id), int(trace.cot_end)))
        gold_all = set(int(g) for g in doc["gold"])
        pool = [d for d in donors if d.doc_id != trace.doc_id and not gold_all & set(int(g) for g in by_id.loc[d.doc_id]["gold"])]
        if not pool:  # every other trace shares a gold code: nothing unrelated to corrupt with
            continue
        donor = pool[int(rng.integers(len(pool)))]
        corrupted, _ = corrupt_prompt(list(trace.prompt_ids), np.asarray(trace.regions), _anchor_tokens(donor))
        chosen.append(trace)
        clean_seqs.append(ids)
        corrupt_seqs.append(corrupted + list(trace.output_ids))
        for r in READOUTS:
            items[r].append(readouts[r])
    if not chosen:
        raise input_error(run_dir / "traces.parquet", "no well-formed trace with anchors and a gold code in its answer", "generate more traces (ctd traces --n-docs)")
    doc_ids = [str(t.doc_id) for t in chosen]
    n = len(chosen)
    parser = TraceParser.for_template(labels, template)
    answer_open = tok.encode(parser.answer_open, add_special_tokens=False)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    hf = load_hf_model(model_path, attn_implementation="sdpa", device_map=settings.device_map) if settings.regenerate and settings.what == "z" else None
    stop_ids = set(tok.encode(parser.answer_close, add_special_tokens=False)[:1]) | {tok.eos_token_id}

    rows: list[dict] = []
    per_trace: dict[tuple, dict[str, np.ndarray]] = {}  # (analysis, mode, positions, readout, layer, head, score, k, set) -> patched
    baselines = {r: {"clean": np.zeros(n), "corrupt": np.zeros(n)} for r in READOUTS + GENERATED}
    # Batches of similar length: left padding to the longest trace of a batch of 40 would triple
    # the tokens of every forward (organism: mean 205, longest 553 tokens).
    by_length = np.argsort([len(s) for s in clean_seqs], kind="stable").tolist()
    batches = [by_length[b : b + settings.batch_size] for b in range(0, n, settings.batch_size)]
    heads_all = [(l, h) for l in range(n_layers) for h in range(n_heads)]
    ranking = {s: [(int(r.layer), int(r.head)) for r in scores[scores["score"] == s].sort_values("rank").itertuples()] for s in ("coarse", "refine")}
    ks = ks_for_heads(n_layers * n_heads)
    head_sets = [(score, hs) for score in ("coarse", "refine") if ranking[score] for k in ks for hs in control_head_sets(ranking[score], k, settings.n_random, settings.seed)]
    all_heads = [("", HeadSet("all", n_layers * n_heads, tuple(heads_all)))]
    sweep_sets = settings.sweep_positions if settings.sweep else ()
    bar = tqdm(total=len(batches) * (len(sweep_sets) * len(heads_all) + len(head_sets) + 2), desc="patch", disable=not progress, file=sys.stderr)

    def store(key: tuple, batch: list[int], values: dict[str, np.ndarray]) -> None:
        for r, v in values.items():
            per_trace.setdefault(key + (r,), np.full(n, np.nan))[batch] = v

    seconds = dict.fromkeys(("runs_and_head_sets", "sweep", "attribution", "regenerate", "summaries"), 0.0)
    clock = time.perf_counter()

    def lap(part: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[part] += now - clock
        clock = now

    for batch in batches:
        inputs = PatchInputs.from_sequences([clean_seqs[i] for i in batch], [corrupt_seqs[i] for i in batch], tok.pad_token_id if tok.pad_token_id is not None else 0)
        readouts = [TokenReadout(r, [items[r][i] for i in batch]) for r in READOUTS]
        positions = {name: inputs.position_mask([_phase_positions(chosen[i], phase_tau[doc_ids[i]])[name] for i in batch]) for name in ("all", "phase1", "phase2")}
        runs, _ = head_set_effects(bridge, inputs, readouts, [], positions["all"], settings.what)
        for r in READOUTS:
            baselines[r]["clean"][batch] = runs.clean[r]
            baselines[r]["corrupt"][batch] = runs.corrupt[r]
        # the invariant and the head sets
        _, effects = head_set_effects(bridge, inputs, readouts, [heads_all], positions["all"], settings.what, runs)
        for mode, values in effects[0].items():
            store(("all_heads", mode, "all", -1, -1, "", n_layers * n_heads, "all"), batch, values)
        _, effects = head_set_effects(bridge, inputs, readouts, [hs.heads for _, hs in head_sets], positions["all"], settings.what, runs)
        for (score, hs), per_mode in zip(head_sets, effects):
            for mode, values in per_mode.items():
                store(("head_set", mode, "all", -1, -1, score, hs.k, hs.name), batch, values)
        bar.update(len(head_sets) + 1)
        lap("runs_and_head_sets")
        for name in sweep_sets:
            modes = ("denoise", "noise") if name == "all" else settings.phase_sweep_modes
            _, sweep = head_sweep(bridge, inputs, readouts, positions[name], settings.what, runs=runs, modes=modes)
            for (layer, head, mode), values in sweep.items():
                store(("sweep", mode, name, layer, head, "", 1, ""), batch, values)
            bar.update(len(heads_all))
        lap("sweep")
        estimates = attribution_patching(bridge, inputs, readouts, positions["all"], settings.what)
        for (mode, r), est in estimates.items():
            base = runs.corrupt[r] if mode == "denoise" else runs.clean[r]
            for layer, head in heads_all:
                per_trace.setdefault(("attribution", mode, "all", layer, head, "", 1, "", r), np.full(n, np.nan))[batch] = base + est[:, layer, head].numpy()
        bar.update(1)
        lap("attribution")
        if settings.regenerate and settings.what == "z":
            prefix = np.array([find_tokens(clean_seqs[i], answer_open, len(chosen[i].prompt_ids), len(clean_seqs[i])) + len(answer_open) for i in batch])
            gold_sets = [set(int(g) for g in by_id.loc[doc_ids[i]]["gold"]) for i in batch]

            tokens_all = {run: getattr(inputs, run) for run in ("clean", "corrupt")}
            prefix_rows = {run: [tokens_all[run][b, inputs.offsets[b] : inputs.offsets[b] + int(prefix[b])].tolist() for b in range(len(batch))] for run in tokens_all}
            width = int(prefix.max())
            new_offsets = width - prefix
            prefix_ids = {}
            prefix_mask = torch.zeros((len(batch), width), dtype=torch.long)
            for b in range(len(batch)):
                prefix_mask[b, new_offsets[b] :] = 1
            for run, rows_ in prefix_rows.items():
                ids_ = torch.full((len(batch), width), pad_id, dtype=torch.long)
                for b, r in enumerate(rows_):
                    ids_[b, new_offsets[b] :] = torch.as_tensor(r)
                prefix_ids[run] = ids_
            shifted = {run: _shifted_source(runs.acts[run], inputs, new_offsets, width, prefix)[0] for run in ("clean", "corrupt")}

            def generated_metrics(tokens_run: str, patch=None) -> dict[str, np.ndarray]:
                source, masks = patch if patch is not None else ("clean", {})
                new = patched_generate(hf, prefix_ids[tokens_run], prefix_mask, shifted[source], masks, prefix_mask.bool(), 24, pad_id, sorted(stop_ids))
                answers = [parser.answer_labels(tok.decode(g, skip_special_tokens=True).split(parser.answer_close)[0])[0] for g in new]
                p1 = np.array([float(bool(a) and a[0] in gs) for a, gs in zip(answers, gold_sets)])
                rec = np.array([len(set(a) & gs) / max(len(gs), 1) for a, gs in zip(answers, gold_sets)])
                return {"p_at_1": p1, "recall": rec}

            for run_name in ("clean", "corrupt"):
                for r, v in generated_metrics(run_name).items():
                    baselines[r][run_name][batch] = v
            for score, hs in head_sets + all_heads:
                masks = head_masks(hs.heads, n_layers, n_heads)
                for mode, (target, source) in {"denoise": ("corrupt", "clean"), "noise": ("clean", "corrupt")}.items():
                    values = generated_metrics(target, (source, masks))
                    key = ("all_heads", mode, "all", -1, -1, "", n_layers * n_heads, "all") if hs.name == "all" else ("head_set", mode, "all", -1, -1, score, hs.k, hs.name)
                    store(key, batch, values)
        lap("regenerate")
    bar.close()

    # per-trace rows and pooled summaries
    boot = _boot_indices(n, settings.n_boot, settings.seed)
    for r in READOUTS + GENERATED:
        if not settings.regenerate and r in GENERATED:
            continue
        for i, d in enumerate(doc_ids):
            rows.append({"doc_id": d, "analysis": "baseline", "mode": "", "positions": "all", "readout": r, "layer": -1, "head": -1, "score": "", "k": 0, "head_set": "", "clean": baselines[r]["clean"][i], "corrupt": baselines[r]["corrupt"][i], "patched": np.nan, "effect": np.nan, "value": baselines[r]["clean"][i] - baselines[r]["corrupt"][i], "ci_low": np.nan, "ci_high": np.nan})
        gap = baselines[r]["clean"] - baselines[r]["corrupt"]
        lo, hi = _ci(np.array([np.nanmean(gap[idx]) for idx in boot]))
        rows.append({"doc_id": None, "analysis": "baseline", "mode": "", "positions": "all", "readout": r, "layer": -1, "head": -1, "score": "", "k": 0, "head_set": "", "clean": float(np.nanmean(baselines[r]["clean"])), "corrupt": float(np.nanmean(baselines[r]["corrupt"])), "patched": np.nan, "effect": np.nan, "value": float(np.nanmean(gap)), "ci_low": lo, "ci_high": hi})
    pooled: dict[tuple, np.ndarray] = {}
    for key, patched in per_trace.items():
        analysis, mode, positions_name, layer, head, score, k, set_name, r = key
        clean, corrupt = baselines[r]["clean"], baselines[r]["corrupt"]
        effect = normalised_effect(mode, clean, corrupt, patched)
        base = {"analysis": analysis, "mode": mode, "positions": positions_name, "readout": r, "layer": layer, "head": head, "score": score, "k": k, "head_set": set_name}
        for i, d in enumerate(doc_ids):
            rows.append({**base, "doc_id": d, "clean": clean[i], "corrupt": corrupt[i], "patched": patched[i], "effect": effect[i], "value": effect[i], "ci_low": np.nan, "ci_high": np.nan})
        draws = _pooled(mode, clean, corrupt, patched, boot)
        pooled[key] = draws
        lo, hi = _ci(draws)
        rows.append({**base, "doc_id": None, "clean": float(np.nanmean(clean)), "corrupt": float(np.nanmean(corrupt)), "patched": float(np.nanmean(patched)), "effect": np.nan, "value": _pooled(mode, clean, corrupt, patched, np.arange(n)), "ci_low": lo, "ci_high": hi})

    def effect_of(key: tuple, idx: np.ndarray):
        *_, r = key
        return _pooled(key[1], baselines[r]["clean"], baselines[r]["corrupt"], per_trace[key], idx)

    # ranked against random and lowest, paired over traces
    for r in READOUTS + (GENERATED if settings.regenerate else ()):
        for mode in ("denoise", "noise"):
            for score in ("coarse", "refine"):
                for k in ks:
                    ranked_key = ("head_set", mode, "all", -1, -1, score, k, "ranked", r)
                    if ranked_key not in per_trace:
                        continue
                    random_keys = [("head_set", mode, "all", -1, -1, score, k, f"random-{d}", r) for d in range(settings.n_random)]
                    lowest_key = ("head_set", mode, "all", -1, -1, score, k, "lowest", r)
                    for name, others in (("ranked_minus_random", random_keys), ("ranked_minus_lowest", [lowest_key])):
                        def diff(idx, others=others):
                            return effect_of(ranked_key, idx) - np.mean([effect_of(o, idx) for o in others], axis=0)

                        lo, hi = _ci(diff(boot))
                        rows.append({"doc_id": None, "analysis": name, "mode": mode, "positions": "all", "readout": r, "layer": -1, "head": -1, "score": score, "k": k, "head_set": "", "clean": np.nan, "corrupt": np.nan, "patched": np.nan, "effect": np.nan, "value": diff(np.arange(n)), "ci_low": lo, "ci_high": hi})

    # scores against causal maps; attribution against the sweep
    causal = "sweep" if settings.sweep else "attribution"
    score_values = {s: np.array([float(scores[(scores["score"] == s) & (scores["layer"] == l) & (scores["head"] == h)]["value"].iloc[0]) if ranking[s] else np.nan for l, h in heads_all]) for s in ("coarse", "refine")}
    perm_rng = np.random.default_rng(settings.seed + 1)
    for r in READOUTS:
        for mode in ("denoise", "noise"):
            keys = [(causal, mode, "all", l, h, "", 1, "", r) for l, h in heads_all]
            if not all(k in per_trace for k in keys):
                continue
            point = np.array([effect_of(k, np.arange(n)) for k in keys])
            draws = np.stack([effect_of(k, boot[:400]) for k in keys], axis=1)
            for score in ("coarse", "refine"):
                sv = score_values[score]
                if not np.isfinite(sv).any():
                    continue
                rho = _spearman(sv, point)
                lo, hi = _ci(np.array([_spearman(sv, d) for d in draws]))
                perms = np.array([_spearman(perm_rng.permutation(sv), point) for _ in range(settings.n_permutations)])
                p = float((np.sum(np.abs(perms) >= abs(rho)) + 1) / (len(perms) + 1))
                base = {"doc_id": None, "analysis": "correlation", "mode": mode, "positions": "all", "readout": r, "layer": -1, "head": -1, "score": score, "head_set": causal, "clean": np.nan, "corrupt": np.nan, "patched": np.nan, "effect": np.nan}
                rows.append({**base, "metric": "spearman", "k": 0, "value": rho, "ci_low": lo, "ci_high": hi, "p_value": p})
                order = np.argsort(-sv)
                for k in ks:
                    top_score = set(order[:k].tolist())

                    def overlap(effects):
                        return len(top_score & set(np.argsort(-effects)[:k].tolist())) / k

                    lo, hi = _ci(np.array([overlap(d) for d in draws]))
                    chance = k / len(heads_all)
                    perm_over = np.array([len(set(perm_rng.permutation(len(heads_all))[:k].tolist()) & set(np.argsort(-point)[:k].tolist())) / k for _ in range(settings.n_permutations)])
                    p = float((np.sum(perm_over >= overlap(point)) + 1) / (len(perm_over) + 1))
                    rows.append({**base, "metric": f"top_k_overlap@{k}", "k": k, "value": overlap(point), "ci_low": lo, "ci_high": hi, "p_value": p, "chance": chance})
            if settings.sweep:
                attr_keys = [("attribution", mode, "all", l, h, "", 1, "", r) for l, h in heads_all]
                attr = np.array([effect_of(k, np.arange(n)) for k in attr_keys])
                # the same trace draws for both maps: the CI is of the agreement, paired by trace
                attr_draws = np.stack([effect_of(k, boot[: len(draws)]) for k in attr_keys], axis=1)
                lo, hi = _ci(np.array([_spearman(a, d) for a, d in zip(attr_draws, draws)]))
                rows.append({"doc_id": None, "analysis": "agreement", "mode": mode, "positions": "all", "readout": r, "layer": -1, "head": -1, "score": "", "k": 0, "head_set": "attribution vs sweep", "metric": "spearman", "clean": np.nan, "corrupt": np.nan, "patched": np.nan, "effect": np.nan, "value": _spearman(attr, point), "ci_low": lo, "ci_high": hi})
            # How well the causal map agrees with itself: Spearman between the maps of two random
            # halves of the traces (a map that does not reproduce cannot be correlated with anything).
            halves = np.random.default_rng(settings.seed + 2)
            split_rhos = []
            for _ in range(200):
                perm = halves.permutation(n)
                a_half, b_half = perm[: n // 2], perm[n // 2 :]
                split_rhos.append(_spearman(np.array([effect_of(k, a_half) for k in keys]), np.array([effect_of(k, b_half) for k in keys])))
            lo, hi = _ci(np.array(split_rhos))
            rows.append({"doc_id": None, "analysis": "reliability", "mode": mode, "positions": "all", "readout": r, "layer": -1, "head": -1, "score": "", "k": 0, "head_set": f"{causal} split-half", "metric": "spearman", "clean": np.nan, "corrupt": np.nan, "patched": np.nan, "effect": np.nan, "value": float(np.nanmedian(split_rhos)), "ci_low": lo, "ci_high": hi})

    frame = pd.DataFrame(rows)
    for column in ("metric", "p_value", "chance"):
        if column not in frame:
            frame[column] = np.nan
    lap("summaries")
    meta = {
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "corruption": "anchor tokens swapped token-for-token with an unrelated document's (no shared gold label)",
        "what": settings.what,
        "readouts": {
            "answer_logprob": "teacher-forced log p of each gold answer code (all its tokens), mean over codes",
            "answer_margin": "at each gold answer code: log p(gold) - max log p(near-miss) at the first token where their tokenisations part, mean over codes",
            "cot_phase1_logprob": "teacher-forced log p of each code the CoT mentions before its boundary (the code's tokens), at that mention, mean over mentions",
            "cot_phase2_margin": "at each phase-2 line's decision token (first token after the checked code and its description: the evidence noted on a kept line, 'needs' on a dropped one): log p(written) - max log p(the other decision's tokens), mean over lines",
            "p_at_1 / recall": "answer regenerated greedily from the answer marker, the patch applied to the prompt and the teacher-forced CoT" if settings.regenerate else "not computed",
        },
        "normalisation": "recovery (denoise) = (patched - corrupt)/(clean - corrupt); damage (noise) = (clean - patched)/(clean - corrupt); summaries pool traces as a ratio of sums, bootstrap 95% CI over traces",
        "ranking": f"CoarseScore / RefineScore on {ranked_on}",
        "ranked_on": {"split": dev_scores.meta.get("split", "dev"), "traces": ranked_on, "file": dev_scores_path.name, "doc_ids": dev_scores.meta.get("doc_ids")},
        "measured_on": {"split": "test", "traces": f"{n} test traces (traces.parquet)"},
        "ks": ks,
        "random_sets": f"{settings.n_random} seeded draws of k heads outside the ranked top k",
        "positions": {"all": "every token", "phase1": "CoT tokens before the trace's boundary", "phase2": "CoT tokens from the boundary on"},
        "phase_sweep_modes": list(settings.phase_sweep_modes),
        "boundary": "the true boundary where known, else the internal estimate",
        "n_traces": n,
        "gap": {
            r: {
                "mean": float(np.nanmean(baselines[r]["clean"] - baselines[r]["corrupt"])),
                "median": float(np.nanmedian(baselines[r]["clean"] - baselines[r]["corrupt"])),
                # a pooled ratio of sums is carried by the traces with the largest gaps
                "share_of_summed_gap_in_top_5_traces": float(np.sort(np.nan_to_num(baselines[r]["clean"] - baselines[r]["corrupt"]))[::-1][:5].sum() / max(np.nansum(baselines[r]["clean"] - baselines[r]["corrupt"]), 1e-12)),
            }
            for r in READOUTS
        },
        "ci": "bootstrap over the patched traces, the dev ranking held fixed",
        "dev_scores": scores[["layer", "head", "score", "value", "rank"]].to_dict(orient="records"),
        "causal_map_for_correlations": causal,
    }
    return PatchingResult(frame, meta)


register_stage(Stage("patch", "patch", ("boundary.parquet", "head_scores.parquet"), ("patching.parquet",), compute, "every head's causal effect and the scores' agreement with it"))
