"""Does the report help? Train text-guided and plain nnU-Net trainers on label fractions of one dataset,
predict clean and degraded test sets, evaluate with nnUNetv2_evaluate_folder, tabulate and plot. Not a test.

    python benchmarks/text_vs_vision.py [--preset cpu|full|smoke] [--out benchmarks/results/text_vs_vision]
        [--trainers T ...] [--fractions 5 25 100] [--conditions clean lowdose motion] [--control | --no-control]
        [--n_train N] [--n_test N] [--size PX] [--device cpu|cuda] [--seed S] [--dataset ID] [--fresh] [--force]
        [--report_variants | --no-report_variants]

Everything goes through the real commands (nnUNetv2_textseg_make_demo, nnUNetv2_plan_and_preprocess,
nnUNetv2_train, nnUNetv2_textseg_predict for text trainers - names containing "BiCLIP" or "MedCLIPSeg" -,
nnUNetv2_predict for the others, nnUNetv2_evaluate_folder), each with its output in OUT/logs/<step>.log; a
failing command prints its log's tail and stops the run. Outputs: OUT/results.json (updated after every
evaluation), OUT/results.md (Markdown table(s), also printed at the end) and OUT/results.png.

Data
  Default: the demo dataset (synthetic chest radiographs with reports) is generated as dataset --demo_id
  (default 990) and planned/preprocessed (2d) with nnUNet_raw/_preprocessed/_results in OUT/work, so nothing
  of yours is touched. --dataset ID uses an existing dataset instead: then YOUR nnUNet_raw/_preprocessed/
  _results env vars are used (they must be set), nothing is generated, plan_and_preprocess only runs if the
  dataset has no 2d configuration yet, the test set is imagesTs/labelsTs (+ reportsTs.csv for text
  trainers) of the raw dataset, and the control row is not available. The benchmark's splits_final.json
  then stays in your preprocessed folder (see below): restore your backup (or delete it) before training
  your own folds. nnUNet_extTrainer is always set to the package's trainer folder (nnUNetv2_textseg_env prints it).

Label fractions without copying data
  nnU-Net keys results by trainer/plans/configuration/fold, so ONE splits_final.json is written into the
  preprocessed dataset folder whose entry i is {"train": subsample_split(base_train, fraction_i, seed),
  "val": base_val}, and fraction i is trained as "fold i". Base = nnU-Net's default fold 0
  (generate_crossval_split on the sorted case ids, seed 12345, 5 folds), so every fraction validates on the
  same cases and, for one seed, the training subsets are nested (5 % in 25 % in 100 %). The fraction->fold
  mapping is stored in results.json; later runs with more fractions append entries and never renumber
  existing ones (so trained folds stay valid). A splits_final.json this script did not write (no matching
  splits_final_text_vs_vision.json record) is refused unless --force, which first backs it up as
  splits_final.before_text_vs_vision.json. Fold folders in nnUNet_results not trained by this script are
  never reused nor overwritten (error).

Conditions
  clean (imagesTs), lowdose (DL3: 5e3 photons per detector bin, projection-domain simulation), motion (K7:
  7-pixel linear blur), gaussian (0.1 x image std); "kind:level" picks another level, e.g. lowdose:DL4 or
  motion:K11. Degraded copies (OUT/work/degraded/...) are made once by robustness.degrade_folder with --seed
  and carry the test reports (reports.csv), so text trainers get each case's report under every condition.

Control row
  --control (on in the cpu/full presets) also generates the same demo dataset in control mode (dataset
  --demo_id + 1: same seed -> same images and masks, but every case carries another case's report) and
  trains every text trainer on it at --control_fraction of the labels (default 100 %; the same label subset as
  the real dataset's at that fraction); its clean test Dice is the row "<trainer> (control reports)" at that
  fraction. If text helps, that row falls to (or below) the plain baseline.

Report variants
  --report_variants (on in the cpu/full presets, off in smoke) asks how each text trainer (BiCLIP/MedCLIPSeg)
  at 100 % of the labels reacts to the quality of the report: the clean test images are predicted once per
  variant kind of nnunetv2_textseg.report_variants (original, contradictory, missing_location,
  overdescriptive, underdescriptive; tables OUT/work/report_variants/<dataset>/reports_<kind>.csv made from
  the test reports with --seed), with --save_uncertainty (and --mc_samples 8 for sampling MedCLIPSeg trainers; these
  predictions use nnU-Net's multiprocess path, which writes the maps, with at least one worker). Dice by
  nnUNetv2_evaluate_folder; mean predictive entropy over all pixels of all cases and over the predicted
  foreground, from OUT/.../uncertainty/CASE_entropy.nii.gz. Stored under "report_variant_entries" in
  results.json (resumable like the rest) and tabulated as a second table in results.md (trainer x variant:
  Dice, Δ Dice vs original, entropies). A trustworthy model's uncertainty should rise when its report
  contradicts the image; the table only reports what is measured. Needs 100 % among the fractions.

Resume
  results.json is written atomically after every evaluated (trainer, fraction, condition). A re-run skips
  evaluations already in it, and training whenever the fold's checkpoint_final.pth exists and was trained by
  this script on the same split. Changing the data settings (dataset, n_train, n_test, size, seed) for an
  existing OUT is refused; --fresh deletes OUT's previous results (and OUT/work) and starts over.

Presets (every value can be overridden by the flags)
  smoke  tests: 8 train / 4 test cases, 64 px, nnUNetTrainer_debug vs nnUNetTrainerBiCLIP_debug, 100 %,
         clean + motion, no control (~2-4 min on 2 CPU cores; a re-run resumes in seconds).
  cpu    64 px, 60 train / 30 test, nnUNetTrainer_demo vs nnUNetTrainerBiCLIP_demo vs
         nnUNetTrainerMedCLIPSeg_demo, fractions 5 25 100, clean lowdose motion, control on (both text trainers),
         report variants on. 11 trainings of 30 x 25 iterations (3 trainers x 3 fractions + 2 controls); on 2 CPU
         cores a plain one takes ~3-5 min, a BiCLIP one ~7-9 min (text encoder, pseudo-image generator, second
         augmented view) and a MedCLIPSeg one ~5-9 min, plus 29 predictions + evaluations (~20-30 s each) and
         10 report-variant predictions with uncertainty maps (MedCLIPSeg's with 8 Monte-Carlo samples):
         roughly 100-120 min. The _noText ablations (same network, no report) are not in the preset; add them
         with --trainers when you have the time (they answer "is it the report or the extra network?").
  full   GPU (-device cuda): 128 px, 400 train / 100 test, nnUNetTrainer, nnUNetTrainerBiCLIP and its
         ablations _noIAC _noCycle _unidirectional _noText, nnUNetTrainerMedCLIPSeg and its _noProb and _noText
         ablations, fractions 1 5 10 25 100, control on, report variants on (5 predictions per text trainer).
         These are nnU-Net's full 1000-epoch schedules: 9 x 5 + 8 = 53 trainings, i.e. days on one GPU;
         shorten with e.g. --trainers nnUNetTrainer_100epochs nnUNetTrainerBiCLIP_100epochs ...
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

# This file is the command line and the order of the steps; the pieces are in benchmarks/runner/: presets.py
# (what runs), state.py (results.json, resume), run.py (the steps as real nnU-Net commands), tables.py (results.md,
# results.png).
from nnunetv2_textseg.atomic import atomic_write_text  # noqa: E402
from nnunetv2_textseg.errors import TextSegError  # noqa: E402
from nnunetv2_textseg.robustness import parse_fraction  # noqa: E402

from benchmarks.runner import BenchmarkError  # noqa: E402
from benchmarks.runner.presets import (CONFIGURATION, CONTROL_SUFFIX, DEFAULT_OUT, PLANS, PRESETS,  # noqa: E402
                                       apply_preset, default_baseline, fraction_key, fraction_label,
                                       is_text_trainer, parse_condition, parse_variant_reports)
from benchmarks.runner.run import SPLITS_FILE, Runner  # noqa: E402
from benchmarks.runner.state import State, git_commit, machine_info  # noqa: E402
from benchmarks.runner.tables import markdown, plot  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu", help="default: cpu")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    p.add_argument("--dataset", type=int, default=None,
                   help="existing dataset id (uses YOUR nnUNet_raw/_preprocessed/_results); default: demo data")
    p.add_argument("--demo_id", type=int, default=990, help="dataset id of the generated demo data (control: +1)")
    p.add_argument("--trainers", nargs="+", default=None)
    p.add_argument("--baseline", default=None, help="trainer the differences refer to (default: first nnUNetTrainer*)")
    p.add_argument("--fractions", nargs="+", default=None, help="label fractions: 5, 5%%, 0.05; note 1 = 100%%, so write one percent as 1%% or 0.01")
    p.add_argument("--conditions", nargs="+", default=None,
                   help="clean, lowdose (DL3), motion (K7), gaussian (0.1) or kind:level, e.g. lowdose:DL4")
    p.add_argument("--control", action=argparse.BooleanOptionalAction, default=None,
                   help="also train every text trainer on control reports (demo data only)")
    p.add_argument("--control_fraction", default="100",
                   help="label fraction the control rows train on (default 100; e.g. 5 for a few-labels control)")
    p.add_argument("--report_variants", action=argparse.BooleanOptionalAction, default=None,
                   help="also predict the clean test set of each text trainer at 100 %% with every report variant "
                        "(original, contradictory, missing_location, overdescriptive, underdescriptive) and "
                        "--save_uncertainty; Dice and mean entropy per variant (on in the cpu/full presets)")
    p.add_argument("--variant_reports", nargs="+", default=None, metavar="KIND=FILE",
                   help="your own report-variant tables of the test cases (e.g. BUSUC's Test_text_<kind>.xlsx) "
                        "instead of generated ones; implies --report_variants")
    p.add_argument("--n_train", type=int, default=None)
    p.add_argument("--n_test", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="demo image side length (px)")
    p.add_argument("--device", default=None, help="cpu, cuda or mps")
    p.add_argument("--seed", type=int, default=None, help="demo data, subsampling and degradation seed")
    p.add_argument("--num_processes", type=int, default=None,
                   help="processes for preprocessing, prediction and evaluation (default: 1 per 2 CPUs, 1..4; "
                        "1 = nnU-Net's sequential prediction without worker processes)")
    p.add_argument("--n_proc_da", type=int, default=None,
                   help="nnUNet_n_proc_DA for training (default: yours, else 1 on CPU, else nnU-Net's)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="set the generated demo dataset's planned 2d batch size (nnU-Net plans it from the number of "
                        "cases; a few labelled cases would get 2). Demo data only.")
    p.add_argument("--patch_size", type=int, default=None,
                   help="set the generated demo dataset's planned 2d patch (side length, px) below --size: the "
                        "large-image condition, where training crops and prediction tiles each see part of the image. "
                        "Demo data only.")
    p.add_argument("--fresh", action="store_true", help="delete OUT's earlier results (and OUT/work) first")
    p.add_argument("--force", action="store_true",
                   help="--dataset: replace your splits_final.json (backed up) with the benchmark's")
    a = p.parse_args(argv)
    apply_preset(a, PRESETS[a.preset])
    a.out = a.out.resolve()
    if a.num_processes is None:
        a.num_processes = max(1, min(4, (os.cpu_count() or 2) // 2))
    try:
        a.fraction_values = list(dict.fromkeys(parse_fraction(f) for f in a.fractions))
        a.control_fraction_value = parse_fraction(a.control_fraction)
    except ValueError as err:
        p.error(str(err))
    try:
        a.condition_specs = list({c["name"]: c for c in map(parse_condition, a.conditions)}.values())
    except BenchmarkError as err:
        p.error(str(err))
    if a.baseline is None:
        a.baseline = default_baseline(a.trainers)
    try:
        a.variant_tables = parse_variant_reports(a.variant_reports) if a.variant_reports else None
    except BenchmarkError as err:
        p.error(str(err))
    if a.variant_tables:
        a.report_variants = True
    if a.patch_size is not None and (a.dataset is not None or not 0 < a.patch_size <= a.size):
        p.error(f"--patch_size must be between 1 and --size ({a.size}) and needs the generated demo data (no "
                f"--dataset): your own dataset's plans are never edited.")
    if a.dataset is not None and a.control:
        print("Note: --control needs the generated demo data; no control row for --dataset.", flush=True)
        a.control = False
    return a


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg = parse_args(argv)
    out = cfg.out
    if cfg.fresh:
        for name in ("results.json", "results.md", "results.png", "logs", "work"):
            target = out / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)
    state = State(out / "results.json")
    data_settings = {"dataset": cfg.dataset, "demo_id": cfg.demo_id if cfg.dataset is None else None,
                     "n_train": cfg.n_train if cfg.dataset is None else None,
                     "n_test": cfg.n_test if cfg.dataset is None else None,
                     "size": cfg.size if cfg.dataset is None else None, "seed": cfg.seed,
                     "batch_size": cfg.batch_size if cfg.dataset is None else None,
                     **({"patch_size": cfg.patch_size} if cfg.patch_size else {})}  # older results.json: no key
    if state.data.get("data_settings") not in (None, data_settings):
        raise BenchmarkError(f"{out} holds results for other data settings ({state.data['data_settings']}, now "
                             f"{data_settings}); use another --out, or --fresh to start over there.")
    text_trainers = [t for t in cfg.trainers if is_text_trainer(t)]
    control_trainers = text_trainers if cfg.control else []
    if cfg.control and not control_trainers:
        print("Note: --control needs a text trainer (BiCLIP/MedCLIPSeg) in --trainers; no control row.", flush=True)
    state.data.update({
        "benchmark": "text_vs_vision", "commit": git_commit(), "machine": machine_info(cfg.device),
        "data_settings": data_settings,
        "settings": {"preset": cfg.preset, "dataset": cfg.dataset, "demo_id": cfg.demo_id, "trainers": cfg.trainers,
                     "baseline": cfg.baseline, "fractions": cfg.fraction_values, "conditions": cfg.condition_specs,
                     "control": bool(control_trainers),
                     "control_labels": [t + CONTROL_SUFFIX for t in control_trainers],
                     **({"control_fraction": cfg.control_fraction_value} if control_trainers else {}),
                     "report_variants": bool(cfg.report_variants and text_trainers),
                     "variant_reports": ({k: str(v) for k, v in cfg.variant_tables.items()}
                                         if cfg.variant_tables else None),
                     "n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "device": cfg.device,
                     "seed": cfg.seed, "configuration": CONFIGURATION, "plans": PLANS,
                     "num_processes": cfg.num_processes, "batch_size": cfg.batch_size,
                     "patch_size": cfg.patch_size}})
    state.start_run(argv)
    runner = Runner(cfg, state)
    state.data["settings"]["env"] = {k: runner.env.get(k) for k in ("nnUNet_n_proc_DA", "nnUNet_def_n_proc")}
    t0 = time.time()

    # dataset(s)
    if cfg.dataset is None:
        dataset_id = cfg.demo_id
        raw = runner.prepare_demo(dataset_id, control=False)
    else:
        dataset_id = cfg.dataset
        raw = runner.dataset_folder(runner.raw_root, dataset_id)
        if raw is None:
            raise BenchmarkError(f"No Dataset{dataset_id:03d}_* in nnUNet_raw={runner.raw_root}.")
        runner.plan_and_preprocess(dataset_id, demo=False)
    state.data["dataset"] = {"id": dataset_id, "name": raw.name, "raw": str(raw)}
    mapping = runner.write_splits(dataset_id, cfg.fraction_values, ours=cfg.dataset is None)
    state.data["fraction_folds"] = mapping
    state.save()
    print("Label fraction -> fold: " + ", ".join(f"{fraction_label(m['fraction'])} -> fold {m['fold']} "
                                                 f"({m['n_train']} train / {m['n_val']} val)" for m in mapping.values()),
          flush=True)

    needs_reports = bool(text_trainers)
    folders = {c["name"]: runner.condition_folder(raw, c, needs_reports) for c in cfg.condition_specs}

    if cfg.variant_tables:  # checked now, not after hours of training
        runner.user_variant_tables(raw, cfg.variant_tables)

    for fraction in cfg.fraction_values:
        split = mapping[fraction_key(fraction)]
        for trainer in cfg.trainers:
            runner.train(dataset_id, trainer, split)
            for cond in cfg.condition_specs:
                images, reports = folders[cond["name"]]
                runner.predict_and_evaluate(dataset_id, raw, trainer, trainer, split, cond, images, reports)

    if cfg.report_variants and text_trainers:
        full = mapping.get(fraction_key(1.0))
        if full is None:
            print("Note: --report_variants uses the 100 % models; add 100 to --fractions. No report-variant table.",
                  flush=True)
        else:
            images, reports = folders["clean"] if "clean" in folders else runner.condition_folder(
                raw, {"name": "clean", "kind": None, "level": None}, True)
            tables = cfg.variant_tables or runner.variant_tables(raw, reports)
            for trainer in text_trainers:
                for kind, table in tables.items():
                    runner.predict_report_variant(dataset_id, raw, trainer, full, kind, images, table)
    elif cfg.report_variants:
        print("Note: --report_variants needs a text trainer (BiCLIP/MedCLIPSeg) in --trainers.", flush=True)

    if control_trainers:
        control_id = cfg.demo_id + 1
        control_raw = runner.prepare_demo(control_id, control=True)
        control_key = fraction_key(cfg.control_fraction_value)
        control_map = runner.write_splits(control_id, [cfg.control_fraction_value], ours=True)
        split = control_map[control_key]
        state.data["dataset"]["control"] = {"id": control_id, "name": control_raw.name, "fold": split["fold"]}
        state.save()
        clean = {"name": "clean", "kind": None, "level": None}
        images, reports = runner.condition_folder(control_raw, clean, True)
        for control_trainer in control_trainers:
            runner.train(control_id, control_trainer, split)
            runner.predict_and_evaluate(control_id, control_raw, control_trainer, control_trainer + CONTROL_SUFFIX,
                                        split, clean, images, reports)
        if control_key not in mapping:  # the control's fraction must appear in the table
            state.data["fraction_folds"][control_key] = {**split, "fold": None, "note": "control only"}

    state.finish_run(time.time() - t0)
    table = markdown(state.data)
    atomic_write_text(out / "results.md", table)
    plot(state.data, out / "results.png")
    print("\n" + table)
    if cfg.dataset is not None:
        print(f"Note: {runner.dataset_folder(runner.pre_root, dataset_id) / SPLITS_FILE} is the benchmark's "
              f"(one entry per label fraction); restore your own before training your folds.")
    print(f"results: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'} "
          f"({state.run['seconds']:.0f} s this run)")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except TextSegError as err:  # ours, the harness's (a failed command: its log's last lines), the package's
        sys.exit(f"text_vs_vision: {err}")
