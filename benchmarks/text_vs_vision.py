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
  your own folds. nnUNet_extTrainer is always set to this repository's trainers/ folder.

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
  trains every text trainer on it at 100 % of the labels; its clean test Dice is the row
  "<trainer> (control reports)". If text helps, that row falls to (or below) the plain baseline.

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
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout without installing
    sys.path.insert(0, str(REPO))

from nnunetv2_textseg.atomic import atomic_write_text  # noqa: E402
from nnunetv2_textseg.errors import TextSegError  # noqa: E402
from nnunetv2_textseg.robustness import (DEGRADATION_FILE, REPORTS_FILE, case_identifiers,  # noqa: E402
                                         default_splits, degrade_folder, parse_fraction, resolve_level,
                                         subsample_split)

DEFAULT_OUT = REPO / "benchmarks" / "results" / "text_vs_vision"
CONFIGURATION = "2d"
PLANS = "nnUNetPlans"
SPLITS_FILE = "splits_final.json"
SPLITS_RECORD = "splits_final_text_vs_vision.json"  # proves splits_final.json is ours (sha256)
SPLITS_BACKUP = "splits_final.before_text_vs_vision.json"
DEMO_NAME, CONTROL_NAME = "TextSegDemo", "TextSegDemoControl"
DEFAULT_LEVELS = {"lowdose": "DL3", "motion": "K7", "gaussian": 0.1}
CONTROL_SUFFIX = " (control reports)"
VARIANT_MC_SAMPLES = 8  # Monte-Carlo passes of MedCLIPSeg trainers in the report-variant predictions

PRESETS: dict[str, dict] = {
    "smoke": dict(trainers=["nnUNetTrainer_debug", "nnUNetTrainerBiCLIP_debug"], fractions=["100"],
                  conditions=["clean", "motion"], n_train=8, n_test=4, size=64, device="cpu", seed=0,
                  control=False, report_variants=False),
    "cpu": dict(trainers=["nnUNetTrainer_demo", "nnUNetTrainerBiCLIP_demo", "nnUNetTrainerMedCLIPSeg_demo"],
                fractions=["5", "25", "100"],
                conditions=["clean", "lowdose", "motion"], n_train=60, n_test=30, size=64, device="cpu", seed=0,
                control=True, report_variants=True),
    "full": dict(trainers=["nnUNetTrainer", "nnUNetTrainerBiCLIP", "nnUNetTrainerBiCLIP_noIAC",
                           "nnUNetTrainerBiCLIP_noCycle", "nnUNetTrainerBiCLIP_unidirectional",
                           "nnUNetTrainerBiCLIP_noText", "nnUNetTrainerMedCLIPSeg", "nnUNetTrainerMedCLIPSeg_noProb",
                           "nnUNetTrainerMedCLIPSeg_noText"],
                 fractions=["1%", "5%", "10%", "25%", "100%"], conditions=["clean", "lowdose", "motion"],
                 n_train=400, n_test=100, size=128, device="cuda", seed=0, control=True, report_variants=True),
}


class BenchmarkError(TextSegError, RuntimeError):
    """The run cannot continue as asked; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------
def samples_at_inference(trainer: str) -> bool:
    """MedCLIPSeg trainers with probabilistic attention: Monte-Carlo samples differ (not for _noProb)."""
    if "MedCLIPSeg" not in trainer:
        return False
    from nnunetv2_textseg.training.variants import text_trainer_class
    try:
        return not text_trainer_class(trainer).deterministic
    except KeyError:  # a MedCLIPSeg-named trainer defined elsewhere: assume it samples
        return True


def is_text_trainer(trainer: str) -> bool:
    return "BiCLIP" in trainer or "MedCLIPSeg" in trainer


def default_baseline(trainers: list[str]) -> str | None:
    """The first plain nnU-Net trainer (nnUNetTrainer, nnUNetTrainer_demo, nnUNetTrainer_100epochs, ...)."""
    for t in trainers:
        if (t == "nnUNetTrainer" or t.startswith("nnUNetTrainer_")) and not is_text_trainer(t):
            return t
    return None


def write_json_atomic(path: Path, data) -> None:
    """The package's one atomic write (stale temp files of killed runs are cleaned up there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def fraction_key(fraction: float) -> str:
    return f"{fraction:.6g}"


