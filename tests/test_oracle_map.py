"""benchmarks/oracle_map.py: the oracle maps and the two-channel dataset it writes (fast; no training)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import io as skio

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import oracle_map  # noqa: E402
from nnunetv2_textseg.demo_data import generate_demo_dataset, named_zones  # noqa: E402


def test_oracle_map_is_the_blurred_mask_scaled_to_its_peak():
    mask = np.zeros((64, 64), np.uint8)
    mask[20:30, 40:50] = 1
    m = oracle_map.oracle_map(mask, 1 / 16)
    assert m.dtype == np.uint8 and m.max() == 255 and m[25, 45] >= 200
    assert m[5, 5] == 0 and 0 < m[25, 37] < m[25, 45]  # blurred past the edge, nothing far away
    assert (oracle_map.oracle_map(np.zeros((64, 64), np.uint8), 1 / 8) == 0).all()


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory) -> Path:
    """A few-labels run's work folder in miniature: demo dataset, its plans/fingerprint/splits, a degraded copy."""
    work = tmp_path_factory.mktemp("work")
    raw = generate_demo_dataset(work / "nnUNet_raw", n_train=6, n_test=3, image_size=64, seed=5,
                                real_reports_dir=work / "no_tables")
    pre = work / "nnUNet_preprocessed" / raw.name
    pre.mkdir(parents=True)
    channel = {"mean": 80.0, "std": 15.0}
    (pre / "nnUNetPlans.json").write_text(json.dumps({
        "dataset_name": raw.name, "foreground_intensity_properties_per_channel": {"0": channel},
        "configurations": {"2d": {"normalization_schemes": ["ZScoreNormalization"], "use_mask_for_norm": [False]}}}))
    (pre / "dataset_fingerprint.json").write_text(json.dumps({"foreground_intensity_properties_per_channel":
                                                              {"0": channel}}))
    (pre / "splits_final.json").write_text(json.dumps([{"train": ["demo_0001"], "val": ["demo_0002"]}]))
    motion = work / "degraded" / raw.name / "motion"
    motion.mkdir(parents=True)
    for image in (raw / "imagesTs").iterdir():
        (motion / image.name).write_bytes(image.read_bytes())
    return work


def test_zones_dataset_has_the_named_zones_as_second_channel(run_folder):
    raw, pre = oracle_map.base_dataset(run_folder, 990)
    out_raw, tests = oracle_map.write_oracle_dataset(run_folder, raw, pre, 1092, "zones", ["clean", "motion"])
    assert out_raw.name == "Dataset1092_TextSegDemoOracleZones"
    meta = json.loads((out_raw / "dataset.json").read_text())
    assert set(meta["channel_names"]) == {"0", "1"}
    plans = json.loads((run_folder / "nnUNet_preprocessed" / out_raw.name / "nnUNetPlans.json").read_text())
    assert plans["dataset_name"] == out_raw.name
    assert plans["configurations"]["2d"]["normalization_schemes"] == ["ZScoreNormalization"] * 2
    assert set(plans["foreground_intensity_properties_per_channel"]) == {"0", "1"}
    for i in range(6):
        zones = skio.imread(out_raw / "imagesTr" / f"demo_{i + 1:04d}_0001.png") > 0
        np.testing.assert_array_equal(zones, named_zones(5, i, 64, []))
        np.testing.assert_array_equal(skio.imread(out_raw / "imagesTr" / f"demo_{i + 1:04d}_0000.png"),
                                      skio.imread(raw / "imagesTr" / f"demo_{i + 1:04d}_0000.png"))
    assert set(tests) == {"clean_own", "clean_shuffled", "clean_none", "motion_own"}
    own = [skio.imread(tests["clean_own"] / f"demo_{i:04d}_0001.png") for i in (7, 8, 9)]
    shuffled = [skio.imread(tests["clean_shuffled"] / f"demo_{i:04d}_0001.png") for i in (7, 8, 9)]
    assert sorted(m.tobytes() for m in own) == sorted(m.tobytes() for m in shuffled)  # the same maps, other cases
    assert all((skio.imread(tests["clean_none"] / f"demo_{i:04d}_0001.png") == 0).all() for i in (7, 8, 9))


