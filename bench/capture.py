"""Capture throughput and memory against its baselines, measured in one run (issue: capture).

Usage: python bench/capture.py [--model PATH] [--n-traces 64] [--batch-size 8] [--out results/bench-capture]

Each method runs in a fresh subprocess over the same traces (teacher-forced prompt + output), so
peak RSS is its own, and is timed after a one-batch warm-up:
- capture:        probes.capture (resid_post of every layer + in-hook attention reductions of every layer)
- forward:        plain HF forward pass over the same batches, no hooks (the issue's floor)
- forward_body:   the same without the unembedding (hidden states only): capture stops after the
                  last block it reads, so this is the floor for what it computes
- per_step:       per-step hooks during generation: the trace fed one token at a time with the KV
                  cache, hidden states and attention reduced at every step
- run_with_cache: TransformerLens run_with_cache without a names filter, per batch
Prints tokens/s and peak RSS of each, ratios to capture, and capture's peak RSS at n and 2n traces.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from functools import lru_cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


@lru_cache(maxsize=None)
def _bridge(model_path: str):
    from probes.models import load_model

    return load_model(model_path)


@lru_cache(maxsize=None)
def _hf(model_path: str):
    from probes.models import load_hf_model

    return load_hf_model(model_path, attn_implementation="eager")


def _load(run: Path, n: int):
    import pandas as pd

    traces = pd.read_parquet(run / "traces.parquet").head(n)
    return traces


def method_capture(run: Path, n: int, batch_size: int, model_path: str) -> dict:
    from analyses.methods.replay import capture_requests
    from probes.capture import CaptureConfig, capture
    from probes.points import resolve_points

    traces = _load(run, n)
    bridge = _bridge(model_path)
    requests = capture_requests(traces)
    work = Path(run) / f"bench-store-{n}"
    shutil.rmtree(work, ignore_errors=True)
    config = CaptureConfig(points=resolve_points(["resid_post"], bridge.cfg.n_layers), attention_layers=list(range(bridge.cfg.n_layers)), batch_size=batch_size)
    t0 = time.perf_counter()
    capture(bridge, requests, work, config, progress=False)
    seconds = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return {"seconds": seconds, "tokens": int(sum(len(r.token_ids) for r in requests))}


def _timed_forward(run: Path, n: int, batch_size: int, model_path: str, body_only: bool) -> dict:
    import torch

    from probes.capture import pad_batch
    from probes.models import load_tokenizer

    traces = _load(run, n)
    model = _hf(model_path)
    module = model.model if body_only else model  # the decoder stack and final norm, no LM head
    pad = load_tokenizer(model_path).pad_token_id
    seqs = [list(p) + list(o) for p, o in zip(traces["prompt_ids"], traces["output_ids"])]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask, pos, _ = pad_batch(seqs[i : i + batch_size], pad)
            module(input_ids=ids, attention_mask=mask, position_ids=pos)
    return {"seconds": time.perf_counter() - t0, "tokens": int(sum(map(len, seqs)))}


def method_forward(run: Path, n: int, batch_size: int, model_path: str) -> dict:
    return _timed_forward(run, n, batch_size, model_path, body_only=False)


def method_forward_body(run: Path, n: int, batch_size: int, model_path: str) -> dict:
    return _timed_forward(run, n, batch_size, model_path, body_only=True)


def method_per_step(run: Path, n: int, batch_size: int, model_path: str) -> dict:
    """What capturing during generation costs: one forward per new token, hooks at every step."""
    import torch

    from probes.capture import pad_batch
    from probes.models import load_tokenizer

    traces = _load(run, n)
    model = _hf(model_path)
    pad = load_tokenizer(model_path).pad_token_id
    kept = []
    t0 = time.perf_counter()
    tokens = 0
    with torch.no_grad():
        for i in range(0, len(traces), batch_size):
            batch = traces.iloc[i : i + batch_size]
            prompts = [list(p) for p in batch["prompt_ids"]]
            outputs = [list(o) for o in batch["output_ids"]]
            ids, mask, pos, _ = pad_batch(prompts, pad)
            out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, output_hidden_states=True, output_attentions=True)
            past = out.past_key_values
            steps = max(len(o) for o in outputs)
            tokens += sum(map(len, prompts))
            for s in range(steps):
                step_ids = torch.tensor([[o[s] if s < len(o) else pad] for o in outputs])
                mask = torch.cat([mask, torch.tensor([[1 if s < len(o) else 0] for o in outputs])], dim=1)
                pos = (mask.sum(1, keepdim=True) - 1)
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=pos, past_key_values=past, use_cache=True, output_hidden_states=True, output_attentions=True)
                past = out.past_key_values
                # the per-step capture: residuals of every layer, attention reduced over keys
                kept.append(torch.stack([h[:, -1] for h in out.hidden_states[1:]]).half())
                kept.append(torch.stack([a[:, :, -1].sum(-1) for a in out.attentions]).half())
                tokens += sum(1 for o in outputs if s < len(o))
    return {"seconds": time.perf_counter() - t0, "tokens": tokens}


def method_run_with_cache(run: Path, n: int, batch_size: int, model_path: str) -> dict:
    import torch

    from probes.capture import pad_batch

    traces = _load(run, n)
    bridge = _bridge(model_path)
    pad = bridge.tokenizer.pad_token_id
    seqs = [list(p) + list(o) for p, o in zip(traces["prompt_ids"], traces["output_ids"])]
    t0 = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            ids, mask, pos, _ = pad_batch(seqs[i : i + batch_size], pad)
            _, cache = bridge.run_with_cache(ids, attention_mask=mask, position_ids=pos)
            del cache
    return {"seconds": time.perf_counter() - t0, "tokens": int(sum(map(len, seqs)))}


METHODS = {"capture": method_capture, "forward": method_forward, "forward_body": method_forward_body, "per_step": method_per_step, "run_with_cache": method_run_with_cache}


def child(args) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("CTD_BENCH_THREADS", "2")))
    # Warm-up: one untimed pass of the same traces on the same loaded model (one-time costs: kernel
    # selection, hook set-up, and the first allocations of each tensor size, which glibc serves
    # by fresh mmap until its threshold adapts), so every method is timed warm, as a long capture
    # runs. The first pass's extra cost is printed as ``first_pass_seconds``.
    first = METHODS[args.method](Path(args.out), args.n_traces, args.batch_size, args.model)
    result = METHODS[args.method](Path(args.out), args.n_traces, args.batch_size, args.model)
    result["peak_rss_mb"] = _peak_rss_mb()
    result["first_pass_seconds"] = first["seconds"]
    print("RESULT " + json.dumps(result))


def run_child(method: str, args, n: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--out", str(args.out), "--n-traces", str(n), "--batch-size", str(args.batch_size), "--model", args.model]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{method} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def ensure_traces(args) -> None:
    if (Path(args.out) / "traces.parquet").exists():
        return
    from dataclasses import replace

    from analyses.machinery.settings import DataSettings, RunConfig
    from analyses.stages import run as run_stage

    n_docs = max(2 * args.n_traces, 64)
    config = RunConfig(model=args.model, data=DataSettings(options={"chapters": ["9"], "n_docs": int(n_docs / 0.1) + 10}))
    config = replace(config, traces=replace(config.traces, n_docs=2 * args.n_traces, n_dev_docs=0))
    run_stage("data", args.out, config)
    run_stage("traces", args.out, config)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--n-traces", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "results" / "bench-capture"))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.model is None:
        from analyses.models.organism import default_organism_path

        args.model = str(default_organism_path())
    if args.child:
        args.method = args.child
        return child(args)
    ensure_traces(args)
    results = {m: run_child(m, args, args.n_traces) for m in METHODS}
    doubled = run_child("capture", args, 2 * args.n_traces)
    base = results["capture"]
    report = {"model": args.model, "n_traces": args.n_traces, "batch_size": args.batch_size, "methods": {}}
    for name, r in results.items():
        tps = r["tokens"] / r["seconds"]
        report["methods"][name] = {
            "tokens_per_s": round(tps, 1),
            "peak_rss_mb": round(r["peak_rss_mb"], 1),
            "time_ratio_to_capture": round(r["seconds"] / base["seconds"] * base["tokens"] / r["tokens"], 3),
            "first_pass_seconds": round(r["first_pass_seconds"], 3),
            "seconds": round(r["seconds"], 3),
        }
    report["capture_cost_vs_forward"] = round((base["seconds"] / base["tokens"]) / (results["forward"]["seconds"] / results["forward"]["tokens"]), 3)
    report["capture_cost_vs_forward_body"] = round((base["seconds"] / base["tokens"]) / (results["forward_body"]["seconds"] / results["forward_body"]["tokens"]), 3)
    report["capture_speedup_vs_per_step"] = round((results["per_step"]["seconds"] / results["per_step"]["tokens"]) / (base["seconds"] / base["tokens"]), 2)
    report["capture_peak_rss_mb"] = {str(args.n_traces): round(base["peak_rss_mb"], 1), str(2 * args.n_traces): round(doubled["peak_rss_mb"], 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
