"""Tests for nnunetv2_textseg.reports: real files in tmp_path, every error names file/row/case."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pandas as pd
import pytest

from nnunetv2_textseg.reports import (
    ReportError,
    ReportTable,
    ReportWarning,
    attach_reports,
    case_id_from_filename,
    dataset_case_ids,
    load_dataset_reports,
    load_mapping,
    reports_path,
)

SHARED_REPORTS = Path(__file__).resolve().parents[2] / "shared" / "reports"
EXAMPLES = Path(__file__).resolve().parents[1] / "text_reports" / "examples"


# --------------------------------------------------------------------------- helpers


def make_dataset(root: Path, case_ids, split: str = "Tr", ending: str = ".png") -> Path:
    """A minimal raw dataset: dataset.json plus empty images{split}/{case}_0000{ending}."""
    ds = root / "Dataset999_Test"
    images = ds / f"images{split}"
    images.mkdir(parents=True, exist_ok=True)
    (ds / "dataset.json").write_text(
        json.dumps({"channel_names": {"0": "xray"}, "labels": {"background": 0, "lesion": 1},
                    "numTraining": len(case_ids), "file_ending": ending})
    )
    for c in case_ids:
        (images / f"{c}_0000{ending}").touch()
    return ds


def write_text(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


# --------------------------------------------------------------------------- case ids


@pytest.mark.parametrize(
    "name, expected",
    [
        ("mask_covid_1.png", "covid_1"),
        ("covid_1_0000.png", "covid_1"),
        ("bjorke_82.png", "bjorke_82"),
        ("case.nii.gz", "case"),
        ("some/dir/case_7_0000.nii.gz", "case_7"),
        ("mask_covid_1000.png", "covid_1000"),  # four trailing digits are part of the id
        ("covid_1", "covid_1"),  # already a case id
        ("mask_covid_1", "mask_covid_1"),  # no extension: returned as is
    ],
)
def test_case_id_from_filename(name, expected):
    assert case_id_from_filename(name) == expected


def test_case_id_mapping_and_prefixes():
    assert case_id_from_filename("scan A.png", mapping={"scan A.png": "case_a"}) == "case_a"
    assert case_id_from_filename("dir/scan A.png", mapping={"scan A": "case_a"}) == "case_a"
    assert case_id_from_filename("seg_x.png", prefixes=("mask_", "seg_")) == "x"
    assert case_id_from_filename("seg_x.png", prefixes="seg_") == "x"  # a bare string works


# --------------------------------------------------------------------------- reading


def test_read_our_layout_keeps_text_verbatim(tmp_path):
    p = write_text(tmp_path / "r.csv", 'case_id,report\na," leading space, kept "\nb,NA\n')
    t = ReportTable.read(p)
    assert t.case_ids == ["a", "b"] and t["a"] == " leading space, kept " and t["b"] == "NA"
    assert len(t) == 2 and "a" in t and t.source == p
    assert t.texts(["b", "a"]) == ["NA", " leading space, kept "]


def test_texts_missing_case_names_case_and_table(tmp_path):
    t = ReportTable.read(write_text(tmp_path / "r.csv", "case_id,report\na,x\n"))
    with pytest.raises(KeyError):  # Mapping idiom still works
        t["zz"]
    with pytest.raises(ReportError, match=r"r\.csv: no report for case 'zz'"):
        t["zz"]
    with pytest.raises(ReportError, match=r"r\.csv.*'zz'"):
        t.texts(["a", "zz"])


def test_empty_or_whitespace_report(tmp_path):
    p = write_text(tmp_path / "r.csv", 'case_id,report\na,ok\nb,"   "\n')
    with pytest.raises(ReportError) as e:
        ReportTable.read(p)
    msg = str(e.value)
    assert "r.csv" in msg and "row 3" in msg and "'b'" in msg


def test_empty_cells(tmp_path):
    p = write_text(tmp_path / "r.csv", "case_id,report\na,ok\n,orphan text\n")
    with pytest.raises(ReportError, match=r"r\.csv, row 3.*id cell"):
        ReportTable.read(p)
    p2 = write_text(tmp_path / "r2.csv", "case_id,report\na,ok\nb,\n")
    with pytest.raises(ReportError, match=r"r2\.csv, row 3 \(case 'b'\)"):
        ReportTable.read(p2)


def test_blank_lines_skipped_but_row_numbers_kept(tmp_path):
    p = write_text(tmp_path / "r.csv", "case_id,report\na,ok\n\nb,\n")
    with pytest.raises(ReportError, match=r"row 4 \(case 'b'\)"):
        ReportTable.read(p)


def test_duplicate_id_different_text_names_both_rows(tmp_path):
    p = write_text(tmp_path / "r.csv", "case_id,report\na,one\nb,two\nmask_a.png,three\n")
    with pytest.raises(ReportError) as e:
        ReportTable.read(p)
    msg = str(e.value)
    assert "r.csv" in msg and "'a'" in msg and "rows 2 and 4" in msg


def test_duplicate_id_same_text_warns_and_keeps_one(tmp_path):
    p = write_text(tmp_path / "r.csv", "case_id,report\na,same\nb,x\na,same\n")
    with pytest.warns(ReportWarning, match=r"'a'.*rows 2 and 4"):
        t = ReportTable.read(p)
    assert t.case_ids == ["a", "b"] and t["a"] == "same"


def test_wrong_or_missing_columns(tmp_path):
    p = write_text(tmp_path / "r.csv", "name,finding\na,x\n")
    with pytest.raises(ReportError) as e:
        ReportTable.read(p)
    msg = str(e.value)
    assert "r.csv" in msg and "'name'" in msg and "'finding'" in msg and "--id-column" in msg
    with pytest.raises(ReportError, match=r"--text-column"):
        ReportTable.read(p, id_column="name")
    with pytest.raises(ReportError, match=r"expected 'nope'.*found columns 'name', 'finding'"):
        ReportTable.read(p, id_column="nope", text_column="finding")
    t = ReportTable.read(p, id_column="name", text_column="finding")
    assert t["a"] == "x"


def test_non_utf8_bytes(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("case_id,report\na,ok\nb,opacit\u00e9 basale\n".encode("latin-1"))
    with pytest.raises(ReportError) as e:
        ReportTable.read(p)
    msg = str(e.value)
    assert "latin.csv" in msg and "line 3" in msg and "0xE9" in msg and "byte offset" in msg
    assert "UTF-8" in msg


def test_utf8_bom_accepted(tmp_path):
    p = write_text(tmp_path / "bom.csv", "\ufeffcase_id,report\na,Opacité basale droite.\n")
    t = ReportTable.read(p)
    assert t.case_ids == ["a"] and t["a"] == "Opacité basale droite."


def test_semicolon_and_tab_delimiters(tmp_path):
    p = write_text(tmp_path / "m.csv",
                   "Image;text\nbjorke_1.png;Bilateral pulmonary infection, two infected areas, "
                   "all left lung and middle right lung.\nbjorke_2.png;Unilateral, one area.\n")
    t = ReportTable.read(p)
    assert t.case_ids == ["bjorke_1", "bjorke_2"]
    assert t["bjorke_1"].endswith("middle right lung.")
    p2 = write_text(tmp_path / "t.tsv", "case_id\treport\na\tx, y; z\n")
    assert ReportTable.read(p2)["a"] == "x, y; z"


def test_unquoted_delimiter_in_text(tmp_path):
    p = write_text(tmp_path / "r.csv", "case_id,report\na,fine\nb,left lung, right lung\n")
    with pytest.raises(ReportError, match=r"r\.csv: cannot parse.*line 3.*double quotes"):
        ReportTable.read(p)


def test_lvit_layout(tmp_path):
    p = write_text(tmp_path / "lvit.csv",
                   'Image,Description,Ground Truth\nmask_covid_1.png,"Bilateral pulmonary infection, '
                   'two infected areas.",mask_covid_1.png\n')
    assert ReportTable.read(p).reports == {"covid_1": "Bilateral pulmonary infection, two infected areas."}


def test_round_trip_quotes_commas_newlines(tmp_path):
    texts = {
        "a": 'Says "hello", then, a comma',
        "b": "line one\nline two\r\nline three",
        "c": "  spaces kept  ",
        "d": "Ünïcödé – 肺 infection; semicolon\ttab",
        "e": "NA",
    }
    p = tmp_path / "out.csv"
    ReportTable(dict(texts)).write(p)
    raw = p.read_bytes()
    assert raw.startswith(b"case_id,report\n") and not raw.startswith(b"\xef\xbb\xbf")
    back = ReportTable.read(p)
    assert back.reports == texts and back.case_ids == list(texts)
    with open(p, newline="", encoding="utf-8") as f:  # also plain csv module readable
        assert {r["case_id"]: r["report"] for r in csv.DictReader(f)} == texts


def test_atomic_write_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "reportsTr.csv"
    ReportTable({"a": "old"}).write(p)
    before = p.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        ReportTable({"a": "new"}).write(p)
    assert p.read_bytes() == before
    assert sorted(x.name for x in tmp_path.iterdir()) == ["reportsTr.csv"]  # temp file removed


# --------------------------------------------------------------------------- xlsx


def test_xlsx_several_sheets(tmp_path):
    p = tmp_path / "book.xlsx"
    with pd.ExcelWriter(p, engine="openpyxl") as w:
        pd.DataFrame({"Image": ["mask_a.png"], "Description": ["train text"]}).to_excel(w, sheet_name="train", index=False)
        pd.DataFrame({"Image": ["mask_b.png"], "Description": ["val text"]}).to_excel(w, sheet_name="val", index=False)
    with pytest.raises(ReportError) as e:
        ReportTable.read(p)
    msg = str(e.value)
    assert "book.xlsx" in msg and "'train'" in msg and "'val'" in msg and "--sheet" in msg
    assert ReportTable.read(p, sheet="val").reports == {"b": "val text"}
    with pytest.raises(ReportError, match=r"no sheet 'test'"):
        ReportTable.read(p, sheet="test")


def test_xlsx_empty_cell(tmp_path):
    p = tmp_path / "one.xlsx"
    pd.DataFrame({"Image": ["mask_a.png", "mask_b.png"], "Description": ["fine", None]}).to_excel(p, index=False)
    with pytest.raises(ReportError, match=r"one\.xlsx, row 3 \(case 'b'\)"):
        ReportTable.read(p)


# --------------------------------------------------------------------------- dataset level


def test_dataset_case_ids_and_paths(tmp_path):
    ds = make_dataset(tmp_path, ["b", "a"])
    (ds / "imagesTr" / "a_0001.png").touch()  # second channel: same case
    assert dataset_case_ids(ds) == ["a", "b"]
    assert reports_path(ds, "Ts") == ds / "reportsTs.csv"
    (ds / "imagesTr" / "bad.png").touch()
    with pytest.raises(ReportError, match=r"bad\.png.*_0000"):
        dataset_case_ids(ds)


def test_missing_report_for_case(tmp_path):
    ds = make_dataset(tmp_path, ["covid_1", "covid_2", "covid_3"])
    src = write_text(tmp_path / "src.csv", "Image,Description\nmask_covid_1.png,x\nmask_covid_3.png,y\n")
    with pytest.raises(ReportError) as e:
        attach_reports(ds, src)
    msg = str(e.value)
    assert "src.csv" in msg and "'covid_2'" in msg and "1 case(s) in imagesTr have no report" in msg
    assert not reports_path(ds).exists()
    out = attach_reports(ds, src, allow_missing=True)
    assert ReportTable.read(out).case_ids == ["covid_1", "covid_3"]


def test_unknown_case_id(tmp_path):
    ds = make_dataset(tmp_path, ["covid_1"])
    src = write_text(tmp_path / "src.csv", "Image,Description\nmask_covid_1.png,x\nmask_covid_9.png,y\n")
    with pytest.raises(ReportError) as e:
        attach_reports(ds, src)
    msg = str(e.value)
    assert "src.csv" in msg and "'covid_9'" in msg and "match no image" in msg and "--mapping" in msg
    with pytest.warns(ReportWarning, match=r"dropping 1 of 2 rows"):
        out = attach_reports(ds, src, allow_extra=True)
    assert ReportTable.read(out).reports == {"covid_1": "x"}


def test_attach_with_mapping_file(tmp_path):
    ds = make_dataset(tmp_path, ["p1", "p2"])
    mp = write_text(tmp_path / "map.csv", "filename,case_id\nscan A.png,p1\nscan B.png,p2\n")
    src = write_text(tmp_path / "src.csv", "file,caption\nscan A.png,x\nscan B.png,y\n")
    mapping = load_mapping(mp)
    assert mapping == {"scan A.png": "p1", "scan B.png": "p2"}
    out = attach_reports(ds, src, mapping=mapping)
    assert load_dataset_reports(ds).reports == {"p1": "x", "p2": "y"} and out == reports_path(ds)


def test_load_mapping_errors(tmp_path):
    bad = write_text(tmp_path / "map.csv", "filename,case_id\na.png,a\na.png,b\n")
    with pytest.raises(ReportError, match=r"map\.csv, row 3.*'a\.png'"):
        load_mapping(bad)


def test_overwrite_refusal(tmp_path):
    ds = make_dataset(tmp_path, ["a"])
    src1 = write_text(tmp_path / "one.csv", "case_id,report\na,first\n")
    src2 = write_text(tmp_path / "two.csv", "case_id,report\na,second\n")
    out = attach_reports(ds, src1)
    assert attach_reports(ds, src1) == out  # same content: no error
    with pytest.raises(ReportError) as e:
        attach_reports(ds, src2)
    assert "reportsTr.csv" in str(e.value) and "--overwrite" in str(e.value)
    assert load_dataset_reports(ds)["a"] == "first"
    attach_reports(ds, src2, overwrite=True)
    assert load_dataset_reports(ds)["a"] == "second"


def test_source_file_unchanged(tmp_path):
    ds = make_dataset(tmp_path, ["covid_1", "covid_2"])
    src = write_text(tmp_path / "src.csv",
                     "\ufeffImage;text\r\nmask_covid_2.png;b, text\r\nmask_covid_1.png;a text\r\n")
    before, mtime = src.read_bytes(), src.stat().st_mtime_ns
    out = attach_reports(ds, src)
    assert src.read_bytes() == before and src.stat().st_mtime_ns == mtime
    # written in the dataset's (sorted) order, UTF-8 without BOM
    assert out.read_bytes() == b'case_id,report\ncovid_1,a text\ncovid_2,"b, text"\n'


def test_load_dataset_reports_missing_file_says_command(tmp_path):
    ds = make_dataset(tmp_path, ["a"])
    with pytest.raises(ReportError, match=r"reportsTr\.csv.*nnUNetv2_textseg_attach_reports -d Dataset999_Test"):
        load_dataset_reports(ds)


def test_load_dataset_reports_validates(tmp_path):
    ds = make_dataset(tmp_path, ["a", "b"])
    ReportTable({"a": "x"}).write(reports_path(ds))
    with pytest.raises(ReportError, match=r"reportsTr\.csv.*'b'"):
        load_dataset_reports(ds)
    assert load_dataset_reports(ds, validate=False).reports == {"a": "x"}


def test_test_split(tmp_path):
    ds = make_dataset(tmp_path, ["t1"], split="Ts", ending=".nii.gz")
    src = write_text(tmp_path / "ts.csv", "case_id,report\nt1_0000.nii.gz,x\n")
    assert attach_reports(ds, src, split="Ts") == ds / "reportsTs.csv"
    assert load_dataset_reports(ds, "Ts").reports == {"t1": "x"}


def test_shipped_examples_read():
    if not EXAMPLES.is_dir():
        pytest.skip("text_reports/examples not present")
    files = sorted(EXAMPLES.glob("*.csv"))
    assert files
    for f in files:
        assert len(ReportTable.read(f)) >= 2, f


# --------------------------------------------------------------------------- real tables


def _shared(rel: str) -> Path:
    p = SHARED_REPORTS / rel
    if not p.is_file():
        pytest.skip(f"shared report table {p} not available")
    return p


def test_real_qata_xlsx_attach_byte_for_byte(tmp_path):
    src = _shared("qata_cov19/Train_text.xlsx")
    import openpyxl  # read the cells independently of pandas for the comparison

    wb = openpyxl.load_workbook(src, read_only=True)
    rows = list(wb[wb.sheetnames[0]].iter_rows(values_only=True))
    wb.close()
    header, body = rows[0], rows[1:]
    assert list(header[:3]) == ["Image", "Description", "Ground Truth"] and len(body) == 5716
    expected = {case_id_from_filename(r[0]): r[1] for r in body}
    assert len(expected) == 5716

    ds = make_dataset(tmp_path, list(expected))
    before = src.read_bytes()
    out = attach_reports(ds, src)
    assert src.read_bytes() == before
    with open(out, newline="", encoding="utf-8") as f:
        written = {r["case_id"]: r["report"] for r in csv.DictReader(f)}
    assert written == expected
    assert written["covid_1"].startswith("Bilateral pulmonary infection")


def test_real_mosmeddata_semicolon_csv():
    t = ReportTable.read(_shared("mosmeddata_plus/Train_text.csv"))
    assert len(t) == 2183
    assert all("," not in c and ";" not in c for c in t.case_ids)
    assert t["bjorke_1"] == "Bilateral pulmonary infection, two infected areas, all left lung and middle right lung."


def test_real_lvit_csv():
    src = _shared("qata_cov19_lvit/train.csv")
    t = ReportTable.read(src)
    raw = pd.read_csv(src, dtype=str, keep_default_na=False)
    assert len(t) == len(raw) == 7145
    assert t.texts([case_id_from_filename(n) for n in raw["Image"]]) == raw["Description"].tolist()
