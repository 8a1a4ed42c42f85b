"""Tests for the robustness protocol: label-fraction splits and degraded test folders (fast, CPU), through the
names nnunetv2_textseg.robustness exports. The degradations' own numbers: test_degradations.py."""
from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_textseg.robustness import (BACKUP_FILE, DEGRADATION_FILE, DOSE_LEVELS, SPLITS_FILE,
                                         case_identifiers, default_splits, degrade_folder, degrade_main,
                                         fraction_size, lowdose_image, lowdose_projection,
                                         make_label_fraction_splits, parse_fraction, psnr, splits_main,
                                         subsample_split)

CASES = [f"case_{i:03d}" for i in range(100)]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _base_splits() -> list[dict]:
    return default_splits(CASES, n_folds=5)


def _fake_preprocessed(root: Path, cases: list[str], ending: str = "npz") -> Path:
    """A dataset folder whose ``nnUNetPlans_2d`` nnU-Net's dataset classes recognise."""
    folder = root / "Dataset999_Fake"
    config = folder / "nnUNetPlans_2d"
    config.mkdir(parents=True)
    for case in cases:
        if ending == "npz":
            np.savez(config / f"{case}.npz", data=np.zeros((1, 4, 4), np.float32))
        else:
            (config / f"{case}.b2nd").write_bytes(b"")
            (config / f"{case}_seg.b2nd").write_bytes(b"")
        with open(config / f"{case}.pkl", "wb") as f:
            pickle.dump({"spacing": (1.0, 1.0)}, f)
    return folder


def _phantom(n: int = 64) -> np.ndarray:
    """Smooth CT-like uint8 phantom: body ellipse, two dark lungs, a bright nodule."""
    y, x = np.mgrid[:n, :n] / (n - 1) * 2 - 1
    img = 0.1 + 0.6 * ((x / 0.85) ** 2 + (y / 0.7) ** 2 < 1)
    img -= 0.45 * (((x + 0.35) / 0.25) ** 2 + (y / 0.45) ** 2 < 1)
    img -= 0.45 * (((x - 0.35) / 0.25) ** 2 + (y / 0.45) ** 2 < 1)
    img += 0.3 * ((x / 0.1) ** 2 + ((y + 0.3) / 0.1) ** 2 < 1)
    from scipy.ndimage import gaussian_filter
    return np.clip(gaussian_filter(img, 1.0) * 255, 0, 255).astype(np.uint8)


def _images_folder(root: Path, n_cases: int = 3, ending: str = ".png") -> Path:
    folder = root / "imagesTs"
    folder.mkdir(parents=True)
    for i in range(n_cases):
        img = sitk.GetImageFromArray(np.roll(_phantom(), 3 * i, axis=1))
        img.SetSpacing((0.7, 0.9))
        if ending != ".png":  # PNG carries no origin; the other formats must keep it
            img.SetOrigin((10.0, -5.0))
        sitk.WriteImage(img, str(folder / f"case_{i:03d}_0000{ending}"))
    return folder


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


# --------------------------------------------------------------------------------------------
# label-fraction splits
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, expected", [(0.05, 0.05), ("0.25", 0.25), (5, 0.05), ("5", 0.05),
                                             ("5%", 0.05), ("1%", 0.01), (1, 1.0), ("100", 1.0)])
def test_parse_fraction(value, expected):
    assert parse_fraction(value) == pytest.approx(expected)


@pytest.mark.parametrize("value", [0, "-3", "150", "abc"])
def test_parse_fraction_rejects(value):
    with pytest.raises(ValueError):
        parse_fraction(value)


def test_fraction_size_is_ceil_and_at_least_one():
    assert fraction_size(80, 0.05) == 4
    assert fraction_size(100, 0.05) == 5  # no float-noise extra case (0.05 * 100 = 5.000000000000001)
    assert fraction_size(81, 0.05) == 5  # ceil(4.05)
    assert fraction_size(10, 0.01) == 1
    assert fraction_size(10, 1.0) == 10


def test_subsample_split_reproducible_and_order_independent():
    train = CASES[:80]
    a = subsample_split(train, 0.25, 3)
    assert a == subsample_split(list(reversed(train)), 0.25, 3)
    assert a != subsample_split(train, 0.25, 4)
    assert len(a) == 20 and set(a) <= set(train)


