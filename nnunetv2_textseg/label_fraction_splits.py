"""Label-fraction training splits: nnU-Net's ``splits_final.json`` rewritten so that every fold trains on only
a fraction of its training cases while validating on exactly nnU-Net's validation cases.

For a fixed seed the subsets are nested (5 % ⊂ 25 % ⊂ 100 %), so label-efficiency curves compare like with like.
The command line is ``nnUNetv2_textseg_label_fraction`` (:func:`nnunetv2_textseg.robustness.splits_main`).
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from nnunetv2_textseg.atomic import atomic_write_text

SPLITS_FILE = "splits_final.json"
BACKUP_FILE = "splits_final_full.json"


def parse_fraction(value: str | float) -> float:
    """``0.05``, ``"0.05"``, ``5``, ``"5"`` or ``"5%"`` -> 0.05.

    Values above 1 (or with a ``%`` suffix) are percent; ``1`` means 100 %, so 1 % must be written
    ``0.01`` or ``"1%"``.
    """
    text = str(value).strip()
    percent = text.endswith("%")
    try:
        number = float(text.rstrip("%"))
    except ValueError:
        raise ValueError(f"Label fraction {value!r} is not a number (use e.g. 0.05, 5 or 5%).") from None
    if percent or number > 1:
        number /= 100.0
    _check_fraction(number)
    return number


def _check_fraction(fraction: float) -> None:
    if not (0 < fraction <= 1) or math.isnan(fraction):
        raise ValueError(f"Label fraction must lie in (0, 1] (or (0, 100] percent); got {fraction}.")


def fraction_size(n_cases: int, fraction: float) -> int:
    """Number of kept cases: ``ceil(fraction · n)``, at least 1 (and never more than n).

    Ceil, not round, so that a small fraction of a small fold never rounds to zero cases and the
    kept share is never below the nominal one. The product is rounded to 9 decimals first so that
    float noise (0.05 · 100 = 5.000000000000001) does not add a case.
    """
    _check_fraction(fraction)
    if n_cases <= 0:
        return 0
    return min(n_cases, max(1, math.ceil(round(fraction * n_cases, 9))))


def subsample_split(train: Sequence[str], fraction: float, rng_seed: int | Sequence[int]) -> list[str]:
    """Keep ``fraction`` of ``train`` (see :func:`fraction_size`), reproducibly by ``rng_seed``.

    The cases are sorted, permuted once by ``rng_seed`` and a prefix is taken, so for one seed the
    subsets are nested across fractions (5 % ⊂ 25 % ⊂ 100 %) and independent of the input order.
    The kept cases are returned sorted.
    """
    cases = sorted(str(c) for c in train)
    if len(set(cases)) != len(cases):
        raise ValueError("Training cases contain duplicates.")
    order = np.random.default_rng(rng_seed).permutation(len(cases))
    keep = order[: fraction_size(len(cases), fraction)]
    return sorted(cases[i] for i in keep)


def _validate_splits(splits: object) -> list[dict]:
    if not isinstance(splits, list) or not splits:
        raise ValueError("Splits must be a non-empty list of {'train': [...], 'val': [...]} dicts.")
    clean = []
    for i, fold in enumerate(splits):
        if not isinstance(fold, dict) or "train" not in fold or "val" not in fold:
            raise ValueError(f"Fold {i} of the splits lacks 'train' or 'val'.")
        train, val = [str(c) for c in fold["train"]], [str(c) for c in fold["val"]]
        if not train:
            raise ValueError(f"Fold {i} of the splits has no training cases.")
        clean.append({"train": train, "val": val})
    return clean


def find_configuration_folder(preprocessed_dataset_folder: Path) -> Path:
    """The folder holding the preprocessed cases (``nnUNetPlans_2d`` preferred, else any one)."""
    folder = Path(preprocessed_dataset_folder)
    if _has_cases(folder):
        raise ValueError(f"{folder} holds preprocessed cases itself; pass the dataset folder above it "
                         f"({folder.parent}), where nnU-Net keeps {SPLITS_FILE}.")
    preferred = folder / "nnUNetPlans_2d"
    candidates = [preferred] + sorted(p for p in folder.iterdir() if p.is_dir() and p != preferred)
    for candidate in candidates:
        if candidate.is_dir() and _has_cases(candidate):
            return candidate
    raise FileNotFoundError(f"No preprocessed cases (.b2nd/.npz + .pkl) in any subfolder of {folder}; "
                            f"run nnUNetv2_plan_and_preprocess first or pass base_splits.")


def _has_cases(folder: Path) -> bool:
    return any(p.suffix in (".b2nd", ".npz") for p in folder.iterdir() if p.is_file())


def case_identifiers(preprocessed_dataset_folder: Path) -> list[str]:
    """Sorted case identifiers, read by nnU-Net's own dataset class from a configuration folder."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    config_folder = str(find_configuration_folder(preprocessed_dataset_folder))
    return sorted(infer_dataset_class(config_folder).get_identifiers(config_folder))


def default_splits(identifiers: Sequence[str], n_folds: int = 5) -> list[dict]:
    """nnU-Net's default split: its own ``generate_crossval_split`` on sorted ids, seed 12345."""
    from nnunetv2.utilities.crossval_split import generate_crossval_split

    splits = generate_crossval_split(sorted(identifiers), seed=12345, n_splits=n_folds)
    return [{"train": [str(c) for c in s["train"]], "val": [str(c) for c in s["val"]]} for s in splits]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _metadata_path(output: Path) -> Path:
    """``splits_final.json`` -> ``splits_final_fraction.json`` (provenance of the written file)."""
    return output.with_name(output.name[: -len(".json")] + "_fraction.json" if output.name.endswith(".json")
                            else output.name + "_fraction.json")


