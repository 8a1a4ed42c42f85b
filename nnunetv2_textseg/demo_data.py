"""Synthetic chest-radiograph dataset with reports, in nnU-Net v2 raw format, for demos and tests.

Each case is a 2D grayscale "radiograph" (dark surroundings, soft tissue, two dark lung fields,
bright mediastinum, rib-like bands, vessel-like texture, noise) with 0-3 faint ground-glass lesions
and a report naming where they are. The lesions are low-contrast on purpose, so that the report
has to help the segmentation.

Orientation convention (as on a real PA chest radiograph): the patient's **right** lung is on the
**image left** (columns ``< size // 2``) and the patient's **left** lung is on the **image right**
(columns ``>= size // 2``). Reports use the patient's sides. Each lung is split into three
equal-height zones, upper/middle/lower, along its own vertical extent.

Reports: by default, real QaTa-COV19 reports (LViT wording, ``shared/reports/qata_cov19_lvit``)
are drawn, parsed with :func:`parse_report`, and lesions are drawn in the zones they name; the text
is kept verbatim. About 10% of cases use the template generator :func:`render_report` for variety,
and a few cases are negative ("No pulmonary infection.") with an empty mask. Without the real
tables every report comes from the template generator.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage import io as skio
from tqdm import tqdm

from nnunetv2_textseg.report_parsing import LEVELS, SIDES, Finding, parse_report, render_report

REPORTS_ENV_VAR = "NNUNET_TEXTSEG_SHARED_REPORTS"
_REPORT_COLUMNS = ("description", "text", "report")
_P_NEGATIVE = 0.04  # rare "no infection" cases with an empty mask
_P_TEMPLATE = 0.10  # template reports mixed in even when real reports exist
_MAX_LESIONS = 3


@dataclass(frozen=True)
class Lungs:
    """Lung masks and vertical extents per patient side ("left"/"right")."""

    masks: dict[str, np.ndarray]
    rows: dict[str, tuple[int, int]]  # first and last row of each lung

    @property
    def union(self) -> np.ndarray:
        return self.masks["left"] | self.masks["right"]

    def zone_mask(self, side: str, levels: tuple[str, ...]) -> np.ndarray:
        """Pixels of ``side``'s lung that lie in the given levels (thirds of its height)."""
        top, bottom = self.rows[side]
        edges = np.linspace(top, bottom + 1, len(LEVELS) + 1)
        band = np.zeros_like(self.masks[side])
        for lv in levels:
            i = LEVELS.index(lv)
            band[int(round(edges[i])):int(round(edges[i + 1])), :] = True
        return band & self.masks[side]


@dataclass(frozen=True)
class DemoCase:
    image: np.ndarray  # uint8 (H, W)
    mask: np.ndarray  # uint8 (H, W), 0/1
    report: str


# --------------------------------------------------------------------------------------------
# image synthesis
# --------------------------------------------------------------------------------------------
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise rescaled to zero mean and unit std."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="reflect")
    return (field - field.mean()) / (field.std() + 1e-8)


