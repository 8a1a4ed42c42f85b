"""Few labels, several seeds: does the report pay where labels are scarce? Not a test.

    python benchmarks/low_label.py [--preset cpu|full|smoke] [--seeds 0 1 2] [--out benchmarks/results/low_label]
        [--trainers T ...] [--fractions 5 10 ...] [--conditions clean lowdose motion] [--n_train N] [--n_test N]
        [--control [--control_fraction F]] [--repeats N] [--no-diagnose]

For every seed, ``text_vs_vision.py`` (the one experiment runner: real nnU-Net commands, same splits for
every trainer, degraded test copies) runs into OUT/seed_S with ``--seed S`` — a fresh demo dataset, label
subsets and degradations per seed — so every cell of the final table is a mean ± std over seeds. Then
``nnUNetv2_textseg_diagnose`` runs on every text model (real / shuffled / contradictory / null test
reports: Dice, pseudo-image AUC over the image and within the lesion-prone region, text sensitivity,
reliance). Outputs: OUT/low_label.json, OUT/low_label.md (also printed) and OUT/low_label.png.

``--repeats N`` trains every model N times per seed on the same data (OUT/seed_S_runR) and pairs the means: one
training is noisy on 2 CPU cores (plain nnU-Net, trained twice on identical data and splits, moved by 0.024 Dice on
clean and 0.069 on motion-blurred test images on average over three seeds), and a Δ paired with a single baseline
training carries that noise. The rows also give the std between one model's trainings.

``--control`` (off by default) also trains every text trainer on control reports (a demo dataset whose reports
belong to other cases; ``--control_fraction`` of its labels, default 100 %), per seed: rows "<trainer> (control
reports)" at that fraction / clean, with their paired Δ to the baseline at that fraction (which --fractions must
hold). If the report helps, that row falls to
(or below) the baseline.

"Few labels" means enough to learn from: with the cpu preset's 500 demo training cases, nnU-Net's fold 0
trains on 400, so 5 % is 20 labelled cases and 10 % is 40. nnU-Net plans the batch size from the number of
cases (25 for 500); the cpu preset sets the 2 it plans for a few labelled cases (``--batch_size``).

Presets
  smoke  2 seeds, 40 train / 6 test cases, _debug trainers, 100 %, clean (tests; a few minutes).
  cpu    3 seeds, 500 train / 40 test, 64 px, nnUNetTrainer_demo, nnUNetTrainerBiCLIP_demo,
         nnUNetTrainerMedCLIPSeg_demo, fractions 5 10, clean lowdose motion: 18 trainings of 750
         iterations (~4-8 min each on 2 CPU cores) + predictions + diagnosis, about 2-2.5 hours.
         Add 25 100 and the _safeAug trainers with --fractions / --trainers when there is time.
  full   GPU: 3 seeds, 500 train / 100 test, 128 px, nnU-Net's 100-epoch schedules of plain nnU-Net
         (default and safe-mode augmentation), BiCLIP and MedCLIPSeg (and their _safeAug), fractions
         5 10 25 100, clean lowdose motion.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
BENCH = Path(__file__).resolve().parent

from nnunetv2_textseg.atomic import atomic_write, atomic_write_text  # noqa: E402
from nnunetv2_textseg.errors import TextSegError  # noqa: E402
from nnunetv2_textseg.harness import CommandError, nnunet_env, run_command  # noqa: E402
from nnunetv2_textseg.robustness import parse_fraction  # noqa: E402

from benchmarks.runner.presets import LOW_LABEL_OUT as DEFAULT_OUT  # noqa: E402
from benchmarks.runner.presets import LOW_LABEL_PRESETS as PRESETS  # noqa: E402
from benchmarks.runner.presets import CONTROL_SUFFIX, apply_preset, fraction_label, is_text_trainer  # noqa: E402

# Place-free reports that neither the demo's report pool, the diagnosis's variants nor the training rewrites use
# (fixed before any result was seen): a model that learnt those by heart is still tested on "no place" wording.
UNSEEN_PHRASINGS = ("Findings consistent with pneumonia.", "Lung opacities are present.",
                    "Signs of infection in the lungs.")
UNSEEN_NEGATIVE_PHRASING = "No acute findings."


def run_seed(cfg: argparse.Namespace, seed: int, repeat: int = 0) -> dict:
    """One seed's text_vs_vision.py run into OUT/seed_S (``repeat`` r > 0: OUT/seed_S_run{r + 1}, the same data,
    splits and degradations, every model trained again)."""
    out = cfg.out / (f"seed_{seed}" if repeat == 0 else f"seed_{seed}_run{repeat + 1}")
    cmd = [sys.executable, str(BENCH / "text_vs_vision.py"), "--preset", "smoke", "--out", str(out),
           "--seed", str(seed), "--trainers", *cfg.trainers, "--fractions", *cfg.fractions,
           "--conditions", *cfg.conditions, "--n_train", str(cfg.n_train), "--n_test", str(cfg.n_test),
           "--size", str(cfg.size), "--device", cfg.device, "--control" if cfg.control else "--no-control",
           "--control_fraction", cfg.control_fraction, "--no-report_variants"]
    if cfg.batch_size:
        cmd += ["--batch_size", str(cfg.batch_size)]
    if cfg.patch_size:
        cmd += ["--patch_size", str(cfg.patch_size)]
    print(f"[low_label] seed {seed}{f' (training {repeat + 1})' if repeat else ''}: {' '.join(cmd[2:])}", flush=True)
    run_command(cmd, dict(os.environ), echo=False)  # its progress on our console; a failure stops the run
    return json.loads((out / "results.json").read_text())


def diagnose_seed(cfg: argparse.Namespace, seed: int, data: dict) -> list[dict]:
    """nnUNetv2_textseg_diagnose on every text model of this seed (clean test images, their reports); a model whose
    diagnosis fails is reported and left out."""
    out = cfg.out / f"seed_{seed}"
    raw = Path(data["dataset"]["raw"])
    env = nnunet_env(out / "work")  # the seed's demo data and models, where text_vs_vision.py put them
    rows = []
    for key, m in data["fraction_folds"].items():
        if m.get("fold") is None:
            continue
        for trainer in (t for t in cfg.trainers if is_text_trainer(t)):
            target = out / "diagnosis" / trainer / f"fold_{m['fold']}"
            result_file = target / "diagnosis.json"
            if not result_file.is_file():
                cmd = ["nnUNetv2_textseg_diagnose", "-d", str(data["dataset"]["id"]),
                       "-c", "2d", "-f", str(m["fold"]), "-tr", trainer, "-i", str(raw / "imagesTs"),
                       "-ref", str(raw / "labelsTs"), "-o", str(target), "-device", cfg.device, "--seed", str(seed)]
                if cfg.phrasings:
                    cmd += ["--phrasings", *cfg.phrasings, "--negative_phrasing", cfg.negative_phrasing]
                print(f"[low_label] diagnose seed {seed} {trainer} {m['fraction']:.0%}", flush=True)
                try:
                    run_command(cmd, env, out / "logs" / f"diagnose_{trainer}_fold{m['fold']}.log", echo=False)
                except CommandError as err:
                    print(err, flush=True)
                    continue
            rows.append(diagnosis_row(seed, trainer, m["fraction"], json.loads(result_file.read_text())))
    return rows


def diagnosis_row(seed: int, trainer: str, fraction: float, res: dict) -> dict:
    """One model's diagnosis.json as a flat row: ``dice_<variant>``, ``auc_<variant>`` (pseudo-image AUC over all
    pixels), ``region_auc_<variant>`` (within the pixels that are lesion in at least one test case) and
    ``side_pseudo_<variant>`` / ``side_pred_<variant>`` (one-sided cases: share whose lesion half is higher in the
    pseudo-image / predicted probability; real and contradictory report). The AUCs are null for a model without a
    pseudo-image (MedCLIPSeg) and the region AUC and side absent in diagnoses of earlier versions: those keys are
    then left out."""
    row = {"seed": seed, "trainer": trainer, "fraction": fraction,
           **{f"dice_{v}": d for v, d in res["dice"].items()}}
    for key, prefix in (("pseudo_image_auc", "auc"), ("pseudo_image_auc_lesion_region", "region_auc")):
        row.update({f"{prefix}_{v}": a for v, a in (res.get(key) or {}).items()})
    if res.get("lesion_region_fraction") is not None:
        row["lesion_region_fraction"] = res["lesion_region_fraction"]
    row.update(text_sensitivity=res["text_sensitivity"], reliance=res["reliance"])
    # the side (diagnoses since the side score): share of one-sided cases whose lesion half is higher
    for what, prefix in (("pseudo_image", "side_pseudo"), ("prediction", "side_pred")):
        for v, score in ((res.get("side") or {}).get(what) or {}).items():
            if score is not None:
                row[f"{prefix}_{v}"] = score["named_side_brighter"]
    return row


def _ms(values: list[float]) -> str:
    v = np.asarray([x for x in values if x is not None and x == x], dtype=float)
    if v.size == 0:
        return "–"
    return f"{v.mean():.4f} ± {v.std(ddof=1) if v.size > 1 else 0.0:.4f}"


def aggregate(cfg: argparse.Namespace, per_seed: dict[int, dict | list[dict]], diag: list[dict]) -> dict:
    """Rows of mean ± std over seeds and Δ paired by seed with the baseline. ``per_seed[s]``: one run's results, or
    the list of a seed's repeated trainings (``--repeats``), whose Dice per model is then their mean."""
    runs_of = {seed: (data if isinstance(data, list) else [data]) for seed, data in per_seed.items()}
    per_run: dict[tuple, dict[int, list]] = {}
    n_train: dict[tuple, int] = {}
    for seed, runs in runs_of.items():
        for data in runs:
            for e in data["entries"]:
                key = (e["label"], e["fraction"], e["condition"])
                per_run.setdefault(key, {}).setdefault(seed, []).append(e["dice"])
                n_train[key] = e["n_train"]
    cells = {key: [(seed, float(np.mean(v)), n_train[key]) for seed, v in seeds.items()]
             for key, seeds in per_run.items()}
    baseline = next((t for t in cfg.trainers if not is_text_trainer(t) and "safeAug" not in t), None)
    rows = []
    for (label, fraction, cond), vals in sorted(cells.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
        dice = {s: d for s, d, _ in vals}
        base = {s: d for s, d, _ in cells.get((baseline, fraction, cond), [])}
        delta = [dice[s] - base[s] for s in dice if s in base] if label != baseline else []
        rows.append({"trainer": label, "fraction": fraction, "condition": cond, "n_train": vals[0][2],
                     "seeds": sorted(dice), "dice": [dice[s] for s in sorted(dice)],
                     "dice_mean": float(np.mean(list(dice.values()))),
                     "dice_std": float(np.std(list(dice.values()), ddof=1)) if len(dice) > 1 else 0.0,
                     "delta_vs_baseline": delta,
                     # each seed's trainings (more than one with --repeats) and their spread: one training's noise
                     "dice_runs": [per_run[(label, fraction, cond)][s] for s in sorted(dice)],
                     "run_std": _run_std(per_run[(label, fraction, cond)])})
    return {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(cfg).items()},
            "commit": next((runs[0].get("commit") for runs in runs_of.values()), None), "baseline": baseline,
            "rows": rows, "diagnosis": diag}