def _written_by_us(output: Path) -> bool:
    """True when ``output`` is byte-identical to the file our metadata says we wrote."""
    meta = _metadata_path(output)
    if not (output.is_file() and meta.is_file()):
        return False
    try:
        return json.loads(meta.read_text())["sha256"] == _sha256(output)
    except (ValueError, KeyError):
        return False


def _load_json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _write_json(path: Path, data: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2))  # a crash never leaves nnU-Net a truncated split file


def _protect_existing(folder: Path, output: Path, overwrite: bool) -> None:
    """Refuse to replace a split file we did not write unless it is backed up or ``overwrite``.

    An nnU-Net ``splits_final.json`` without a backup is first copied to ``splits_final_full.json``,
    so the full split is never lost.
    """
    if not output.is_file() or _written_by_us(output) or overwrite:
        return
    backup = folder / BACKUP_FILE
    if output == folder / SPLITS_FILE:
        if not backup.is_file():
            shutil.copyfile(output, backup)
            return
        if _validate_splits(_load_json(output)) == _validate_splits(_load_json(backup)):
            return  # the full split restored by copying the backup back
        raise ValueError(f"{output} differs from the backup {backup} and was not written by "
                         f"make_label_fraction_splits (edited since?); pass overwrite=True (CLI: --overwrite) "
                         f"to replace it, keeping {backup} as the full split, or delete {backup} to make "
                         f"the current file the full split.")
    raise ValueError(f"{output} exists and was not written by make_label_fraction_splits; "
                     f"pass overwrite=True (CLI: --overwrite) to replace it.")


def _resolve_base_splits(folder: Path, output: Path, base_splits: list[dict] | None,
                         n_folds: int) -> tuple[list[dict], str]:
    """The full (100 %) splits to subsample and where they came from; saves the backup if missing."""
    backup = folder / BACKUP_FILE
    nnunet_file = folder / SPLITS_FILE
    if base_splits is not None:
        splits, source = _validate_splits(base_splits), "base_splits argument"
    elif backup.is_file():
        splits, source = _validate_splits(_load_json(backup)), str(backup)
    elif nnunet_file.is_file() and not _written_by_us(nnunet_file):
        splits, source = _validate_splits(_load_json(nnunet_file)), str(nnunet_file)
    else:
        splits = default_splits(case_identifiers(folder), n_folds)
        source = f"nnU-Net default {n_folds}-fold split (generate_crossval_split, seed 12345)"
    if output == nnunet_file and not backup.is_file():
        _write_json(backup, splits)  # restoring the 100 % split = copying this back
    return splits, source


def make_label_fraction_splits(preprocessed_dataset_folder: Path, fraction: float, seed: int = 0,
                               n_folds: int = 5, base_splits: list[dict] | None = None,
                               output: Path | None = None, overwrite: bool = False) -> list[dict]:
    """Write an nnU-Net ``splits_final.json`` whose folds train on ``fraction`` of their cases.

    Each fold keeps ``ceil(fraction · n_train)`` (at least one) of its training cases, chosen by
    :func:`subsample_split` with seed ``(seed, fold)``; its validation cases are nnU-Net's,
    untouched. For a fixed seed the subsets are **nested**: one permutation per fold, of which a
    prefix is kept, so the 5 % cases ⊂ the 25 % cases ⊂ all cases.

    Base (100 %) splits, first found of: ``base_splits``; ``splits_final_full.json`` (the backup
    of an earlier run); an existing ``splits_final.json`` not written by us; nnU-Net's default
    ``n_folds``-fold split of the case identifiers in the preprocessed configuration folder
    (``nnUNetPlans_2d`` preferred). ``n_folds`` only matters for that last case.

    Before replacing anything the full split is saved as ``splits_final_full.json`` (never
    overwritten), so restoring the 100 % split is copying it back. Provenance (fraction, seed,
    base, sha256 of the written file) goes to ``splits_final_fraction.json``; a split file that
    does not match that record (edited by hand or by nnU-Net) is replaced only with ``overwrite``.

    Args:
        preprocessed_dataset_folder: ``$nnUNet_preprocessed/DatasetXXX_Name`` (not a config folder).
        fraction: kept share in (0, 1]; percent values are handled by :func:`parse_fraction`.
        seed: subsampling seed; different seeds give different (non-nested) subsets.
        output: where to write the splits (default ``<folder>/splits_final.json``).
        overwrite: replace an ``output`` file we did not write.

    Returns:
        The written splits, ``[{"train": [...], "val": [...]}, ...]``.
    """
    _check_fraction(fraction)
    folder = Path(preprocessed_dataset_folder).resolve()
    if not folder.is_dir():
        raise FileNotFoundError(f"Preprocessed dataset folder {folder} does not exist.")
    output = Path(output).resolve() if output is not None else folder / SPLITS_FILE
    _protect_existing(folder, output, overwrite)
    full, source = _resolve_base_splits(folder, output, base_splits, n_folds)

    splits = []
    for fold, split in enumerate(full):
        val = set(split["val"])
        train = [c for c in split["train"] if c not in val]  # never train on a validation case
        splits.append({"train": subsample_split(train, fraction, (seed, fold)), "val": list(split["val"])})

    _write_json(output, splits)
    _write_json(_metadata_path(output), {
        "fraction": fraction, "seed": seed, "rounding": "ceil, at least 1", "base": source,
        "n_train_per_fold": [len(s["train"]) for s in splits],
        "n_train_full_per_fold": [len(s["train"]) for s in full],
        "sha256": _sha256(output),
    })
    return splits
