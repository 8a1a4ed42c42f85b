"""Robustness protocol: label-fraction training splits and degraded copies of test images.

Two independent tools, each with a Python API and an argparse CLI:

* **Label-fraction splits** (:func:`make_label_fraction_splits`, CLI :func:`splits_main`): rewrite
  nnU-Net's ``splits_final.json`` so that every fold trains on only a fraction of its training cases
  while validating on exactly nnU-Net's validation cases. For a fixed seed the subsets are nested
  (5 % ⊂ 25 % ⊂ 100 %), so label-efficiency curves compare like with like.
* **Degraded test folders** (:func:`degrade_folder`, CLI :func:`degrade_main`): write a copy of an
  nnU-Net raw images folder with simulated low-dose CT noise, motion blur or Gaussian noise, same
  file names and geometry, plus the unchanged report table so text-guided models can predict it.

Dose levels ("DL")
------------------
``lowdose`` takes the number of incident photons per detector bin and projection angle, ``I0``.
Noise variance of a line integral is ``≈ 1/(I0·exp(−p))``, so halving ``I0`` is halving the dose.
Named presets (:data:`DOSE_LEVELS`), relative dose = ``I0 / 1e5``:

======  ========  =============  ==============================
preset  I0        relative dose  meaning
======  ========  =============  ==============================
DL1     1e5       1.00           near full dose, barely visible
DL2     2e4       0.20           mild noise
DL3     5e3       0.05           strong noise
DL4     1e3       0.01           very low dose, heavy streaks
======  ========  =============  ==============================
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

if TYPE_CHECKING:  # SimpleITK is imported lazily so the split tools load fast
    import SimpleITK as sitk

SPLITS_FILE = "splits_final.json"
BACKUP_FILE = "splits_final_full.json"
DEGRADATION_FILE = "degradation.json"
REPORTS_FILE = "reports.csv"

#: Photons per detector bin (I0) of the named dose levels; relative dose = I0 / 1e5.
DOSE_LEVELS: Mapping[str, float] = MappingProxyType({"DL1": 1e5, "DL2": 2e4, "DL3": 5e3, "DL4": 1e3})
KINDS = ("lowdose", "motion", "gaussian")
METHODS = ("projection", "image")
#: File endings of images nnU-Net reads (2D via SimpleITK / natural-image readers).
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


# ============================================================================================
# label-fraction splits
# ============================================================================================
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
    from nnunetv2_textseg.atomic import atomic_write_text

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


# ============================================================================================
# degradations (pure functions on 2D float arrays)
# ============================================================================================
def _rescale(img: np.ndarray) -> tuple[np.ndarray, float, float]:
    """Image -> [0, 1] plus the (lo, hi) needed to map back."""
    img = np.asarray(img, dtype=np.float64)
    lo, hi = float(img.min()), float(img.max())
    return (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img), lo, hi


def _fbp(sinogram: np.ndarray, theta: np.ndarray, size: int) -> np.ndarray:
    from skimage.transform import iradon

    return iradon(sinogram, theta=theta, output_size=size, filter_name="ramp", circle=False)


def lowdose_projection(img: np.ndarray, photons: float, rng: np.random.Generator,
                       max_line_integral: float = 4.0, n_angles: int | None = None) -> np.ndarray:
    """Simulate a CT scan at ``photons`` incident photons per detector bin (lower = lower dose).

    Intensities are rescaled to attenuation ``[0, μmax]`` (minimum = air), with μmax chosen so that
    the most attenuating ray has line integral ``max_line_integral`` (transmission e⁻⁴ ≈ 2 % by
    default, typical of a body scan), which makes the noise level independent of image size. The
    sinogram ``p`` (``skimage.transform.radon``) is turned into counts ``I ~ Poisson(I0·exp(−p))``,
    clamped to ≥ 1 (log of zero), and back into line integrals ``−log(I/I0)``.

    Only the noise is reconstructed (ramp-filtered ``iradon`` of noisy − clean sinogram, exact
    because FBP is linear) and added to the image: FBP of a clean discretised sinogram already
    blurs and rings, which would otherwise confound dose with reconstruction error. The result is
    mapped back to the original intensity range (not clipped).
    """
    from skimage.transform import radon

    if photons <= 0:
        raise ValueError(f"Photon count must be positive, got {photons}.")
    unit, lo, hi = _rescale(img)
    if hi == lo:
        return np.asarray(img, dtype=np.float64).copy()
    h, w = unit.shape
    size = max(h, w)
    padded = np.zeros((size, size))  # radon needs a square image; padding is air
    top, left = (size - h) // 2, (size - w) // 2
    padded[top:top + h, left:left + w] = unit
    theta = np.linspace(0.0, 180.0, n_angles or size, endpoint=False)

    sino_unit = radon(padded, theta=theta, circle=False)
    mu_max = max_line_integral / sino_unit.max()
    sino = sino_unit * mu_max
    counts = np.maximum(rng.poisson(photons * np.exp(-sino)), 1)
    noise_sino = -np.log(counts / photons) - sino
    noise = _fbp(noise_sino, theta, size)[top:top + h, left:left + w]
    return (unit + noise / mu_max) * (hi - lo) + lo


def lowdose_image(img: np.ndarray, photons: float, rng: np.random.Generator) -> np.ndarray:
    """Cheap image-domain low-dose proxy: Poisson noise on the image rescaled to [0, photons].

    Unlike :func:`lowdose_projection` noise grows with intensity and has no streaks; it is only a
    fast approximation with the same dose axis (fewer photons = more noise).
    """
    if photons <= 0:
        raise ValueError(f"Photon count must be positive, got {photons}.")
    unit, lo, hi = _rescale(img)
    if hi == lo:
        return np.asarray(img, dtype=np.float64).copy()
    return rng.poisson(unit * photons) / photons * (hi - lo) + lo


def motion_kernel(kernel_size: int, angle_deg: float) -> np.ndarray:
    """Normalised ``k×k`` linear kernel: a k-tap line through the centre at ``angle_deg``.

    The line spans the box from edge to edge (k taps at any angle, like common MotionBlur
    augmentations), so K7 smears a point over 7 pixels along the dominant axis.

    The angle is measured from the column (x) axis towards decreasing row index (counter-clockwise
    as displayed).
    """
    from skimage.draw import line

    k = int(kernel_size)
    if k < 1:
        raise ValueError(f"Motion kernel size must be ≥ 1, got {kernel_size}.")
    half = (k - 1) / 2.0
    # Stretch the direction to the box edge so every angle gives k taps (extent k along the line).
    uy, ux = -math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))
    scale = half / max(abs(uy), abs(ux))
    dy, dx = uy * scale, ux * scale
    rr, cc = line(round(half - dy), round(half - dx), round(half + dy), round(half + dx))
    kernel = np.zeros((k, k))
    kernel[np.clip(rr, 0, k - 1), np.clip(cc, 0, k - 1)] = 1.0
    return kernel / kernel.sum()


def motion_blur(img: np.ndarray, kernel_size: int, angle_deg: float) -> np.ndarray:
    """Linear motion blur of length ``kernel_size`` pixels at ``angle_deg`` (reflecting borders)."""
    from scipy.ndimage import convolve

    return convolve(np.asarray(img, dtype=np.float64), motion_kernel(kernel_size, angle_deg), mode="reflect")


def gaussian_noise(img: np.ndarray, rel_std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive Gaussian noise with std = ``rel_std`` × the image's own intensity std."""
    if rel_std < 0:
        raise ValueError(f"Relative noise std must be ≥ 0, got {rel_std}.")
    img = np.asarray(img, dtype=np.float64)
    return img + rng.normal(0.0, rel_std * float(img.std()), img.shape)


