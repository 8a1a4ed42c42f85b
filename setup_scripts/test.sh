#!/usr/bin/env bash
# Install (if needed) and run the whole test suite (unit + real nnU-Net integration tests), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup_scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q -ra "$@"
