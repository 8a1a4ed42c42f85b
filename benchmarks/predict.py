"""Seconds per case: nnUNetv2_predict with a plain nnUNetTrainer model vs nnUNetv2_textseg_predict with a
BiCLIP model of the same plans, same cases, one run, as a ratio. Not a test.

    python benchmarks/predict.py [--root demo_work] [-d 990] [--text nnUNetTrainerBiCLIP_demo] [--plain nnUNetTrainer_demo]

Uses the models the README's demo trains (run `bash setup_scripts/demo.sh` first). Two measurements:
the whole command (process start, model load, encoder load, preprocessing workers, export) and the
in-process prediction loop (models already loaded; ours includes encoding every report). Target ≤ 1.1×.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nnunetv2_textseg.harness import nnunet_env, run_command  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO / "demo_work"))
    p.add_argument("-d", "--dataset_id", type=int, default=990)
    p.add_argument("--text", default="nnUNetTrainerBiCLIP_demo")
    p.add_argument("--plain", default="nnUNetTrainer_demo")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "predict.json"))
    a = p.parse_args(argv)
    root = Path(a.root).resolve()
    env = nnunet_env(root)  # the demo's folders under --root
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet") or k.endswith("OFFLINE")})
    ds = next((root / "nnUNet_raw").glob(f"Dataset{a.dataset_id:03d}_*"))
    images = ds / "imagesTs"
    n = len(list(images.glob("*_0000*")))
    tmp = Path(tempfile.mkdtemp())
    common = ["-i", str(images), "-d", str(a.dataset_id), "-c", "2d", "-f", "0", "-device", a.device]

    def cli(cmd: list[str]) -> float:
        return run_command(cmd, env, capture=True, echo=False).seconds

    cli_plain = cli(["nnUNetv2_predict", *common, "-o", str(tmp / "plain"), "-tr", a.plain])
    # text models never mirror at test time (spatial words), plain nnU-Net does by default: also time it
    # without its mirroring so the ratio compares the same amount of network work
    cli_plain_notta = cli(["nnUNetv2_predict", *common, "-o", str(tmp / "plain_notta"), "-tr", a.plain,
                           "--disable_tta"])
    cli_text = cli(["nnUNetv2_textseg_predict", *common, "-o", str(tmp / "text"), "-tr", a.text,
                    "-reports", str(ds / "reportsTs.csv")])

    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    from nnunetv2_textseg.reports import ReportTable

    def loop(predictor, trainer, reports=None) -> float:
        predictor.initialize_from_trained_model_folder(get_output_folder(a.dataset_id, trainer, "nnUNetPlans", "2d"),
                                                       (0,))
        if reports is not None:
            predictor.load_encoder()  # model loading is not timed, for either model
        t = time.perf_counter()
        if reports is not None:
            predictor.set_reports(reports)
        predictor.predict_from_files(str(images), str(tmp / f"loop_{trainer}"), num_processes_preprocessing=2,
                                     num_processes_segmentation_export=2)
        return time.perf_counter() - t

    kw = dict(perform_everything_on_device=a.device == "cuda", device=torch.device(a.device), allow_tqdm=False)
    loop_plain = loop(nnUNetPredictor(**kw), a.plain)
    loop_text = loop(nnUNetTextPredictor(**kw), a.text, ReportTable.read(ds / "reportsTs.csv"))
    shutil.rmtree(tmp)

    rows = {"cases": n, "device": a.device, "torch": torch.__version__, "cpus": os.cpu_count(),
            "command_s_per_case": {"plain": cli_plain / n, "text": cli_text / n, "ratio": cli_text / cli_plain},
            "command_s_per_case_plain_without_tta": {"plain": cli_plain_notta / n, "text": cli_text / n,
                                                     "ratio": cli_text / cli_plain_notta},
            "loop_s_per_case": {"plain": loop_plain / n, "text": loop_text / n, "ratio": loop_text / loop_plain}}
    print(f"\nPrediction, {n} cases of {ds.name}, {a.device}, {os.cpu_count()} CPUs\n")
    print("| measurement | nnUNetv2_predict (plain) s/case | nnUNetv2_textseg_predict (BiCLIP) s/case | ratio |")
    print("|---|---|---|---|")
    for k, label in (("command_s_per_case", "whole command"),
                     ("command_s_per_case_plain_without_tta", "whole command, plain with --disable_tta"),
                     ("loop_s_per_case", "prediction loop")):
        r = rows[k]
        print(f"| {label} | {r['plain']:.3f} | {r['text']:.3f} | {r['ratio']:.2f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(rows, indent=2))
    print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    main()
