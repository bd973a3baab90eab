"""Capture, characterisation reductions and attribution patching at a real model's size.

Usage: python bench/scale.py [--quick] [--lengths 1024 2048 4096] [--dtype bfloat16] [--device cpu] [--out FILE]

A random-weight model in the shape of a 1.5B reasoning model (DeepSeek-R1-Distill-Qwen-1.5B: 28
layers, d_model 1536, 12 heads, 2 key/value heads, MLP 8960, vocabulary 151,936) is built on the
fly and saved once to a scratch folder (``--quick``: a 4-layer, d_model 256 model for CI). For each
trace length T (prompt 256 tokens, the rest CoT), in a fresh process each, so peak memory is its own:

- ``forward``: one plain forward of the bridge over the trace, no hooks (eager attention, with the
  unembedding: the plain forward the issue's target is measured against);
- ``forward_body``: the Hugging Face decoder stack alone with eager attention (no unembedding,
  which capture never computes: the strict floor of what capture computes);
- ``forward_sdpa``: the Hugging Face decoder stack with fused attention (what generation would use);
- ``capture``: ``probes.capture`` of the CoT tokens, residual stream after every layer and the
  in-hook attention reductions of every layer (region mass, document kurtosis, value mass);
- ``characterize``: the internal boundary signal and the attention attribution read back from
  that store (the characterize stage's reductions);
- ``attribution``: attribution patching of every head on the trace (1k tokens only).

Prints seconds, the capture/forward ratio (target <= 1.3x at 4k), memory per method and length, and
store bytes per token. Memory is read two ways: the process's lifetime peak RSS (dominated by
loading the weights at short lengths) and the working peak, the highest RSS sampled every 2 ms
during the timed call minus the RSS just before it. The eager forward's own working memory grows
with T^2 (each layer's pattern exists while that layer runs) and the unembedding adds T x vocab
logits; capture must add only memory linear in T on top of the eager decoder stack (no pattern
kept): ``capture_extra_work_mb`` is capture's working peak minus ``forward_body``'s, and its
increments across 1k/2k/4k are reported.
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
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FULL = dict(n_layers=28, d_model=1536, n_heads=12, n_kv_heads=2, d_mlp=8960, vocab=151_936)
QUICK = dict(n_layers=4, d_model=256, n_heads=4, n_kv_heads=2, d_mlp=512, vocab=8_192)
PROMPT = 256


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _Measured:
    """Times the block (CUDA synchronised) and records its working memory: the highest RSS sampled
    every 2 ms inside it minus the RSS on entry (``mb``), and on CUDA the peak allocated above the
    allocation on entry (``gpu_mb``)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self):
        import threading

        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self._gpu_base = torch.cuda.memory_allocated()
        self.base = self.peak = _current_rss_mb()
        self._stop = threading.Event()

        def sample():
            while not self._stop.wait(0.002):
                self.peak = max(self.peak, _current_rss_mb())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        self._started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self._started
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_mb())
        self.mb = round(self.peak - self.base, 1)
        self.gpu_mb = round((torch.cuda.max_memory_allocated() - self._gpu_base) / 2**20, 1) if self.cuda else None

    def record(self, result: dict) -> None:
        result["seconds"] = self.seconds
        result["work_mb"] = self.mb
        if self.gpu_mb is not None:
            result["gpu_work_mb"] = self.gpu_mb


