"""Per-head effects: the one-head-at-a-time sweep and attribution patching, timed against one plain
forward over the same traces, in one run (issue: causal evidence that can find a head).

Usage: python bench/patching.py --run results/ctd-default [--n-traces 40] [--repeats 3] [--out FILE]

The run's traces are corrupted as the patch stage corrupts them (anchor tokens swapped with a
donor's). Times, per trace:
- forward:      one plain batched forward of the corrupted traces (the floor);
- sweep:        every head alone, both modes (2 x layers x heads batched forwards, plus baselines);
- attribution:  activation difference x gradient for every head, both modes (2 forwards of each
                run for the activations, then one forward and one backward per mode).
Prints seconds per trace and each method's ratio to the forward, and the rank agreement of the two.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--n-traces", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    import pandas as pd
    import torch
    from scipy.stats import spearmanr

    from analyses.machinery.io import Manifest
    from analyses.methods.readouts import READOUTS, answer_readouts
    from analyses.stages.patch import _anchor_tokens, corrupt_prompt
    from analyses.tasks.sources import Dataset, near_misses_of
    from probes.models import load_model
    from probes.patching import PatchInputs, TokenReadout, attribution_patching, head_sweep, normalised_effect

    manifest = Manifest(args.run)
    bridge = load_model(manifest.model_path(), device=args.device)
    tok = bridge.tokenizer
    dataset = Dataset.load(args.run)
    by_id = dataset.docs.set_index("doc_id")
    traces = pd.read_parquet(args.run / "traces.parquet")
    traces = traces[traces["well_formed"]]
    donors = [t for t in traces.itertuples() if _anchor_tokens(t)]
    rng = np.random.default_rng(0)
    clean, corrupt, items = [], [], {r: [] for r in READOUTS}
    for t in traces.itertuples():
        if len(clean) == args.n_traces:
            break
        if not _anchor_tokens(t):
            continue
        doc = by_id.loc[t.doc_id]
        ids = list(t.prompt_ids) + list(t.output_ids)
        gold = [int(g) for g in doc["gold"] if int(g) in set(int(a) for a in t.answer)]
        readouts = answer_readouts(tok, dataset.labels, ids, np.asarray(t.regions), gold, near_misses_of(doc))
        if not readouts["answer_logprob"]:
            continue
        pool = [d for d in donors if d.doc_id != t.doc_id and not set(map(int, doc["gold"])) & set(map(int, by_id.loc[d.doc_id]["gold"]))]
        donor = pool[int(rng.integers(len(pool)))]
        bad, _ = corrupt_prompt(list(t.prompt_ids), np.asarray(t.regions), _anchor_tokens(donor))
        clean.append(ids)
        corrupt.append(bad + list(t.output_ids))
        for r in READOUTS:
            items[r].append(readouts[r])
    n = len(clean)
    inputs = PatchInputs.from_sequences(clean, corrupt, tok.pad_token_id or 0)
    readouts = [TokenReadout(r, items[r]) for r in READOUTS]

    def timed(fn):
        fn()  # warm
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t0)
        return out, best

    def forward():
        with torch.no_grad():
            return bridge(inputs.corrupt, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids)

    _, t_forward = timed(forward)
    (runs, sweep), t_sweep = timed(lambda: head_sweep(bridge, inputs, readouts))
    estimates, t_attr = timed(lambda: attribution_patching(bridge, inputs, readouts))
    agreement = {}
    for mode in ("denoise", "noise"):
        for r in READOUTS:
            heads = sorted({(l, h) for (l, h, m) in sweep})
            exact = [normalised_effect(mode, runs.clean[r], runs.corrupt[r], sweep[(l, h, mode)][r]).mean() for l, h in heads]
            base = runs.corrupt[r] if mode == "denoise" else runs.clean[r]
            approx = [normalised_effect(mode, runs.clean[r], runs.corrupt[r], base + estimates[(mode, r)][:, l, h].numpy()).mean() for l, h in heads]
            agreement[f"{mode}/{r}"] = round(float(spearmanr(exact, approx).statistic), 3)
    n_heads = bridge.cfg.n_layers * bridge.cfg.n_heads
    result = {
        "run": str(args.run),
        "traces": n,
        "heads": n_heads,
        "mean_tokens_per_trace": round(float(np.mean([len(c) for c in clean])), 1),
        "forward_seconds_per_trace": round(t_forward / n, 5),
        "sweep_seconds_per_trace": round(t_sweep / n, 5),
        "attribution_seconds_per_trace": round(t_attr / n, 5),
        "sweep_over_forward": round(t_sweep / t_forward, 1),
        "attribution_over_forward": round(t_attr / t_forward, 1),
        "sweep_over_attribution": round(t_sweep / t_attr, 1),
        "spearman_attribution_vs_sweep": agreement,
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
