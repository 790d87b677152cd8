#!/usr/bin/env bash
# Create .venv and install what is missing; re-runs are fast (skipped when the requirements are unchanged).
set -euo pipefail
cd "$(dirname "$0")/.."
REQ="${1:-requirements.txt}"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=".venv/.installed-$(cat requirements*.txt "$REQ" | sha256sum | cut -c1-16)"  # every file -r pulls in
if [ ! -f "$stamp" ]; then
  # torch first, pinned: its CPU wheel lies on disk, while a loose range would pull a multi-GB CUDA build.
  .venv/bin/pip install -q --disable-pip-version-check torch==2.13.0
  .venv/bin/pip install -q --disable-pip-version-check -r "$REQ"
  touch "$stamp"
fi