def psnr(clean: np.ndarray, noisy: np.ndarray, data_range: float | None = None) -> float:
    """Peak signal-to-noise ratio in dB.

    ``data_range`` defaults to 255 for uint8 images (the usual 8-bit convention) and to
    ``max − min`` of ``clean`` otherwise (the dtype range of int16 CT would inflate PSNR by ~25 dB).
    Identical images give ``inf``.
    """
    from skimage.metrics import peak_signal_noise_ratio

    clean = np.asarray(clean)
    if data_range is None:
        data_range = 255.0 if clean.dtype == np.uint8 else float(clean.max() - clean.min()) or 1.0
    a, b = clean.astype(np.float64), np.asarray(noisy, dtype=np.float64)
    if np.array_equal(a, b):
        return math.inf
    return float(peak_signal_noise_ratio(a, b, data_range=data_range))


# ============================================================================================
# degradations of a folder
# ============================================================================================
def resolve_level(kind: str, level: float | str) -> float:
    """Numeric level; for ``lowdose`` also a preset name (``"DL3"`` -> 5000 photons)."""
    if kind not in KINDS:
        raise ValueError(f"Unknown degradation kind {kind!r}; choose one of {', '.join(KINDS)}.")
    if isinstance(level, str) and level.strip().upper() in DOSE_LEVELS:
        if kind != "lowdose":
            raise ValueError(f"Dose preset {level!r} only applies to kind 'lowdose'.")
        return DOSE_LEVELS[level.strip().upper()]
    if isinstance(level, str) and level.strip().upper().startswith("K") and kind == "motion":
        level = level.strip()[1:]  # "K7" -> 7, the usual way kernel sizes are named
    try:
        value = float(level)
    except (TypeError, ValueError):
        raise ValueError(f"Level {level!r} is not a number"
                         + (f" or one of {', '.join(DOSE_LEVELS)}" if kind == "lowdose" else "") + ".") from None
    if kind == "motion" and (value < 1 or value != int(value)):
        raise ValueError(f"Motion kernel size must be a positive integer, got {level!r}.")
    if kind == "lowdose" and value <= 0:
        raise ValueError(f"Photon count must be positive, got {level!r}.")
    if kind == "gaussian" and value < 0:
        raise ValueError(f"Relative noise std must be ≥ 0, got {level!r}.")
    return value


