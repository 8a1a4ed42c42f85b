#!/usr/bin/env bash
# Prepared GPU check (about 8 minutes on one GPU; run it where a GPU is lent, CI never has one):
#   1. train step of plain nnU-Net, BiCLIP (with and without IAC; at batch 2 also without its adapters,
#      _mapOnly) and MedCLIPSeg at a 256² patch with
#      nnU-Net's CUDA defaults (AMP, its grad scaler, pinned memory) but torch.compile off unless COMPILE=t
#      (compiling four trainers took over 8 minutes on an H200): s/iter and peak GPU memory as ratios to
#      nnUNetTrainer (benchmarks/train_step.py --device cuda), at the plans' batch (2) and at batch 12;
#   2. short _debug trainings of plain nnU-Net and MedCLIPSeg on the same data, then prediction of the test
#      cases: nnUNetv2_predict (plain) vs nnUNetv2_textseg_predict --mc_samples 8 --save_uncertainty (seconds).
# Writes OUT/train_step.json, OUT/train_step_b12.json, OUT/predict.json and OUT/gpu_check.md (OUT=benchmarks/results/gpu_check).
# A GPU machine without this project's environment: install wheels of nnunetv2 2.8.1 and its dependencies
# that its Python lacks (pip download --platform manylinux... --python-version X here, pip install --no-index
# --no-deps there), then this repo (pip install --no-deps --no-build-isolation .), and pass PY=<that python>.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/gpu_check}
PY=${PY:-.venv/bin/python}
BIN=$(dirname "$PY")
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU visible'; print('torch', torch.__version__, torch.cuda.get_device_name(0))"

WORK="$OUT/work"
nnUNet_compile=${COMPILE:-f} "$PY" benchmarks/train_step.py --device cuda --size 256 --iters 20 --warmup 5 \
  --root "$WORK" -d 989 \
  --trainers nnUNetTrainer nnUNetTrainerBiCLIP_noIAC nnUNetTrainerBiCLIP nnUNetTrainerBiCLIP_mapOnly \
  nnUNetTrainerMedCLIPSeg --out "$OUT/train_step.json" | tee "$OUT/train_step.md"
# the same at nnU-Net's 2D reference batch size (12): the 40-case dataset caps the plans' batch at 2, where the
# step is bound by how fast the host queues kernels, not by the GPU
nnUNet_compile=${COMPILE:-f} "$PY" benchmarks/train_step.py --device cuda --size 256 --iters 20 --warmup 5 \
  --root "$WORK" -d 989 --batch_size 12 \
  --trainers nnUNetTrainer nnUNetTrainerBiCLIP_noIAC nnUNetTrainerBiCLIP nnUNetTrainerMedCLIPSeg \
  --out "$OUT/train_step_b12.json" | tee "$OUT/train_step_b12.md"

export nnUNet_raw="$WORK/raw" nnUNet_preprocessed="$WORK/pre" nnUNet_results="$WORK/res"
export nnUNet_extTrainer="$("$PY" -c 'from nnunetv2_textseg.cli import trainers_folder; print(trainers_folder())')"
RAW=$(ls -d "$nnUNet_raw"/Dataset989_*)
# these short trainings only provide models for the prediction timing: no torch.compile (its start-up would
# take longer than the 8 iterations; the train-step rows above measure nnU-Net's compiled default)
for T in nnUNetTrainer_debug nnUNetTrainerMedCLIPSeg_debug; do
  nnUNet_compile=f "$BIN/nnUNetv2_train" 989 2d 0 -tr $T > "$OUT/train_$T.log" 2>&1
done
t0=$(date +%s.%N)
"$BIN/nnUNetv2_predict" -i "$RAW/imagesTs" -o "$OUT/pred_plain" -d 989 -c 2d -f 0 -tr nnUNetTrainer_debug > "$OUT/pred_plain.log" 2>&1
t1=$(date +%s.%N)
"$BIN/nnUNetv2_textseg_predict" -i "$RAW/imagesTs" -o "$OUT/pred_mc8" -d 989 -c 2d -f 0 -tr nnUNetTrainerMedCLIPSeg_debug \
  --mc_samples 8 --save_uncertainty > "$OUT/pred_mc8.log" 2>&1
t2=$(date +%s.%N)
"$PY" - "$OUT" "$t0" "$t1" "$t2" <<'PYEOF'
import json, sys
from pathlib import Path
out, t0, t1, t2 = Path(sys.argv[1]), *map(float, sys.argv[2:])
res = {"plain_s": t1 - t0, "medclipseg_mc8_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0)}
(out / "predict.json").write_text(json.dumps(res, indent=2))
md = ["| trainer | batch | s/iter | × nnUNetTrainer | peak GPU mem (MiB) | × mem | launching ops | host reads |",
      "|---|---|---|---|---|---|---|---|"]
for name in ("train_step.json", "train_step_b12.json"):
    md += [f"| {r['trainer']} | {r['batch_size']} | {r['s_per_iter']:.4f} | {r['time_ratio']:.2f} | {r['peak_mem_mib']:.0f} | "
           f"{r['mem_ratio']:.2f} | {r['launching_ops']:.0f} | {r['host_reads']:.1f} |"
           for r in json.loads((out / name).read_text())["rows"]]
md += ["", f"Prediction of the test cases (whole command, incl. start-up): plain nnU-Net {res['plain_s']:.1f} s, "
           f"MedCLIPSeg --mc_samples 8 --save_uncertainty {res['medclipseg_mc8_s']:.1f} s ({res['ratio']:.2f}x)."]
(out / "gpu_check.md").write_text("\n".join(md) + "\n")
print("\n".join(md))
PYEOF