def test_splits_sizes_validation_and_nesting(tmp_path):
    folder = tmp_path / "Dataset999_Fake"
    folder.mkdir()
    base = _base_splits()
    by_fraction = {}
    for fraction in (0.05, 0.25, 1.0):
        splits = make_label_fraction_splits(folder, fraction, seed=0, base_splits=base)
        assert json.loads((folder / SPLITS_FILE).read_text()) == splits
        by_fraction[fraction] = splits
        for fold, (split, full) in enumerate(zip(splits, base)):
            assert split["val"] == full["val"]  # nnU-Net's validation set, untouched
            assert not set(split["train"]) & set(split["val"])
            assert set(split["train"]) <= set(full["train"])
            assert len(split["train"]) == fraction_size(len(full["train"]), fraction)
    for fold in range(5):
        s5, s25, s100 = (set(by_fraction[f][fold]["train"]) for f in (0.05, 0.25, 1.0))
        assert s5 < s25 < s100 == set(base[fold]["train"])
    meta = json.loads((folder / "splits_final_fraction.json").read_text())
    assert meta["fraction"] == 1.0 and meta["seed"] == 0


def test_splits_reproducible_and_seed_dependent(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    base = _base_splits()
    a = make_label_fraction_splits(folder, 0.25, seed=1, base_splits=base)
    b = make_label_fraction_splits(folder, 0.25, seed=1, base_splits=base)
    c = make_label_fraction_splits(folder, 0.25, seed=2, base_splits=base)
    assert a == b
    assert all(x["train"] != y["train"] for x, y in zip(a, c))
    # folds are subsampled independently (seed mixes in the fold index)
    assert len({tuple(s["train"]) for s in a}) == 5


def test_val_cases_in_base_train_are_dropped(tmp_path):
    folder = tmp_path / "ds"
    folder.mkdir()
    base = [{"train": ["a", "b", "c", "d"], "val": ["d", "e"]}]
    splits = make_label_fraction_splits(folder, 1.0, base_splits=base)
    assert splits == [{"train": ["a", "b", "c"], "val": ["d", "e"]}]


def test_real_preprocessed_folder_default_split_and_backup(tmp_path):
    folder = _fake_preprocessed(tmp_path, CASES[:20])
    assert case_identifiers(folder) == CASES[:20]
    splits = make_label_fraction_splits(folder, 0.25, seed=0)
    full = json.loads((folder / BACKUP_FILE).read_text())
    assert full == default_splits(CASES[:20])  # nnU-Net's own 5-fold split, seed 12345
    assert [s["val"] for s in splits] == [s["val"] for s in full]
    assert [len(s["train"]) for s in splits] == [4] * 5  # ceil(0.25 * 16)
    # rerunning with another fraction reuses the backup, not our own fraction split
    again = make_label_fraction_splits(folder, 0.5, seed=0)
    assert all(set(a["train"]) < set(b["train"]) for a, b in zip(splits, again))


def test_blosc2_folder_identifiers(tmp_path):
    folder = _fake_preprocessed(tmp_path, CASES[:7], ending="b2nd")
    assert case_identifiers(folder) == CASES[:7]
    with pytest.raises(ValueError, match="pass the dataset folder above it"):
        case_identifiers(folder / "nnUNetPlans_2d")


def test_existing_nnunet_split_is_backed_up_not_lost(tmp_path):
    folder = _fake_preprocessed(tmp_path, CASES[:10])
    custom = [{"train": CASES[:8], "val": CASES[8:10]}]
    (folder / SPLITS_FILE).write_text(json.dumps(custom))
    splits = make_label_fraction_splits(folder, 0.5, seed=0)
    assert json.loads((folder / BACKUP_FILE).read_text()) == custom
    assert splits[0]["val"] == CASES[8:10] and len(splits[0]["train"]) == 4


def test_foreign_split_file_requires_overwrite(tmp_path):
    folder = _fake_preprocessed(tmp_path, CASES[:10])
    make_label_fraction_splits(folder, 0.5, seed=0)
    # someone edits splits_final.json by hand after our run: it no longer matches our record
    (folder / SPLITS_FILE).write_text(json.dumps([{"train": CASES[:2], "val": CASES[2:4]}]))
    with pytest.raises(ValueError, match="overwrite"):
        make_label_fraction_splits(folder, 0.25, seed=0)
    splits = make_label_fraction_splits(folder, 0.25, seed=0, overwrite=True)
    assert len(splits) == 5  # from the backup (full split), not the edited file
    # a custom output path that we did not write is protected too
    other = tmp_path / "mine.json"
    other.write_text("[]")
    with pytest.raises(ValueError, match="overwrite"):
        make_label_fraction_splits(folder, 0.25, output=other)


def test_splits_cli(tmp_path, monkeypatch, capsys):
    folder = _fake_preprocessed(tmp_path, CASES[:20])
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
    assert splits_main(["-d", "999", "-p", "25", "--seed", "3"]) == 0
    splits = json.loads((folder / SPLITS_FILE).read_text())
    assert [len(s["train"]) for s in splits] == [4] * 5
    assert "Wrote" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# dose presets and PSNR
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [lowdose_projection, lowdose_image])
def test_psnr_falls_with_dose(fn):
    """The presets mean what the README's tables assume: DL1 barely visible, each step clearly noisier."""
    img = _phantom()
    values = [psnr(img, np.clip(fn(img, DOSE_LEVELS[k], np.random.default_rng(0)), 0, 255).astype(np.uint8))
              for k in ("DL1", "DL3", "DL4")]
    assert values[0] > values[1] + 3 > values[2] + 6, values
    assert values[0] > 30  # near full dose is only mildly noisy


