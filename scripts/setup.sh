#!/usr/bin/env bash
# Set up .venv on a fresh machine: torch first (a CPU wheel, pinned), then the project and its test tools.
# Safe to rerun: it skips work when pyproject.toml has not changed since the last successful set-up.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${CTD_TORCH:-torch==2.13.0}
stamp=.venv/.ctd-setup
want="$(sha256sum pyproject.toml | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "$TORCH_SPEC"
.venv/bin/python -m pip install -q -e ".[test]"
echo "$want" > "$stamp"