def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def machine_info(device: str) -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "device": device}
    try:
        import torch
        info["torch"] = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    try:
        from importlib.metadata import version
        info["nnunetv2"] = version("nnunetv2")
    except Exception:  # noqa: BLE001 - informative only
        pass
    return info


# ---------------------------------------------------------------------------------------------------
# conditions
# ---------------------------------------------------------------------------------------------------
def parse_condition(text: str) -> dict:
    """'clean' | 'lowdose' | 'motion' | 'gaussian' | 'kind:level' -> {"name", "kind", "level"}."""
    kind, _, level = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind == "clean":
        if level:
            raise BenchmarkError("The clean condition takes no level.")
        return {"name": "clean", "kind": None, "level": None}
    if kind not in DEFAULT_LEVELS:
        raise BenchmarkError(f"Unknown condition {text!r}: use clean, {', '.join(DEFAULT_LEVELS)} or kind:level "
                             f"(e.g. lowdose:DL4, motion:K11).")
    level = level.strip() or DEFAULT_LEVELS[kind]
    try:
        resolve_level(kind, level)
    except ValueError as err:
        raise BenchmarkError(f"Condition {text!r}: {err}") from None
    name = kind if str(level) == str(DEFAULT_LEVELS[kind]) else f"{kind}_{level}"
    return {"name": name, "kind": kind, "level": level}


