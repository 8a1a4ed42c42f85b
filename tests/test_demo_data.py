"""Tests for the synthetic demo dataset and the report parser (fast, CPU only)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage import io as skio

from nnunetv2_textseg.demo_data import (default_reports_dir, generate_demo_dataset, load_real_reports, main,
                                        make_case, named_zones)
from nnunetv2_textseg.report_parsing import (LEVELS, SIDES, Finding, parse_report, render_report,
                                             swap_laterality)

SHARED_REPORTS = Path(os.environ.get("NNUNET_TEXTSEG_SHARED_REPORTS",
                                     Path(__file__).resolve().parents[2] / "shared" / "reports"))
LVIT_TRAIN = SHARED_REPORTS / "qata_cov19_lvit" / "train.csv"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _cases(folder: Path, split: str = "Tr") -> list[tuple[str, np.ndarray, np.ndarray, str]]:
    """(case_id, image, mask, report) for every case of a split, in report-table order."""
    reports = pd.read_csv(folder / f"reports{split}.csv", encoding="utf-8")
    out = []
    for case_id, report in zip(reports["case_id"], reports["report"]):
        img = skio.imread(folder / f"images{split}" / f"{case_id}_0000.png")
        mask = skio.imread(folder / f"labels{split}" / f"{case_id}.png")
        out.append((case_id, img, mask, report))
    return out


def _mask_sides(mask: np.ndarray) -> frozenset[str]:
    """Patient sides with foreground: patient's right = image left half."""
    half = mask.shape[1] // 2
    sides = set()
    if mask[:, :half].any():
        sides.add("right")
    if mask[:, half:].any():
        sides.add("left")
    return frozenset(sides)


def _agreement(cases) -> float:
    """Fraction of parseable reports whose stated sides equal the mask's sides exactly."""
    hits = []
    for _, _, mask, report in cases:
        finding = parse_report(report)
        if finding is not None:
            hits.append(finding.sides == _mask_sides(mask))
    return float(np.mean(hits))


@pytest.fixture(scope="module")
def demo40(tmp_path_factory) -> Path:
    return generate_demo_dataset(tmp_path_factory.mktemp("raw"), n_train=40, n_test=8, image_size=64, seed=3)


# --------------------------------------------------------------------------------------------
# dataset format
# --------------------------------------------------------------------------------------------
@pytest.mark.integration  # nnU-Net's verify_dataset_integrity, ~5 s CPU
def test_nnunet_format(tmp_path: Path) -> None:
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = generate_demo_dataset(tmp_path, dataset_id=991, name="Fmt", n_train=8, n_test=4, image_size=64)
    assert folder == tmp_path / "Dataset991_Fmt"
    verify_dataset_integrity(str(folder), num_processes=1)

    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["channel_names"] == {"0": "X-ray"}
    assert meta["labels"] == {"background": 0, "lesion": 1}
    assert meta["numTraining"] == 8 and meta["file_ending"] == ".png"
    for split, n in (("Tr", 8), ("Ts", 4)):
        cases = _cases(folder, split)
        assert len(cases) == n == len(list((folder / f"images{split}").glob("*.png")))
        for case_id, img, mask, report in cases:
            assert case_id.startswith("demo_")
            assert img.dtype == np.uint8 and img.shape == (64, 64)
            assert mask.dtype == np.uint8 and mask.shape == (64, 64)
            assert set(np.unique(mask)) <= {0, 1}
            assert isinstance(report, str) and report
            assert img.std() > 10  # not a blank image
    header = (folder / "reportsTr.csv").read_text(encoding="utf-8").splitlines()[0]
    assert header == "case_id,report"


def test_overwrite_guard(tmp_path: Path) -> None:
    generate_demo_dataset(tmp_path, n_train=2, n_test=1, image_size=48)
    with pytest.raises(ValueError, match="overwrite"):
        generate_demo_dataset(tmp_path, n_train=2, n_test=1, image_size=48)
    folder = generate_demo_dataset(tmp_path, n_train=3, n_test=1, image_size=48, overwrite=True)
    assert len(list((folder / "imagesTr").glob("*.png"))) == 3
    with pytest.raises(ValueError, match="already used"):
        generate_demo_dataset(tmp_path, name="Other", n_train=1, n_test=1, image_size=48)


# --------------------------------------------------------------------------------------------
# reports vs masks
# --------------------------------------------------------------------------------------------
def _check_consistent(cases) -> int:
    parsed = 0
    for case_id, _, mask, report in cases:
        finding = parse_report(report)
        if finding is None:
            continue
        parsed += 1
        if finding.is_negative:
            assert not mask.any(), f"{case_id}: negative report but non-empty mask"
        else:
            assert _mask_sides(mask) == finding.sides, f"{case_id}: {report!r} vs mask sides {_mask_sides(mask)}"
    return parsed


def test_reports_agree_with_masks(demo40: Path) -> None:
    cases = _cases(demo40, "Tr") + _cases(demo40, "Ts")
    parsed = _check_consistent(cases)
    assert parsed >= 0.9 * len(cases)
    assert sum(m.any() for _, _, m, _ in cases) >= 0.8 * len(cases)