def _degrader(kind: str, level: float, method: str) -> Callable[[np.ndarray, np.random.Generator, dict], np.ndarray]:
    """A function (2D image, rng, record) -> degraded image; ``record`` collects per-image params."""
    if kind == "lowdose":
        if method not in METHODS:
            raise ValueError(f"Unknown lowdose method {method!r}; choose one of {', '.join(METHODS)}.")
        fn = lowdose_projection if method == "projection" else lowdose_image
        return lambda img, rng, record: fn(img, level, rng)
    if kind == "motion":
        def blur(img: np.ndarray, rng: np.random.Generator, record: dict) -> np.ndarray:
            angle = float(rng.uniform(0.0, 180.0))
            record.setdefault("angle_deg", []).append(round(angle, 3))
            return motion_blur(img, int(level), angle)
        return blur
    return lambda img, rng, record: gaussian_noise(img, level, rng)


def _level_label(level: float | str, value: float) -> float | str:
    """Keep preset names (``"DL3"``, ``"K7"``) as given; numbers (also from the CLI) as numbers."""
    try:
        float(level)
    except (TypeError, ValueError):
        return str(level).strip()
    return value


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_ENDINGS))


def _file_rng(seed: int, name: str) -> np.random.Generator:
    """Per-file generator keyed by the file name, so a case's noise does not depend on the others."""
    return np.random.default_rng([int(seed), zlib.crc32(name.encode("utf-8"))])


def _to_dtype(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Round and clip to the dtype's range (integer types), then cast."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        arr = np.clip(np.rint(arr), info.min, info.max)
    elif np.issubdtype(dtype, np.floating):
        info = np.finfo(dtype)
        arr = np.clip(arr, info.min, info.max)
    return arr.astype(dtype)


def _apply_2d(arr: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], vector: bool) -> np.ndarray:
    """Apply a 2D function slice-wise (3D volumes) and channel-wise (RGB images)."""
    if vector:  # SimpleITK puts components last
        return np.stack([_apply_2d(arr[..., c], fn, False) for c in range(arr.shape[-1])], axis=-1)
    if arr.ndim == 2:
        return fn(arr)
    return np.stack([_apply_2d(s, fn, False) for s in arr], axis=0)


