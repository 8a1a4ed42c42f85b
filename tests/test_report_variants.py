"""Report-quality variants (nnunetv2_textseg.report_variants): what each kind keeps, removes or contradicts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nnunetv2_textseg.report_parsing import LEVELS, SIDES, _tokens, parse_report
from nnunetv2_textseg.report_variants import (_LESION_DETAILS, _NEUTRAL_DETAILS, VARIANT_KINDS, finding_only, main,
                                              make_variant, write_variant_tables)
from nnunetv2_textseg.reports import ReportError, ReportTable

SHARED = Path(__file__).resolve().parents[2] / "shared" / "reports"
LVIT_TEST = SHARED / "qata_cov19_lvit" / "test.csv"

BUILTIN = [
    "Bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung.",
    "Unilateral pulmonary infection, one infected area, lower right lung.",
    "Unilateral pulmonary infection, one infected area, upper middle left lung.",
    "Bilateral pulmonary infection, two infected areas, lower left lung and lower right lung.",
    "Bilateral pulmonary infection, two infected areas, middle left lung and middle right lung.",
    "Bilateral pulmonary infection, two infected areas, all left lung and all right lung.",
    "Bilateral pulmonary infection, three infected areas, upper lower left lung and lwoer right lung.",  # typo
    "Unilateral pulmonary infection, one infected area,midddle lowerright lung.",  # typos, glued words
    "Bilateral pulmonary infection involving two regions with involvement of all left lung and the middle "
    "lower right lung",  # MedCLIPSeg's rephrasing
    "Unilateral pulmonary infection involving one regions affecting the lower left lung",
]
NEGATIVE = ["No pulmonary infection.", "Lungs are clear, no infected area.", "No evidence of pulmonary infection."]
ALL_ZONES = frozenset((s, lv) for s in SIDES for lv in LEVELS)
MIRROR = {"left": "right", "right": "left"}


def _real_reports(n: int = 40) -> list[str]:
    if not LVIT_TEST.is_file():
        return []
    texts = list(dict.fromkeys(pd.read_csv(LVIT_TEST)["Description"].astype(str)))
    rng = np.random.default_rng(0)
    return [texts[i] for i in sorted(rng.choice(len(texts), size=min(n, len(texts)), replace=False))]


REAL = _real_reports()
POSITIVE = BUILTIN + [t for t in REAL if (f := parse_report(t)) is not None and f.zones]


def _rng(i: int = 0) -> np.random.Generator:
    return np.random.default_rng(i)


def test_real_reports_available_or_skipped():
    if not LVIT_TEST.is_file():
        pytest.skip(f"{LVIT_TEST} not available")
    assert len(REAL) >= 20 and sum(parse_report(t) is not None for t in REAL) >= 20


def test_original_unchanged():
    for t in POSITIVE + NEGATIVE:
        assert make_variant(t, "original", _rng()) == t


def test_unknown_kind_and_empty_text():
    with pytest.raises(ValueError, match="unknown report variant"):
        make_variant(BUILTIN[0], "sarcastic", _rng())
    with pytest.raises(ValueError):
        make_variant("  ", "contradictory", _rng())


@pytest.mark.parametrize("i", range(3))
def test_contradictory_mirrors_the_location(i):
    for t in POSITIVE:
        f = parse_report(t)
        v = make_variant(t, "contradictory", _rng(i))
        g = parse_report(v)
        assert g is not None, (t, v)
        if f.zones == ALL_ZONES:  # nothing to move: "no infection"
            assert g.is_negative, (t, v)
            continue
        assert g.sides == frozenset(MIRROR[s] for s in f.sides), (t, v)
        assert g.zones != f.zones and len(g.zones & f.zones) < len(f.zones), (t, v)
        if len(f.sides) == 1:  # one lung: the other lung, same levels
            assert g.zones == frozenset((MIRROR[s], lv) for s, lv in f.zones), (t, v)


def test_contradictory_examples():
    assert make_variant(BUILTIN[1], "contradictory", _rng()) == \
        "Unilateral pulmonary infection, one infected area, lower left lung."
    # bilateral lower -> swapping sides changes nothing, so upper/lower are swapped too
    v = make_variant(BUILTIN[3], "contradictory", _rng())
    assert parse_report(v).zones == {("left", "upper"), ("right", "upper")}
    # middle + middle: no swap moves it -> the other zones of both lungs
    v = make_variant(BUILTIN[4], "contradictory", _rng())
    assert parse_report(v).zones == ALL_ZONES - {("left", "middle"), ("right", "middle")}
    # typo "lwoer" survives swap_laterality's word swap, so the finding is written afresh and parses right
    v = make_variant(BUILTIN[6], "contradictory", _rng())
    assert parse_report(v).sides == {"left", "right"} and parse_report(v).count == 3


def test_contradictory_negative_states_a_lesion():
    for t in NEGATIVE:
        g = parse_report(make_variant(t, "contradictory", _rng()))
        assert g is not None and len(g.zones) == 1 and g.count == 1


@pytest.mark.parametrize("i", range(2))
def test_missing_location_keeps_the_finding_only(i):
    for t in POSITIVE:
        v = make_variant(t, "missing_location", _rng(i))
        g = parse_report(v)
        assert g is None or not g.zones, (t, v)
        low = v.lower()
        assert "infection" in low, (t, v)
        assert not {"left", "right", "bilateral", "unilateral", "upper", "lower", "middle"} & set(
            low.replace(",", " ").replace(".", " ").split()), (t, v)
    assert make_variant(BUILTIN[0], "missing_location", _rng()) == "Pulmonary infection, two infected areas."
    assert make_variant(BUILTIN[8], "missing_location", _rng()) == "Pulmonary infection involving two regions."
    for t in NEGATIVE:  # no location to remove: still negative
        g = parse_report(make_variant(t, "missing_location", _rng()))
        assert g is not None and g.is_negative


def test_missing_location_keeps_the_count():
    for t in POSITIVE:
        f = parse_report(t)
        v = make_variant(t, "missing_location", _rng())
        counts = [tok for tok in _tokens(v) if tok in ("one", "two", "three", "four", "five")]
        if f.count is not None:
            assert counts, (t, v)


def test_finding_only_keeps_the_finding_without_place_or_count():
    """The training rewrite of the bare finding: no place, no count, the report's own finding words; negative reports
    stay negative."""
    for t in POSITIVE:
        v = finding_only(t)
        g = parse_report(v)
        assert g is None or (not g.zones and g.count is None), (t, v)
        assert "infection" in v.lower() and not {"one", "two", "three", "four", "five"} & set(_tokens(v)), (t, v)
        assert len(v) < len(make_variant(t, "missing_location", _rng())), (t, v)
    assert finding_only(BUILTIN[0]) == "Pulmonary infection."
    assert finding_only(BUILTIN[9]) == "Pulmonary infection."  # "... involving one regions affecting ..."
    assert finding_only("Pulmonary infection, 3 infected areas, lower left lung") == "Pulmonary infection."
    assert finding_only("Two infected areas in the left lung.") == "Two infected areas."  # nothing but the count
    for t in NEGATIVE:
        g = parse_report(finding_only(t))
        assert g is not None and g.is_negative, t


@pytest.mark.parametrize("i", range(3))
def test_overdescriptive_adds_irrelevant_detail(i):
    for t in POSITIVE + NEGATIVE:
        f = parse_report(t)
        v = make_variant(t, "overdescriptive", _rng(i))
        assert v.startswith(t.rstrip()) and len(v) > len(t) + 20, (t, v)
        g = parse_report(v)
        assert g is not None and g.zones == f.zones and g.count == f.count, (t, v)
    # negative reports get no lesion description
    for t in NEGATIVE:
        v = make_variant(t, "overdescriptive", _rng(i))
        assert not any(d in v for d in _LESION_DETAILS), v


def test_detail_sentences_name_no_location_or_count():
    forbidden = {"left", "right", "both", "bilat", "unilat", "upper", "middle", "lower", "all", "area", "infected",
                 "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"}
    for d in _LESION_DETAILS + _NEUTRAL_DETAILS:
        assert not set(_tokens(d)) & forbidden, (d, _tokens(d))
        assert parse_report(d) is None or not parse_report(d).zones


def test_underdescriptive_is_generic_and_shorter():
    for t in POSITIVE:
        v = make_variant(t, "underdescriptive", _rng())
        g = parse_report(v)
        assert (g is None or not g.zones) and len(v) < len(t), (t, v)
        assert v in ("Pulmonary infection.", "Abnormal chest radiograph.")
    for t in NEGATIVE:
        v = make_variant(t, "underdescriptive", _rng())
        g = parse_report(v)
        assert g is not None and g.is_negative and len(v) < len(t), (t, v)


def test_deterministic_given_rng():
    for kind in VARIANT_KINDS:
        for t in POSITIVE[:8] + NEGATIVE:
            assert make_variant(t, kind, _rng(7)) == make_variant(t, kind, _rng(7))
    # and the generator matters where a choice is made
    outs = {make_variant(BUILTIN[0], "overdescriptive", _rng(i)) for i in range(10)}
    assert len(outs) > 1


def _write_input(path: Path) -> dict[str, str]:
    reports = {"demo_0001": BUILTIN[0], "demo_0002": BUILTIN[1], "case_0000": NEGATIVE[0],
               "demo_0004": 'Bilateral pulmonary infection, two infected areas, "all" left lung and all right lung.'}
    ReportTable(reports).write(path)
    return reports


def test_write_variant_tables(tmp_path):
    src = tmp_path / "reportsTs.csv"
    reports = _write_input(src)
    before = src.read_bytes()
    paths = write_variant_tables(src, tmp_path / "variants", seed=3)
    assert set(paths) == set(VARIANT_KINDS)
    assert src.read_bytes() == before
    for kind, path in paths.items():
        assert path.name == f"reports_{kind}.csv" and path.is_file()
        assert path.read_text(encoding="utf-8").splitlines()[0] == "case_id,report"
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        assert list(df["case_id"]) == list(reports)  # ids literally (case_0000 is not stripped), same order
        texts = dict(zip(df["case_id"], df["report"]))
        if kind == "original":
            assert texts == reports
        if kind == "contradictory":
            assert parse_report(texts["demo_0002"]).sides == {"left"}
        if kind == "missing_location":
            assert all(not (parse_report(x) and parse_report(x).zones) for x in texts.values())
    # deterministic and independent of the table's other rows
    again = write_variant_tables(src, tmp_path / "again", seed=3)
    assert all(again[k].read_bytes() == paths[k].read_bytes() for k in VARIANT_KINDS)
    ReportTable({"demo_0001": reports["demo_0001"]}).write(tmp_path / "one.csv")
    single = write_variant_tables(tmp_path / "one.csv", tmp_path / "single", seed=3)
    full = pd.read_csv(paths["overdescriptive"], dtype=str).set_index("case_id")["report"]
    one = pd.read_csv(single["overdescriptive"], dtype=str).set_index("case_id")["report"]
    assert one["demo_0001"] == full["demo_0001"]


def test_write_variant_tables_never_overwrites_input(tmp_path):
    src = tmp_path / "reports_original.csv"
    _write_input(src)
    before = src.read_bytes()
    with pytest.raises(ReportError, match="overwrite the input"):
        write_variant_tables(src, tmp_path)
    assert src.read_bytes() == before
    assert not (tmp_path / "reports_contradictory.csv").exists()


def test_write_variant_tables_reads_lvit_layout(tmp_path):
    if not LVIT_TEST.is_file():
        pytest.skip(f"{LVIT_TEST} not available")
    head = pd.read_csv(LVIT_TEST).head(12)
    src = tmp_path / "lvit.csv"
    head.to_csv(src, index=False)
    paths = write_variant_tables(src, tmp_path / "out")
    df = pd.read_csv(paths["underdescriptive"], dtype=str)
    assert len(df) == len(head.drop_duplicates("Image"))
    assert df["case_id"].iloc[0] == head["Image"].iloc[0][len("mask_"):-len(".png")]


def test_cli(tmp_path, capsys):
    src = tmp_path / "reportsTs.csv"
    _write_input(src)
    assert main([str(src), str(tmp_path / "v"), "--seed", "1"]) == 0
    assert all((tmp_path / "v" / f"reports_{k}.csv").is_file() for k in VARIANT_KINDS)
    assert main([str(src), str(tmp_path)]) == 0  # reportsTs.csv is not one of the outputs
    bad = tmp_path / "v" / "reports_original.csv"
    assert main([str(bad), str(tmp_path / "v")]) == 1
    assert "overwrite the input" in capsys.readouterr().err
