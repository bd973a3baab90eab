"""bench/scale.py at its --quick size (a 4-layer model, 1,024- and 4,096-token traces) runs end to
end; capture takes the fused path and adds to the sdpa forward's working memory no more than the
issue's allowance (2x the bytes it stores + 256 MiB), where the eager pattern path adds several
times that; the store grows linearly with the trace; fused attribution's memory grows about
linearly from 1k to 4k tokens and stays far below the eager path's."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("forward_sdpa", "forward_body", "capture_resid", "capture", "capture_eager", "attribution", "attribution_eager", "characterize")


def test_scale_bench_quick(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "bench/scale.py", "--quick", "--lengths", "1024", "4096", "--methods", *METHODS, "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    rows = {(r["method"], r["length"]): r for r in summary["rows"]}
    lengths = [1024, 4096]
    for method in METHODS:
        for length in lengths:
            assert rows[(method, length)]["status"] == "ok" and rows[(method, length)]["seconds"] > 0, (method, length)
    assert {rows[("capture", L)]["attention_path"] for L in lengths} == {"fused"}
    assert {rows[("capture_eager", L)]["attention_path"] for L in lengths} == {"eager"}
    assert {rows[("capture_resid", L)]["attention_path"] for L in lengths} == {"fused"}
    # the characterize reductions read one signal row per CoT token (prompt of 256 tokens)
    assert [rows[("characterize", L)]["signal_shape"][0] for L in lengths] == [L - 256 for L in lengths]
    # a store that kept any attention pattern would grow per token with the trace's length
    per_token = [summary["store_bytes_per_token"][str(L)] for L in lengths]
    assert abs(per_token[1] - per_token[0]) / per_token[0] < 0.02, per_token
    assert per_token[0] >= 4 * 256 * 2  # resid_post of 4 layers x d_model 256 in float16
    for L in lengths:  # the memory target, over the sdpa forward
        assert summary["capture_extra_mb"][str(L)] <= summary["capture_extra_allowed_mb"][str(L)], summary["capture_extra_mb"]
    work = summary["work_mb"]["4096"]
    # One layer's float32 softmax at 4k is 4 heads x 4096^2 x 4 bytes = 256 MiB: the eager path pays
    # it (measured 750 MiB over sdpa), the fused path adds tens of MiB.
    assert work["capture"] - work["forward_sdpa"] < 0.25 * (work["capture_eager"] - work["forward_sdpa"]), work
    assert work["attribution"] < 0.25 * work["attribution_eager"], work
    # linear growth is 4x over 1k -> 4k (measured 3.9); the eager path grows 9x. The 4.5x target is
    # checked at the 1.5B shape (BENCHMARKS.md); RSS noise at this size needs a margin.
    assert summary["attribution_work_growth"]["1024->4096"] <= 6, summary["attribution_work_growth"]