def build(folder: Path, shape: dict, dtype: str) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from analyses.organism import default_organism_path
    from probes.models import load_tokenizer

    if (folder / "config.json").exists():
        return folder
    config = Qwen2Config(
        vocab_size=shape["vocab"], hidden_size=shape["d_model"], intermediate_size=shape["d_mlp"], num_hidden_layers=shape["n_layers"],
        num_attention_heads=shape["n_heads"], num_key_value_heads=shape["n_kv_heads"], max_position_embeddings=8192, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta"):
        model = Qwen2ForCausalLM(config)
    model = model.to_empty(device="cpu").to(getattr(torch, dtype))
    with torch.no_grad():
        for p in model.parameters():  # random weights at a scale that keeps activations finite
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
            else:
                p.fill_(1.0)
    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    load_tokenizer(default_organism_path()).save_pretrained(tmp / "tokenizer")
    tmp.rename(folder)
    return folder


def _trace(length: int, vocab: int):
    import numpy as np

    rng = np.random.default_rng(length)
    ids = rng.integers(10, vocab - 10, size=length).tolist()
    regions = np.full(length, 3, dtype=np.int64)  # CoT
    regions[:PROMPT] = 0
    regions[20 : PROMPT - 20] = 1  # the document inside the prompt
    return ids, regions


def child(method: str, folder: Path, length: int, device: str, dtype: str, work: Path) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("CTD_BENCH_THREADS", str(os.cpu_count() or 2))))
    from probes.models import load_hf_model, load_model

    shape = json.loads((folder / "config.json").read_text())
    ids, regions = _trace(length, shape["vocab_size"])
    tokens = torch.tensor([ids], device=device)
    torch_dtype = getattr(torch, dtype)
    result = {"method": method, "length": length}
    if method in ("forward_sdpa", "forward_body"):
        model = load_hf_model(folder, device=device, dtype=torch_dtype, attn_implementation="sdpa" if method == "forward_sdpa" else "eager")
        with torch.no_grad():
            model.model(input_ids=tokens[:, :64])  # warm
            with _Measured(device) as measured:
                model.model(input_ids=tokens)
            measured.record(result)
    else:
        bridge = load_model(folder, device=device, dtype=torch_dtype, validate=False)
        if method == "forward":
            with torch.no_grad():
                bridge(tokens[:, :64], return_type=None)
                with _Measured(device) as measured:
                    bridge(tokens, return_type=None)
                measured.record(result)
        elif method in ("capture", "characterize"):
            from probes.capture import CaptureConfig, CaptureRequest, capture
            from probes.points import resolve_points

            store_root = work / f"store-{length}"
            request = CaptureRequest(doc_id=f"t{length}", token_ids=ids, positions=np.arange(PROMPT, length), regions=regions, document_mask=regions == 1, norm_origin=PROMPT, norm_length=length - PROMPT)
            config = CaptureConfig(points=resolve_points(["resid_post"], bridge.cfg.n_layers), attention_layers=list(range(bridge.cfg.n_layers)), batch_size=1, dtype="float16")
            if method == "capture":
                warm = CaptureRequest(doc_id="warm", token_ids=ids[:64], positions=np.arange(32, 64), regions=regions[:64], document_mask=regions[:64] == 1, norm_origin=32, norm_length=32)
                shutil.rmtree(work / "warm", ignore_errors=True)  # a complete store would be resumed, not computed
                capture(bridge, [warm], work / "warm", config, progress=False)  # touches every weight page
                shutil.rmtree(store_root, ignore_errors=True)
                with _Measured(device) as measured:
                    capture(bridge, [request], store_root, config, progress=False)
                measured.record(result)
                size = sum(p.stat().st_size for p in (store_root / "activations").glob("shard-*.safetensors"))
                result["store_bytes_per_token"] = round(size / (length - PROMPT), 1)
            else:
                import pandas as pd

                from analyses.boundary import internal_signal
                from analyses.characterize import compute_attribution
                from probes.store import open_store

                store = open_store(store_root)
                with _Measured(device) as measured:
                    signal = internal_signal(store, f"t{length}", PROMPT, length, list(range(bridge.cfg.n_layers)))
                    trace = pd.DataFrame({"doc_id": [f"t{length}"], "cot_start": [PROMPT], "cot_end": [length]})
                    compute_attribution(store, trace, bridge.cfg.n_layers, bridge.cfg.n_heads)
                measured.record(result)
                result["signal_shape"] = list(signal.shape)
        elif method == "attribution":
            from probes.patching import PatchInputs, TokenReadout, attribution_patching

            corrupt = list(ids)
            for i in range(40, 60):  # corrupt part of the document
                corrupt[i] = (corrupt[i] + 7) % shape["vocab_size"]
            inputs = PatchInputs.from_sequences([ids], [corrupt], 0)
            readout = TokenReadout("next", [[((p,), (ids[p + 1],), ()) for p in range(length - 20, length - 1)]])
            with _Measured(device) as measured:
                attribution_patching(bridge, inputs, [readout])
            measured.record(result)
    result["peak_rss_mb"] = round(_rss_mb(), 1)
    return result