def test_blurred_zones_follow_the_cases_lungs_and_the_text_only_map_the_finding_alone(run_folder, monkeypatch,
                                                                                        tmp_path):
    from nnunetv2_textseg import demo_data
    from nnunetv2_textseg.report_parsing import LEVELS
    raw, _ = oracle_map.base_dataset(run_folder, 990)
    meta = json.loads((raw / "dataset.json").read_text())
    maps = {kind: oracle_map.map_function(kind, raw, meta) for kind in ("zonesBlurred", "zonesTextOnly", "zonesBoxes")}

    def label(k: int) -> Path:
        return raw / ("labelsTr" if k < 6 else "labelsTs") / f"demo_{k + 1:04d}.png"
    positive = []
    for i in range(9):
        zones = named_zones(5, i, 64, [])
        b, t, x = (maps[kind](f"demo_{i + 1:04d}", label(i)) for kind in ("zonesBlurred", "zonesTextOnly", "zonesBoxes"))
        assert b.dtype == t.dtype == x.dtype == np.uint8
        if not zones.any():  # a negative report names no zone: every map empty
            assert b.max() == 0 and t.max() == 0 and x.max() == 0
            continue
        positive.append(i)
        for m in (b, t, x):  # blurred (soft edges, not a 0/255 mask), high on the named zones
            assert len(np.unique(m)) > 10 and m[zones].mean() > m[~zones].mean() + 60
        assert b[zones].min() > 0 and x[zones].min() > 0
        assert not np.array_equal(b, t)  # the own-lung map knows this case's lungs, the text-only one does not
        assert x[~zones].mean() > b[~zones].mean()  # the boxes also cover the corners the lungs leave out
        finding, lungs = demo_data.case_finding_and_lungs(5, i, 64, [])
        for side in {s for s, _ in finding.zones}:  # boxes: each named third of the lung's height, its whole width
            top, bottom = lungs.rows[side]
            cols = np.flatnonzero(lungs.masks[side].any(axis=0))
            middle, third = (cols[0] + cols[-1]) // 2, (bottom + 1 - top) / 3
            for k, level in enumerate(LEVELS):
                row = int(top + third * (k + 0.5))
                if (side, level) in finding.zones:
                    assert x[row, middle] > 200 and x[row, cols[0]] > 100 and x[row, cols[-1]] > 100
                elif not {(side, LEVELS[n]) for n in (k - 1, k + 1) if 0 <= n < 3} & finding.zones:
                    assert x[row, middle] < 100  # a third not named, with no named neighbour: outside every box
    assert len(positive) >= 2
    # the text-only map of a case is a function of its finding alone: give case j the finding of case i (its own
    # lungs kept) and it gets case i's map (the average lung comes from the training cases, untouched)
    i, j = positive[0], positive[-1]
    original = demo_data.case_finding_and_lungs

    def swapped(seed, index, size, pool):
        finding, lungs = original(seed, index, size, pool)
        return (original(seed, i, size, pool)[0], lungs) if index == j else (finding, lungs)
    monkeypatch.setattr(demo_data, "case_finding_and_lungs", swapped)
    empty = tmp_path / "empty.png"  # case j's own lesions need not lie in case i's zones; an empty label passes the check
    skio.imsave(empty, np.zeros((64, 64), np.uint8), check_contrast=False)
    relabelled = oracle_map.map_function("zonesTextOnly", raw, meta)
    np.testing.assert_array_equal(relabelled(f"demo_{j + 1:04d}", empty), maps["zonesTextOnly"](f"demo_{i + 1:04d}",
                                                                                                 label(i)))


