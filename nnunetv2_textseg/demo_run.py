"""The README's main job, end to end with the real commands: make a demo dataset with reports, plan and
preprocess, encode the reports, train short MedCLIPSeg and BiCLIP models and a short plain nnU-Net, predict
the test set (the text models with each case's report and uncertainty maps: MedCLIPSeg with Monte-Carlo
samples, BiCLIP with its pseudo-images), evaluate all with nnUNetv2_evaluate_folder, print the scores.

    nnUNetv2_textseg_demo [--root demo_work] [--trainers nnUNetTrainerMedCLIPSeg_demo nnUNetTrainerBiCLIP_demo]
        [--baseline nnUNetTrainer_demo] [--mc_samples 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from nnunetv2_textseg.atomic import atomic_write_text
from nnunetv2_textseg.errors import run_cli
from nnunetv2_textseg.harness import (FOLDER_VARS, evaluate_folder, is_text_trainer, nnunet_env, prediction_command,
                                      run_command)


def _main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default="demo_work", help="working folder (nnUNet_raw/preprocessed/results inside)")
    p.add_argument("-d", "--dataset_id", type=int, default=990)
    p.add_argument("--n_train", type=int, default=60)
    p.add_argument("--n_test", type=int, default=30)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--trainers", nargs="+", default=["nnUNetTrainerMedCLIPSeg_demo", "nnUNetTrainerBiCLIP_demo"],
                   help="text trainers (default: %(default)s)")
    p.add_argument("--mc_samples", type=int, default=8, help="Monte-Carlo samples for MedCLIPSeg trainers")
    p.add_argument("--baseline", default="nnUNetTrainer_demo")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    root = Path(a.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    cpus = os.cpu_count() or 2
    # nnU-Net starts up to 12 augmentation workers and 8 validation/export workers by default; on a small CPU
    # machine they only compete with training for the same cores.
    env = nnunet_env(root, n_proc_da=max(1, min(4, cpus // 2)), def_n_proc=max(1, min(8, cpus)))
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    d = str(a.dataset_id)
    raw = Path(env["nnUNet_raw"])
    # The demo rebuilds its own dataset under --root each time (results of earlier runs are replaced).
    for base in (env[var] for var in FOLDER_VARS):
        for old in Path(base).glob(f"Dataset{a.dataset_id:03d}_*"):
            shutil.rmtree(old)
    run_command(["nnUNetv2_textseg_make_demo", "-d", d, "--n_train", str(a.n_train), "--n_test", str(a.n_test),
                 "--size", str(a.size), "--seed", str(a.seed), "--raw", str(raw)], env, logs / "make_demo.log")
    ds = next(raw.glob(f"Dataset{a.dataset_id:03d}_*"))
    run_command(["nnUNetv2_plan_and_preprocess", "-d", d, "-c", "2d", "-np", "2", "--verify_dataset_integrity"], env,
                logs / "plan_and_preprocess.log")
    run_command(["nnUNetv2_textseg_encode", "-d", d], env, logs / "encode.log")
    scores = {}
    for trainer in dict.fromkeys([*a.trainers, a.baseline]):  # each trained once
        run_command(["nnUNetv2_train", d, "2d", "0", "-tr", trainer, "-device", a.device], env,
                    logs / f"train_{trainer}.log")
        out = root / "predictions" / trainer
        if out.exists():
            shutil.rmtree(out)
        text = is_text_trainer(trainer)
        cmd = [prediction_command(trainer), "-i", str(ds / "imagesTs"), "-o", str(out), "-d", d, "-c", "2d", "-f", "0",
               "-tr", trainer, "-device", a.device]
        if "MedCLIPSeg" in trainer:
            cmd += ["-reports", str(ds / "reportsTs.csv"), "--save_uncertainty"] + (
                ["--mc_samples", str(a.mc_samples)] if a.mc_samples > 1 else [])
        elif text:
            cmd += ["-reports", str(ds / "reportsTs.csv"), "--save_uncertainty", "--save_pseudo_images"]
        run_command(cmd, env, logs / f"predict_{trainer}.log")
        scores[trainer] = evaluate_folder(ds / "labelsTs", out, env, logs / f"evaluate_{trainer}.log").foreground_mean

    print("\nTest-set scores (nnUNetv2_evaluate_folder, foreground mean over "
          f"{a.n_test} cases, fold 0, {a.device}):")
    width = max(32, *(len(t) for t in scores))
    print(f"| {'trainer':{width}s} | Dice   | IoU    | Δ Dice  |")
    print(f"|{'-' * (width + 2)}|--------|--------|---------|")
    base = scores[a.baseline]["Dice"]
    for trainer, s in scores.items():
        diff = "–" if trainer == a.baseline else f"{s['Dice'] - base:+.4f}"
        print(f"| {trainer:{width}s} | {s['Dice']:.4f} | {s['IoU']:.4f} | {diff:>7s} |")
    print(f"\nΔ Dice: text trainer minus {a.baseline}. Uncertainty maps (.nii.gz + .png overlays): "
          f"{root / 'predictions'}/<trainer>/uncertainty; BiCLIP's pseudo-images: .../pseudo_images")
    atomic_write_text(root / "demo_scores.json", json.dumps(scores, indent=2))


def main(argv=None) -> int:
    """``nnUNetv2_textseg_demo``: exit code 0, or 2 with one ``ERROR:`` message for a problem the user can fix (a failed
    nnU-Net command: the command, its exit code and its log's last lines)."""
    return run_cli(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