def test_psnr_conventions():
    img = _phantom()
    assert psnr(img, img) == float("inf")
    noisy = img.astype(np.int16) + 5
    assert psnr(img, noisy) == pytest.approx(20 * np.log10(255 / 5))
    f = img.astype(np.float32) / 255
    assert psnr(f, f + 0.01) == pytest.approx(20 * np.log10((f.max() - f.min()) / 0.01), rel=1e-3)


# --------------------------------------------------------------------------------------------
# degraded folders
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ending", [".png", ".nii.gz"])
def test_degrade_folder_geometry_names_reports(tmp_path, ending):
    src = _images_folder(tmp_path, ending=ending)
    (src / "reports.csv").write_bytes("case_id,report\ncase_000,\"Ölfleck; right lung\"\n".encode("utf-8"))
    out = degrade_folder(src, tmp_path / "out", "gaussian", 0.1, seed=0, progress=False)
    names = sorted(p.name for p in src.iterdir() if p.name != "reports.csv")
    assert sorted(p.name for p in out.iterdir() if p.name not in ("reports.csv", DEGRADATION_FILE)) == names
    assert (out / "reports.csv").read_bytes() == (src / "reports.csv").read_bytes()
    for name in names:
        a, b = sitk.ReadImage(str(src / name)), sitk.ReadImage(str(out / name))
        assert a.GetSize() == b.GetSize() and a.GetPixelID() == b.GetPixelID()
        assert np.allclose(a.GetSpacing(), b.GetSpacing()) and np.allclose(a.GetOrigin(), b.GetOrigin())
        assert np.allclose(a.GetDirection(), b.GetDirection())
        assert not np.array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    meta = json.loads((out / DEGRADATION_FILE).read_text())
    assert meta["kind"] == "gaussian" and meta["level"] == 0.1 and meta["seed"] == 0
    assert set(meta["files"]) == set(names)


def test_degrade_folder_reports_argument_and_sibling(tmp_path):
    src = _images_folder(tmp_path, n_cases=1)
    sibling = tmp_path / "reportsTs.csv"
    sibling.write_text("case_id,report\ncase_000,sibling\n", encoding="utf-8")
    out = degrade_folder(src, tmp_path / "a", "motion", 3, progress=False)
    assert (out / "reports.csv").read_bytes() == sibling.read_bytes()
    given = tmp_path / "given.csv"
    given.write_text("case_id,report\ncase_000,given\n", encoding="utf-8")
    out = degrade_folder(src, tmp_path / "b", "motion", 3, reports=given, progress=False)
    assert (out / "reports.csv").read_bytes() == given.read_bytes()


def test_degrade_folder_lowdose_levels_and_methods(tmp_path):
    src = _images_folder(tmp_path, n_cases=1)
    for method in ("projection", "image"):
        means = []
        for preset in ("DL1", "DL3", "DL4"):
            out = degrade_folder(src, tmp_path / f"{method}_{preset}", "lowdose", preset, method=method,
                                 progress=False)
            meta = json.loads((out / DEGRADATION_FILE).read_text())
            assert meta["level"] == preset and meta["level_value"] == DOSE_LEVELS[preset]
            assert meta["method"] == method
            means.append(meta["mean_psnr"])
        assert means[0] > means[1] > means[2], (method, means)


def test_degrade_folder_deterministic_by_seed(tmp_path):
    src = _images_folder(tmp_path, n_cases=2)
    runs = {name: degrade_folder(src, tmp_path / name, "motion", "K7", seed=seed, progress=False)
            for name, seed in (("a", 1), ("b", 1), ("c", 2))}
    for case in sorted(p.name for p in src.iterdir()):
        assert np.array_equal(_read(runs["a"] / case), _read(runs["b"] / case))
    meta_a, meta_c = (json.loads((runs[n] / DEGRADATION_FILE).read_text()) for n in ("a", "c"))
    assert meta_a["files"] != meta_c["files"]  # other seed, other blur angles
    assert all(len(r["angle_deg"]) == 1 for r in meta_a["files"].values())


