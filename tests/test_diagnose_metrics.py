"""The diagnosis's numbers on hand-made inputs: pixel AUC and the lesion-prone region it can be restricted to; the
report variants it predicts with."""
import numpy as np
import pytest

from nnunetv2_textseg.diagnose import (DiagnoseError, format_table, lesion_prone_region, parse_variant_tables,
                                       pixel_auc, read_variant_tables, rephrased_reports, report_variants, side_score)


def test_pixel_auc_perfect_chance_and_inverted():
    labels = np.array([0, 0, 1, 1])
    assert pixel_auc(np.array([0.1, 0.2, 0.8, 0.9]), labels) == 1.0
    assert pixel_auc(np.array([0.9, 0.8, 0.2, 0.1]), labels) == 0.0
    assert pixel_auc(np.full(4, 0.5), labels) == 0.5  # ties count half
    assert np.isnan(pixel_auc(np.ones(3), np.zeros(3)))


def test_lesion_prone_region_is_the_union_of_references_and_removes_the_location_prior():
    # two 1x4 "cases": lesions at pixel 1 and pixel 2; pixels 0 and 3 never hold a lesion (outside the lungs)
    refs = [np.array([0, 1, 0, 0], bool), np.array([0, 0, 1, 0], bool)]
    region = lesion_prone_region(refs)
    assert region.tolist() == [False, True, True, False]
    # a pseudo-image that only knows where lesions can be (the same map for every case)
    prior = [np.array([0.0, 1.0, 1.0, 0.0])] * 2
    ref = np.concatenate(refs)
    scores = np.concatenate(prior)
    assert abs(pixel_auc(scores, ref) - 5 / 6) < 1e-12  # high over the whole image ...
    inside = np.tile(region, 2)
    assert pixel_auc(scores[inside], ref[inside]) == 0.5  # ... chance within the region
    # one that knows which pixel this case's report names
    knows = np.concatenate([np.array([0, 1.0, 0.2, 0]), np.array([0, 0.2, 1.0, 0])])
    assert pixel_auc(knows[inside], ref[inside]) == 1.0


def test_lesion_prone_region_needs_one_grid_and_a_lesion():
    assert lesion_prone_region([np.zeros(4, bool), np.zeros(5, bool)]) is None
    assert lesion_prone_region([np.zeros(4, bool)]) is None
    assert lesion_prone_region([]) is None


def test_side_score_counts_one_sided_cases_whose_named_half_is_higher():
    """A map the same on both sides, or on the wrong side, is never higher on the lesion's side; the lesion's own
    mask always is; bilateral cases are left out; cases of different sizes are scored one by one."""
    refs = np.zeros((4, 8, 8), bool)
    refs[0, 2:4, 1:3] = refs[1, 5:7, 5:7] = True  # left, right
    refs[2, 2:4, 1:3] = refs[2, 2:4, 5:7] = True  # both halves: not one-sided
    refs[3, 1:2, 6:8] = True  # right
    assert side_score(np.ones(refs.shape), refs)["named_side_brighter"] == 0.0
    assert side_score(refs[:, :, ::-1].astype(float), refs)["named_side_brighter"] == 0.0
    same = side_score(refs.astype(float), refs)
    assert same["cases"] == 3 and same["named_side_brighter"] == 1.0 and same["median_ratio"] > 1e3
    half = refs.astype(float)
    half[3] = refs[3, :, ::-1]  # one case of three on the wrong side
    assert abs(side_score(half, refs)["named_side_brighter"] - 2 / 3) < 1e-12
    assert side_score(np.ones(refs.shape), np.ones(refs.shape, bool)) is None  # no one-sided case
    sizes = [np.zeros((6, 10), bool), np.zeros((8, 8), bool)]
    sizes[0][1, 8] = sizes[1][1, 1] = True
    assert side_score([r.astype(float) for r in sizes], sizes)["named_side_brighter"] == 1.0


def test_rephrased_variant_gives_each_case_a_user_phrasing_in_turn_and_keeps_negative_reports_negative():
    reports = {"c3": "No lung infection.", "c1": "Bilateral pulmonary infection, two infected areas, upper left "
               "lung and lower right lung.", "c2": "Unilateral pulmonary infection, one infected area, middle "
               "right lung.", "c4": "Unilateral pulmonary infection, one infected area, lower left lung."}
    phrasings = ("Findings consistent with pneumonia.", "Lung opacities are present.")
    out = rephrased_reports(reports, phrasings, "No acute findings.")
    assert out == {"c1": phrasings[0], "c2": phrasings[1], "c3": "No acute findings.", "c4": phrasings[1]}
    assert set(rephrased_reports(reports, phrasings).values()) == set(phrasings)  # no negative text: all rephrased
    variants = report_variants(reports, phrasings=phrasings, negative_phrasing="No acute findings.")
    assert list(variants)[-2:] == ["rephrased", "null"] and variants["rephrased"] == out
    assert "rephrased" not in report_variants(reports)  # only when asked for
    for bad in (((),), (("",),), (phrasings, " ")):
        with pytest.raises(DiagnoseError, match="non-empty"):
            rephrased_reports(reports, *bad)


