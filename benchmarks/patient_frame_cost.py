"""What the patient-frame bookkeeping costs in nnU-Net's data augmentation: seconds per sample of nnU-Net's own
2D training pipeline on an image, vs the same pipeline carrying the 3 position channels (stashed past the
intensity transforms, resampled by the spatial ones with the image's grid). One run, same random draws per
sample, best of 3 passes. Not a test. (Computing the positions from the grid in closed form instead of
resampling them was tried: exact, but slower than one grid_sample of 3 channels — 0.28 vs 0.04 ms at 64²,
0.69 vs 0.39 ms at 256² — so training resamples.)

    python benchmarks/patient_frame_cost.py [--size 64 256] [--samples 200] [--out benchmarks/results/patient_frame_cost.json]

Target: ≤ 1.05× (the position channels are read by the network with one grid_sample, which train_step.py
includes in BiCLIP's step time).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def pipeline(patch: int):
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return nnUNetTrainer.get_training_transforms(patch_size=(patch, patch), rotation_for_DA=(-np.pi, np.pi),
                                                 deep_supervision_scales=[[1, 1], [0.5, 0.5], [0.25, 0.25]],
                                                 mirror_axes=(0, 1), do_dummy_2d_data_aug=False)


def time_pipeline(transform, make_sample, n: int, rounds: int = 3) -> float:
    """Seconds per sample, the best of ``rounds`` passes over the same samples with the same random draws
    (batchgeneratorsv2 draws from both numpy's and torch's global generators)."""
    samples = [make_sample(i) for i in range(n)]
    best = float("inf")
    for _ in range(rounds):
        np.random.seed(0)
        torch.manual_seed(0)
        t = time.perf_counter()
        for image, seg in samples:
            transform(image=image.clone(), segmentation=seg.clone())
        best = min(best, (time.perf_counter() - t) / n)
    return best


def main(argv=None) -> int:
    from nnunetv2_textseg.patient_frame import protect_position_channels, with_position_channels
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, nargs="+", default=[64, 256])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "patient_frame_cost.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)  # as in nnU-Net's loader workers
    rows = []
    for size in a.size:
        big = int(size * 1.4)  # nnU-Net crops a larger initial patch for rotation
        g = torch.Generator().manual_seed(0)
        image = lambda i: torch.randn(1, big, big, generator=g)  # noqa: E731
        seg = torch.zeros(1, big, big, dtype=torch.int16)
        plain = time_pipeline(pipeline(size), lambda i: (image(i), seg.clone()), a.samples)
        framed = time_pipeline(protect_position_channels(pipeline(size)),
                               lambda i: (with_position_channels(image(i)), seg.clone()), a.samples)
        rows.append({"patch": size, "plain_s": plain, "with_position_s": framed, "ratio": framed / plain})
    print(f"nnU-Net 2D training pipeline per sample (1 thread, {a.samples} samples)\n")
    print("| patch | plain (ms) | with position channels (ms) | ratio |\n|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['patch']}² | {1e3 * r['plain_s']:.2f} | {1e3 * r['with_position_s']:.2f} | {r['ratio']:.3f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"rows": rows, "torch": torch.__version__}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
