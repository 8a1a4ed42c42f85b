"""Monte-Carlo prediction cost of MedCLIPSeg: seconds per case of plain nnU-Net (no TTA), MedCLIPSeg's mean
path and MedCLIPSeg with N samples - batched per tile (the default, --mc_batch_size 8) and one sliding-window pass
per sample (--mc_batch_size 1) -, one run, as ratios. Not a test.

    python benchmarks/predict_mc.py [--root demo_work] [-d 990] [--mc 8] [--mc_batch_size 8]

Needs the demo's models plus a MedCLIPSeg model in the same results folder, e.g.
``nnUNetv2_train 990 2d 0 -tr nnUNetTrainerMedCLIPSeg_debug -device cpu`` with the demo's env.
Models are loaded before timing; report encoding is included.
"""
import argparse
import glob
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nnunetv2_textseg.harness import nnunet_env  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO / "demo_work"))
    p.add_argument("-d", type=int, default=990)
    p.add_argument("--mc", type=int, default=8)
    p.add_argument("--text", default="nnUNetTrainerMedCLIPSeg_debug")
    p.add_argument("--plain", default="nnUNetTrainer_demo")
    p.add_argument("--mc_batch_size", type=int, default=8)
    a = p.parse_args()
    if a.mc < 2 or a.mc_batch_size < 1:
        p.error("--mc must be >= 2 and --mc_batch_size >= 1")
    os.environ.update(nnunet_env(a.root))  # the demo's folders under --root, for nnU-Net in this process
    import torch
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    from nnunetv2_textseg.reports import ReportTable

    ds = glob.glob(os.environ["nnUNet_raw"] + f"/Dataset{a.d:03d}_*")[0]
    table = ReportTable.read(Path(ds) / "reportsTs.csv")
    out = Path(tempfile.mkdtemp())
    kw = dict(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    sec = {}
    runs = {"mean": (0, 1), "batched": (a.mc, a.mc_batch_size), "per_pass": (a.mc, 1)}
    for name, (mc, batch) in runs.items():
        pr = nnUNetTextPredictor(mc_samples=mc, mc_batch_size=batch, **kw)
        pr.initialize_from_trained_model_folder(get_output_folder(a.d, a.text, "nnUNetPlans", "2d"), (0,))
        pr.load_encoder()
        t = time.perf_counter()
        pr.set_reports(table)
        pr.predict_from_files(ds + "/imagesTs", str(out / name), num_processes_preprocessing=1,
                              num_processes_segmentation_export=1)
        sec[name] = (time.perf_counter() - t) / len(table)
    pr = nnUNetPredictor(use_mirroring=False, **kw)
    pr.initialize_from_trained_model_folder(get_output_folder(a.d, a.plain, "nnUNetPlans", "2d"), (0,))
    t = time.perf_counter()
    pr.predict_from_files(ds + "/imagesTs", str(out / "plain"), num_processes_preprocessing=1,
                          num_processes_segmentation_export=1)
    plain = (time.perf_counter() - t) / len(table)
    rows = {"plain_s_per_case": plain, "mean_path_s_per_case": sec["mean"], "mc": a.mc,
            "mc_batch_size": a.mc_batch_size, "mc_batched_s_per_case": sec["batched"],
            "mc_per_pass_s_per_case": sec["per_pass"], "mean_path_ratio": sec["mean"] / plain,
            "mc_batched_ratio": sec["batched"] / plain, "mc_per_pass_ratio": sec["per_pass"] / plain,
            "s_per_extra_sample_batched": (sec["batched"] - sec["mean"]) / (a.mc - 1),
            "s_per_extra_sample_per_pass": (sec["per_pass"] - sec["mean"]) / (a.mc - 1)}
    print("| prediction | s/case | × plain nnU-Net (no TTA) | s per extra sample |\n|---|---:|---:|---:|")
    print(f"| nnUNetTrainer, --disable_tta | {plain:.3f} | 1.00 | – |")
    print(f"| MedCLIPSeg, mean path | {sec['mean']:.3f} | {sec['mean'] / plain:.2f} | – |")
    print(f"| MedCLIPSeg, --mc_samples {a.mc} (batched, {a.mc_batch_size} per tile) | {sec['batched']:.3f} | "
          f"{sec['batched'] / plain:.2f} | {rows['s_per_extra_sample_batched']:.3f} |")
    print(f"| MedCLIPSeg, --mc_samples {a.mc} --mc_batch_size 1 (a pass per sample) | {sec['per_pass']:.3f} | "
          f"{sec['per_pass'] / plain:.2f} | {rows['s_per_extra_sample_per_pass']:.3f} |")
    (REPO / "benchmarks" / "results").mkdir(parents=True, exist_ok=True)
    (REPO / "benchmarks" / "results" / "predict_mc.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