def test_degrade_folder_refusals(tmp_path):
    src = _images_folder(tmp_path, n_cases=1)
    with pytest.raises(ValueError, match="input folder"):
        degrade_folder(src, src, "gaussian", 0.1, progress=False)
    with pytest.raises(ValueError, match="input folder"):
        degrade_folder(src, src / "sub", "gaussian", 0.1, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match=r"out.*overwrite"):
        degrade_folder(src, out, "gaussian", 0.1, progress=False)
    degrade_folder(src, out, "gaussian", 0.1, overwrite=True, progress=False)
    assert (out / "keep.txt").exists()  # a folder we did not write is not cleared
    with pytest.raises(ValueError, match="kind"):
        degrade_folder(src, tmp_path / "x", "blur", 1, progress=False)
    with pytest.raises(ValueError, match="DL"):
        degrade_folder(src, tmp_path / "x", "lowdose", "DL9", progress=False)
    with pytest.raises(ValueError, match="positive integer"):
        degrade_folder(src, tmp_path / "x", "motion", 2.5, progress=False)
    assert not (tmp_path / "x").exists()


def test_degrade_cli(tmp_path, capsys):
    src = _images_folder(tmp_path, n_cases=1)
    assert degrade_main(["-i", str(src), "-o", str(tmp_path / "o"), "--kind", "lowdose", "--level", "DL2",
                         "--method", "image", "--seed", "4"]) == 0
    assert "mean PSNR" in capsys.readouterr().out
    meta = json.loads((tmp_path / "o" / DEGRADATION_FILE).read_text())
    assert meta["seed"] == 4 and meta["relative_dose"] == pytest.approx(0.2)
    with pytest.raises(SystemExit):
        degrade_main(["-i", str(src), "-o", str(tmp_path / "o"), "--kind", "lowdose", "--level", "DL2"])


def test_degrade_folder_volume_rgb_and_own_folder_cleared(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    vol = sitk.GetImageFromArray(_phantom()[None].astype(np.int16) * 4 - 1000)  # 2D as a 1-slice volume
    vol.SetSpacing((0.7, 0.7, 5.0))
    sitk.WriteImage(vol, str(src / "a_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.stack([_phantom()] * 3, -1), isVector=True), str(src / "b_0000.png"))
    out = degrade_folder(src, tmp_path / "out", "lowdose", "DL3", progress=False)
    for name in ("a_0000.nii.gz", "b_0000.png"):
        a, b = sitk.ReadImage(str(src / name)), sitk.ReadImage(str(out / name))
        assert a.GetSize() == b.GetSize() and a.GetPixelID() == b.GetPixelID()
        assert np.allclose(a.GetSpacing(), b.GetSpacing())
    meta = json.loads((out / DEGRADATION_FILE).read_text())
    assert 20 < meta["files"]["a_0000.nii.gz"]["psnr"] < 45  # range of the image, not of int16
    (out / "mine_0000.png").write_bytes(b"")  # a file the user put there
    (src / "b_0000.png").unlink()  # this case is gone from the input: its old output is stale
    degrade_folder(src, out, "lowdose", "DL3", overwrite=True, progress=False)
    assert not (out / "b_0000.png").exists()  # our own earlier output is cleared, no stale cases
    assert (out / "mine_0000.png").is_file()  # what we did not write stays


def test_degrade_cli_numeric_level_recorded_as_number(tmp_path):
    src = _images_folder(tmp_path, n_cases=1)
    assert degrade_main(["-i", str(src), "-o", str(tmp_path / "g"), "--kind", "gaussian", "--level", "0.1"]) == 0
    meta = json.loads((tmp_path / "g" / DEGRADATION_FILE).read_text())
    assert meta["level"] == 0.1 and meta["method"] is None


def test_public_names_stay_importable_from_robustness():
    """The benchmarks and the console scripts import these from nnunetv2_textseg.robustness."""
    import nnunetv2_textseg.robustness as robustness

    for name in ("DEGRADATION_FILE", "REPORTS_FILE", "case_identifiers", "default_splits", "degrade_folder",
                 "parse_fraction", "resolve_level", "subsample_split", "splits_main", "degrade_main"):
        assert name in robustness.__all__ and hasattr(robustness, name), name
