"""Robustness protocol: label-fraction training splits and degraded copies of test images — the two command
lines and the protocol's public names.

The work lives in one module per role:

* :mod:`nnunetv2_textseg.label_fraction_splits` — nnU-Net ``splits_final.json`` whose folds train on a fraction
  of their cases (validation unchanged, nested subsets for one seed); command :func:`splits_main`.
* :mod:`nnunetv2_textseg.degraded_test_sets` — degraded copies of an images folder (same names, geometry,
  dtype, report table) and their dose-level presets; command :func:`degrade_main`.
* :mod:`nnunetv2_textseg.degradations` — the degradations themselves (low-dose noise, motion blur, Gaussian
  noise), pure functions shared with the training augmentation.

Their public names are importable from here as well, which is where the benchmarks import them from.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from nnunetv2_textseg.degradations import (gaussian_noise, lowdose_image, lowdose_projection, motion_blur,
                                           motion_kernel)
from nnunetv2_textseg.degraded_test_sets import (DEGRADATION_FILE, DOSE_LEVELS, IMAGE_ENDINGS, KINDS, METHODS,
                                                 REPORTS_FILE, degrade_folder, degrade_image, psnr, resolve_level)
from nnunetv2_textseg.label_fraction_splits import (BACKUP_FILE, SPLITS_FILE, case_identifiers, default_splits,
                                                    find_configuration_folder, fraction_size,
                                                    make_label_fraction_splits, parse_fraction, subsample_split)

__all__ = [
    # label-fraction splits
    "SPLITS_FILE", "BACKUP_FILE", "parse_fraction", "fraction_size", "subsample_split", "case_identifiers",
    "default_splits", "find_configuration_folder", "make_label_fraction_splits",
    # degraded test sets
    "DEGRADATION_FILE", "REPORTS_FILE", "DOSE_LEVELS", "KINDS", "METHODS", "IMAGE_ENDINGS", "resolve_level",
    "degrade_image", "degrade_folder", "psnr",
    # degradations
    "lowdose_image", "lowdose_projection", "motion_kernel", "motion_blur", "gaussian_noise",
    # command lines
    "splits_main", "degrade_main",
]


def splits_main(argv: list[str] | None = None) -> int:
    """CLI: ``-d DATASET -p FRACTION_OR_PERCENT [--seed S] [--folds N] [--overwrite]``."""
    parser = argparse.ArgumentParser(
        description="Write an nnU-Net splits_final.json whose folds train on a fraction of their cases "
                    "(validation sets unchanged; full split backed up as splits_final_full.json).")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name, e.g. 503 or Dataset503_X")
    parser.add_argument("-p", "--fraction", required=True,
                        help="fraction (0.05) or percent (5 or 5%%); 1 means 100%%")
    parser.add_argument("--seed", type=int, default=0, help="subsampling seed (default 0)")
    parser.add_argument("--folds", type=int, default=5,
                        help="folds of the default split when none exists yet (default 5)")
    parser.add_argument("-o", "--output", type=Path, default=None, help="write here instead of splits_final.json")
    parser.add_argument("--overwrite", action="store_true", help="replace a split file not written by this tool")
    args = parser.parse_args(argv)

    from nnunetv2_textseg.paths import preprocessed_dataset_folder

    try:
        fraction = parse_fraction(args.fraction)
        folder = preprocessed_dataset_folder(args.dataset)
        splits = make_label_fraction_splits(folder, fraction, seed=args.seed, n_folds=args.folds,
                                            output=args.output, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        parser.error(str(err))
    target = args.output or folder / SPLITS_FILE
    sizes = ", ".join(f"{len(s['train'])}/{len(s['val'])}" for s in splits)
    print(f"Wrote {target}: {fraction:.4g} of training cases, seed {args.seed}; train/val per fold: {sizes}")
    return 0


def degrade_main(argv: list[str] | None = None) -> int:
    """CLI: ``-i IN -o OUT --kind lowdose|motion|gaussian --level L [--seed] [--method] [--reports]``."""
    parser = argparse.ArgumentParser(
        description="Write a degraded copy of an nnU-Net images folder (low-dose CT noise, motion blur, "
                    "Gaussian noise) with the same file names, geometry and report table.")
    parser.add_argument("-i", "--input", required=True, type=Path, help="images folder, e.g. imagesTs")
    parser.add_argument("-o", "--output", required=True, type=Path, help="new folder for the degraded copy")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--level", required=True,
                        help="lowdose: photons per detector bin or " + "/".join(DOSE_LEVELS)
                             + "; motion: kernel size (7 or K7); gaussian: std relative to image std")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", choices=METHODS, default="projection", help="lowdose simulation domain")
    parser.add_argument("--reports", type=Path, default=None,
                        help="report table to copy as reports.csv (default: the input's own, if any)")
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")
    args = parser.parse_args(argv)
    try:
        out = degrade_folder(args.input, args.output, args.kind, args.level, seed=args.seed,
                             reports=args.reports, overwrite=args.overwrite, method=args.method)
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    meta = json.loads((out / DEGRADATION_FILE).read_text(encoding="utf-8"))
    print(f"Wrote {len(meta['files'])} degraded images to {out} (mean PSNR {meta['mean_psnr']} dB)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(degrade_main())