def _ellipse(shape: tuple[int, int], cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
    """Normalised squared radius ((y-cy)/ry)^2 + ((x-cx)/rx)^2 on the pixel grid (<= 1 inside)."""
    yy, xx = np.mgrid[:shape[0], :shape[1]].astype(np.float64)
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2


def _make_lungs(rng: np.random.Generator, size: int) -> tuple[Lungs, np.ndarray, np.ndarray]:
    """Random lung fields, body outline and heart shadow. Returns (lungs, body, heart) masks."""
    shape = (size, size)
    s = float(size)
    body = _ellipse(shape, s * rng.uniform(0.52, 0.58), s * 0.5, s * 0.52, s * rng.uniform(0.44, 0.48)) <= 1
    heart = _ellipse(shape, s * rng.uniform(0.66, 0.72), s * rng.uniform(0.54, 0.58),
                     s * rng.uniform(0.11, 0.14), s * rng.uniform(0.11, 0.14)) <= 1
    half = np.zeros(shape, dtype=bool)
    half[:, size // 2:] = True  # image right half = patient's left
    cy = s * rng.uniform(0.46, 0.52)
    masks, rows = {}, {}
    for side, cx0, shrink in (("right", 0.30, 1.0), ("left", 0.70, 0.94)):
        cx = s * (cx0 + rng.uniform(-0.02, 0.02))
        ry = s * rng.uniform(0.27, 0.32) * shrink
        rx = s * rng.uniform(0.13, 0.16) * shrink
        lung = _ellipse(shape, cy + rng.uniform(-0.02, 0.02) * s, cx, ry, rx) <= 1
        lung &= half if side == "left" else ~half
        lung[:max(1, int(0.08 * s)), :] = False  # apices never reach the image edge
        lung &= ~heart
        masks[side] = lung
        r = np.flatnonzero(lung.any(axis=1))
        rows[side] = (int(r[0]), int(r[-1]))
    return Lungs(masks, rows), body, heart


def _anatomy(rng: np.random.Generator, lungs: Lungs, body: np.ndarray, heart: np.ndarray) -> np.ndarray:
    """Float image in ~[0, 1]: dark air outside, grey soft tissue, dark lungs, bright mediastinum,
    rib bands and vessel texture over the lungs."""
    size = body.shape[0]
    img = np.where(body, 0.55, 0.06)
    lung = lungs.union
    img = np.where(lung, 0.22, img)
    mediastinum = np.abs(np.arange(size) - size * rng.uniform(0.49, 0.51)) < size * rng.uniform(0.05, 0.07)
    img = np.where(mediastinum[None, :] & body & ~lung, 0.68, img)  # spine + mediastinum
    img = np.where(heart & body, 0.72, img)
    img = ndimage.gaussian_filter(img, sigma=size / 64, mode="nearest")  # soft anatomical edges

    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    # Ribs: bright bands curving down laterally, fainter over soft tissue.
    period = size / rng.uniform(8.0, 10.0)
    curvature = rng.uniform(1.0, 1.6) / size
    phase = rng.uniform(0, 2 * np.pi)
    ribs = 0.5 + 0.5 * np.cos(2 * np.pi * (yy + curvature * (xx - size / 2) ** 2) / period + phase)
    img += np.where(lung, 0.08, np.where(body, 0.03, 0.0)) * ribs ** 4

    # Vessels: fine smooth texture, denser towards the hila (medial lung).
    hilum_weight = np.clip(1.0 - np.abs(xx - size / 2) / (0.35 * size), 0.2, 1.0)
    vessels = np.abs(_smooth_noise(rng, (size, size), sigma=size / 80))
    img += lung * 0.05 * hilum_weight * vessels
    return img


def _finish(rng: np.random.Generator, img: np.ndarray) -> np.ndarray:
    """Exposure gradient + quantum noise, then map [0, 1] to uint8."""
    size = img.shape[0]
    yy, xx = np.mgrid[:size, :size] / size
    gy, gx = rng.uniform(-0.05, 0.05, size=2)
    img = img * rng.uniform(0.9, 1.1) + gy * (yy - 0.5) + gx * (xx - 0.5)
    img = img + rng.normal(0.0, 0.025, img.shape)
    return np.clip(np.round(img * 255), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------------
# lesions
# --------------------------------------------------------------------------------------------
def _lesion_mask(rng: np.random.Generator, region: np.ndarray, full_extent: bool) -> np.ndarray:
    """Ground-glass-like blob: smoothed noise thresholded inside an ellipse, restricted to ``region``.

    ``full_extent`` makes the ellipse span the region's height (multi-zone statements such as
    "all left lung"); otherwise it is a smaller patch around a random region pixel.
    """
    size = region.shape[0]
    ys, xs = np.nonzero(region)
    height, width = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    if full_extent:
        cy = 0.5 * (ys.min() + ys.max()) + rng.uniform(-0.1, 0.1) * height
        cx = 0.5 * (xs.min() + xs.max()) + rng.uniform(-0.1, 0.1) * width
        ry = 0.5 * height * rng.uniform(0.8, 1.1)
    else:
        i = int(rng.integers(len(ys)))  # centre on a region pixel so the blob overlaps the zone
        cy, cx = float(ys[i]), float(xs[i])
        ry = 0.5 * height * rng.uniform(0.6, 1.0)
    ry, rx = max(2.0, ry), max(2.0, 0.5 * width * rng.uniform(0.4, 0.8))
    r2 = _ellipse(region.shape, cy, cx, ry, rx)
    # Irregular, patchy outline: the noise decides where the ellipse's soft interior is kept.
    field = (1.0 - r2) + 0.35 * _smooth_noise(rng, region.shape, sigma=max(1.0, size / 40))
    blob = (field > rng.uniform(0.05, 0.25)) & region
    blob = ndimage.binary_opening(blob, iterations=1) if blob.sum() > 40 else blob
    min_px = max(6, int(0.0015 * size * size))
    if blob.sum() < min_px:  # noise ate the lesion: fall back to the plain ellipse
        blob = (r2 <= 1) & region
    if blob.sum() < min_px:
        blob = region.copy()
    return blob


def _lesion_groups(finding: Finding, rng: np.random.Generator) -> list[tuple[str, tuple[str, ...]]]:
    """One lesion per stated side group, plus extra ones when more areas are stated (max 3)."""
    groups = [(side, finding.levels(side)) for side in SIDES if finding.levels(side)]
    wanted = min(finding.count if finding.count else len(groups), _MAX_LESIONS)
    extra = [groups[int(rng.integers(len(groups)))] for _ in range(max(0, wanted - len(groups)))]
    return groups + extra


def _draw_lesions(rng: np.random.Generator, finding: Finding, lungs: Lungs,
                  contrast: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Label mask and additive intensity map for the lesions a finding describes."""
    shape = lungs.union.shape
    label = np.zeros(shape, dtype=bool)
    added = np.zeros(shape)
    seen: set[tuple[str, tuple[str, ...]]] = set()
    for side, levels in _lesion_groups(finding, rng):
        region = lungs.zone_mask(side, levels)
        if not region.any():  # degenerate geometry: fall back to the whole lung on that side
            region = lungs.masks[side]
        first = (side, levels) not in seen
        seen.add((side, levels))
        blob = _lesion_mask(rng, region, full_extent=first and len(levels) > 1)
        c = rng.uniform(*contrast)
        texture = 0.7 + 0.3 * np.clip(_smooth_noise(rng, shape, sigma=max(1.0, shape[0] / 48)), -1, 1)
        added = np.maximum(added, blob * c * texture)
        label |= blob
    # Ground glass fades out at its border rather than ending in a step.
    added = ndimage.gaussian_filter(added, sigma=max(0.7, shape[0] / 96))
    return label, added


# --------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------
def _random_finding(rng: np.random.Generator) -> Finding:
    """A plausible finding: bilateral more often than not, lower zones most often."""
    sides = list(SIDES) if rng.random() < 0.6 else [str(rng.choice(SIDES))]
    zones: set[tuple[str, str]] = set()
    for side in sides:
        u = rng.random()
        if u < 0.3:
            levels = LEVELS
        elif u < 0.75:
            levels = (str(rng.choice(LEVELS, p=[0.2, 0.3, 0.5])),)
        else:
            levels = tuple(sorted(rng.choice(LEVELS, size=2, replace=False), key=LEVELS.index))
        zones.update((side, lv) for lv in levels)
    count = len(sides) + (1 if rng.random() < 0.15 else 0)
    return Finding(frozenset(zones), count)


def default_reports_dir() -> Path | None:
    """Real-report folder: ``$NNUNET_TEXTSEG_SHARED_REPORTS`` (the reports root or the
    ``qata_cov19_lvit`` folder itself), else ``shared/reports/qata_cov19_lvit`` beside the checkout."""
    candidates = []
    env = os.environ.get(REPORTS_ENV_VAR)
    if env:
        candidates += [Path(env) / "qata_cov19_lvit", Path(env)]
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "reports" / "qata_cov19_lvit")
    for c in candidates:
        if c.is_dir() and _report_tables(c):
            return c
    return None


def _report_tables(folder: Path) -> list[Path]:
    """Report tables in ``folder``: train tables first when present (test reports stay unseen)."""
    tables = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".csv", ".xlsx") and p.is_file())
    exact = [p for p in tables if p.stem.lower() in ("train", "train_text")]  # not the *_10/_25 subsets
    train = [p for p in tables if p.stem.lower().startswith("train")]
    return exact or train or tables


def _read_table(path: Path) -> pd.Series:
    """The report column of one table (LViT csv, MosMedData+ ';' csv, MedCLIPSeg xlsx)."""
    if path.suffix.lower() == ".xlsx":
        df = pd.read_excel(path)
    else:
        with open(path, encoding="utf-8-sig") as f:
            header = f.readline()
        sep = ";" if header.count(";") > header.count(",") else ","
        df = pd.read_csv(path, sep=sep, encoding="utf-8-sig")
    for col in df.columns:
        if str(col).strip().lower() in _REPORT_COLUMNS:
            return df[col].dropna().astype(str)
    return pd.Series([], dtype=str)


def load_real_reports(folder: Path) -> list[tuple[str, Finding]]:
    """All parseable, positive reports of the tables in ``folder`` (duplicates kept, so drawing
    uniformly reproduces the real distribution of findings)."""
    out: list[tuple[str, Finding]] = []
    parsed: dict[str, Finding | None] = {}
    for table in _report_tables(folder):
        for text in _read_table(table):
            if text not in parsed:
                parsed[text] = parse_report(text)
            finding = parsed[text]
            if finding is not None and finding.zones:
                out.append((text, finding))
    return out


def _choose_report(rng: np.random.Generator, pool: list[tuple[str, Finding]]) -> tuple[str, Finding]:
    """Report text and the finding the lesions must follow."""
    u = rng.random()
    if u < _P_NEGATIVE:
        finding = Finding(frozenset(), 0)
        return render_report(finding, rng), finding
    if pool and u < 1.0 - _P_TEMPLATE:
        return pool[int(rng.integers(len(pool)))]
    finding = _random_finding(rng)
    style = "lvit" if rng.random() < 0.7 else "medclipseg"
    text = render_report(finding, rng, style=style, typo_prob=0.05)
    # A typo can, rarely, change what the text says; the lesions follow what it says.
    reparsed = parse_report(text)
    return text, reparsed if reparsed is not None and reparsed.zones else finding


# --------------------------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------------------------
def make_case(rng: np.random.Generator, size: int, pool: list[tuple[str, Finding]],
              contrast: tuple[float, float]) -> DemoCase:
    """One synthetic radiograph, its lesion mask and its report."""
    report, finding = _choose_report(rng, pool)
    lungs, body, heart = _make_lungs(rng, size)
    img = _anatomy(rng, lungs, body, heart)
    label = np.zeros((size, size), dtype=bool)
    if finding.zones:
        label, added = _draw_lesions(rng, finding, lungs, contrast)
        img = img + added
    return DemoCase(_finish(rng, img), label.astype(np.uint8), report)


def case_finding_and_lungs(seed: int, index: int, size: int,
                           pool: list[tuple[str, Finding]]) -> tuple[Finding, Lungs]:
    """The finding and lung fields of demo case ``index`` (see :func:`named_zones`), re-drawn from its random stream."""
    rng = np.random.default_rng([seed, index])
    _, finding = _choose_report(rng, pool)
    lungs, _, _ = _make_lungs(rng, size)
    return finding, lungs


def named_zones(seed: int, index: int, size: int, pool: list[tuple[str, Finding]]) -> np.ndarray:
    """The lung zones the report of demo case ``index`` (0-based over training then test cases; ``demo_0001`` is 0) of
    a dataset generated with ``seed``, ``size`` and report ``pool`` names: bool (size, size), all False for a negative
    report. Re-draws the case's report and lungs from the same random stream as :func:`generate_demo_dataset`, so
    this is where the generator was allowed to put lesions — the most a report can say about where they are."""
    finding, lungs = case_finding_and_lungs(seed, index, size, pool)
    zones = np.zeros((size, size), dtype=bool)
    for side, level in finding.zones:
        zones |= lungs.zone_mask(side, (level,))
    return zones


def derangement(rng: np.random.Generator, n: int) -> np.ndarray:
    """Permutation without fixed points (cycle through a random order), identity if n < 2."""
    if n < 2:
        return np.arange(n)
    order = rng.permutation(n)
    perm = np.empty(n, dtype=int)
    perm[order] = np.roll(order, -1)
    return perm


def _prepare_folder(raw_root: Path, dataset_id: int, name: str, overwrite: bool) -> Path:
    folder = raw_root / f"Dataset{dataset_id:03d}_{name}"
    clashes = [p for p in raw_root.glob(f"Dataset{dataset_id:03d}_*") if p.is_dir() and p != folder]
    if clashes:
        raise ValueError(f"dataset id {dataset_id} is already used by {clashes[0]}; choose another "
                         f"--dataset_id (nnU-Net needs unique ids)")
    if folder.exists():
        if not overwrite:
            raise ValueError(f"dataset folder {folder} already exists; pass overwrite=True "
                             f"(--overwrite) to replace it")
        shutil.rmtree(folder)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (folder / sub).mkdir(parents=True)
    return folder


def _write_dataset_json(folder: Path, name: str, n_train: int, meta: dict) -> None:
    dataset_json = {
        "channel_names": {"0": "X-ray"},  # not "CT": nnU-Net then z-scores each image
        "labels": {"background": 0, "lesion": 1},
        "numTraining": n_train,
        "file_ending": ".png",
        "name": name,
        "description": "Synthetic chest radiographs with faint lesions and location reports "
                       "(nnunetv2_textseg demo). Patient's left = image right.",
        "textseg_demo": meta,
    }
    with open(folder / "dataset.json", "w", encoding="utf-8") as f:
        json.dump(dataset_json, f, indent=2)


def generate_demo_dataset(raw_root: Path, dataset_id: int = 990, name: str = "TextSegDemo",
                          n_train: int = 40, n_test: int = 20, image_size: int = 96, seed: int = 0,
                          control: bool = False, real_reports_dir: Path | None = None,
                          lesion_contrast: tuple[float, float] = (0.04, 0.12),
                          overwrite: bool = False) -> Path:
    """Write ``raw_root/Dataset{id:03d}_{name}`` (imagesTr/labelsTr/imagesTs/labelsTs as PNG,
    dataset.json, reportsTr.csv, reportsTs.csv with columns ``case_id,report``).

    ``real_reports_dir=None`` auto-detects the real LViT tables (see :func:`default_reports_dir`);
    a folder without tables means template reports only. ``control=True`` keeps images and masks
    identical to ``control=False`` with the same seed but gives every case the report of another
    case of the same split, so the reports carry no information about the mask.
    ``lesion_contrast`` is the range of the lesions' added brightness as a fraction of the
    intensity range. Returns the dataset folder.
    """
    raw_root = Path(raw_root)
    reports_dir = default_reports_dir() if real_reports_dir is None else Path(real_reports_dir)
    pool = load_real_reports(reports_dir) if reports_dir is not None and reports_dir.is_dir() else []
    folder = _prepare_folder(raw_root, dataset_id, name, overwrite)

    splits = (("Tr", n_train, 0), ("Ts", n_test, n_train))
    for k, (split, n, offset) in enumerate(tqdm(splits, desc=f"Dataset{dataset_id:03d}", unit="split", leave=False)):
        ids, reports = [], []
        for i in tqdm(range(n), desc=f"  {split}", unit="case", leave=False):
            case_id = f"demo_{offset + i + 1:04d}"
            # One generator per case: a case does not change when n_train/n_test do.
            case = make_case(np.random.default_rng([seed, offset + i]), image_size, pool, lesion_contrast)
            skio.imsave(folder / f"images{split}" / f"{case_id}_0000.png", case.image, check_contrast=False)
            skio.imsave(folder / f"labels{split}" / f"{case_id}.png", case.mask, check_contrast=False)
            ids.append(case_id)
            reports.append(case.report)
        if control:
            perm = derangement(np.random.default_rng([seed, 7919, k]), n)
            reports = [reports[j] for j in perm]
        pd.DataFrame({"case_id": ids, "report": reports}).to_csv(
            folder / f"reports{split}.csv", index=False, encoding="utf-8")

    meta = {"seed": seed, "control": control, "image_size": image_size,
            "lesion_contrast": list(lesion_contrast), "real_reports": len(pool) > 0,
            "orientation": "patient's right lung = image left (columns < size/2)"}
    _write_dataset_json(folder, name, n_train, meta)
    return folder


# --------------------------------------------------------------------------------------------
# preview + CLI
# --------------------------------------------------------------------------------------------
def preview_grid(folder: Path, n: int = 8, split: str = "Tr", scale: int = 2) -> np.ndarray:
    """RGB grid of the first ``n`` cases (upsampled ``scale`` times) with the mask outline in red."""
    from skimage.segmentation import find_boundaries

    images = sorted((Path(folder) / f"images{split}").glob("*_0000.png"))[:n]
    tiles = []
    for p in images:
        img = np.kron(skio.imread(p), np.ones((scale, scale), dtype=np.uint8))
        mask = skio.imread(Path(folder) / f"labels{split}" / p.name.replace("_0000.png", ".png"))
        mask = np.kron(mask, np.ones((scale, scale), dtype=np.uint8))
        rgb = np.repeat(img[..., None], 3, axis=-1)
        rgb[find_boundaries(mask > 0, mode="inner")] = (255, 0, 0)
        tiles.append(np.pad(rgb, ((2, 2), (2, 2), (0, 0)), constant_values=255))
    cols = min(4, len(tiles))
    rows = [np.concatenate(tiles[r:r + cols] + [np.full_like(tiles[0], 255)] * (cols - len(tiles[r:r + cols])), axis=1)
            for r in range(0, len(tiles), cols)]
    return np.concatenate(rows, axis=0)


def main(argv: list[str] | None = None) -> int:
    """CLI: ``nnUNetv2_textseg_make_demo -d 990 --n_train 40 --n_test 20``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("-d", "--dataset_id", type=int, default=990)
    parser.add_argument("--name", default="TextSegDemo")
    parser.add_argument("--n_train", type=int, default=40)
    parser.add_argument("--n_test", type=int, default=20)
    parser.add_argument("--size", type=int, default=96, help="image side length in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--control", action="store_true",
                        help="shuffle reports between cases so they carry no information")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing dataset folder")
    parser.add_argument("--raw", default=os.environ.get("nnUNet_raw"),
                        help="nnU-Net raw folder (default: $nnUNet_raw)")
    parser.add_argument("--reports_dir", type=Path, default=None,
                        help=f"folder with real report tables (default: ${REPORTS_ENV_VAR} or shared/reports)")
    args = parser.parse_args(argv)
    if not args.raw:
        parser.error("nnUNet_raw is not set; pass --raw or export nnUNet_raw")
    try:
        folder = generate_demo_dataset(Path(args.raw), args.dataset_id, args.name, args.n_train,
                                       args.n_test, args.size, args.seed, args.control,
                                       args.reports_dir, overwrite=args.overwrite)
    except ValueError as e:
        parser.error(str(e))
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