def degrade_image(image: sitk.Image, kind: str, level: float, rng: np.random.Generator,
                  method: str = "projection", record: dict | None = None) -> sitk.Image:
    """Degrade a SimpleITK image, keeping pixel type, size, spacing, origin and direction."""
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    vector = image.GetNumberOfComponentsPerPixel() > 1
    fn = _degrader(kind, resolve_level(kind, level), method)
    record = {} if record is None else record
    out = _to_dtype(_apply_2d(arr.astype(np.float64), lambda a: fn(a, rng, record), vector), arr.dtype)
    result = sitk.GetImageFromArray(out, isVector=vector)
    result.CopyInformation(image)
    for key in image.GetMetaDataKeys():
        result.SetMetaData(key, image.GetMetaData(key))
    return result


def _find_reports(input_folder: Path, reports: Path | None) -> Path | None:
    """The report table to copy: ``reports``, ``<in>/reports.csv`` or ``reportsTs.csv`` next to ``imagesTs``."""
    if reports is not None:
        reports = Path(reports)
        if not reports.is_file():
            raise FileNotFoundError(f"Report table {reports} does not exist.")
        return reports
    if (input_folder / REPORTS_FILE).is_file():
        return input_folder / REPORTS_FILE
    if input_folder.name.startswith("images"):  # raw dataset layout: imagesTs/ + reportsTs.csv
        sibling = input_folder.parent / f"reports{input_folder.name[len('images'):]}.csv"
        if sibling.is_file():
            return sibling
    return None


def _check_separate_folders(input_folder: Path, output_folder: Path) -> None:
    """Refuse an output folder that is, contains or lies inside the input folder (symlinks resolved).

    Writing into the input would mix degraded and clean images; an output above the input (``-i D/imagesTs
    -o D``) would, with ``--overwrite``, put the input itself at risk.
    """
    src, dst = input_folder.resolve(), output_folder.resolve()
    if dst == src or src in dst.parents or dst in src.parents:
        where = "is" if dst == src else ("lies inside" if src in dst.parents else "contains")
        raise ValueError(f"Output folder {output_folder} {where} the input folder {input_folder}; degraded copies "
                         f"must go to a separate folder that neither contains nor lies inside the input "
                         f"(e.g. {src.parent / (src.name + '_degraded')}).")


