"""Degraded test sets: a copy of an nnU-Net raw images folder with simulated low-dose CT noise, motion blur or
Gaussian noise — same file names, geometry and dtype — plus the unchanged report table, so that text-guided
models can predict it. The degradations themselves are :mod:`nnunetv2_textseg.degradations`, the functions the
training augmentation applies too; this module draws their random parameters per file, applies them slice- and
component-wise and records what it did. The command line is ``nnUNetv2_textseg_degrade``
(:func:`nnunetv2_textseg.robustness.degrade_main`).

Levels
------
``lowdose`` takes the number of incident photons per detector bin and projection angle, ``I0`` (see
:func:`~nnunetv2_textseg.degradations.lowdose_projection`; the ``image`` method reads the same number as the
expected count of the brightest pixel). Halving ``I0`` is halving the dose. Named presets (:data:`DOSE_LEVELS`),
relative dose = ``I0 / 1e5``:

======  ========  =============  ==============================
preset  I0        relative dose  meaning
======  ========  =============  ==============================
DL1     1e5       1.00           near full dose, barely visible
DL2     2e4       0.20           mild noise
DL3     5e3       0.05           strong noise
DL4     1e3       0.01           very low dose, heavy streaks
======  ========  =============  ==============================

``motion`` takes the kernel size ``k`` (``7`` or ``"K7"``): the smear length in pixels along the dominant axis,
at an angle drawn uniformly from [0°, 180°) per image. ``gaussian`` takes the noise std relative to each image's
own intensity std.
"""
from __future__ import annotations

import json
import math
import shutil
import zlib
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Callable, Mapping

import numpy as np

from nnunetv2_textseg.atomic import atomic_write_text
from nnunetv2_textseg.degradations import gaussian_noise, lowdose_image, lowdose_projection, motion_blur

if TYPE_CHECKING:  # SimpleITK is imported lazily so that importing the package stays fast
    import SimpleITK as sitk

DEGRADATION_FILE = "degradation.json"
REPORTS_FILE = "reports.csv"

#: Photons per detector bin (I0) of the named dose levels; relative dose = I0 / 1e5.
DOSE_LEVELS: Mapping[str, float] = MappingProxyType({"DL1": 1e5, "DL2": 2e4, "DL3": 5e3, "DL4": 1e3})
KINDS = ("lowdose", "motion", "gaussian")
#: How ``lowdose`` is simulated: on the sinogram (:func:`lowdose_projection`) or on the image (:func:`lowdose_image`).
METHODS = ("projection", "image")
#: File endings of images nnU-Net reads (2D via SimpleITK / natural-image readers).
IMAGE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".mha", ".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")


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
    """A function (2D image, the file's generator, record) -> degraded image.

    It draws the degradation's random parameters from the generator (the motion angle; the noise kinds draw their
    noise from it), applies the shared function of :mod:`nnunetv2_textseg.degradations` and notes drawn
    parameters in ``record``.
    """
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
        meta = json.loads((folder / DEGRADATION_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    if isinstance(meta.get("written_files"), list):
        names = list(meta["written_files"])
    else:
        files = meta.get("files")
        names = ((list(files) if isinstance(files, (dict, list)) else [])
                 + ([REPORTS_FILE] if meta.get("reports") else []))
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
    degradation_record = {
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
    }
    atomic_write_text(output_folder / DEGRADATION_FILE, json.dumps(degradation_record, indent=2))
    return output_folder
