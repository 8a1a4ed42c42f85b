#!/usr/bin/env bash
# Install (if needed) and run the whole test suite (unit + real nnU-Net integration tests), offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup_scripts/install.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
# nnU-Net gives torch every core on CPU; with its augmentation workers on the same cores, spinning OpenMP threads
# slow every forward pass many times over (see nnunetv2_textseg.harness.nnunet_env)
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
exec .venv/bin/python -m pytest -q -ra "$@"
