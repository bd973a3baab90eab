"""The probe bank (as the suite calls it, ``solver="auto"``) vs a loop of scikit-learn fits over
the same (layer, bucket) grid, in one run; the batched Newton bank is timed too.

Usage: python bench/probes.py [--run DIR] [--target phase] [--device cpu|cuda]
With --run, the problems are the run's real probe problems (captured residuals); without, a
synthetic grid of the organism's shape (4 layers x 5 buckets, d_model 256). Prints the timings,
the ratio of the scikit-learn loop's time to the suite's (target >= 1.0 on a CPU, >= 10 on CUDA),
which path ``auto`` took, and the largest accuracy difference (within 0.01 of scikit-learn).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from probes.linear import ProbeProblem, evaluate_bank, fit_probe_bank, split_by_document  # noqa: E402


def synthetic(layers=4, buckets=5, n=2000, d=256, seed=0):
    rng = np.random.default_rng(seed)
    problems = []
    for layer in range(layers):
        for bucket in range(buckets):
            docs = np.repeat(np.arange(n // 20), 20).astype(str)
            w = rng.normal(size=d)
            x = rng.normal(size=(n, d)).astype(np.float32)
            y = (x @ w + rng.normal(scale=8, size=n) > 0).astype(int)
            problems.append(ProbeProblem(("synthetic", layer, bucket), x, y, docs))
    return problems


def from_run(run: Path, target: str):
    import pandas as pd

    from analyses.stages.characterize import probe_examples
    from analyses.machinery.io import read_parquet
    from analyses.tasks.sources import Dataset
    from probes.points import point_of_hook
    from probes.store import open_store

    store = open_store(run)
    traces = read_parquet(run / "traces.parquet")
    docs = Dataset.load(run).docs
    tau = {str(t.doc_id): int(t.true_boundary) if not pd.isna(t.true_boundary) else int((t.cot_start + t.cot_end) // 2) for t in traces.itertuples()}
    n_layers = max(layer for key, layer in (point_of_hook(p) for p in store.points if ":" not in p) if key == "resid_post") + 1
    data = probe_examples(store, traces, docs, tau, n_layers)
    problems = []
    for key, rows in sorted(data.items()):
        labels = np.array([r[1] for r in rows])
        if key[0] == target and len(rows) >= 20 and len(np.unique(labels)) == 2:
            problems.append(ProbeProblem(key, np.stack([r[0] for r in rows]), labels, np.array([r[2] for r in rows])))
    return problems


def sklearn_loop(problems, train_masks, C=1.0):
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    accuracies = []
    for p, train in zip(problems, train_masks):
        scaler = StandardScaler().fit(p.features[train])
        model = LogisticRegression(C=C, max_iter=1000).fit(scaler.transform(p.features[train]), p.labels[train])
        test = ~train
        accuracies.append(float((model.predict(scaler.transform(p.features[test])) == p.labels[test]).mean()))
    return accuracies


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", type=Path)
    parser.add_argument("--target", default="phase")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu or cuda")
    parser.add_argument("--out", type=Path, help="also write the result as JSON here")
    args = parser.parse_args()
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    problems = from_run(args.run, args.target) if args.run else synthetic()
    test_masks = [split_by_document(p.documents, 0.3, seed=0) for p in problems]
    train_masks = [~m for m in test_masks]

    def timed(fn):
        fn()  # warm (thread pools, kernels, caches)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return out, min(times)

    fit, auto_s = timed(lambda: fit_probe_bank(problems, train_masks, device=device))
    _, newton_s = timed(lambda: fit_probe_bank(problems, train_masks, solver="newton", device=device))
    sk_acc, sk_s = timed(lambda: sklearn_loop(problems, train_masks))
    auto_acc = [r["accuracy"] for r in evaluate_bank(fit, problems, test_masks)]
    result = {
        "source": str(args.run) if args.run else "synthetic 4 layers x 5 buckets, n=2000, d=256",
        "device": str(device),
        "groups": len(problems),
        "rows_per_group": int(np.mean([len(p.labels) for p in problems])),
        "d": int(problems[0].features.shape[1]),
        "auto_path": fit.solver,
        "auto_seconds": round(auto_s, 4),
        "newton_bank_seconds": round(newton_s, 4),
        "sklearn_loop_seconds": round(sk_s, 4),
        "ratio_sklearn_loop_over_auto": round(sk_s / auto_s, 2),
        "ratio_sklearn_loop_over_newton_bank": round(sk_s / newton_s, 2),
        "max_abs_accuracy_difference": round(float(np.max(np.abs(np.array(auto_acc) - np.array(sk_acc)))), 4),
        "mean_accuracy_auto": round(float(np.mean(auto_acc)), 4),
        "mean_accuracy_sklearn": round(float(np.mean(sk_acc)), 4),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
