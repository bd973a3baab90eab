"""Capture, attention statistics and attribution patching at a real model's size and real trace lengths.

Usage: python bench/scale.py [--quick] [--lengths 1024 4096 8192 16384] [--dtype bfloat16] [--device cpu]
       [--methods ...] [--limit-s 1200] [--limit-mb 21000] [--out FILE]

A random-weight model in the shape of a 1.5B reasoning model (DeepSeek-R1-Distill-Qwen-1.5B: 28
layers, d_model 1536, 12 heads, 2 key/value heads, MLP 8960, vocabulary 151,936) is built on the
fly and saved once to a scratch folder (``--quick``: a 4-layer, d_model 256 model for CI). For each
trace length T (prompt 256 tokens, the rest CoT) every method runs in a fresh process of its own,
so its time and peak memory are its own:

- ``forward_sdpa``: the Hugging Face decoder stack with fused attention (the floor);
- ``forward_body``: the same stack with eager attention (what every pattern reader pays);
- ``capture_resid``: ``probes.capture``, the residual stream after every layer at the CoT tokens
  (fused attention: nothing asks for a pattern);
- ``capture``: the same plus every layer's attention statistics (region masses, document
  kurtosis, value-weighted masses) on the fused path (``probes.fused``: no T x T tensor);
- ``capture_eager``: the same statistics read from each layer's eager pattern in ``hook_pattern``;
- ``tl_cache``: TransformerLens (its TransformerBridge, the current API) ``run_with_cache`` of the
  residual stream, with a hook on every ``hook_pattern`` that reduces it to region masses at the
  CoT queries (what a user writes by hand);
- ``nnsight_resid``: nnsight saving every layer's output at the CoT tokens (fused attention);
- ``nnsight_eager``: nnsight with eager attention, saving the same region-mass reduction of each
  layer's attention weights;
- ``attribution`` / ``attribution_eager``: attribution patching of every head (both modes, one
  read-out over the last 20 tokens), fused with recomputed blocks / the eager pattern path;
- ``characterize``: the internal boundary signal and attention attribution read back from the
  ``capture`` store.

A method whose process passes ``--limit-mb`` of resident memory or ``--limit-s`` seconds is killed
and recorded as ``did not fit`` or ``past the limit`` (never dropped). Every process runs with
``MALLOC_MMAP_THRESHOLD_=131072`` (glibc returns freed blocks over 128 KiB; attribution sets the
same for itself). Memory is the working peak:
the highest RSS sampled every 2 ms during the timed call minus the RSS just before it (weights
and the warm-up excluded). Rows are appended to ``--out`` as they finish.
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

    from analyses.models.organism import default_organism_path
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


METHODS = ("forward_sdpa", "forward_body", "capture_resid", "capture", "capture_eager", "tl_cache", "nnsight_resid", "nnsight_eager", "attribution", "attribution_eager", "characterize")


def _region_onehot(regions, device, dtype):
    import torch

    onehot = torch.zeros(len(regions), int(regions.max()) + 1, dtype=dtype, device=device)
    onehot[torch.arange(len(regions)), torch.as_tensor(regions)] = 1
    return onehot


def child(method: str, folder: Path, length: int, device: str, dtype: str, work: Path) -> dict:
    import numpy as np
    import torch

    torch.set_num_threads(int(os.environ.get("CTD_BENCH_THREADS", str(os.cpu_count() or 2))))
    from probes.models import load_hf_model, load_model

    shape = json.loads((folder / "config.json").read_text())
    ids, regions = _trace(length, shape["vocab_size"])
    tokens = torch.tensor([ids], device=device)
    torch_dtype = getattr(torch, dtype)
    n_layers = shape["num_hidden_layers"]
    result = {"method": method, "length": length, "status": "ok"}
    warm = tokens[:, :64]
    if method in ("forward_sdpa", "forward_body"):
        model = load_hf_model(folder, device=device, dtype=torch_dtype, attn_implementation="sdpa" if method == "forward_sdpa" else "eager")
        with torch.no_grad():
            model.model(input_ids=warm)
            with _Measured(device) as measured:
                model.model(input_ids=tokens)
            measured.record(result)
    elif method in ("capture_resid", "capture", "capture_eager", "characterize"):
        from probes.capture import CaptureConfig, CaptureRequest, capture
        from probes.points import resolve_points

        bridge = load_model(folder, device=device, dtype=torch_dtype, validate=False)
        store_root = work / f"store-{length}"
        request = CaptureRequest(doc_id=f"t{length}", token_ids=ids, positions=np.arange(PROMPT, length), regions=regions, document_mask=regions == 1, norm_origin=PROMPT, norm_length=length - PROMPT)
        layers = [] if method == "capture_resid" else list(range(n_layers))
        config = CaptureConfig(points=resolve_points(["resid_post"], n_layers), attention_layers=layers, batch_size=1, dtype="float16", attention="eager" if method == "capture_eager" else "fused")
        if method != "characterize":
            result["attention_path"] = config.attention_path
            root = store_root if method == "capture" else work / f"store-{method}-{length}"
            warm_request = CaptureRequest(doc_id="warm", token_ids=ids[:64], positions=np.arange(32, 64), regions=regions[:64], document_mask=regions[:64] == 1, norm_origin=32, norm_length=32)
            shutil.rmtree(work / "warm", ignore_errors=True)  # a complete store would be resumed, not computed
            capture(bridge, [warm_request], work / "warm", config, progress=False)  # touches every weight page
            shutil.rmtree(root, ignore_errors=True)
            with _Measured(device) as measured:
                capture(bridge, [request], root, config, progress=False)
            measured.record(result)
            size = sum(p.stat().st_size for p in (root / "activations").glob("shard-*.safetensors"))
            result["store_bytes"] = size
            result["store_bytes_per_token"] = round(size / (length - PROMPT), 1)
            if method != "capture":
                shutil.rmtree(root, ignore_errors=True)
        else:
            import pandas as pd

            from analyses.methods.boundary import internal_signal
            from analyses.stages.characterize import compute_attribution
            from probes.store import open_store

            store = open_store(store_root)
            with _Measured(device) as measured:
                signal = internal_signal(store, f"t{length}", PROMPT, length, list(range(n_layers)))
                trace = pd.DataFrame({"doc_id": [f"t{length}"], "cot_start": [PROMPT], "cot_end": [length]})
                compute_attribution(store, trace, n_layers, shape["num_attention_heads"])
            measured.record(result)
            result["signal_shape"] = list(signal.shape)
    elif method == "tl_cache":
        bridge = load_model(folder, device=device, dtype=torch_dtype, validate=False)
        onehot = _region_onehot(regions, device, torch_dtype)
        kept = {}

        def reduce(pattern, hook):  # [batch, head, query, key] -> region masses at the CoT queries
            kept[hook.name] = (pattern[:, :, PROMPT:, :] @ onehot).float()

        hooks = [(f"blocks.{l}.attn.hook_pattern", reduce) for l in range(n_layers)]
        resid = lambda name: name.endswith("hook_resid_post")  # noqa: E731
        with torch.no_grad():
            bridge.run_with_hooks(warm, fwd_hooks=[], return_type=None)
            with _Measured(device) as measured:
                with bridge.hooks(fwd_hooks=hooks):
                    _, cache = bridge.run_with_cache(tokens, names_filter=resid, return_type=None)
                rows = {name: cache[name][:, PROMPT:] for name in cache.keys()}
            measured.record(result)
        result["kept"] = len(rows) + len(kept)
    elif method in ("nnsight_resid", "nnsight_eager"):
        from nnsight import LanguageModel

        model = load_hf_model(folder, device=device, dtype=torch_dtype, attn_implementation="sdpa" if method == "nnsight_resid" else "eager")
        from probes.models import load_tokenizer

        lm = LanguageModel(model, tokenizer=load_tokenizer(folder))
        onehot = _region_onehot(regions, device, torch_dtype)

        def run(ids_):
            saved = []
            with lm.trace(ids_):
                for layer in lm.model.layers:
                    if method == "nnsight_resid":
                        out = layer.output
                        out = out[0] if isinstance(out, tuple) else out
                        saved.append(out[:, PROMPT:].save())
                    else:
                        weights = layer.self_attn.output[1]  # eager attention returns its weights
                        saved.append((weights[:, :, PROMPT:, :] @ onehot[: ids_.shape[1]]).save())
            return saved

        with torch.no_grad():
            run(warm if method == "nnsight_resid" else tokens[:, : PROMPT + 64])
            with _Measured(device) as measured:
                saved = run(tokens)
            measured.record(result)
        result["kept"] = len(saved)
    elif method in ("attribution", "attribution_eager"):
        import contextlib

        import probes.patching as patching

        bridge = load_model(folder, device=device, dtype=torch_dtype, validate=False)
        corrupt = list(ids)
        for i in range(40, 60):  # corrupt part of the document
            corrupt[i] = (corrupt[i] + 7) % shape["vocab_size"]
        inputs = patching.PatchInputs.from_sequences([ids], [corrupt], 0)
        readout = patching.TokenReadout("next", [[((p,), (ids[p + 1],), ()) for p in range(length - 20, length - 1)]])
        if method == "attribution_eager":  # the pattern path: eager attention, every activation kept
            patching.fused_attention = lambda bridge, **kw: contextlib.nullcontext()
        small = patching.PatchInputs.from_sequences([ids[:64]], [corrupt[:64]], 0)
        patching.attribution_patching(bridge, small, [patching.TokenReadout("next", [[((60,), (ids[61],), ())]])], recompute=method == "attribution")
        with _Measured(device) as measured:
            patching.attribution_patching(bridge, inputs, [readout], recompute=method == "attribution")
        measured.record(result)
    else:
        raise SystemExit(f"unknown method {method!r}")
    result["peak_rss_mb"] = round(_rss_mb(), 1)
    return result


def run_child(method: str, args, folder: Path, length: int) -> dict:
    """One method at one length in its own process, killed past ``--limit-mb`` resident or
    ``--limit-s`` seconds (recorded as such)."""
    cmd = [sys.executable, __file__, "--child", method, "--folder", str(folder), "--length", str(length), "--device", args.device, "--dtype", args.dtype, "--work", str(args.work)]
    started = time.perf_counter()
    # Every method under the same allocator setting (the one attribution sets for itself,
    # probes.fused.returning_freed_memory): glibc's adaptive mmap threshold otherwise keeps freed
    # transient blocks resident, and RSS would measure the allocator's history rather than the
    # method. It costs every method a page fault per fresh block (about 18% of the sdpa forward's
    # time at 4k tokens), so ratios compare like with like and absolute seconds run high.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    peak = 0.0
    verdict = None
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/status") as f:
                rss = next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) / 1024
            peak = max(peak, rss)
        except (OSError, StopIteration):
            pass
        if peak > args.limit_mb:
            verdict = f"did not fit (over {args.limit_mb} MB resident; the machine has {_machine_mb()} MB)"
        elif time.perf_counter() - started > args.limit_s:
            verdict = f"past the limit ({args.limit_s} s)"
        if verdict:
            proc.kill()
            break
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if verdict:
        return {"method": method, "length": length, "status": verdict, "seconds": None, "work_mb": None, "rss_mb_seen": round(peak, 1)}
    line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
    if line is None:
        if proc.returncode in (-9, 137) or "MemoryError" in stderr or "DefaultCPUAllocator" in stderr:
            return {"method": method, "length": length, "status": f"did not fit (killed at {round(peak)} MB resident)", "seconds": None, "work_mb": None}
        raise SystemExit(f"{method} at {length} failed:\n{stderr[-3000:]}")
    return json.loads(line[len("RESULT "):])


def _machine_mb() -> int:
    with open("/proc/meminfo") as f:
        return int(next(l for l in f if l.startswith("MemTotal:")).split()[1]) // 1024


def _ratio(a, b):
    return round(a / b, 3) if a is not None and b else None


def summarise(rows: list[dict], lengths: list[int], shape: dict, args, started: float) -> dict:
    by = {(r["method"], r["length"]): r for r in rows}

    def seconds(m, L):
        return by.get((m, L), {}).get("seconds")

    def work(m, L):
        return by.get((m, L), {}).get("work_mb")

    table = {L: {m: (round(seconds(m, L), 2) if seconds(m, L) is not None else by.get((m, L), {}).get("status")) for m in METHODS if (m, L) in by} for L in lengths}
    summary = {
        "shape": shape,
        "dtype": args.dtype,
        "device": args.device,
        "threads": int(os.environ.get("CTD_BENCH_THREADS", str(os.cpu_count() or 2))),
        "seconds": table,
        "over_sdpa": {L: {m: _ratio(seconds(m, L), seconds("forward_sdpa", L)) for m in METHODS if (m, L) in by and m != "characterize"} for L in lengths},
        "work_mb": {L: {m: work(m, L) for m in METHODS if (m, L) in by} for L in lengths},
        # what capture adds to the sdpa forward's working memory, against 2x its stored bytes + 256 MiB
        "capture_extra_mb": {L: (round(work("capture", L) - work("forward_sdpa", L), 1) if work("capture", L) is not None and work("forward_sdpa", L) is not None else None) for L in lengths},
        "capture_extra_allowed_mb": {L: (round(2 * by[("capture", L)]["store_bytes"] / 2**20 + 256, 1) if ("capture", L) in by and by[("capture", L)].get("store_bytes") else None) for L in lengths},
        "store_bytes_per_token": {L: by.get(("capture", L), {}).get("store_bytes_per_token") for L in lengths},
        "characterize_seconds_per_1k_tokens": {L: (round(1000 * seconds("characterize", L) / (L - PROMPT), 4) if seconds("characterize", L) is not None else None) for L in lengths},
        "bench_seconds": round(time.perf_counter() - started, 1),
        "rows": rows,
    }
    att = [L for L in lengths if work("attribution", L) is not None]
    if len(att) >= 2:
        summary["attribution_work_growth"] = {f"{att[0]}->{L}": _ratio(work("attribution", L), work("attribution", att[0])) for L in att[1:]}
    return summary


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a small model and short traces (CI)")
    parser.add_argument("--lengths", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--limit-s", type=float, default=1200.0, help="a method running longer is killed and recorded as past the limit")
    parser.add_argument("--limit-mb", type=float, default=21000.0, help="a method holding more resident memory is killed and recorded as did not fit")
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
    lengths = args.lengths or ([512, 1024] if args.quick else [1024, 4096, 8192, 16384])
    methods = args.methods or METHODS
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    folder = build(args.work / ("model-quick" if args.quick else "model-1.5b"), shape, args.dtype)
    rows = []
    for length in lengths:
        for method in methods:
            if method == "characterize" and not any(r["method"] == "capture" and r["length"] == length and r.get("seconds") for r in rows):
                continue  # reads the capture store
            rows.append(run_child(method, args, folder, length))
            print(json.dumps(rows[-1]), flush=True)
            if args.out:  # partial results survive an interrupted bench
                args.out.write_text(json.dumps(summarise(rows, lengths, shape, args, started), indent=2) + "\n")
    summary = summarise(rows, lengths, shape, args, started)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}, indent=2))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