def _plain_name(name: object) -> bool:
    """A bare file name (no folder part, no '..'): the only entries a manifest may name."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def _own_manifest(folder: Path) -> tuple[list[str], bool] | None:
    """(files this tool wrote into ``folder``, whether it created ``folder``) from its ``degradation.json``;
    None when there is no readable record. Records of older versions (no ``written_files``) name their
    images under ``files`` plus ``reports.csv``."""
    try:
        meta = _load_json(folder / DEGRADATION_FILE)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("written_files"), list):
        names = list(meta["written_files"])
    else:
        files = meta.get("files")
        names = (list(files) if isinstance(files, (dict, list)) else []) + ([REPORTS_FILE] if meta.get("reports") else [])
    names = [n for n in names if _plain_name(n)] + [DEGRADATION_FILE]
    return list(dict.fromkeys(names)), meta.get("created_output_folder") is True


def _remove_own_files(folder: Path) -> bool:
    """Delete what an earlier run of :func:`degrade_folder` wrote into ``folder``, nothing else.

    Only the files its manifest (``degradation.json``) lists are deleted — even in a folder the tool created,
    a file someone put there later is theirs. Returns whether the earlier run created the folder.
    """
    record = _own_manifest(folder)
    if record is None:
        return False
    names, created = record
    targets = [folder / n for n in names]
    for path in dict.fromkeys(targets):
        if path.is_symlink() or path.is_file():  # a symlink itself is removed, never what it points to
            path.unlink(missing_ok=True)
    return created


def _prepare_output(input_folder: Path, output_folder: Path, overwrite: bool) -> bool:
    """Check and prepare the output folder; returns whether this tool created it (now or in an earlier run)."""
    _check_separate_folders(input_folder, output_folder)
    dst = output_folder.resolve()
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"Output {output_folder} exists and is not a folder.")
    created = not dst.exists()
    if dst.is_dir() and any(dst.iterdir()):
        if not overwrite:
            raise ValueError(f"Output folder {output_folder} exists and is not empty; "
                             f"pass overwrite=True (CLI: --overwrite) to replace its contents.")
        # only what our own earlier run wrote (listed in its degradation.json) is deleted: no stale cases remain,
        # and files we did not write stay untouched
        created = _remove_own_files(dst)
    dst.mkdir(parents=True, exist_ok=True)
    return created


def degrade_folder(input_folder: Path, output_folder: Path, kind: str, level: float | str, seed: int = 0,
                   reports: Path | None = None, overwrite: bool = False, method: str = "projection",
                   progress: bool = True) -> Path:
    """Write a degraded copy of an nnU-Net images folder (same file names, geometry and dtype).

    Args:
        input_folder: folder of ``CASE_XXXX.<ending>`` images (any ending in :data:`IMAGE_ENDINGS`).
        output_folder: new folder; must not be, contain or lie inside the input folder; an existing non-empty
            one is only used with ``overwrite``, which first deletes the files an earlier run wrote there (as
            listed in its ``degradation.json``; in a folder that run created, also stale image files), nothing else.
        kind: ``"lowdose"`` (level = photons per detector bin I0, or a preset ``"DL1"``..``"DL4"``),
            ``"motion"`` (level = kernel size k, ``7`` or ``"K7"``) or ``"gaussian"`` (level = noise std
            relative to each image's intensity std).
        seed: noise seed; each file gets its own generator from (seed, file name).
        reports: report table to copy as ``<out>/reports.csv``; default ``<in>/reports.csv`` or the
            ``reportsTs.csv`` beside an ``imagesTs`` folder. Copied byte for byte.
        method: lowdose only: ``"projection"`` (sinogram Poisson noise + FBP) or ``"image"``.

    Values are rounded and clipped to the input dtype's range. ``degradation.json`` records kind,
    level, seed, method, per-file PSNR, (motion) blur angles and the files written (``written_files``).

    Returns:
        ``output_folder``.
    """
    import SimpleITK as sitk
    from tqdm import tqdm

    input_folder, output_folder = Path(input_folder), Path(output_folder)
    if not input_folder.is_dir():
        raise FileNotFoundError(f"Input folder {input_folder} does not exist.")
    value = resolve_level(kind, level)
    _degrader(kind, value, method)  # validate the method before touching the output folder
    files = _image_files(input_folder)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_ENDINGS)}) in {input_folder}.")
    report_table = _find_reports(input_folder, reports)
    created = _prepare_output(input_folder, output_folder, overwrite)
    written: list[str] = []

    per_file: dict[str, dict] = {}
    for path in tqdm(files, desc=f"{kind} {level}", disable=not progress):
        image = sitk.ReadImage(str(path))
        record: dict = {}
        degraded = degrade_image(image, kind, value, _file_rng(seed, path.name), method, record)
        written.append(path.name)
        sitk.WriteImage(degraded, str(output_folder / path.name))
        record["psnr"] = round(psnr(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(degraded)), 3)
        per_file[path.name] = record
    if report_table is not None:
        written.append(REPORTS_FILE)
        shutil.copyfile(report_table, output_folder / REPORTS_FILE)

    finite = [r["psnr"] for r in per_file.values() if math.isfinite(r["psnr"])]
    _write_json(output_folder / DEGRADATION_FILE, {
        "kind": kind, "level": _level_label(level, value), "level_value": value,
        "relative_dose": value / DOSE_LEVELS["DL1"] if kind == "lowdose" else None,
        "seed": seed, "method": method if kind == "lowdose" else None,
        "input_folder": str(input_folder.resolve()),
        "reports": str(report_table.resolve()) if report_table is not None else None,
        "mean_psnr": round(float(np.mean(finite)), 3) if finite else None,
        "files": {name: {k: (v if math.isfinite(v) else None) if isinstance(v, float) else v
                         for k, v in rec.items()} for name, rec in per_file.items()},
        # manifest: --overwrite deletes only these files (and, in a folder we created, its stale image files)
        "written_files": written + [DEGRADATION_FILE],
        "created_output_folder": created,
    })
    return output_folder


# ============================================================================================
# CLIs
# ============================================================================================
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
    meta = _load_json(out / DEGRADATION_FILE)
    print(f"Wrote {len(meta['files'])} degraded images to {out} (mean PSNR {meta['mean_psnr']} dB)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(degrade_main())
