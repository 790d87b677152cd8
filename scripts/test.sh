#!/usr/bin/env bash
# Install what is missing (Python packages, and Debian's chromium for the browser test), then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
export STREAMLIT_SERVER_HEADLESS=true STREAMLIT_BROWSER_GATHER_USAGE_STATS=false
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ]; then
  (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "warning: could not install chromium"
fi
bash scripts/setup_env.sh requirements-dev.txt
set +e
.venv/bin/python -m pytest -q tests/ "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then echo "no tests collected"; exit 1; fi
exit "$rc"
