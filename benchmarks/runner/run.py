"""The benchmark's steps as real nnU-Net commands: make and plan the demo data, write the label-fraction splits,
train, make the degraded test folders, predict and evaluate (also with report variants). Every command goes through
:mod:`nnunetv2_textseg.harness` with its output in OUT/logs/<step>.log; every step is recorded in results.json
(:class:`~benchmarks.runner.state.State`) and skipped on a re-run when its result is there and still valid."""
from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import time
from pathlib import Path

from nnunetv2_textseg.harness import (CommandError, EvaluationSummary, evaluate_command, is_text_trainer, nnunet_env,
                                      prediction_command, read_summary, run_command)
from nnunetv2_textseg.robustness import (DEGRADATION_FILE, REPORTS_FILE, case_identifiers, default_splits,
                                         degrade_folder, resolve_level, subsample_split)

from benchmarks.runner import BenchmarkError
from benchmarks.runner.presets import (CONFIGURATION, CONTROL_NAME, DEMO_NAME, PLANS, VARIANT_MC_SAMPLES,
                                       fraction_key, fraction_label, samples_at_inference)
from benchmarks.runner.state import State, sha256_json, write_json_atomic

__all__ = ["Runner", "edit_demo_plans", "entropy_stats", "SPLITS_FILE", "SPLITS_RECORD", "SPLITS_BACKUP"]

SPLITS_FILE = "splits_final.json"
SPLITS_RECORD = "splits_final_text_vs_vision.json"  # proves splits_final.json is ours (sha256)
SPLITS_BACKUP = "splits_final.before_text_vs_vision.json"


