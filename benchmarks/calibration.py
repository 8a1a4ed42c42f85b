"""Calibration and uncertainty quality of the text-vs-vision models: ECE of the foreground probability and the
error-retrieval AUC (nnUNetv2_textseg_calibration) of every trainer's 100 %-label model on the clean test
set; MedCLIPSeg trainers also with Monte-Carlo sampling. Not a test.

    python benchmarks/calibration.py [--out benchmarks/results/text_vs_vision] [--mc 8]

Run benchmarks/text_vs_vision.py first (same --out): its models, test set and results.json are used.
Predictions (--save_probabilities; text trainers also --save_uncertainty) go to OUT/work/calibration/<row>;
the table goes to OUT/calibration.md and OUT/calibration.json. Plain nnU-Net is predicted with
nnUNetv2_predict and its default test-time mirroring; its uncertainty is the entropy of its probabilities.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nnunetv2_textseg.errors import TextSegError  # noqa: E402
from nnunetv2_textseg.harness import (evaluate_folder, is_text_trainer, nnunet_env, prediction_command,  # noqa: E402
                                      run_command)

from benchmarks.runner.presets import DEFAULT_OUT, samples_at_inference  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--mc", type=int, default=8, help="Monte-Carlo samples for MedCLIPSeg trainers (0: none)")
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)
    results = a.out / "results.json"
    if not results.is_file():
        sys.exit(f"No {results}; run benchmarks/text_vs_vision.py --out {a.out} first.")
    data = json.loads(results.read_text())
    full = data["fraction_folds"].get("1")
    if not full or full.get("fold") is None:
        sys.exit(f"{results} has no 100 % model (fraction 100 was not trained).")
    work = a.out / "work"
    # the generated demo data live in OUT/work; --dataset used yours
    env = nnunet_env(work if data["settings"].get("dataset") is None else None, n_proc_da=1)
    dataset_id, raw = data["dataset"]["id"], Path(data["dataset"]["raw"])
    fold = str(full["fold"])
    logs = work / "calibration" / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    runs = []
    for trainer in data["settings"]["trainers"]:
        runs.append((trainer, trainer, 0))
        if samples_at_inference(trainer) and a.mc > 1:
            runs.append((f"{trainer}, --mc_samples {a.mc}", trainer, a.mc))
    rows = []
    for label, trainer, mc in runs:
        pred = work / "calibration" / (trainer + (f"_mc{mc}" if mc else ""))
        if pred.exists():
            shutil.rmtree(pred)
        text = is_text_trainer(trainer)
        cmd = [prediction_command(trainer), "-i", str(raw / "imagesTs"), "-o",
               str(pred), "-d", str(dataset_id), "-c", "2d", "-f", fold, "-tr", trainer, "-device", a.device,
               "--disable_progress_bar", "-npp", "1", "-nps", "1", "--save_probabilities"]
        if text:
            cmd += ["-reports", str(raw / "reportsTs.csv"), "--save_uncertainty"] + (["--mc_samples", str(mc)] if mc else [])
        seconds = run_command(cmd, env, logs / f"predict_{pred.name}.log").seconds
        dice = evaluate_folder(raw / "labelsTs", pred, env, logs / f"evaluate_{pred.name}.log").dice
        run_command(["nnUNetv2_textseg_calibration", "-ref", str(raw / "labelsTs"), "-pred", str(pred)], env,
                    logs / f"calibration_{pred.name}.log")
        cal = json.loads((pred / "calibration.json").read_text())
        rows.append({"row": label, "trainer": trainer, "mc_samples": mc, "dice": dice, "seconds": round(seconds, 1),
                     **{k: cal[k] for k in ("ece", "error_retrieval_auc", "best_possible_auc", "error_rate",
                                            "mean_uncertainty", "n_cases")}})
        print(f"{label}: Dice {dice:.4f}  ECE {cal['ece']:.4f}  error-retrieval AUC {cal['error_retrieval_auc']:.4f}",
              flush=True)
    lines = [f"Calibration, {data['dataset']['name']}, 100 % of the labels (fold {fold}), clean test set "
             f"({rows[0]['n_cases']} cases); uncertainty = predictive entropy. Error-retrieval AUC: 0.5 = unrelated "
             f"to the errors, best possible = 1 − error rate / 2.", "",
             "| model | Dice | ECE ↓ | error-retrieval AUC ↑ | best possible AUC | mean entropy |",
             "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['row']} | {r['dice']:.4f} | {r['ece']:.4f} | {r['error_retrieval_auc']:.4f} | "
              f"{r['best_possible_auc']:.4f} | {r['mean_uncertainty']:.4f} |" for r in rows]
    (a.out / "calibration.md").write_text("\n".join(lines) + "\n")
    (a.out / "calibration.json").write_text(json.dumps({"fold": fold, "rows": rows}, indent=2))
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TextSegError as err:  # a failed command (its log's last lines) or unset nnU-Net folders
        sys.exit(f"calibration: {err}")
