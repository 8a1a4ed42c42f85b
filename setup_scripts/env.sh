#!/usr/bin/env bash
# Source this to set nnU-Net's folders and nnUNet_extTrainer (our trainers/) for this shell:
#   source setup_scripts/env.sh [ROOT]      (default ROOT: ./nnUNet_data; existing nnUNet_* values are kept)
_textseg_repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
eval "$("$_textseg_repo/.venv/bin/nnUNetv2_textseg_env" --root "${1:-${NNUNET_TEXTSEG_ROOT:-$PWD/nnUNet_data}}")"
export PATH="$_textseg_repo/.venv/bin:$PATH"
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
unset _textseg_repo
