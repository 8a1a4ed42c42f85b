"""Dataset folders, resolved the way nnU-Net resolves them (its env vars, read at call time)."""
from __future__ import annotations

import os
from pathlib import Path

from nnunetv2_textseg.errors import TextSegError


class DatasetConfigError(TextSegError, RuntimeError):
    """nnU-Net's folders or the dataset id are not set up as needed; the message says how."""


def _require(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        raise DatasetConfigError(f"{var} is not set. Set nnUNet_raw, nnUNet_preprocessed and nnUNet_results "
                           f"(`eval \"$(nnUNetv2_textseg_env)\"` prints a default set-up).")
    return Path(value)


def dataset_name(dataset: str | int) -> str:
    """'503', 503 or 'Dataset503_X' -> 'Dataset503_X' (nnU-Net's own lookup)."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    try:
        return maybe_convert_to_dataset_name(str(dataset))
    except (RuntimeError, ValueError) as e:
        raise DatasetConfigError(str(e)) from e


def results_folder() -> Path:
    """nnU-Net's results folder (``nnUNet_results``), or one clear error if it is not set."""
    return _require("nnUNet_results")


def raw_dataset_folder(dataset: str | int) -> Path:
    folder = _require("nnUNet_raw") / dataset_name(dataset)
    if not folder.is_dir():
        raise DatasetConfigError(f"No raw dataset folder {folder}; check nnUNet_raw and the dataset id.")
    return folder


def preprocessed_dataset_folder(dataset: str | int, create: bool = False) -> Path:
    folder = _require("nnUNet_preprocessed") / dataset_name(dataset)
    if create:
        folder.mkdir(parents=True, exist_ok=True)
    return folder