def test_named_zones_hold_every_lesion_and_follow_the_report(demo40: Path) -> None:
    """named_zones re-draws a case's report and lungs: its lesions lie inside, and the zones' sides are the report's."""
    folder = default_reports_dir()
    pool = load_real_reports(folder) if folder is not None else []
    meta = json.loads((demo40 / "dataset.json").read_text())["textseg_demo"]
    assert meta["real_reports"] == bool(pool)
    n_train = 40
    for split, offset in (("Tr", 0), ("Ts", n_train)):
        for i, (case_id, _, mask, report) in enumerate(_cases(demo40, split)):
            zones = named_zones(meta["seed"], offset + i, 64, pool)
            assert int(case_id.rsplit("_", 1)[1]) - 1 == offset + i
            assert not (mask.astype(bool) & ~zones).any(), case_id  # every lesion pixel in a named zone
            assert zones.any() == mask.any(), case_id  # negative report: no zone, no lesion
            finding = parse_report(report)
            if finding is not None and finding.zones:
                assert _mask_sides(zones) == finding.sides, case_id
                assert zones.mean() < 0.5  # zones, not the whole image
    other_seed = named_zones(meta["seed"] + 1, 0, 64, pool)
    assert not np.array_equal(other_seed, named_zones(meta["seed"], 0, 64, pool)) or not other_seed.any()


def test_lesions_are_faint() -> None:
    # Same seed with zero lesion contrast gives the same image without lesions (same draws).
    for seed in range(5):
        case = make_case(np.random.default_rng(seed), 64, [], (0.04, 0.12))
        plain = make_case(np.random.default_rng(seed), 64, [], (0.0, 0.0))
        np.testing.assert_array_equal(case.mask, plain.mask)
        diff = case.image.astype(int) - plain.image.astype(int)
        assert diff.min() >= -1 and diff.max() <= 0.12 * 1.1 * 255 + 1
        if case.mask.any():
            assert diff[case.mask > 0].mean() > 2


def test_template_reports_agree_with_masks(tmp_path: Path) -> None:
    folder = generate_demo_dataset(tmp_path / "raw", n_train=30, n_test=0, image_size=64, seed=1,
                                   real_reports_dir=tmp_path / "no_tables")
    cases = _cases(folder)
    assert _check_consistent(cases) >= 27
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["textseg_demo"]["real_reports"] is False


@pytest.mark.skipif(not LVIT_TRAIN.exists(), reason="shared/reports not available")
def test_real_reports_are_used_verbatim(demo40: Path) -> None:
    real = set(pd.read_csv(LVIT_TRAIN)["Description"].astype(str))
    reports = [r for *_, r in _cases(demo40)]
    assert sum(r in real for r in reports) >= 0.6 * len(reports)


@pytest.mark.skipif(not SHARED_REPORTS.exists(), reason="shared/reports not available")
@pytest.mark.parametrize("sub", ["qata_cov19_lvit", "qata_cov19", "mosmeddata_plus"])
def test_load_real_reports(sub: str) -> None:
    pool = load_real_reports(SHARED_REPORTS / sub)
    assert len(pool) > 1000 and all(f.zones for _, f in pool)


def test_control_mode(demo40: Path, tmp_path: Path) -> None:
    control = generate_demo_dataset(tmp_path, n_train=40, n_test=8, image_size=64, seed=3, control=True)
    normal_cases, control_cases = _cases(demo40), _cases(control)
    for (cid_a, img_a, mask_a, _), (cid_b, img_b, mask_b, _) in zip(normal_cases, control_cases):
        assert cid_a == cid_b
        np.testing.assert_array_equal(img_a, img_b)
        np.testing.assert_array_equal(mask_a, mask_b)
    normal_reports = [r for *_, r in normal_cases]
    control_reports = [r for *_, r in control_cases]
    assert sorted(normal_reports) == sorted(control_reports)  # same style, same texts
    assert _agreement(normal_cases) == 1.0
    assert _agreement(control_cases) < 0.8  # ~0.55: most real reports are bilateral


# --------------------------------------------------------------------------------------------
# determinism + CLI
# --------------------------------------------------------------------------------------------
def test_deterministic_by_seed(tmp_path: Path) -> None:
    kw = dict(n_train=5, n_test=2, image_size=48)
    a = generate_demo_dataset(tmp_path / "a", seed=7, **kw)
    b = generate_demo_dataset(tmp_path / "b", seed=7, **kw)
    c = generate_demo_dataset(tmp_path / "c", seed=8, **kw)
    for split in ("Tr", "Ts"):
        ca, cb, cc = _cases(a, split), _cases(b, split), _cases(c, split)
        for x, y in zip(ca, cb):
            assert x[0] == y[0] and x[3] == y[3]
            np.testing.assert_array_equal(x[1], y[1])
            np.testing.assert_array_equal(x[2], y[2])
        assert any(not np.array_equal(x[1], z[1]) for x, z in zip(ca, cc))


