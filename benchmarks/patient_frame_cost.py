"""What the patient-frame bookkeeping costs. Not a test. Two measurements, one run each:

1. **Training iteration** (the issue's bar, ≤ 1.05×): seconds per nnU-Net training iteration — its own loader
   (``next(dataloader)``: loading, cropping, augmentation) plus ``train_step`` — of each text trainer with the
   bookkeeping vs the same trainer without it. "Without" is the same network, loss and data, with nothing loaded
   or warped for the frame: the position channels are then the patch's own grid (as if every patch were the whole
   image, which is what a trainer without bookkeeping would know). Demo images larger than the planned patch
   (128² images, 64² patch: crops in every sample), nnU-Net's default augmentation, ``nnUNet_n_proc_DA`` 0 by
   default, so the augmentation runs in the training process and its cost is inside the measured time (with
   background workers it is hidden whenever they keep up). Trainers alternate in rounds; median per trainer.
2. **Augmentation pipeline alone**: seconds per sample of nnU-Net's own 2D training pipeline on an image vs the
   same pipeline carrying the 3 position channels (stashed past the intensity transforms, resampled by the spatial
   ones with the image's grid); same random draws per sample, best of 3 passes. (Computing the positions from the
   grid in closed form instead of resampling them was tried: exact, but slower than one grid_sample of 3 channels
   — 0.28 vs 0.04 ms at 64², 0.69 vs 0.39 ms at 256² — so training resamples.)

    python benchmarks/patient_frame_cost.py [--parts iteration pipeline] [--root benchmarks/results/work]
        [--iters 10] [--rounds 4] [--n_proc_da 0] [--size 64 256] [--samples 200]
        [--out benchmarks/results/patient_frame_cost.json]
"""
from __future__ import annotations

import argparse
import json
import os
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


ITERATION_TRAINERS = ("nnUNetTrainerBiCLIP", "nnUNetTrainerMedCLIPSeg")


def without_bookkeeping(trainer_cls: type) -> type:
    """``trainer_cls`` with the same network and losses but no patient-frame bookkeeping: no position channels are
    loaded or warped by the data pipeline; ``train_step`` appends the patch's own coordinate grid instead."""
    import torch
    from nnunetv2_textseg.patient_frame import POSITION_CHANNELS, position_channels

    class WithoutBookkeeping(trainer_cls):
        patient_frame = False  # plain nnU-Net dataset class and augmentation pipeline

        def _text_plans_entry(self, identity, spec):
            return {**super()._text_plans_entry(identity, spec), "position_channels": POSITION_CHANNELS}

        def train_step(self, batch: dict) -> dict:
            x = batch["data"]
            grid = torch.from_numpy(position_channels(tuple(x.shape[2:]))).to(x.dtype)
            return super().train_step({**batch, "data": torch.cat([x, grid.expand(x.shape[0], -1, -1, -1)], 1)})

    WithoutBookkeeping.__name__ = WithoutBookkeeping.__qualname__ = f"{trainer_cls.__name__}_noFrameBookkeeping"
    return WithoutBookkeeping


def large_image_dataset(root: Path, dataset_id: int, size: int, patch: int) -> Path:
    """train_step.py's demo dataset of ``size``² images (our own folders under ``root``), planned with a ``patch``²
    patch."""
    from benchmarks.runner.run import edit_demo_plans
    from benchmarks.train_step import ensure_dataset
    env = ensure_dataset(root, dataset_id, size)  # (nnU-Net's planner needs nnUNet_n_proc_DA >= 1)
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet") or k.endswith("_OFFLINE")})
    pre = next(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id:03d}_*"))
    plans_file = pre / "nnUNetPlans.json"
    plans_file.write_text(json.dumps(edit_demo_plans(json.loads(plans_file.read_text()), 2, patch, plans_file),
                                     indent=2))
    return pre


