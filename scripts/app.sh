#!/usr/bin/env bash
# Install what is missing, then launch MTF Lab on the demo log (generated on first start).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh requirements.txt
export STREAMLIT_SERVER_HEADLESS=true STREAMLIT_BROWSER_GATHER_USAGE_STATS=false
export STREAMLIT_SERVER_MAX_UPLOAD_SIZE="${MTF_MAX_UPLOAD_MB:-200}"  # one upload limit for the app and Streamlit
exec .venv/bin/python -m streamlit run app.py "$@"