class Runner:
    """One benchmark run's steps, in OUT (``cfg.out``): logs in OUT/logs, the demo data, degraded copies and
    predictions in OUT/work; ``cfg`` is text_vs_vision.py's parsed command line."""

    def __init__(self, cfg: argparse.Namespace, state: State):
        self.cfg = cfg
        self.state = state
        self.out: Path = cfg.out
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.work = self.out / "work"
        self.env = self._env()
        self.raw_root = Path(self.env["nnUNet_raw"])
        self.pre_root = Path(self.env["nnUNet_preprocessed"])
        self.res_root = Path(self.env["nnUNet_results"])

    # ---- environment and commands ------------------------------------------------------------
    def _env(self) -> dict[str, str]:
        cfg = self.cfg
        # The demo's own folders in OUT/work, never the user's; --dataset: the user's (they must be set). Worker
        # defaults (a value in the user's environment wins): on CPU, nnU-Net's 12 augmentation workers only compete
        # with training for the same cores; its pool for the final validation's export (and evaluation) is 8, and
        # on a small CPU machine starting 8 spawned workers costs more than the validation itself.
        env = nnunet_env(self.work if cfg.dataset is None else None, n_proc_da=1 if cfg.device == "cpu" else None,
                         def_n_proc=cfg.num_processes)
        if cfg.n_proc_da is not None:  # the flag wins over the user's environment
            env["nnUNet_n_proc_DA"] = str(cfg.n_proc_da)
        return env

    def evaluate(self, step: str, raw: Path, pred: Path) -> tuple[float, EvaluationSummary]:
        """nnUNetv2_evaluate_folder on a prediction folder; returns (seconds, its summary)."""
        t = self.run(f"evaluate_{step}", evaluate_command(raw / "labelsTs", pred, self.cfg.num_processes))
        return t, read_summary(pred)

    def run(self, step: str, cmd: list[str]) -> float:
        """Run one real command, output to OUT/logs/<step>.log; a failure is recorded in results.json and stops the
        run with the command, its exit code and its log's last lines."""
        try:
            done = run_command(cmd, self.env, self.logs / f"{step}.log", cwd=self.out, tail_lines=40)
        except CommandError as err:
            self.state.step(step, "failed", err.seconds, returncode=err.returncode)
            raise
        self.state.step(step, "ran", done.seconds)
        return done.seconds

    def skip(self, step: str, why: str) -> None:
        print(f"- skip {step}: {why}", flush=True)
        self.state.step(step, "skipped", reason=why)

    # ---- datasets ----------------------------------------------------------------------------
    def dataset_folder(self, root: Path, dataset_id: int) -> Path | None:
        found = sorted(p for p in root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir())
        return found[0] if found else None

    def prepare_demo(self, dataset_id: int, control: bool) -> Path:
        """Generate + plan/preprocess the demo dataset (once; recorded in results.json)."""
        cfg, done = self.cfg, self.state.data["done_steps"]
        key = f"make_demo_{dataset_id}"
        raw = self.dataset_folder(self.raw_root, dataset_id)
        if done.get(key) and raw is not None:
            self.skip(key, f"{raw} exists")
        else:
            started = self.state.data.setdefault("started_steps", {})
            leftovers = [old for root in (self.raw_root, self.pre_root, self.res_root)
                         for old in root.glob(f"Dataset{dataset_id:03d}_*")]
            if leftovers and not started.get(key):
                # not written by this benchmark's results.json (another run's folder, a link, the user's): never
                # deleted
                raise BenchmarkError(f"{leftovers[0]} exists but {self.state.path} did not create it: this benchmark "
                                     f"deletes only what it wrote. Move it away, or give another --out.")
            for old in leftovers:  # leftovers of our own interrupted run
                shutil.rmtree(old)
            started[key] = True
            self.state.save()
            done.pop(f"plan_and_preprocess_{dataset_id}", None)
            cmd = ["nnUNetv2_textseg_make_demo", "-d", str(dataset_id), "--name", CONTROL_NAME if control else DEMO_NAME,
                   "--n_train", str(cfg.n_train), "--n_test", str(cfg.n_test), "--size", str(cfg.size),
                   "--seed", str(cfg.seed), "--raw", str(self.raw_root)] + (["--control"] if control else [])
            self.run(key, cmd)
            done[key] = True
            self.state.save()
            raw = self.dataset_folder(self.raw_root, dataset_id)
        self.plan_and_preprocess(dataset_id, demo=True)
        return raw

    def plan_and_preprocess(self, dataset_id: int, demo: bool) -> None:
        done = self.state.data["done_steps"]
        key = f"plan_and_preprocess_{dataset_id}"
        pre = self.dataset_folder(self.pre_root, dataset_id)
        planned = pre is not None and (pre / f"{PLANS}.json").is_file() and (pre / f"{PLANS}_{CONFIGURATION}").is_dir()
        if planned and (done.get(key) or not demo):
            self.skip(key, f"{pre / (PLANS + '_' + CONFIGURATION)} exists")
            return
        if demo and pre is not None:
            shutil.rmtree(pre)  # an interrupted preprocessing of our own dataset
        self.run(key, ["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", CONFIGURATION,
                       "-np", str(self.cfg.num_processes), "-npfp", str(self.cfg.num_processes)])
        patch = getattr(self.cfg, "patch_size", None)
        if demo and (self.cfg.batch_size or patch):  # our own generated dataset only: a user's plans are never edited
            pre = self.dataset_folder(self.pre_root, dataset_id)
            plans_file = pre / f"{PLANS}.json"
            write_json_atomic(plans_file, edit_demo_plans(json.loads(plans_file.read_text()), self.cfg.batch_size,
                                                          patch, plans_file))
        done[key] = True
        self.state.save()

    # ---- label-fraction splits ---------------------------------------------------------------
    def write_splits(self, dataset_id: int, fractions: list[float], ours: bool) -> dict[str, dict]:
        """One splits_final.json, entry i = fraction i (nested subsets of nnU-Net's default fold 0)."""
        pre = self.dataset_folder(self.pre_root, dataset_id)
        ids = case_identifiers(pre)
        base = default_splits(ids, 5)[0]
        base_train, base_val = sorted(base["train"]), list(base["val"])
        path, record_path = pre / SPLITS_FILE, pre / SPLITS_RECORD
        record = json.loads(record_path.read_text()) if record_path.is_file() else None
        existing = json.loads(path.read_text()) if path.is_file() else None
        written_by_us = (existing is not None and record is not None
                         and record.get("sha256") == hashlib.sha256(path.read_bytes()).hexdigest())
        if existing is not None and not written_by_us:
            if ours:  # generated demo data: the split file is ours by construction
                existing = None
            elif not self.cfg.force:
                raise BenchmarkError(
                    f"{path} exists and was not written by this benchmark (no matching {record_path.name}). "
                    f"The benchmark needs its own splits_final.json (one entry per label fraction). Pass --force "
                    f"to back yours up as {SPLITS_BACKUP} and replace it, or use the demo data (omit --dataset).")
            else:
                backup = pre / SPLITS_BACKUP
                if backup.exists():
                    backup = pre / f"{SPLITS_BACKUP[:-5]}.{int(time.time())}.json"
                shutil.copyfile(path, backup)
                print(f"Backed up your {path.name} as {backup}", flush=True)
                existing = None
        splits = list(existing or [])
        mapping = {}
        for fraction in fractions:
            entry = {"train": subsample_split(base_train, fraction, self.cfg.seed), "val": base_val}
            fold = next((i for i, s in enumerate(splits)
                         if sorted(s["train"]) == entry["train"] and list(s["val"]) == base_val), None)
            if fold is None:
                splits.append(entry)
                fold = len(splits) - 1
            mapping[fraction_key(fraction)] = {"fraction": fraction, "fold": fold, "n_train": len(entry["train"]),
                                               "n_val": len(base_val), "split_sha256": sha256_json(entry)}
        if splits != existing:
            write_json_atomic(path, splits)
            write_json_atomic(record_path, {
                "written_by": "benchmarks/text_vs_vision.py", "seed": self.cfg.seed,
                "base": "nnU-Net default fold 0 (generate_crossval_split, sorted ids, seed 12345, 5 folds)",
                "folds": {str(m["fold"]): m["fraction"] for m in mapping.values()},
                "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
        return mapping

    # ---- training ----------------------------------------------------------------------------
    def train(self, dataset_id: int, trainer: str, split: dict) -> None:
        fold = split["fold"]
        step = f"train_{dataset_id}_{trainer}_fold{fold}"
        res = self.dataset_folder(self.res_root, dataset_id)
        fold_dir = (res / f"{trainer}__{PLANS}__{CONFIGURATION}" / f"fold_{fold}") if res is not None else None
        key = f"{dataset_id}/{trainer}/fold_{fold}"
        record = self.state.data["trained"].get(key)
        ours = record is not None and record.get("split_sha256") == split["split_sha256"]
        if fold_dir is not None and (fold_dir / "checkpoint_final.pth").is_file() and ours and record.get("finished"):
            self.skip(step, f"{fold_dir / 'checkpoint_final.pth'} exists")
            return
        if fold_dir is not None and fold_dir.exists():
            if record is None:  # a model this benchmark did not start (yours, another run's): never deleted
                raise BenchmarkError(f"{fold_dir} exists but was not trained by this benchmark (fold {fold} is its "
                                     f"{fraction_label(split['fraction'])} split). Move it away or use another trainer "
                                     f"name; the benchmark does not reuse or overwrite your models.")
            shutil.rmtree(fold_dir)  # our own stale or interrupted training
        self.state.drop_entries(dataset_id, trainer, fold)
        self.state.data["trained"][key] = {"split_sha256": split["split_sha256"], "fraction": split["fraction"],
                                           "finished": False}
        self.state.save()
        seconds = self.run(step, ["nnUNetv2_train", str(dataset_id), CONFIGURATION, str(fold), "-tr", trainer,
                                  "-device", self.cfg.device])
        self.state.data["trained"][key].update(finished=True, seconds=round(seconds, 1))
        self.state.save()

    # ---- test folders ------------------------------------------------------------------------
    def condition_folder(self, raw: Path, cond: dict, needs_reports: bool) -> tuple[Path, Path | None]:
        """(images folder, report table or None) of a condition; degraded copies made once."""
        images = raw / "imagesTs"
        if not images.is_dir() or not (raw / "labelsTs").is_dir():
            raise BenchmarkError(f"{raw} has no imagesTs/ and labelsTs/; the benchmark evaluates on the test set.")
        reports = raw / "reportsTs.csv"
        if cond["kind"] is None:
            return images, (reports if reports.is_file() else None)
        folder = self.work / "degraded" / raw.name / cond["name"]
        meta_file = folder / DEGRADATION_FILE
        n_images = len([p for p in images.iterdir() if p.is_file()])
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        step = f"degrade_{raw.name}_{cond['name']}"
        if (meta is not None and meta.get("kind") == cond["kind"] and meta.get("seed") == self.cfg.seed
                and meta.get("level_value") == resolve_level(cond["kind"], cond["level"])
                and len(meta.get("files", {})) == n_images):
            self.skip(step, f"{folder} exists")
        else:
            print(f"$ degrade_folder({images}, {folder}, kind={cond['kind']!r}, level={cond['level']!r}, "
                  f"seed={self.cfg.seed})", flush=True)
            t = time.time()
            degrade_folder(images, folder, cond["kind"], cond["level"], seed=self.cfg.seed, overwrite=True,
                           progress=False)
            self.state.step(step, "ran", time.time() - t)
        table = folder / REPORTS_FILE
        if needs_reports and not table.is_file():
            raise BenchmarkError(f"{folder} has no {REPORTS_FILE} (degrade_folder copies {reports} when it exists); "
                                 f"text trainers need the test reports.")
        return folder, (table if table.is_file() else None)

    # ---- prediction + evaluation -------------------------------------------------------------
    def predict_and_evaluate(self, dataset_id: int, raw: Path, trainer: str, label: str, split: dict, cond: dict,
                             images: Path, reports: Path | None) -> None:
        fraction, fold = split["fraction"], split["fold"]
        signature = {"split_sha256": split["split_sha256"], "kind": cond["kind"], "level": cond["level"],
                     "seed": self.cfg.seed if cond["kind"] else None, "dataset_id": dataset_id}
        old = self.state.entry(label, fraction, cond["name"])
        step = f"{dataset_id}_{trainer}_fold{fold}_{cond['name']}"
        if old is not None and old.get("signature") == signature:
            self.skip(f"predict_evaluate_{step}", f"Dice {old['dice']:.4f} already in results.json")
            return
        pred = self.work / "predictions" / raw.name / trainer / f"fold_{fold}" / cond["name"]
        if pred.exists():
            shutil.rmtree(pred)
        pred.mkdir(parents=True)  # nnUNetv2_textseg_predict's sequential mode (-npp 0 -nps 0) does not create it
        text = is_text_trainer(trainer)
        cmd = [prediction_command(trainer), "-i", str(images), "-o", str(pred),
               "-d", str(dataset_id), "-c", CONFIGURATION, "-p", PLANS, "-f", str(fold), "-tr", trainer,
               "-device", self.cfg.device, "--disable_progress_bar"]
        # one process: nnU-Net's sequential mode (no worker start-up, the fastest on small CPU machines)
        n = 0 if self.cfg.num_processes <= 1 else self.cfg.num_processes
        cmd += ["-npp", str(n), "-nps", str(n)]
        if text:
            if reports is None:
                raise BenchmarkError(f"No test reports for {images} (reportsTs.csv next to imagesTs); "
                                     f"{trainer} needs them.")
            cmd += ["-reports", str(reports)]
        t_pred = self.run(f"predict_{step}", cmd)
        t_eval, summary = self.evaluate(step, raw, pred)
        fg = summary.foreground_mean
        self.state.put_entry({
            "label": label, "trainer": trainer, "dataset_id": dataset_id, "fraction": fraction, "fold": fold,
            "n_train": split["n_train"], "condition": cond["name"], "dice": fg["Dice"], "iou": fg["IoU"],
            "n_cases": len(summary.cases), "text": text,
            "predicted_with": cmd[0], "predictions": str(pred), "signature": signature,
            "seconds": {"predict": round(t_pred, 1), "evaluate": round(t_eval, 1)}})
        print(f"  {label} @ {fraction_label(fraction)} / {cond['name']}: Dice {fg['Dice']:.4f}  IoU {fg['IoU']:.4f}",
              flush=True)

    # ---- report variants ---------------------------------------------------------------------
    def variant_tables(self, raw: Path, reports: Path | None) -> dict[str, Path]:
        """reports_<kind>.csv for every report-variant kind, made from the test reports (deterministic)."""
        from nnunetv2_textseg.report_variants import write_variant_tables
        if reports is None:
            raise BenchmarkError(f"No test reports (reportsTs.csv next to {raw / 'imagesTs'}); the report variants "
                                 f"are made from them.")
        folder = self.work / "report_variants" / raw.name
        before = {p.name: p.read_bytes() for p in folder.glob("reports_*.csv")} if folder.is_dir() else {}
        t = time.time()
        paths = write_variant_tables(reports, folder, seed=self.cfg.seed)
        step = f"report_variants_{raw.name}"
        if all(before.get(p.name) == p.read_bytes() for p in paths.values()):
            self.skip(step, f"{folder} is up to date")
        else:
            print(f"Report variants of {reports}: {folder} ({', '.join(paths)})", flush=True)
            self.state.step(step, "ran", time.time() - t)
        return paths

    def user_variant_tables(self, raw: Path, tables: dict[str, Path]) -> dict[str, Path]:
        """--variant_reports tables, checked before any prediction: readable, and a report for every test case."""
        from nnunetv2_textseg.reports import ReportError, dataset_case_ids, read_report_table
        images = raw / "imagesTs"
        try:
            cases = dataset_case_ids(raw, "Ts")
        except ReportError as err:
            raise BenchmarkError(f"--variant_reports: the test set cannot be listed: {err}") from None
        for kind, path in tables.items():
            try:
                known = read_report_table(path).reports
            except ReportError as err:
                raise BenchmarkError(f"--variant_reports {kind}={path}: {err}") from None
            missing = sorted(set(cases) - set(known))
            if missing:
                raise BenchmarkError(f"--variant_reports {kind}={path} has no report for {len(missing)} of the "
                                     f"{len(cases)} test case(s) in {images}: {missing[:10]}"
                                     f"{' ...' if len(missing) > 10 else ''}. Give a table that covers the test set.")
        return tables

    def predict_report_variant(self, dataset_id: int, raw: Path, trainer: str, split: dict, kind: str,
                               images: Path, reports: Path) -> None:
        """Clean test images with the ``kind`` variant of their reports: Dice + predictive entropy."""
        fold = split["fold"]
        mc = VARIANT_MC_SAMPLES if samples_at_inference(trainer) else 0
        signature = {"split_sha256": split["split_sha256"], "variant": kind, "dataset_id": dataset_id,
                     "reports_sha256": hashlib.sha256(reports.read_bytes()).hexdigest(), "mc_samples": mc,
                     "read_as_given": True}
        old = self.state.variant_entry(trainer, kind)
        step = f"{dataset_id}_{trainer}_fold{fold}_reports_{kind}"
        if old is not None and old.get("signature") == signature:
            self.skip(f"predict_evaluate_{step}", f"Dice {old['dice']:.4f} already in results.json")
            return
        pred = self.work / "predictions" / raw.name / trainer / f"fold_{fold}" / f"reports_{kind}"
        if pred.exists():
            shutil.rmtree(pred)
        pred.mkdir(parents=True)
        # uncertainty maps are written by nnU-Net's multiprocess path only: at least one worker
        n = max(1, self.cfg.num_processes)
        cmd = ["nnUNetv2_textseg_predict", "-i", str(images), "-o", str(pred), "-d", str(dataset_id),
               "-c", CONFIGURATION, "-p", PLANS, "-f", str(fold), "-tr", trainer, "-device", self.cfg.device,
               "--disable_progress_bar", "-npp", str(n), "-nps", str(n), "-reports", str(reports),
               "--save_uncertainty", "--keep_unfamiliar_reports"] + (["--mc_samples", str(mc)] if mc else [])
        # variants measure how the model reads what it is given: the unfamiliar-report guard stays off here
        t_pred = self.run(f"predict_{step}", cmd)
        t_eval, summary = self.evaluate(step, raw, pred)
        fg = summary.foreground_mean
        cases = [Path(c["prediction_file"]).name for c in summary.cases]
        ent = entropy_stats(pred, cases)
        self.state.put_variant_entry({
            "trainer": trainer, "variant": kind, "dataset_id": dataset_id, "fraction": split["fraction"], "fold": fold,
            "n_train": split["n_train"], "condition": "clean", "dice": fg["Dice"], "iou": fg["IoU"],
            "n_cases": len(cases), "mc_samples": mc, **ent, "reports": str(reports), "predictions": str(pred),
            "signature": signature, "seconds": {"predict": round(t_pred, 1), "evaluate": round(t_eval, 1)}})
        fg_ent = ent["mean_entropy_foreground"]
        print(f"  {trainer} @ 100% / clean, {kind} reports: Dice {fg['Dice']:.4f}  mean entropy "
              f"{ent['mean_entropy']:.4f}  in predicted foreground {'–' if fg_ent is None else f'{fg_ent:.4f}'}",
              flush=True)


def entropy_stats(pred: Path, prediction_files: list[str]) -> dict:
    """Mean predictive entropy over all pixels of all cases (``uncertainty/CASE_entropy.nii.gz``) and over the
    pixels the prediction calls foreground (None if it predicts none)."""
    import numpy as np
    import SimpleITK as sitk
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    ending = json.loads((pred / "dataset.json").read_text())["file_ending"]
    reader = PlansManager(json.loads((pred / "plans.json").read_text())).image_reader_writer_class()
    if not prediction_files:
        prediction_files = sorted(p.name for p in pred.iterdir() if p.is_file() and p.name.endswith(ending))
    total = n_total = fg_total = n_fg = 0.0
    for name in (Path(f).name for f in prediction_files):
        case = name[:-len(ending)] if name.endswith(ending) else name
        unc_file = pred / "uncertainty" / f"{case}_entropy.nii.gz"
        if not unc_file.is_file():
            raise BenchmarkError(f"{unc_file} missing: nnUNetv2_textseg_predict --save_uncertainty wrote no entropy "
                                 f"map for case {case!r}.")
        entropy = sitk.GetArrayFromImage(sitk.ReadImage(str(unc_file))).astype(np.float64)
        seg, _ = reader.read_seg(str(pred / f"{case}{ending}"))
        seg = np.asarray(seg[0])
        if entropy.size != seg.size:
            raise BenchmarkError(f"{unc_file}: {entropy.shape} does not match the segmentation's shape {seg.shape}.")
        entropy = entropy.reshape(seg.shape)
        fg = seg > 0
        total += float(entropy.sum())
        n_total += entropy.size
        fg_total += float(entropy[fg].sum())
        n_fg += int(fg.sum())
    return {"mean_entropy": total / n_total if n_total else None,
            "mean_entropy_foreground": fg_total / n_fg if n_fg else None,
            "foreground_pixels": int(n_fg)}


def edit_demo_plans(plans: dict, batch_size: int | None, patch_size: int | None, where: Path) -> dict:
    """The generated demo dataset's 2d plans with the benchmark's batch size and patch (each when given).

    nnU-Net plans the batch from the dataset's size (25 for 500 demo cases); with a few labelled cases it would plan
    2. It plans the whole image as the patch for small images; a smaller patch is the large-image condition, where
    training crops and prediction tiles each see part of the image. ``where`` names the plans file in errors."""
    config = plans["configurations"][CONFIGURATION]
    if batch_size:
        config["batch_size"] = batch_size
    if patch_size:
        stride = 1
        for s in config["architecture"]["arch_kwargs"]["strides"]:
            stride *= int(s[0] if isinstance(s, (list, tuple)) else s)
        if patch_size % stride:
            raise BenchmarkError(f"--patch_size {patch_size} is not a multiple of {stride}, the total stride of the "
                                 f"U-Net nnU-Net planned in {where}; use a multiple of {stride}.")
        config["patch_size"] = [patch_size, patch_size]
    return plans