def _run_std(runs_by_seed: dict[int, list]) -> float | None:
    """Std between trainings of the same model on the same data (ddof 1, pooled over the seeds); None with one
    training per seed."""
    groups = [np.asarray(v, dtype=float) for v in runs_by_seed.values() if len(v) > 1]
    if not groups:
        return None
    within = sum(((g - g.mean()) ** 2).sum() for g in groups) / sum(len(g) - 1 for g in groups)
    return float(np.sqrt(within))


def markdown(result: dict) -> str:
    s = result["settings"]
    lines = [f"# Few labels, {len(s['seeds'])} seeds (commit `{result['commit']}`)", "",
             f"Demo data {s['size']}² px"
             f"{' (planned patch ' + str(s['patch_size']) + '²: large-image condition)' if s.get('patch_size') else ''}"
             f", {s['n_train']} train / {s['n_test']} test cases per seed (a new dataset, "
             f"label subset and degradation per seed: {s['seeds']}); device {s['device']}. Dice: "
             f"`nnUNetv2_evaluate_folder` foreground mean; mean ± std over seeds; Δ: paired difference to "
             f"`{result['baseline']}` (same seed, fraction, condition).", "",
             "| fraction | condition | trainer | labelled cases | Dice | Δ Dice |", "|---:|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {100 * r['fraction']:g}% | {r['condition']} | {r['trainer']} | {r['n_train']} | "
                     f"{_ms(r['dice'])} | {_ms(r['delta_vs_baseline']) if r['delta_vs_baseline'] else '–'} |")
    if s.get("repeats", 1) > 1 and any(r.get("run_std") is not None for r in result["rows"]):
        spreads = ", ".join(f"{r['trainer']} {100 * r['fraction']:g}% {r['condition']} {r['run_std']:.4f}"
                            for r in result["rows"] if r.get("run_std") is not None)
        lines += ["", f"Every model was trained {s['repeats']} times per seed on the same data (OUT/seed_S_runR); a "
                      f"seed's Dice is the mean of its trainings. Std between trainings of one model (pooled over "
                      f"seeds): {spreads}."]
    if any(r["trainer"].endswith(CONTROL_SUFFIX) for r in result["rows"]):
        lines += ["", f"\"{CONTROL_SUFFIX.strip()}\": the text trainer trained and tested on the same images with "
                      f"every case's report taken from another case "
                      f"({_fraction_text(s.get('control_fraction', '100'))} of the labels; "
                      f"Δ to `{result['baseline']}` at that fraction, – without that row). If the report helps, this "
                      f"row falls to (or below) the baseline."]
    if result["diagnosis"]:
        lines += ["", "Does it read the report? `nnUNetv2_textseg_diagnose` on the clean test set (mean ± std over "
                      "seeds): Dice with the real, shuffled (another case's), contradictory, location-free, "
                      "generic (\"Pulmonary infection.\"), rephrased (place-free wordings never seen in training: "
                      "--phrasings; given the null report by the unfamiliar-report guard, as prediction does, and "
                      "'as given' without it) and no report; pixel AUC of BiCLIP's pseudo-image for "
                      "lesion vs background, over the whole image and within the lesion region (pixels that are "
                      "lesion in at least one test case: what a report can add beyond where lesions can be at all; "
                      "– for models without a pseudo-image); side: share of the cases with lesions in one half of "
                      "the image whose pseudo-image is higher in that half, with the real and the contradictory "
                      "report (which names the other side).", "",
                  "| fraction | trainer | Dice real | shuffled | contradictory | missing location | generic | "
                  "rephrased | rephrased as given | null | "
                  "AUC real | AUC shuffled | AUC contradictory | AUC in lesion region real | shuffled | null | "
                  "side real | side contradictory | text sensitivity |", "|---:|---|" + "---:|" * 17]
        keys = sorted({(d["fraction"], d["trainer"]) for d in result["diagnosis"]})
        for f, t in keys:
            ds = [d for d in result["diagnosis"] if d["fraction"] == f and d["trainer"] == t]
            cols = " | ".join(_ms([d.get(k) for d in ds]) for k in (
                "dice_real", "dice_shuffled", "dice_contradictory", "dice_missing_location",
                "dice_underdescriptive", "dice_rephrased", "dice_rephrased_as_given", "dice_null", "auc_real",
                "auc_shuffled", "auc_contradictory",
                "region_auc_real", "region_auc_shuffled", "region_auc_null", "side_pseudo_real",
                "side_pseudo_contradictory", "text_sensitivity"))
            lines.append(f"| {100 * f:g}% | {t} | {cols} |")
    return "\n".join(lines) + "\n"


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    groups = sorted({(r["fraction"], r["condition"]) for r in rows})
    trainers = list(dict.fromkeys(r["trainer"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4.5))
    width = 0.8 / max(1, len(trainers))
    for i, t in enumerate(trainers):
        xs, ms, ss = [], [], []
        for g, (f, c) in enumerate(groups):
            r = next((r for r in rows if r["trainer"] == t and r["fraction"] == f and r["condition"] == c), None)
            if r:
                xs.append(g + i * width)
                ms.append(r["dice_mean"])
                ss.append(r["dice_std"])
        ax.bar(xs, ms, width, yerr=ss, capsize=3, label=t)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{100 * f:g}%\n{c}" for f, c in groups], fontsize=8)
    ax.set_ylabel("Dice (mean ± std over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--seeds", nargs="+", type=int, default=None)
    p.add_argument("--trainers", nargs="+", default=None)
    p.add_argument("--fractions", nargs="+", default=None)
    p.add_argument("--conditions", nargs="+", default=None)
    p.add_argument("--n_train", type=int, default=None)
    p.add_argument("--n_test", type=int, default=None)
    p.add_argument("--size", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--batch_size", type=int, default=None,
                   help="planned 2d batch size of the demo data (cpu preset: 2, what nnU-Net plans for a few cases)")
    p.add_argument("--patch_size", type=int, default=None,
                   help="planned 2d patch of the demo data, below --size: the large-image condition (e.g. --size 128 "
                        "--patch_size 64)")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=False,
                   help="also train every text trainer on control (shuffled) reports of a control demo dataset, "
                        "--control_fraction of its labels, per seed (rows '<trainer> (control reports)'; default off)")
    p.add_argument("--control_fraction", default="100",
                   help="label fraction of the control rows (default 100; 5 for a few-labels control)")
    p.add_argument("--repeats", type=int, default=1,
                   help="train every model this many times per seed on the same data and pair means (one training "
                        "of plain nnU-Net moved by 0.02-0.07 Dice between two runs on identical data); the diagnosis "
                        "uses the first training")
    p.add_argument("--diagnose", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--phrasings", nargs="*", default=list(UNSEEN_PHRASINGS),
                   help="the diagnosis's 'rephrased' variant: place-free reports worded unlike the demo's report pool, "
                        "its variants and the training rewrites (none: no such row)")
    p.add_argument("--negative_phrasing", default=UNSEEN_NEGATIVE_PHRASING)
    cfg = p.parse_args(argv)
    if cfg.repeats < 1:
        p.error(f"--repeats must be 1 or more (trainings per model and seed), got {cfg.repeats}")
    try:  # checked here, before the first seed's hours of training, not when text_vs_vision.py reaches the control
        parse_fraction(cfg.control_fraction)
    except ValueError as err:
        p.error(f"--control_fraction: {err}")
    return apply_preset(cfg, PRESETS[cfg.preset])


