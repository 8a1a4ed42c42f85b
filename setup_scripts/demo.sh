#!/usr/bin/env bash
# The main job on built-in demo data: install, make a demo dataset with reports, plan/preprocess, encode,
# train short MedCLIPSeg and BiCLIP models and a short plain nnU-Net (CPU), predict with reports, evaluate, print Dice.
set -euo pipefail
cd "$(dirname "$0")/.."
bash setup_scripts/install.sh
exec .venv/bin/nnUNetv2_textseg_demo --root demo_work "$@"