# ---------------------------------------------------------------------------------------------------
# the run's state (results.json)
# ---------------------------------------------------------------------------------------------------
class State:
    """results.json: settings, machine, fraction->fold mapping, trained folds, entries, timings."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("entries", [])
        self.data.setdefault("trained", {})
        self.data.setdefault("done_steps", {})
        self.data.setdefault("runs", [])
        self.data.setdefault("report_variant_entries", [])
        self.run: dict = {}

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def start_run(self, argv: list[str]) -> None:
        self.run = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": argv, "steps": []}
        self.data["runs"].append(self.run)

    def step(self, name: str, status: str, seconds: float = 0.0, **extra) -> None:
        self.run["steps"].append({"step": name, "status": status, "seconds": round(seconds, 2), **extra})
        if status == "ran":  # seconds of each step's latest execution, across resumed runs
            self.data.setdefault("timings", {})[name] = round(seconds, 2)
        self.save()

    # entries -----------------------------------------------------------------------------------
    def entry(self, label: str, fraction: float, condition: str) -> dict | None:
        for e in self.data["entries"]:
            if e["label"] == label and e["fraction"] == fraction and e["condition"] == condition:
                return e
        return None

    def put_entry(self, new: dict) -> None:
        self.data["entries"] = [e for e in self.data["entries"]
                                if not (e["label"] == new["label"] and e["fraction"] == new["fraction"]
                                        and e["condition"] == new["condition"])] + [new]
        self.save()

    def drop_entries(self, dataset_id: int, trainer: str, fold: int) -> None:
        for key in ("entries", "report_variant_entries"):
            self.data[key] = [e for e in self.data.get(key, [])
                              if not (e["dataset_id"] == dataset_id and e["trainer"] == trainer and e["fold"] == fold)]
        self.save()

    # report-variant entries -----------------------------------------------------------------------
    def variant_entry(self, trainer: str, kind: str) -> dict | None:
        return next((e for e in self.data["report_variant_entries"] if e["trainer"] == trainer and e["variant"] == kind),
                    None)

    def put_variant_entry(self, new: dict) -> None:
        self.data["report_variant_entries"] = [e for e in self.data["report_variant_entries"]
                                               if not (e["trainer"] == new["trainer"]
                                                       and e["variant"] == new["variant"])] + [new]
        self.save()


# ---------------------------------------------------------------------------------------------------
# the runner
# ---------------------------------------------------------------------------------------------------
class Runner:
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
    def _env(self) -> dict:
        cfg = self.cfg
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                   nnUNet_extTrainer=str(REPO / "trainers"))
        if cfg.dataset is None:  # the demo's own folders, never the user's
            for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
                env[var] = str(self.work / var)
                Path(env[var]).mkdir(parents=True, exist_ok=True)
        else:
            missing = [v for v in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results") if not os.environ.get(v)]
            if missing:
                raise BenchmarkError(f"--dataset uses your nnU-Net folders, but {', '.join(missing)} is not set "
                                     f"(`eval \"$(nnUNetv2_textseg_env)\"` or `source setup_scripts/env.sh`).")
        if cfg.n_proc_da is not None:
            env["nnUNet_n_proc_DA"] = str(cfg.n_proc_da)
        elif cfg.device == "cpu" and "nnUNet_n_proc_DA" not in os.environ:
            # nnU-Net's default (12 augmentation workers) only competes with training for the same cores
            env["nnUNet_n_proc_DA"] = "1"
        if "nnUNet_def_n_proc" not in os.environ:
            # nnU-Net's pool size for the final validation's export (and evaluation): 8 by default, and on a
            # small CPU machine starting 8 spawned workers costs more than the validation itself
            env["nnUNet_def_n_proc"] = str(cfg.num_processes)
        return env

    def evaluate(self, step: str, raw: Path, pred: Path) -> tuple[float, dict]:
        """nnUNetv2_evaluate_folder on a prediction folder; returns (seconds, its summary.json)."""
        t = self.run(f"evaluate_{step}", [
            "nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred), "-djfile", str(pred / "dataset.json"),
            "-pfile", str(pred / "plans.json"), "-np", str(self.cfg.num_processes)])
        return t, json.loads((pred / "summary.json").read_text())

    def run(self, step: str, cmd: list[str]) -> float:
        """Run one real command, output to OUT/logs/<step>.log; on failure print the log's tail and stop."""
        log = self.logs / f"{step}.log"
        print(f"$ {' '.join(cmd)}", flush=True)
        t = time.time()
        with open(log, "w") as f:
            r = subprocess.run(cmd, env=self.env, stdout=f, stderr=subprocess.STDOUT, cwd=str(self.out))
        seconds = time.time() - t
        if r.returncode != 0:
            tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
            self.state.step(step, "failed", seconds, returncode=r.returncode)
            raise BenchmarkError(f"Command failed ({r.returncode}) after {seconds:.0f} s: {' '.join(cmd)}\n"
                                 f"--- last lines of {log} ---\n{tail}\n--- (full log: {log})")
        print(f"  done in {seconds:.0f} s (log: {log})", flush=True)
        self.state.step(step, "ran", seconds)
        return seconds

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
            for root in (self.raw_root, self.pre_root, self.res_root):  # leftovers of an interrupted run
                for old in root.glob(f"Dataset{dataset_id:03d}_*"):
                    shutil.rmtree(old)
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
        if demo and self.cfg.batch_size:
            # nnU-Net plans the batch from the dataset's size (25 for 500 demo cases); with a few labelled cases
            # it would plan 2. Our own generated dataset only: a user's plans are never edited.
            pre = self.dataset_folder(self.pre_root, dataset_id)
            plans = json.loads((pre / f"{PLANS}.json").read_text())
            plans["configurations"][CONFIGURATION]["batch_size"] = self.cfg.batch_size
            write_json_atomic(pre / f"{PLANS}.json", plans)
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
            if record is None and self.cfg.dataset is not None:
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
        cmd = ["nnUNetv2_textseg_predict" if text else "nnUNetv2_predict", "-i", str(images), "-o", str(pred),
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
        fg = summary["foreground_mean"]
        self.state.put_entry({
            "label": label, "trainer": trainer, "dataset_id": dataset_id, "fraction": fraction, "fold": fold,
            "n_train": split["n_train"], "condition": cond["name"], "dice": fg["Dice"], "iou": fg["IoU"],
            "n_cases": len(summary.get("metric_per_case", [])), "text": text,
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
                     "reports_sha256": hashlib.sha256(reports.read_bytes()).hexdigest(), "mc_samples": mc}
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
               "--save_uncertainty"] + (["--mc_samples", str(mc)] if mc else [])
        t_pred = self.run(f"predict_{step}", cmd)
        t_eval, summary = self.evaluate(step, raw, pred)
        fg = summary["foreground_mean"]
        cases = [Path(c["prediction_file"]).name for c in summary.get("metric_per_case", [])]
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


# ---------------------------------------------------------------------------------------------------
# report: Markdown + plot
# ---------------------------------------------------------------------------------------------------
def _fmt(x, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{x:+.4f}" if signed else f"{x:.4f}"


def control_labels(settings: dict) -> list[str]:
    """Table labels of the control rows (results.json of earlier versions had one "control_label")."""
    if settings.get("control_labels") is not None:
        return list(settings["control_labels"])
    return [settings["control_label"]] if settings.get("control_label") else []


def rows_for_report(data: dict) -> tuple[list[dict], str | None]:
    s = data["settings"]
    baseline = s.get("baseline")
    labels = list(s["trainers"]) + control_labels(s)
    fractions = sorted({m["fraction"] for m in data["fraction_folds"].values()})
    conditions = [c["name"] for c in s["conditions"]]
    wanted = [e for e in data["entries"] if e["label"] in labels and e["fraction"] in fractions
              and e["condition"] in conditions]
    base = {(e["fraction"], e["condition"]): e for e in wanted if e["label"] == baseline}
    rows = []
    for f in fractions:
        for c in conditions:
            for label in labels:
                e = next((x for x in wanted if x["label"] == label and x["fraction"] == f and x["condition"] == c), None)
                if e is None:
                    continue
                b = base.get((f, c))
                rows.append({**e, "d_dice": None if b is None or label == baseline else e["dice"] - b["dice"],
                             "d_iou": None if b is None or label == baseline else e["iou"] - b["iou"]})
    return rows, baseline


def markdown(data: dict) -> str:
    s, m = data["settings"], data.get("machine", {})
    rows, baseline = rows_for_report(data)
    conds = ", ".join(c["name"] + (f" ({c['level']})" if c["level"] is not None else "") for c in s["conditions"])
    n_val = next(iter(data["fraction_folds"].values()), {}).get("n_val")
    lines = [
        f"# Text vs vision: {data.get('dataset', {}).get('name', '?')}",
        "",
        f"Commit `{data.get('commit') or 'unknown'}`; preset `{s['preset']}`; "
        + (f"demo data {s['size']}² px, {s['n_train']} train / {s['n_test']} test cases, " if s["dataset"] is None
           else f"dataset {s['dataset']}, ")
        + f"seed {s['seed']}; device {s['device']} ({m.get('cpu_count')} CPUs, torch {m.get('torch')}); "
        f"trainers {', '.join(s['trainers'])}; label fractions "
        f"{', '.join(fraction_label(f) for f in s['fractions'])} of nnU-Net's fold-0 training cases "
        f"(validation: the same {n_val} fold-0 cases for every fraction); conditions {conds}.",
        "",
        f"Dice / IoU: `nnUNetv2_evaluate_folder` foreground mean over the test cases. "
        f"Δ = difference to `{baseline}` at the same fraction and condition." if baseline else
        "Dice / IoU: `nnUNetv2_evaluate_folder` foreground mean over the test cases (no plain nnUNetTrainer* "
        "baseline in the run, so no differences).",
        "",
        "| fraction | condition | trainer | train cases | Dice | Δ Dice | IoU | Δ IoU |",
        "|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {fraction_label(r['fraction'])} | {r['condition']} | {r['label']} | {r['n_train']} | "
                     f"{_fmt(r['dice'])} | {_fmt(r['d_dice'], True)} | {_fmt(r['iou'])} | {_fmt(r['d_iou'], True)} |")
    if not rows:
        lines.append("| – | – | – | – | – | – | – | – |")
    lines += variant_markdown(data)
    return "\n".join(lines) + "\n"


def variant_rows(data: dict) -> list[dict]:
    """Report-variant entries of the current settings' text trainers, ordered trainer x variant kind."""
    from nnunetv2_textseg.report_variants import VARIANT_KINDS
    s = data["settings"]
    if not s.get("report_variants"):
        return []
    entries = data.get("report_variant_entries", [])
    rows = []
    for trainer in s["trainers"]:
        mine = {e["variant"]: e for e in entries if e["trainer"] == trainer}
        base = mine.get("original")
        for kind in list(s.get("variant_reports") or VARIANT_KINDS):
            e = mine.get(kind)
            if e is None:
                continue
            rows.append({**e, "d_dice": None if base is None or kind == "original" else e["dice"] - base["dice"]})
    return rows


def variant_markdown(data: dict) -> list[str]:
    rows = variant_rows(data)
    if not rows:
        return []
    mc = sorted({r["trainer"] for r in rows if r.get("mc_samples")})
    user = data["settings"].get("variant_reports")
    source = ("(your tables, `--variant_reports`: " + ", ".join(f"{k} = `{Path(v).name}`" for k, v in user.items())
              + ")") if user else (
        "(`nnunetv2_textseg.report_variants`: contradictory = location mirrored/flipped, missing_location = no "
        "side/zone words, overdescriptive = irrelevant detail added, underdescriptive = \"Pulmonary infection.\")")
    return [
        "",
        "## Report quality (100 % of the labels, clean test images)",
        "",
        "Each text trainer predicts the clean test images once per report variant " + source + " "
        "with `--save_uncertainty`" + (f" (`--mc_samples {VARIANT_MC_SAMPLES}` for {', '.join(mc)})" if mc else "")
        + ". Δ Dice = difference to the same trainer with the original reports. Entropy: mean predictive entropy "
        "(nats) over all pixels of all test cases, and over the pixels predicted as foreground."
        + ("" if user else " The original row repeats the clean 100 % prediction of the first table"
           + (" (for the Monte-Carlo trainers up to their sampling)" if mc else "") + "."),
        "",
        "| trainer | variant | Dice | Δ Dice | mean entropy | entropy in predicted foreground |",
        "|---|---|---:|---:|---:|---:|",
    ] + [f"| {r['trainer']} | {r['variant']} | {_fmt(r['dice'])} | {_fmt(r['d_dice'], True)} | "
         f"{_fmt(r.get('mean_entropy'))} | {_fmt(r.get('mean_entropy_foreground'))} |" for r in rows]


def plot(data: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = data["settings"]
    rows, _ = rows_for_report(data)
    labels = list(s["trainers"]) + control_labels(s)
    labels = [l for l in labels if any(r["label"] == l for r in rows)] or labels
    fractions = sorted({m["fraction"] for m in data["fraction_folds"].values()})
    conditions = [c["name"] for c in s["conditions"]]
    colours = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, len(conditions), figsize=(max(4.5, 1.2 + 0.45 * len(labels) * len(fractions))
                                                          * len(conditions), 4.2), squeeze=False, sharey=True)
    width = 0.8 / max(1, len(labels))
    for ax, cond in zip(axes[0], conditions):
        for j, label in enumerate(labels):
            xs, ys = [], []
            for i, f in enumerate(fractions):
                r = next((r for r in rows if r["label"] == label and r["fraction"] == f and r["condition"] == cond), None)
                if r is not None and r["dice"] is not None and not math.isnan(r["dice"]):
                    xs.append(i - 0.4 + width * (j + 0.5))
                    ys.append(r["dice"])
            control = label.endswith(CONTROL_SUFFIX)
            # a control row takes its trainer's colour, hatched and pale, so the pair reads at a glance
            k = labels.index(label[:-len(CONTROL_SUFFIX)]) if control and label[:-len(CONTROL_SUFFIX)] in labels else j
            bars = ax.bar(xs, ys, width, color=colours(k % 10), alpha=0.55 if control else 1.0, label=label,
                          hatch="//" if control else None, edgecolor="black" if control else None)
            for b, y in zip(bars, ys):
                ax.text(b.get_x() + b.get_width() / 2, y + 0.01, f"{y:.2f}", ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(fractions)), [fraction_label(f) for f in fractions])
        ax.set_xlabel("label fraction")
        ax.set_title(cond)
        ax.set_ylim(0, 1.05)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("Dice (test set, foreground mean)")
    handles, names = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="lower center", ncol=min(4, max(1, len(names))), fontsize=8, frameon=False)
    fig.suptitle(f"Text vs vision: {data.get('dataset', {}).get('name', '')} (commit {data.get('commit') or '?'})",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 0.95))
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def parse_variant_reports(items: list[str]) -> dict[str, Path]:
    """["original=a.xlsx", "contradictory=b.csv", ...] -> {kind: path}; kinds are names of output folders."""
    tables: dict[str, Path] = {}
    for item in items:
        kind, sep, path = item.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z0-9_-]+", kind) or not path:
            raise BenchmarkError(f"--variant_reports takes KIND=FILE with KIND made of letters, digits, _ or -; "
                                 f"got {item!r}.")
        if kind in tables:
            raise BenchmarkError(f"--variant_reports names {kind!r} twice.")
        if not Path(path).is_file():
            raise BenchmarkError(f"--variant_reports {kind}: no file {path}.")
        tables[kind] = Path(path).resolve()
    if "original" not in tables:
        raise BenchmarkError("--variant_reports needs an 'original=FILE' table: the other variants are compared "
                             "with it.")
    return {"original": tables.pop("original"), **tables}


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
    p.add_argument("--fresh", action="store_true", help="delete OUT's earlier results (and OUT/work) first")
    p.add_argument("--force", action="store_true",
                   help="--dataset: replace your splits_final.json (backed up) with the benchmark's")
    a = p.parse_args(argv)
    for key, value in PRESETS[a.preset].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    a.out = a.out.resolve()
    if a.num_processes is None:
        a.num_processes = max(1, min(4, (os.cpu_count() or 2) // 2))
    try:
        a.fraction_values = list(dict.fromkeys(parse_fraction(f) for f in a.fractions))
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
                     "batch_size": cfg.batch_size if cfg.dataset is None else None}
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
                     "report_variants": bool(cfg.report_variants and text_trainers),
                     "variant_reports": ({k: str(v) for k, v in cfg.variant_tables.items()}
                                         if cfg.variant_tables else None),
                     "n_train": cfg.n_train, "n_test": cfg.n_test, "size": cfg.size, "device": cfg.device,
                     "seed": cfg.seed, "configuration": CONFIGURATION, "plans": PLANS,
                     "num_processes": cfg.num_processes, "batch_size": cfg.batch_size}})
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
        control_map = runner.write_splits(control_id, [1.0], ours=True)
        split = control_map[fraction_key(1.0)]
        state.data["dataset"]["control"] = {"id": control_id, "name": control_raw.name, "fold": split["fold"]}
        state.save()
        clean = {"name": "clean", "kind": None, "level": None}
        images, reports = runner.condition_folder(control_raw, clean, True)
        for control_trainer in control_trainers:
            runner.train(control_id, control_trainer, split)
            runner.predict_and_evaluate(control_id, control_raw, control_trainer, control_trainer + CONTROL_SUFFIX,
                                        split, clean, images, reports)
        if fraction_key(1.0) not in mapping:  # the control's fraction must appear in the table
            state.data["fraction_folds"][fraction_key(1.0)] = {**split, "fold": None, "note": "control only"}

    state.run["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    state.run["seconds"] = round(time.time() - t0, 1)
    state.run["trained"] = [s["step"] for s in state.run["steps"] if s["step"].startswith("train_") and s["status"] == "ran"]
    state.save()
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
    except BenchmarkError as err:
        sys.exit(f"text_vs_vision: {err}")