def _fraction_text(fraction: str) -> str:
    """'5', '5%' or '0.05' -> '5%' (as typed if text_vs_vision.py will reject it)."""
    try:
        return fraction_label(parse_fraction(fraction))
    except ValueError:
        return str(fraction)


def _same_fraction(fraction: str, other: str) -> bool:
    try:
        return parse_fraction(fraction) == parse_fraction(other)
    except ValueError:  # text_vs_vision.py says what is wrong with it
        return False


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(argv)
    if cfg.control and not any(_same_fraction(f, cfg.control_fraction) for f in cfg.fractions):
        print(f"Note: the control rows are trained on {_fraction_text(cfg.control_fraction)} of the labels; add it to "
              f"--fractions for their Δ to the baseline.", flush=True)
    cfg.out.mkdir(parents=True, exist_ok=True)
    per_seed, diag = {}, []
    for seed in cfg.seeds:
        per_seed[seed] = [run_seed(cfg, seed, r) for r in range(cfg.repeats)]
        if cfg.diagnose:
            diag += diagnose_seed(cfg, seed, per_seed[seed][0])
        result = aggregate(cfg, per_seed, diag)  # written after every seed: a partial run still reports
        atomic_write_text(cfg.out / "low_label.json", json.dumps(result, indent=2))
        atomic_write_text(cfg.out / "low_label.md", markdown(result))
    plot(result, cfg.out / "low_label.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TextSegError as err:  # a failed seed run or a bad option: the message, not a traceback
        sys.exit(f"low_label: {err}")
