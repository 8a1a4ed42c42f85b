"""Seconds per training iteration (and peak memory) of nnUNetTrainer vs nnUNetTrainerBiCLIP vs _noIAC (and the
earlier defaults, _mapOnly and _endToEnd) on the same preprocessed data, measured in one run, printed as ratios, plus
the time of BiCLIP's one-off report-pathway warm-up. Not a test.

    python benchmarks/train_step.py [--root benchmarks/results/work] [-d 990] [--iters 30] [--device cpu] [--repeats 3]

Data loading is excluded (batches are drawn first, then the timed loop only runs ``train_step``), so the
numbers compare the networks and losses, which is what the trainers change. Targets: ≤ 1.1× without IAC,
≤ 1.6× with IAC.

Each row also counts, over five more train steps (seeded), the ops that launch work (views and other
metadata-only ops left out; the optimisers as on CUDA: SGD multi-tensor, the text modules' AdamW fused) and the
reads of a tensor's value by the host outside the optimiser step (on a GPU each one waits for the queued kernels).
On a GPU at small batches the text modules are many small kernels and the step is bound by how fast the host queues
them, so these counts say where GPU time goes when no GPU is at hand; they do not depend on the machine's load.
``--batch_size`` overrides the plans' batch (this 40-case dataset caps it at 2; nnU-Net's 2D reference is 12).
``--repeats R`` times the trainer list R times in turn (A B C, A B C, ...): a shared CPU's speed drifts by ±10 %
between runs a minute apart, so each repeat's ratio is taken to plain nnU-Net's time in the same repeat, and the
table gives the median s/iter and the median and range of those ratios.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from nnunetv2_textseg.errors import TextSegError  # noqa: E402
from nnunetv2_textseg.harness import SHORT_FOLDERS, nnunet_env, run_command  # noqa: E402


def ensure_dataset(root: Path, dataset_id: int, size: int) -> dict:
    # root/raw, root/pre, root/res: gpu_check.sh trains and predicts in the same folders afterwards
    env = nnunet_env(root, names=SHORT_FOLDERS)
    if not list(Path(env["nnUNet_preprocessed"]).glob(f"Dataset{dataset_id:03d}_*/nnUNetPlans_2d")):
        run_command(["nnUNetv2_textseg_make_demo", "-d", str(dataset_id), "--n_train", "40", "--n_test", "4",
                     "--size", str(size), "--raw", env["nnUNet_raw"], "--overwrite"], env, capture=True, echo=False)
        run_command(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "2d", "-np", "2"], env,
                    capture=True, echo=False)
    return env


def time_trainer(name: str, dataset_id: int, device: str, iters: int, warmup: int,
                 batch_size: int | None = None) -> dict:
    import torch
    from nnunetv2.run.run_training import get_trainer_from_args

    torch.manual_seed(0)
    trainer = get_trainer_from_args(str(dataset_id), "2d", 0, name, device=torch.device(device))
    if batch_size:  # the plans' batch is capped by this small dataset's size; nnU-Net reads it in initialize()
        trainer.configuration_manager.configuration["batch_size"] = batch_size
    trainer.initialize()
    dl_tr, dl_val = trainer.get_dataloaders()
    batches = [next(dl_tr) for _ in range(warmup + iters)]
    for dl in (dl_tr, dl_val):
        if hasattr(dl, "_finish"):
            dl._finish()
    trainer.network.train()
    for b in batches[:warmup]:
        trainer.train_step(b)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    for b in batches[warmup:]:
        trainer.train_step(b)
    if device == "cuda":
        torch.cuda.synchronize()
    sec = (time.perf_counter() - t) / iters
    peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    # BiCLIP's report-pathway warm-up runs once, before the first epoch (outside the train step): its time per
    # step on the same batches, and what its configured number of steps costs in all
    warm_s, warm_steps = None, int(getattr(trainer, "pathway_warmup_steps", 0))
    if warm_steps > 0:
        import itertools
        trainer.dataloader_train = itertools.cycle(batches)
        t = time.perf_counter()
        trainer.warm_up_report_pathways(iters)
        if device == "cuda":
            torch.cuda.synchronize()
        warm_s = (time.perf_counter() - t) / iters
    ops, reads = count_step_ops(trainer, batches[-5:])
    return {"trainer": name, "s_per_iter": sec, "peak_mem_mib": peak, "batch_size": trainer.batch_size,
            "launching_ops": ops, "host_reads": reads,
            "warmup_s_per_step": warm_s, "warmup_steps": warm_steps,
            "patch_size": list(trainer.configuration_manager.patch_size),
            "params_m": sum(p.numel() for p in trainer.network.parameters()) / 1e6, "rss_before_mib": rss0 / 1024}


# ops that only make a view or read metadata: no kernel on a GPU
_VIEW_OPS = ("aten.view", "aten._unsafe_view", "aten.expand", "aten.permute", "aten.t.", "aten.transpose",
             "aten.slice", "aten.select", "aten.unsqueeze", "aten.squeeze", "aten.detach", "aten.alias",
             "aten.as_strided", "aten.lift_fresh", "aten.split", "aten.unbind", "aten.narrow", "aten.split_with_sizes",
             "aten._reshape_alias", "aten.reshape", "aten.flatten", "aten.chunk", "aten.view_as", "aten.unflatten",
             "aten.empty", "aten.set_", "aten.resize_", "profiler.")
_HOST_READS = ("aten._local_scalar_dense", "aten.nonzero", "aten._unique", "aten.unique", "aten.masked_select",
               "aten.is_nonzero", "aten.item")


def count_step_ops(trainer, batches: list[dict]) -> tuple[float, float]:
    """(ops that launch work, host reads of a tensor's value outside the optimiser step) per ``train_step``, mean
    over ``batches`` with torch's random draws seeded (report dropout, rewritten reports, cross-fitting routes),
    the optimisers as on CUDA (SGD multi-tensor, the text modules' AdamW fused). The step's own end-of-step read of
    its loss (nnU-Net's, one per step) is counted."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    class Counter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops, self.reads, self.in_optimizer = 0, 0, False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            # AdamW's per-parameter step counters live on the host (unless fused or capturable): reading one
            # launches no kernel
            host_counter = self.in_optimizer and name.startswith("aten._local_scalar_dense")
            if not name.startswith(_VIEW_OPS) and not host_counter:
                self.ops += 1
            # a boolean index is a nonzero inside the kernel; the optimisers' step counters live on the host (not
            # capturable): reading them waits for nothing
            boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
                torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
            if (name.startswith(_HOST_READS) or boolean_index) and not self.in_optimizer:
                self.reads += 1
            return func(*args, **(kwargs or {}))

    inner = [getattr(trainer.optimizer, k) for k in ("main", "text") if hasattr(trainer.optimizer, k)] \
        or [trainer.optimizer]
    from nnunetv2_textseg.training.text_trainer import fused_adamw_on

    text = getattr(trainer.optimizer, "text", None)  # the text modules' AdamW: fused where torch has the kernel
    fused_on_cpu = fused_adamw_on(torch.device("cpu"))
    counter = Counter()
    for opt in inner:
        for group in opt.param_groups:  # as on CUDA: that AdamW fused, the rest multi-tensor
            fused = opt is text and fused_on_cpu
            group["fused"], group["foreach"] = (True, False) if fused else (group.get("fused"), True)
        step = opt.step

        def counted(*a, _step=step, **k):
            counter.in_optimizer = True
            try:
                return _step(*a, **k)
            finally:
                counter.in_optimizer = False
        opt.step = counted
    # the step's final loss.cpu() reads a CPU tensor here: count it as the one read a GPU step makes
    torch.manual_seed(0)
    with counter:
        for batch in batches:
            trainer.train_step(batch)
    return counter.ops / len(batches), counter.reads / len(batches) + 1


def combine_repeats(runs: list[list[dict]]) -> list[dict]:
    """One row per trainer from ``runs`` (one list of rows per repeat, the same trainers in the same order, plain
    nnU-Net first): the first repeat's row with the median s/iter, each repeat's time ratio to the first trainer of
    that repeat (``time_ratio_runs``) and their median (``time_ratio``)."""
    import statistics
    rows = []
    for i, first in enumerate(runs[0]):
        times = [run[i]["s_per_iter"] for run in runs]
        ratios = [run[i]["s_per_iter"] / run[0]["s_per_iter"] for run in runs]
        rows.append({**first, "s_per_iter": statistics.median(times), "s_per_iter_runs": times,
                     "time_ratio": statistics.median(ratios), "time_ratio_runs": ratios})
    return rows


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--root", default=str(REPO / "benchmarks" / "results" / "work"))
    p.add_argument("-d", "--dataset_id", type=int, default=989)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--batch_size", type=int, default=None,
                   help="train with this batch instead of the plans' (which this small dataset caps at 2)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--trainers", nargs="+",
                   default=["nnUNetTrainer", "nnUNetTrainerBiCLIP_noIAC", "nnUNetTrainerBiCLIP",
                            "nnUNetTrainerBiCLIP_mapOnly", "nnUNetTrainerBiCLIP_endToEnd"])
    p.add_argument("--repeats", type=int, default=1,
                   help="time the trainer list this many times in turn; ratios per repeat, median and range")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_step.json"))
    a = p.parse_args(argv)
    if a.batch_size is not None and a.batch_size < 1:
        p.error(f"--batch_size must be 1 or more (samples per step), got {a.batch_size}")
    if a.repeats < 1:
        p.error(f"--repeats must be 1 or more, got {a.repeats}")
    root = Path(a.root)
    env = ensure_dataset(root, a.dataset_id, a.size)
    os.environ.update({k: v for k, v in env.items() if k.startswith("nnUNet") or k == "HF_HUB_OFFLINE"})
    # Each trainer in its own process: peak memory (ru_maxrss) is per process.
    runs: list[list[dict]] = []
    for repeat in range(a.repeats):
        runs.append([])
        for name in a.trainers:
            out = run_command([sys.executable, __file__, "--_one", name, "-d", str(a.dataset_id), "--iters",
                               str(a.iters), "--warmup", str(a.warmup), "--device", a.device,
                               "--batch_size", str(a.batch_size or 0)], os.environ, capture=True,
                              echo=False)
            runs[-1].append(json.loads(out.stdout.strip().splitlines()[-1]))
            if a.repeats > 1:
                print(f"repeat {repeat + 1}/{a.repeats}: {name} {runs[-1][-1]['s_per_iter']:.3f} s/iter", flush=True)
    rows = combine_repeats(runs)
    base = rows[0]
    import torch
    print(f"\nTrain step, {a.device}, torch {torch.__version__}, {os.cpu_count()} CPUs, patch {base['patch_size']}, "
          f"batch {base['batch_size']}, {a.iters} timed iterations (after {a.warmup} warm-up)"
          + (f", median of {a.repeats} repeats (ratio range in brackets)" if a.repeats > 1 else "") + "\n")
    print("| trainer | s/iter | × nnUNetTrainer | peak mem (MiB) | × mem | params (M) | pathway warm-up (s/step × steps) "
          "| launching ops / step | × ops | host reads / step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        r["mem_ratio"] = r["peak_mem_mib"] / base["peak_mem_mib"]
        warm = "–" if not r.get("warmup_s_per_step") else \
            f"{r['warmup_s_per_step']:.3f} × {r['warmup_steps']} = {r['warmup_s_per_step'] * r['warmup_steps']:.0f} s"
        r["ops_ratio"] = r["launching_ops"] / base["launching_ops"]
        spread = "" if len(r["time_ratio_runs"]) < 2 else \
            f" ({min(r['time_ratio_runs']):.2f}–{max(r['time_ratio_runs']):.2f})"
        print(f"| {r['trainer']} | {r['s_per_iter']:.3f} | {r['time_ratio']:.2f}{spread} | {r['peak_mem_mib']:.0f} | "
              f"{r['mem_ratio']:.2f} | {r['params_m']:.2f} | {warm} | {r['launching_ops']:.0f} | {r['ops_ratio']:.2f} | "
              f"{r['host_reads']:.1f} |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"device": a.device, "torch": torch.__version__, "cpus": os.cpu_count(),
                                       "platform": platform.platform(), "rows": rows}, indent=2))
    print(f"\nwritten: {a.out}")


if __name__ == "__main__":
    if "--_one" in sys.argv:
        i = sys.argv.index("--_one")
        name = sys.argv[i + 1]
        args = sys.argv[i + 2:]
        q = argparse.ArgumentParser()
        q.add_argument("-d", type=int)
        q.add_argument("--iters", type=int)
        q.add_argument("--warmup", type=int)
        q.add_argument("--device")
        q.add_argument("--batch_size", type=int)
        b = q.parse_args(args)
        import io
        import contextlib
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            res = time_trainer(name, b.d, b.device, b.iters, b.warmup, b.batch_size or None)
        print(json.dumps(res))
    else:
        try:
            main()
        except TextSegError as err:  # a failed command: its output's last lines, not a traceback
            sys.exit(f"train_step: {err}")
