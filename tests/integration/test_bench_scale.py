"""bench/scale.py at its --quick size (a 4-layer model, 1,024- and 4,096-token traces) runs end to
end; its store grows linearly with the trace (the same bytes per CoT token at both lengths), and
capture adds less memory to the eager forward at 4k than one layer's attention pattern."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scale_bench_quick(tmp_path):
    out = tmp_path / "scale.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "bench/scale.py", "--quick", "--lengths", "1024", "4096", "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(out.read_text())
    lengths = sorted(int(k) for k in summary["capture_over_forward"])
    assert lengths == [1024, 4096]
    rows = {(r["method"], r["length"]): r for r in summary["rows"]}
    for method in ("forward", "forward_body", "forward_sdpa", "capture", "characterize"):
        for length in lengths:
            assert rows[(method, length)]["seconds"] > 0
    for method in ("forward", "forward_body", "forward_sdpa", "capture"):
        assert all(summary["work_mb"][method][str(L)] >= 0 for L in lengths)
    # the characterize reductions read one signal row per CoT token (prompt of 256 tokens)
    assert [rows[("characterize", L)]["signal_shape"][0] for L in lengths] == [L - 256 for L in lengths]
    # a store that kept any attention pattern would grow per token with the trace's length
    per_token = [summary["store_bytes_per_token"][str(L)] for L in lengths]
    assert abs(per_token[1] - per_token[0]) / per_token[0] < 0.02, per_token
    # resid_post of 4 layers x d_model 256 in float16 is the floor of what each token stores
    assert per_token[0] >= 4 * 256 * 2
    assert summary["attribution_seconds"] > 0
    # One layer's bfloat16 pattern at 4k is 4 heads x 4096^2 x 2 bytes = 128 MiB. Measured over the
    # eager stack at 4k: 18-43 MiB (4 runs); the reductions before blocking (a float32 copy of all
    # CoT rows) added 119 MiB and fail here.
    assert summary["capture_extra_work_mb"]["4096"] < 72, summary["capture_extra_work_mb"]
