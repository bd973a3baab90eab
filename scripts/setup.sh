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
# PNG export of figures needs Chromium (kaleido drives it); install it where we can, else HTML only.
if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; } >/dev/null 2>&1 \
    || echo "setup: could not install chromium; figures will be written as HTML only"
fi
echo "$want" > "$stamp"