def run_child(method: str, args, folder: Path, length: int) -> dict:
    cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder), "--length", str(length), "--device", args.device, "--dtype", args.dtype, "--work", str(args.work)]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        raise SystemExit(f"{method} at {length} failed:\n{proc.stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small model and short traces (CI)")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", type=Path, default=Path("results/bench-scale"))
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child")
    parser.add_argument("--folder", type=Path)
    parser.add_argument("--length", type=int)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.folder, args.length, args.device, args.dtype, args.work)))
        return
    shape = QUICK if args.quick else FULL
    lengths = args.lengths or ([512, 1024] if args.quick else [1024, 2048, 4096])
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folder = build(args.work / ("model-quick" if args.quick else "model-1.5b"), shape, args.dtype)
    rows = []
    for length in lengths:
        for method in ("forward", "forward_body", "forward_sdpa", "capture", "characterize"):
            rows.append(run_child(method, args, folder, length))
            print(json.dumps(rows[-1]), flush=True)
    rows.append(run_child("attribution", args, folder, lengths[0] if args.quick else 1024))
    print(json.dumps(rows[-1]), flush=True)
    by = {(r["method"], r["length"]): r for r in rows}
    summary = {
        "shape": shape,
        "dtype": args.dtype,
        "device": args.device,
        "threads": int(os.environ.get("CTD_BENCH_THREADS", str(os.cpu_count() or 2))),
        "capture_over_forward": {L: round(by[("capture", L)]["seconds"] / by[("forward", L)]["seconds"], 3) for L in lengths},
        "capture_over_forward_body": {L: round(by[("capture", L)]["seconds"] / by[("forward_body", L)]["seconds"], 3) for L in lengths},
        "capture_over_forward_sdpa": {L: round(by[("capture", L)]["seconds"] / by[("forward_sdpa", L)]["seconds"], 3) for L in lengths},
        "characterize_seconds_per_1k_tokens": {L: round(1000 * by[("characterize", L)]["seconds"] / (L - PROMPT), 4) for L in lengths},
        "peak_rss_mb": {m: {L: by[(m, L)]["peak_rss_mb"] for L in lengths} for m in ("forward", "capture")},
        "work_mb": {m: {L: by[(m, L)]["work_mb"] for L in lengths} for m in ("forward", "forward_body", "forward_sdpa", "capture")},
        "capture_extra_work_mb": {L: round(by[("capture", L)]["work_mb"] - by[("forward_body", L)]["work_mb"], 1) for L in lengths},
        "store_bytes_per_token": {L: by[("capture", L)]["store_bytes_per_token"] for L in lengths},
        "attribution_seconds": rows[-1]["seconds"],
        "attribution_over_forward": round(rows[-1]["seconds"] / by[("forward", rows[-1]["length"])]["seconds"], 2),
        "bench_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    if len(lengths) >= 3:  # with lengths doubling, linear growth doubles the increments; a kept pattern quadruples them
        for name, key in (("forward_body", lambda L: by[("forward_body", L)]["work_mb"]), ("capture_extra", lambda L: summary["capture_extra_work_mb"][L])):
            a, b, c = (key(L) for L in lengths[:3])
            summary[f"{name}_work_increment_ratio"] = round((c - b) / (b - a), 2) if b != a else None
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