BREAST = {"0019": "Findings indicate a benign tumor situated in the upper area.",
          "0286": "The breast shows a malignant tumor positioned in the center."}


def test_rule_made_variants_leave_reports_they_cannot_read_and_a_users_table_replaces_them():
    """The rules rewrite chest-report wording only: a breast report comes back as it was (the count diagnose prints
    catches it). A user's table named like a rule-made variant replaces it; any other name adds a row before null."""
    made = report_variants(BREAST)
    assert made["contradictory"] == BREAST and made["missing_location"]["0286"] == BREAST["0286"]
    contra = {"0019": "Findings indicate a benign tumor situated in the lower area.",
              "0286": "Malignant tumor detected, but breast appears completely normal.", "9999": "extra row"}
    over = {c: t + " Margins are well defined." for c, t in BREAST.items()}
    variants = report_variants(BREAST, tables={"contradictory": contra, "overdescriptive": over})
    assert list(variants) == ["real", "shuffled", "contradictory", "missing_location", "underdescriptive",
                              "overdescriptive", "null"]
    assert variants["contradictory"] == {c: contra[c] for c in BREAST}  # only the diagnosed cases
    assert variants["overdescriptive"] == over and variants["missing_location"] == made["missing_location"]


def test_variant_tables_are_read_in_any_importer_layout_and_bad_ones_refused(tmp_path):
    pd = pytest.importorskip("pandas")
    table = tmp_path / "Test_text_contradictory.xlsx"  # BUSUC's layout: image file names, not case ids
    pd.DataFrame({"Image": ["0019.png", "0286.png", "0300.png"],
                  "Description": ["Benign tumor detected, but breast appears completely normal.",
                                  "A lesion in the lower area.", "unused"],
                  "Ground Truth": ["0019.png", "0286.png", "0300.png"]}).to_excel(table, index=False)
    tables = parse_variant_tables([f"contradictory={table}"])
    assert tables == {"contradictory": table}
    read = read_variant_tables(tables, sorted(BREAST))
    assert read["contradictory"]["0019"].startswith("Benign tumor detected") and set(read["contradictory"]) == {
        "0019", "0286"}
    with pytest.raises(DiagnoseError, match=r"1 of the 3 diagnosed case\(s\) have no report in it: \['0400'\]"):
        read_variant_tables(tables, ["0019", "0286", "0400"])
    for spec, says in (("contradictory", "expected NAME=TABLE"), (f"real={table}", "measured by diagnose itself"),
                       (f"my variant={table}", "letters, digits and _"), (f"original={table}", "the real reports"),
                       (f"x={tmp_path / 'nope.csv'}", "no such file")):
        with pytest.raises(DiagnoseError, match=says):
            parse_variant_tables([spec])
    with pytest.raises(DiagnoseError, match="given twice"):
        parse_variant_tables([f"a={table}", f"a={table}"])
    assert parse_variant_tables([f"Contradictory={table}"]) == {"contradictory": table}  # replaces the rule-made one
    bad = tmp_path / "bad.csv"
    bad.write_text("name,words\n0019,a report\n")
    with pytest.raises(DiagnoseError, match=r"--variant_table terse=.*bad.csv: .*case_id,report CSV"):
        read_variant_tables({"terse": bad}, ["0019"])


def test_the_table_says_which_variants_left_reports_as_they_were():
    result = {"cases": 2, "dice": {"real": 0.5, "contradictory": 0.5}, "text_sensitivity": None, "reliance": 0.0,
              "side": {}, "unchanged_reports": {"shuffled": 0, "contradictory": 2, "overdescriptive": 1},
              "variant_tables": {"overdescriptive": "over.csv"}, "reports_in_rule_wording": 0}
    table = format_table(result)
    assert "2/2 real report(s) are not in the chest-report wording" in table
    assert "for them contradictory, missing_location, underdescriptive are no meaningful rewrites" in table
    partial = format_table(dict(result, text_sensitivity=0.25, text_sensitivity_cases=1, reports_in_rule_wording=2,
                                variant_tables={v: "t.csv" for v in ("contradictory", "missing_location",
                                                                     "underdescriptive")}))
    assert "0.2500 (over the 1 of 2 cases whose contradictory report differs)" in partial
    assert "not in the chest-report wording" not in partial and "give your own" not in partial
    assert "text sensitivity |P_real − P_contra| / |P_real|: not measured" in table
    assert "contradictory: 2/2 report(s) left as they were" in table and "--variant_table contradictory=TABLE" in table
    assert "overdescriptive: 1/2 report(s) left as they were — the row repeats real for them\n" in table + "\n"
    assert "shuffled:" not in table