def time_iterations(pre: Path, names: list[str], iters: int, rounds: int, warmup: int) -> list[dict]:
    """Median seconds per training iteration (``next(loader)`` + ``train_step``) of every trainer and its
    ``without_bookkeeping`` twin, measured in alternating rounds."""
    from nnunetv2_textseg.training.variants import text_trainer_class
    torch.manual_seed(0)
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    runs = {}
    for name in names:
        cls = text_trainer_class(name)
        for label, c in ((name, cls), (f"{name} without bookkeeping", without_bookkeeping(cls))):
            trainer = c({**plans, "continue_training": False}, "2d", 0, dataset_json, torch.device("cpu"))
            trainer.initialize()
            trainer.network.train()
            loader, val_loader = trainer.get_dataloaders()
            for dl in (val_loader,):
                if hasattr(dl, "_finish"):
                    dl._finish()
            for _ in range(warmup):
                trainer.train_step(next(loader))
            runs[label] = (trainer, loader, [])
    for r in range(rounds):
        order = list(runs) if r % 2 == 0 else list(runs)[::-1]
        for label in order:
            trainer, loader, times = runs[label]
            t, cpu = time.perf_counter(), time.process_time()
            for _ in range(iters):
                trainer.train_step(next(loader))
            times.append(((time.perf_counter() - t) / iters, (time.process_time() - cpu) / iters))
            print(f"  round {r + 1}/{rounds} {label}: {times[-1][0]:.3f} s/iter ({times[-1][1]:.3f} CPU-s)", flush=True)
    rows = []
    for name in names:
        w, wo = np.asarray(runs[name][2]), np.asarray(runs[f"{name} without bookkeeping"][2])
        with_, without = np.median(w, 0), np.median(wo, 0)
        # CPU seconds of this process (loading, augmentation and train step all run in it): less sensitive than
        # wall time to other work on the machine
        rows.append({"trainer": name, "with_s": float(with_[0]), "without_s": float(without[0]),
                     "ratio": float(with_[0] / without[0]), "with_cpu_s": float(with_[1]),
                     "without_cpu_s": float(without[1]), "cpu_ratio": float(with_[1] / without[1]),
                     "rounds_with_s": w.tolist(), "rounds_without_s": wo.tolist(),
                     "patch_size": list(runs[name][0].configuration_manager.patch_size),
                     "batch_size": runs[name][0].batch_size})
    for _, loader, _ in runs.values():
        if hasattr(loader, "_finish"):
            loader._finish()
    return rows


def pipeline_rows(sizes: list[int], samples: int) -> list[dict]:
    from nnunetv2_textseg.patient_frame import protect_position_channels, with_position_channels
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in nnU-Net's loader workers
    rows = []
    for size in sizes:
        big = int(size * 1.4)  # nnU-Net crops a larger initial patch for rotation
        g = torch.Generator().manual_seed(0)
        image = lambda i: torch.randn(1, big, big, generator=g)  # noqa: E731
        seg = torch.zeros(1, big, big, dtype=torch.int16)
        plain = time_pipeline(pipeline(size), lambda i: (image(i), seg.clone()), samples)
        framed = time_pipeline(protect_position_channels(pipeline(size)),
                               lambda i: (with_position_channels(image(i)), seg.clone()), samples)
        rows.append({"patch": size, "plain_s": plain, "with_position_s": framed, "ratio": framed / plain})
    torch.set_num_threads(threads)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", nargs="+", choices=["iteration", "pipeline"], default=["iteration", "pipeline"])
    p.add_argument("--root", type=Path, default=REPO / "benchmarks" / "results" / "work_frame")
    p.add_argument("-d", "--dataset_id", type=int, default=987)
    p.add_argument("--image_size", type=int, default=128)
    p.add_argument("--patch", type=int, default=64)
    p.add_argument("--trainers", nargs="+", default=list(ITERATION_TRAINERS))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--n_proc_da", type=int, default=0,
                   help="nnUNet_n_proc_DA: 0 runs the augmentation in the training process (its cost is measured)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the iteration part (default: torch's)")
    p.add_argument("--size", type=int, nargs="+", default=[64, 256], help="pipeline part: patch sizes")
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "patient_frame_cost.json")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    result = {"torch": torch.__version__, "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if "iteration" in a.parts:
        pre = large_image_dataset(a.root, a.dataset_id, a.image_size, a.patch)
        os.environ["nnUNet_n_proc_DA"] = str(a.n_proc_da)
        rows = time_iterations(pre, a.trainers, a.iters, a.rounds, a.warmup)
        result["iteration"] = {"rows": rows, "n_proc_da": a.n_proc_da, "image_size": a.image_size,
                               "iters": a.iters, "rounds": a.rounds}
        print(f"\nTraining iteration (nnU-Net loader with nnUNet_n_proc_DA={a.n_proc_da} + train_step), "
              f"{a.image_size}² images, {a.patch}² patch, batch {rows[0]['batch_size']}, median of {a.rounds} rounds "
              f"× {a.iters} iterations, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs\n")
        print("| trainer | with bookkeeping (s/iter) | without (s/iter) | ratio | with (CPU-s/iter) | without (CPU-s/iter) "
              "| CPU ratio |\n|---|---:|---:|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['trainer']} | {r['with_s']:.3f} | {r['without_s']:.3f} | {r['ratio']:.3f} | "
                  f"{r['with_cpu_s']:.3f} | {r['without_cpu_s']:.3f} | {r['cpu_ratio']:.3f} |")
    if "pipeline" in a.parts:
        rows = pipeline_rows(a.size, a.samples)
        result["pipeline"] = {"rows": rows, "samples": a.samples}
        print(f"\nnnU-Net 2D training pipeline per sample (1 thread, {a.samples} samples)\n")
        print("| patch | plain (ms) | with position channels (ms) | ratio |\n|---:|---:|---:|---:|")
        for r in rows:
            print(f"| {r['patch']}² | {1e3 * r['plain_s']:.2f} | {1e3 * r['with_position_s']:.2f} | "
                  f"{r['ratio']:.3f} |")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2))
    print(f"\nwritten: {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