def test_zones_of_another_dataset_are_refused_naming_the_label(run_folder, tmp_path):
    work = tmp_path / "work"
    (work / "nnUNet_raw").mkdir(parents=True)
    dataset = next((run_folder / "nnUNet_raw").glob("Dataset990_*"))
    shutil.copytree(dataset, work / "nnUNet_raw" / dataset.name)
    shutil.copytree(run_folder / "nnUNet_preprocessed" / dataset.name, work / "nnUNet_preprocessed" / dataset.name)
    label = work / "nnUNet_raw" / dataset.name / "labelsTr" / "demo_0001.png"
    skio.imsave(label, np.ones((64, 64), np.uint8), check_contrast=False)  # lesion everywhere: not this generator's
    raw_copy, pre = oracle_map.base_dataset(work, 990)
    with pytest.raises(oracle_map.OracleInputError, match="demo_0001.png has lesion pixels outside"):
        oracle_map.write_oracle_dataset(work, raw_copy, pre, 1092, "zones", ["clean"])
    meta = json.loads((raw_copy / "dataset.json").read_text())
    for kind in ("zonesBlurred", "zonesTextOnly", "zonesBoxes"):  # every map re-drawn from the generator checks it
        with pytest.raises(oracle_map.OracleInputError, match="demo_0001.png has lesion pixels outside"):
            oracle_map.map_function(kind, raw_copy, meta)("demo_0001", label)


def test_a_folder_that_is_not_a_run_is_one_clear_error(tmp_path):
    with pytest.raises(oracle_map.OracleInputError, match="low_label.py seed's work folder"):
        oracle_map.base_dataset(tmp_path, 990)


def test_a_dataset_it_did_not_write_is_never_overwritten(run_folder):
    raw, pre = oracle_map.base_dataset(run_folder, 990)
    theirs = run_folder / "nnUNet_raw" / "Dataset1091_SomeoneElses"
    theirs.mkdir()
    (theirs / "dataset.json").write_text("{}")
    with pytest.raises(oracle_map.OracleInputError, match="Dataset1091_SomeoneElses already uses dataset id 1091"):
        oracle_map.write_oracle_dataset(run_folder, raw, pre, 1091, "coarse", ["clean"])
    assert (theirs / "dataset.json").read_text() == "{}" and not (run_folder / "nnUNet_raw" /
                                                                  "Dataset1091_TextSegDemoOracleCoarse").exists()
    shutil.rmtree(theirs)
    same_name = run_folder / "nnUNet_raw" / "Dataset1091_TextSegDemoOracleCoarse"
    same_name.mkdir()
    (same_name / "notes.txt").write_text("mine")
    with pytest.raises(oracle_map.OracleInputError, match="was not written by this script"):
        oracle_map.write_oracle_dataset(run_folder, raw, pre, 1091, "coarse", ["clean"])
    assert (same_name / "notes.txt").read_text() == "mine" and not (same_name / "imagesTr").exists()
    shutil.rmtree(same_name)
    oracle_map.write_oracle_dataset(run_folder, raw, pre, 1091, "coarse", ["clean"])  # its own: written, and again
    oracle_map.write_oracle_dataset(run_folder, raw, pre, 1091, "coarse", ["clean"])


def test_zones_need_a_demo_dataset_and_conditions_need_their_images(run_folder, tmp_path):
    work = tmp_path / "work"
    dataset = next((run_folder / "nnUNet_raw").glob("Dataset990_*"))
    shutil.copytree(dataset, work / "nnUNet_raw" / dataset.name)
    shutil.copytree(run_folder / "nnUNet_preprocessed" / dataset.name, work / "nnUNet_preprocessed" / dataset.name)
    raw, pre = oracle_map.base_dataset(work, 990)
    with pytest.raises(oracle_map.OracleInputError, match="no test images for condition 'lowdose'"):
        oracle_map.write_oracle_dataset(work, raw, pre, 1090, "fine", ["clean", "lowdose"])
    assert not list((work / "nnUNet_raw").glob("Dataset1090_*"))  # refused before writing anything
    meta = json.loads((raw / "dataset.json").read_text())
    meta.pop("textseg_demo")
    (raw / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(oracle_map.OracleInputError, match="is not a \\(non-control\\) demo dataset"):
        oracle_map.write_oracle_dataset(work, raw, pre, 1092, "zones", ["clean"])
