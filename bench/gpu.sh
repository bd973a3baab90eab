#!/usr/bin/env bash
# The GPU benches in one prepared script (<= 8 minutes on one GPU): probe bank, patching and, where
# present, the scale bench, on CUDA in bf16 where the bench supports it. Prints every ratio and
# writes them all to one JSON file ($OUT/gpu_bench.json, or results/bench-gpu/gpu_bench.json).
#
# Usage: bash bench/gpu.sh [RUN_DIR]   (RUN_DIR: a finished run for the patching bench; default:
# a quick run made here, about 2 minutes)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
OUT_DIR=${OUT:-results/bench-gpu}
mkdir -p "$OUT_DIR"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench/gpu.sh: no CUDA device here (BENCHMARKS.md says which numbers need one)')"
RUN=${1:-$OUT_DIR/quick-run}
if [ ! -f "$RUN/manifest.json" ]; then
  "$PY" -m analyses.interface.cli run --quick --out "$RUN" --until characterize
fi
start=$(date +%s)
"$PY" bench/probes.py --device cuda --out "$OUT_DIR/probes_synthetic.json"
"$PY" bench/probes.py --device cuda --run "$RUN" --out "$OUT_DIR/probes_run.json"
"$PY" bench/patching.py --device cuda --run "$RUN" --n-traces 20 --out "$OUT_DIR/patching.json"
if [ -f bench/scale.py ]; then
  "$PY" bench/scale.py --device cuda --dtype bfloat16 --out "$OUT_DIR/scale.json"
fi
"$PY" - "$OUT_DIR" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
merged = {p.stem: json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if p.name != "gpu_bench.json"}
(out / "gpu_bench.json").write_text(json.dumps(merged, indent=2) + "\n")
for name, result in merged.items():
    ratios = {k: v for k, v in result.items() if "ratio" in k or "over" in k or "speedup" in k}
    print(name, json.dumps(ratios))
PY
echo "gpu benches: $(( $(date +%s) - start )) s; all numbers in $OUT_DIR/gpu_bench.json"