def test_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SystemExit):
        main(["--n_train", "1"])
    assert main(["--raw", str(tmp_path), "-d", "992", "--name", "Cli", "--n_train", "2",
                 "--n_test", "1", "--size", "48", "--control"]) == 0
    assert (tmp_path / "Dataset992_Cli" / "reportsTs.csv").exists()
    with pytest.raises(SystemExit):  # exists, no --overwrite
        main(["--raw", str(tmp_path), "-d", "992", "--name", "Cli", "--n_train", "2", "--size", "48"])


# --------------------------------------------------------------------------------------------
# report parsing
# --------------------------------------------------------------------------------------------
def _zones(**sides: str) -> frozenset[tuple[str, str]]:
    return frozenset((side, lv) for side, levels in sides.items()
                     for lv in (LEVELS if levels == "all" else levels.split()))


@pytest.mark.parametrize("text, zones, count", [
    ("Bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung.",
     _zones(left="all", right="middle lower"), 2),
    ("Unilateral pulmonary infection, one infected area, lower right lung.", _zones(right="lower"), 1),
    ("Bilateral pulmonary infection, two infected areas, lower left lung and upper middle lower right lung.",
     _zones(left="lower", right="all"), 2),
    ("Bilateral pulmonary infection involving two regions with involvement of all left lung and the "
     "middle lower right lung", _zones(left="all", right="middle lower"), 2),
    ("Bilateral pulmonary infection,two infected areas,lower left and lower right lung.",
     _zones(left="lower", right="lower"), 2),
    # real typos: transposition, glued words, doubled letters, missing letters
    ("Bilateral pulmonary infection, two infected areas, middle lwoer left lung and lowerright lung.",
     _zones(left="middle lower", right="lower"), 2),
    ("Unilateral pulmonary infection, oneinfected areas, middle lower leflung.", _zones(left="middle lower"), 1),
    ("Bilateral pulmonary infection, two infected areas, all left lung and alll right lung.",
     _zones(left="all", right="all"), 2),
    ("Bilateral pulmonary infection, nine infected areas, middle left lung and middle right lung.",
     _zones(left="middle", right="middle"), 9),
    ("Unilateral pulmonary infection, 3 infected areas, higher left lung.", _zones(left="upper"), 3),
    ("Bilateral infection of the left lung and upper right lung.", _zones(left="all", right="upper"), None),
])
def test_parse_report(text: str, zones: frozenset, count: int | None) -> None:
    assert parse_report(text) == Finding(zones, count)


def test_parse_report_negative_and_garbage() -> None:
    assert parse_report("No pulmonary infection.").is_negative
    assert parse_report("Lungs are clear, no infected area.").is_negative
    assert parse_report("") is None
    assert parse_report("Heart size normal? Unremarkable abdomen.") is None
    assert parse_report("There are two infected areas.") is None  # a count alone places nothing


def test_render_round_trip() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        sides = [s for s in SIDES if rng.random() < 0.6] or ["left"]
        zones = frozenset((s, lv) for s in sides for lv in LEVELS if rng.random() < 0.5) \
            or frozenset({(sides[0], "lower")})
        finding = Finding(zones, int(rng.integers(1, 5)))
        for style in ("lvit", "medclipseg"):
            text = render_report(finding, rng, style=style, typo_prob=0.0)
            assert parse_report(text) == finding, text
    assert parse_report(render_report(Finding(frozenset(), 0), rng)).is_negative


def test_render_typos_mostly_parse() -> None:
    rng = np.random.default_rng(1)
    finding = Finding(_zones(left="all", right="middle lower"), 2)
    texts = [render_report(finding, rng, typo_prob=1.0) for _ in range(100)]
    assert len(set(texts)) > 10
    assert np.mean([parse_report(t) == finding for t in texts]) > 0.9


def test_swap_laterality() -> None:
    text = "Left lung clear; RIGHT lower zone and right-sided effusion, leftover Bright left."
    swapped = swap_laterality(text)
    assert swapped == "Right lung clear; LEFT lower zone and left-sided effusion, leftover Bright right."
    assert swap_laterality(swapped) == text
    finding = parse_report("Bilateral pulmonary infection, two infected areas, all left lung and lower right lung.")
    mirrored = parse_report(swap_laterality(
        "Bilateral pulmonary infection, two infected areas, all left lung and lower right lung."))
    assert mirrored.zones == frozenset(({"left": "right", "right": "left"}[s], lv) for s, lv in finding.zones)


@pytest.mark.skipif(not LVIT_TRAIN.exists(), reason="shared/reports not available")
def test_parse_rate_on_real_tables() -> None:
    reports = pd.read_csv(LVIT_TRAIN)["Description"].astype(str)
    rate = np.mean([parse_report(r) is not None for r in reports])
    assert rate > 0.9
    # The stated laterality agrees with the parsed sides for nearly all reports.
    lat = np.mean([len(parse_report(r).sides) == (2 if r.lower().startswith("bilateral") else 1)
                   for r in reports if parse_report(r) is not None])
    assert lat > 0.98
    mosmed = SHARED_REPORTS / "mosmeddata_plus" / "Train_text.csv"
    if mosmed.exists():
        texts = pd.read_csv(mosmed, sep=";")["text"].astype(str)
        assert np.mean([parse_report(t) is not None for t in texts]) > 0.9
