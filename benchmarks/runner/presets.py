"""What a benchmark run trains and tests: the presets of text_vs_vision.py and low_label.py, which trainers read
reports, the test conditions and the label-fraction keys. Pure values and parsing; nothing runs here."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

from nnunetv2_textseg.harness import is_text_trainer
from nnunetv2_textseg.robustness import resolve_level

from benchmarks.runner import BenchmarkError

__all__ = ["REPO", "DEFAULT_OUT", "LOW_LABEL_OUT", "CONFIGURATION", "PLANS", "DEMO_NAME", "CONTROL_NAME",
           "DEFAULT_LEVELS", "CONTROL_SUFFIX", "VARIANT_MC_SAMPLES", "PRESETS", "LOW_LABEL_PRESETS", "apply_preset",
           "is_text_trainer", "samples_at_inference", "default_baseline", "fraction_key", "fraction_label",
           "parse_condition", "parse_variant_reports"]

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "text_vs_vision"
LOW_LABEL_OUT = REPO / "benchmarks" / "results" / "low_label"
CONFIGURATION = "2d"
PLANS = "nnUNetPlans"
DEMO_NAME, CONTROL_NAME = "TextSegDemo", "TextSegDemoControl"
DEFAULT_LEVELS = {"lowdose": "DL3", "motion": "K7", "gaussian": 0.1}
CONTROL_SUFFIX = " (control reports)"
VARIANT_MC_SAMPLES = 8  # Monte-Carlo passes of MedCLIPSeg trainers in the report-variant predictions

# text_vs_vision.py --preset (its docstring says what each is for and costs)
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

# low_label.py --preset: text_vs_vision.py runs once per seed with these values (its docstring explains them)
LOW_LABEL_PRESETS: dict[str, dict] = {
    "smoke": dict(seeds=[0, 1], trainers=["nnUNetTrainer_debug", "nnUNetTrainerBiCLIP_debug"], fractions=["100"],
                  conditions=["clean"], n_train=40, n_test=6, size=64, device="cpu", batch_size=2),
    "cpu": dict(seeds=[0, 1, 2], trainers=["nnUNetTrainer_demo", "nnUNetTrainerBiCLIP_demo",
                                           "nnUNetTrainerMedCLIPSeg_demo"],
                fractions=["5", "10"], conditions=["clean", "lowdose", "motion"], n_train=500, n_test=40, size=64,
                device="cpu", batch_size=2),
    "full": dict(seeds=[0, 1, 2], trainers=["nnUNetTrainer_100epochs", "nnUNetTrainer_safeAug",
                                            "nnUNetTrainerBiCLIP_100epochs", "nnUNetTrainerBiCLIP_safeAug",
                                            "nnUNetTrainerMedCLIPSeg_100epochs", "nnUNetTrainerMedCLIPSeg_safeAug"],
                 fractions=["5", "10", "25", "100"], conditions=["clean", "lowdose", "motion"], n_train=500,
                 n_test=100, size=128, device="cuda", batch_size=None),
}


def apply_preset(args: argparse.Namespace, preset: dict) -> argparse.Namespace:
    """Fill every option the command line left at None from the preset: flags override a preset value by value."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def samples_at_inference(trainer: str) -> bool:
    """MedCLIPSeg trainers with probabilistic attention: Monte-Carlo samples differ (not for _noProb)."""
    if "MedCLIPSeg" not in trainer:
        return False
    from nnunetv2_textseg.training.variants import text_trainer_class  # torch and nnU-Net: only when asked
    try:
        return not text_trainer_class(trainer).deterministic
    except KeyError:  # a MedCLIPSeg-named trainer defined elsewhere: assume it samples
        return True


def default_baseline(trainers: list[str]) -> str | None:
    """The first plain nnU-Net trainer (nnUNetTrainer, nnUNetTrainer_demo, nnUNetTrainer_100epochs, ...)."""
    for t in trainers:
        if (t == "nnUNetTrainer" or t.startswith("nnUNetTrainer_")) and not is_text_trainer(t):
            return t
    return None


def fraction_key(fraction: float) -> str:
    """A label fraction as a results.json key (JSON keys are strings; 6 digits survive the round trip)."""
    return f"{fraction:.6g}"


def fraction_label(fraction: float) -> str:
    return f"{100 * fraction:g}%"


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
