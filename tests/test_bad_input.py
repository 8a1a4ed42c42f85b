"""Bad input and safety (issue 12, "Nothing lost, nothing run that the user did not ask for"): every test calls
the real code with a harmful, damaged or merely unexpected input and checks the message (what, where, the fix) and,
where files are involved, that the user's files are unchanged (hashes before/after).

Sections, by surface: report tables; embedding caches; text encoders (identity, tokenizer, truncation); training
(the text trainer's preparation, no training); prediction (nnUNetv2_textseg_predict on a stand-in model folder);
tools (degrade, convert_pretrained, encode, report variants, atomic writes); security (pickles, remote code,
spreadsheet formulas, links).
"""
from __future__ import annotations

import hashlib
import json
import os

# Never touch the network: set before transformers / huggingface_hub are imported here.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import re
import shutil
import subprocess
import sys
import unicodedata
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from nnunetv2_textseg.cache import (CACHE_FORMAT, CacheError, OutdatedCacheError, TextEmbeddingCache,
                                    build_or_update_cache, cache_folder, cache_path, load_checked_cache, text_sha)
from nnunetv2_textseg.encoders import (IDENTITY_KEYS, EncoderError, EncoderSpec, ReportTruncationWarning,
                                       TextEncoder, bundled_minilm_path, identity_diff, load_encoder,
                                       spec_from_record, spec_to_dict)
from nnunetv2_textseg.reports import (ReportError, ReportTable, ReportWarning, SpreadsheetFormulaWarning,
                                      attach_reports, load_dataset_reports, load_mapping, reports_path)


def _sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under ``root`` (what must survive untouched)."""
    return {str(p.relative_to(root)): _sha(p) for p in sorted(Path(root).rglob("*")) if p.is_file()}


def _one_error_line(err: str) -> str:
    """The single ``ERROR: ...`` line a command prints for a user error (and nothing like a traceback)."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("ERROR: ")]
    assert len(lines) == 1, err
    return lines[0]

# =========================================================================================
# Report tables: reading, importing (nnUNetv2_textseg_attach_reports), the dataset's own reportsTr.csv
# =========================================================================================
def _dataset(root: Path, cases=("a", "b"), split: str = "Tr", name: str = "Dataset990_X") -> Path:
    """A raw dataset folder as nnU-Net wants it: dataset.json and images{split}/{case}_0000.png (empty files:
    only the names are read here)."""
    d = root / name
    (d / f"images{split}").mkdir(parents=True)
    for case in cases:
        (d / f"images{split}" / f"{case}_0000.png").write_bytes(b"")
    (d / "dataset.json").write_text(json.dumps({"file_ending": ".png"}))
    return d


def _write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


NFC_ID, NFD_ID = unicodedata.normalize("NFC", "café_1"), unicodedata.normalize("NFD", "café_1")


@pytest.mark.parametrize("name, content, message", [
    ("empty.csv", b"", r"the file is empty; it needs a header row and one row per case"),
    ("header_only.csv", "case_id,report\n",
     r"the table has a header \('case_id', 'report'\) but no rows; add one row per case"),
    ("columns.csv", "patient,findings\na,x\n",
     r"no id column; expected one of 'case_id', .* found columns 'patient', 'findings'\. Name the column with "
     r"--id-column"),
    ("duplicates.csv", "case_id,report\na,x\nb,y\na,z\n",
     r"case 'a' appears in rows 2 and 4 with different reports; keep one row per case"),
    ("empty_report.csv", 'case_id,report\na,x\nb,"  "\n',
     r", row 3 \(case 'b'\): the report \('report'\) is empty; write the report text or remove the case"),
    ("empty_id.csv", "case_id,report\n,x\n",
     r", row 2: the id cell \('case_id'\) is empty; fill in the case id or delete the row"),
    ("garbage.csv", bytes(range(256)),
     r"not valid UTF-8 at line 2, column 118 \(byte offset 128, byte 0x80\)\. Save the file as UTF-8"),
    ("latin1.csv", "case_id,report\na,opacité\n".encode("latin-1"),
     r"not valid UTF-8 at line 2, column 9 \(byte offset 23, byte 0xE9\)\. Save the file as UTF-8"),
    ("utf16.csv", "case_id,report\na,x\n".encode("utf-16"), r"is UTF-16 encoded .*Save it as UTF-8"),
    ("workbook.csv", b"PK\x03\x04\x14\x00\x06\x00binary zip content",
     r"is a zip file \(an Excel workbook\?\) with a \.csv suffix\. If it is a workbook, rename it to \.xlsx"),
    ("old.xls", b"\xd0\xcf\x11\xe0", r"old \.xls workbooks are not supported; save it as \.xlsx or UTF-8 CSV"),
    ("commas_everywhere.csv", "case_id,report\na,left lung, right lung\nb,clear, no effusion\n",
     r"cannot parse as CSV: line 2 has 3 fields but the header \(case_id,report\) has 2; 2 of 2 row\(s\) are like "
     r"this\. The report text contains an unquoted ','.*Fix: quote the report column"),
    ("comma_once.csv", "case_id,report\na,fine\nb,clear\nc,left, right\n",
     r"line 4 has 3 fields .* 1 of 3 row\(s\) .*unquoted ','.*Fix: quote the report column"),
    ("semicolons.csv", "case_id;report\na;left; right\nb;clear; no effusion\n",
     r"line 2 has 3 fields .*unquoted ';'.*Fix: quote the report column"),
    ("trailing.csv", "case_id,report\na,x,\nb,y,\n",
     r"line 2 has 3 fields .*end with extra ',' delimiter\(s\)\. Fix: remove them"),
])
def test_unreadable_report_table_is_one_message_naming_file_and_fix(tmp_path, name, content, message):
    path = _write(tmp_path / name, content)
    before = _sha(path)
    with pytest.raises(ReportError) as e:
        ReportTable.read(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    assert re.search(message, msg), msg
    assert _sha(path) == before


def test_report_table_not_found(tmp_path):
    with pytest.raises(ReportError, match=re.escape(f"{tmp_path / 'nope.csv'}: report table not found")):
        ReportTable.read(tmp_path / "nope.csv")


def _workbook(path: Path, sheets: dict[str, pd.DataFrame]) -> Path:
    with pd.ExcelWriter(path, engine="openpyxl") as w:
        for name, frame in sheets.items():
            frame.to_excel(w, sheet_name=name, index=False)
    return path


def test_xlsx_without_the_named_sheet(tmp_path):
    path = _workbook(tmp_path / "book.xlsx", {"Sheet1": pd.DataFrame({"case_id": ["a"], "report": ["x"]})})
    before = _sha(path)
    with pytest.raises(ReportError, match=re.escape(f"{path}: no sheet 'train'; the workbook has 'Sheet1'.")):
        ReportTable.read(path, sheet="train")
    assert _sha(path) == before


def test_xlsx_with_an_empty_sheet(tmp_path):
    path = _workbook(tmp_path / "empty.xlsx", {"Sheet1": pd.DataFrame()})
    with pytest.raises(ReportError, match=re.escape(f"{path}: no id column;") + r".*found columns \(none\)\..*"
                                          r"--id-column"):
        ReportTable.read(path)


def test_mapping_that_maps_a_name_twice(tmp_path):
    path = _write(tmp_path / "map.csv", "filename,case_id\nscan1.png,a\nscan1.png,b\n")
    with pytest.raises(ReportError, match=re.escape(f"{path}, row 3: 'scan1.png' is mapped twice ('a' and 'b'); "
                                                    f"keep one.")):
        load_mapping(path)


def test_attach_report_for_a_case_without_image(tmp_path):
    d = _dataset(tmp_path)
    src = _write(tmp_path / "src.csv", "case_id,report\na,x\nb,y\nz,orphan\n")
    before = _sha(src)
    with pytest.raises(ReportError) as e:
        attach_reports(d, src)
    msg = str(e.value)
    assert f"{src} does not match imagesTr (2 cases, 3 reports)" in msg
    assert "1 report id(s) match no image in imagesTr: 'z'. Fix: check the id mapping" in msg and "--allow-extra" in msg
    assert _sha(src) == before and not reports_path(d).exists()


def test_attach_image_without_report(tmp_path):
    d = _dataset(tmp_path, cases=("a", "b", "c"))
    src = _write(tmp_path / "src.csv", "case_id,report\na,x\nb,y\n")
    with pytest.raises(ReportError, match=r"1 case\(s\) in imagesTr have no report: 'c'\. Fix: add one row per case"):
        attach_reports(d, src)
    assert not reports_path(d).exists()


def test_attach_does_not_replace_a_different_table_without_overwrite(tmp_path):
    d = _dataset(tmp_path)
    target = _write(reports_path(d), "case_id,report\na,old a\nb,old b\n")
    before = _sha(target)
    src = _write(tmp_path / "src.csv", "case_id,report\na,new a\nb,new b\n")
    with pytest.raises(ReportError, match=re.escape(f"{target}: exists with different content; pass --overwrite")):
        attach_reports(d, src)
    assert _sha(target) == before


def test_attach_refuses_the_datasets_own_table_as_source(tmp_path):
    d = _dataset(tmp_path)
    own = _write(reports_path(d), "case_id,report\nb,y\na,x\n")  # not in the dataset's order: would be rewritten
    before = _sha(own)
    with pytest.raises(ReportError, match=re.escape(f"{own}: is the dataset's own reportsTr.csv; copy it elsewhere")):
        attach_reports(d, own, overwrite=True)
    assert _sha(own) == before


@pytest.mark.parametrize("problem, message", [
    ("no dataset.json", r"dataset\.json: not found; .* is not an nnU-Net raw dataset folder"),
    ("broken dataset.json", r"dataset\.json: invalid JSON"),
    ("no channel suffix", r"a\.png: image name lacks the nnU-Net channel suffix; rename it to '\{case_id\}_0000\.png'"),
])
def test_attach_into_a_malformed_dataset(tmp_path, problem, message):
    d = _dataset(tmp_path)
    if problem == "no dataset.json":
        (d / "dataset.json").unlink()
    elif problem == "broken dataset.json":
        (d / "dataset.json").write_text('{"file_ending": ".png",')
    else:
        (d / "imagesTr" / "a_0000.png").rename(d / "imagesTr" / "a.png")
    src = _write(tmp_path / "src.csv", "case_id,report\na,x\nb,y\n")
    with pytest.raises(ReportError, match=message):
        attach_reports(d, src)
    assert not reports_path(d).exists()


def test_attach_accepts_a_bom_and_writes_plain_utf8(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte-order mark; it must not end up in the first column's name."""
    d = _dataset(tmp_path)
    src = _write(tmp_path / "src.csv", b"\xef\xbb\xbfcase_id,report\na,x\nb,y\n")
    before = _sha(src)
    target = attach_reports(d, src)
    assert target.read_bytes() == b"case_id,report\na,x\nb,y\n" and _sha(src) == before


def test_dataset_table_ids_that_differ_only_in_unicode_form(tmp_path):
    """An accent typed in a spreadsheet (NFC) vs the same name from a macOS file name (NFD): the message names
    the pair (escaped, since both print alike) and the fix, instead of listing the case as missing and unknown."""
    d = _dataset(tmp_path, cases=(NFD_ID, "b"))
    table = _write(reports_path(d), f"case_id,report\n{NFC_ID},x\nb,y\n")
    before = _sha(table)
    with pytest.raises(ReportError) as e:
        load_dataset_reports(d)
    msg = str(e.value)
    assert ("1 report id(s) differ from a case id in imagesTr only in Unicode normalisation (NFC vs NFD" in msg
            and f"{ascii(NFC_ID)} (table) vs {ascii(NFD_ID)} (imagesTr)" in msg), msg
    assert "Fix: import the table with nnUNetv2_textseg_attach_reports, which matches such ids" in msg
    assert _sha(table) == before


def test_attach_matches_ids_that_differ_only_in_unicode_form(tmp_path):
    d = _dataset(tmp_path, cases=(NFD_ID, "b"))
    src = _write(tmp_path / "src.csv", f"case_id,report\n{NFC_ID},x\nb,y\n")
    before = _sha(src)
    with pytest.warns(ReportWarning, match=r"1 report id\(s\) match a case in imagesTr only after Unicode NFC "
                                           r"normalisation") as caught:
        target = attach_reports(d, src)
    assert f"{ascii(NFC_ID)} (table) vs {ascii(NFD_ID)} (imagesTr)" in str(caught[0].message)
    assert load_dataset_reports(d).reports == {NFD_ID: "x", "b": "y"}  # the images' spelling: nnU-Net finds it
    assert _sha(src) == before and target == reports_path(d)


def _raw_env(tmp_path: Path, monkeypatch) -> Path:
    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / k).mkdir(exist_ok=True)
        monkeypatch.setenv(k, str(tmp_path / k))
    return tmp_path / "nnUNet_raw"


def test_attach_cli_unquoted_commas_is_one_line(tmp_path, monkeypatch, capsys):
    from nnunetv2_textseg.cli import _run, attach_reports_main

    d = _dataset(_raw_env(tmp_path, monkeypatch), name="Dataset990_X")
    src = _write(tmp_path / "src.csv", "case_id,report\na,left lung, right lung\nb,clear, no effusion\n")
    before = _sha(src)
    rc = _run(attach_reports_main, ["-d", "990", "-i", str(src)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line.startswith(f"ERROR: {src}: cannot parse as CSV: line 2") and "quote the report column" in line
    assert _sha(src) == before and not reports_path(d).exists()

# =========================================================================================
# Embedding caches: validated on every load; never unpickled, never updated when damaged
# =========================================================================================
def _cache(n: int = 3, dim: int = 4, length: int = 5, spec: dict | None = None) -> TextEmbeddingCache:
    rng = np.random.default_rng(0)
    mask = np.zeros((n, length), bool)
    mask[:, :3] = True
    return TextEmbeddingCache([f"case_{i}" for i in range(n)], [f"{i:064x}" for i in range(n)],
                              rng.normal(size=(n, dim)).astype(np.float32),
                              rng.normal(size=(n, length, dim)).astype(np.float16), mask,
                              {"name_or_path": "enc", "config_sha": "0", "pooling": "mean", "max_length": 8,
                               "dim": dim}, spec or spec_to_dict(EncoderSpec("enc", max_length=8)))


def _damaged(kind: str) -> TextEmbeddingCache:
    c = _cache()
    if kind == "pooled rows":
        c.pooled = c.pooled[:2]
    elif kind == "tokens rows":
        c.tokens = c.tokens[:2]
    elif kind == "tokens dim":
        c.tokens = c.tokens[..., :3]
    elif kind == "mask shape":
        c.mask = c.mask[:, :4]
    elif kind == "hash count":
        c.text_sha = c.text_sha[:2]
    elif kind == "nan pooled":
        c.pooled[1, 2] = np.nan
    elif kind == "inf tokens":
        c.tokens[2, 0, 1] = np.inf
    elif kind == "nan tokens":
        c.tokens[0, 1, 3] = np.nan
    elif kind == "duplicate ids":
        c.case_ids = ["case_0", "case_0", "case_2"]
    elif kind == "dim record":
        c.identity = dict(c.identity, dim=7)
    return c


@pytest.mark.parametrize("kind, detail", [
    ("pooled rows", "'pooled' has shape (2, 4), expected (3, D) for 3 case ids"),
    ("tokens rows", "'tokens' has shape (2, 5, 4), expected (3, L, 4)"),
    ("tokens dim", "'tokens' has shape (3, 5, 3), expected (3, L, 4)"),
    ("mask shape", "'mask' has shape (3, 4), expected (3, 5)"),
    ("hash count", "2 report hashes for 3 case ids"),
    ("nan pooled", "'pooled' holds 1 non-finite value(s)"),
    ("inf tokens", "'tokens' holds 1 non-finite value(s)"),
    ("nan tokens", "'tokens' holds 1 non-finite value(s)"),
    ("duplicate ids", "1 duplicate case id(s)"),
    ("dim record", "embeddings have 4 dimensions, its encoder record says 7"),
])
def test_damaged_cache_is_refused_on_load(tmp_path, kind, detail):
    path = _damaged(kind).save(tmp_path / "enc__mean8__Tr.npz")  # save() writes what it is given
    before = _sha(path)
    with pytest.raises(CacheError) as e:
        TextEmbeddingCache.load(path)
    msg = str(e.value)
    assert f"The text embedding cache {path} is damaged: {detail}" in msg
    assert "Delete it and run nnUNetv2_textseg_encode again" in msg
    # updating it is refused the same way, and the file stays as it was
    with pytest.raises(CacheError, match="is damaged"):
        build_or_update_cache({"case_0": "x"}, path, spec=EncoderSpec("enc", max_length=8), progress=False)
    assert _sha(path) == before


def test_valid_cache_still_loads(tmp_path):
    c = _cache()
    loaded = TextEmbeddingCache.load(c.save(tmp_path / "c.npz"))
    assert loaded.case_ids == c.case_ids and np.array_equal(loaded.pooled, c.pooled)
    assert np.array_equal(loaded.tokens, c.tokens) and np.array_equal(loaded.mask, c.mask)


def _npz(path: Path, good: Path, **changes) -> Path:
    """Rewrite the cache ``good`` as ``path`` with some arrays replaced (None: left out), as another program, an
    older version or a damaged disk might have written it."""
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    for k, v in changes.items():
        if v is None:
            arrays.pop(k)
        else:
            arrays[k] = v
    with open(path, "wb") as f:
        np.savez(f, **arrays)
    return path


@pytest.mark.parametrize("changes, detail", [
    ({"tokens": np.zeros((3, 5, 4), np.int8)}, "is damaged: 'tokens' has dtype int8, expected floating point"),
    ({"mask": np.ones((3, 5), np.float32)}, "is damaged: 'mask' has dtype float32, expected bool"),
    ({"identity": np.array("[1, 2]")}, "is damaged: its encoder record (identity/spec) is not a JSON object"),
    ({"identity": np.array("{not json")}, "Cannot read the text embedding cache"),
    ({"mask": None}, "Cannot read the text embedding cache"),
    ({"format": np.array(CACHE_FORMAT + 1)}, f"has cache format {CACHE_FORMAT + 1}, expected {CACHE_FORMAT}; delete it"),
])
def test_cache_written_by_something_else_is_refused(tmp_path, changes, detail):
    path = _npz(tmp_path / "enc__mean8__Tr.npz", _cache().save(tmp_path / "good.npz"), **changes)
    before = _sha(path)
    with pytest.raises(CacheError) as e:
        TextEmbeddingCache.load(path)
    assert str(path) in str(e.value) and detail in str(e.value), str(e.value)
    assert "nnUNetv2_textseg_encode" in str(e.value)  # the fix
    with pytest.raises(CacheError):  # nor is it updated (and so overwritten) in place
        build_or_update_cache({"case_0": "x"}, path, spec=EncoderSpec("enc", max_length=8), progress=False)
    assert _sha(path) == before


def _old_format_cache(path: Path, reports: dict[str, str], dim: int = 32, spec: EncoderSpec | None = None) -> Path:
    """A cache as the previous version wrote it: format 1, identity by name and a config hash that included the
    encoder's folder path."""
    n = len(reports)
    spec = spec or EncoderSpec("enc", max_length=8)
    with open(path, "wb") as f:
        np.savez(f, format=np.array(1), case_ids=np.array(list(reports), dtype=str),
                 text_sha=np.array([text_sha(t) for t in reports.values()], dtype=str),
                 pooled=np.zeros((n, dim), np.float32), tokens=np.zeros((n, 2, dim), np.float16),
                 mask=np.ones((n, 2), bool),
                 identity=np.array(json.dumps({"name_or_path": "enc", "revision": None, "config_sha": "0" * 16,
                                               "pooling": "mean", "max_length": 8, "dim": dim})),
                 spec=np.array(json.dumps(spec_to_dict(spec))))
    return path


def test_cache_of_the_previous_format_asks_to_re_encode(tmp_path):
    reports = {"a": "left lung", "b": "right lung"}
    path = _old_format_cache(tmp_path / "enc__mean8__Tr.npz", reports)
    before = _sha(path)
    for call in (lambda: TextEmbeddingCache.load(path), lambda: load_checked_cache(path, reports)):
        with pytest.raises(OutdatedCacheError) as e:
            call()
        msg = str(e.value)
        assert f"The text embedding cache {path} was written by an older version of nnunetv2_textseg" in msg
        assert "by folder path rather than by weights" in msg and "Re-encode: run nnUNetv2_textseg_encode" in msg
    assert _sha(path) == before


def test_cache_of_the_previous_format_is_re_encoded_by_encode(tmp_path, tiny_dir):
    reports = {"a": "left lung", "b": "right lung"}
    spec = EncoderSpec(str(tiny_dir), max_length=8)
    path = _old_format_cache(tmp_path / "tiny__Tr.npz", reports)
    with pytest.warns(UserWarning, match="written by an older version of nnunetv2_textseg; re-encoding all reports"):
        cache, n = build_or_update_cache(reports, path, spec=spec, progress=False)
    assert n == 2 and TextEmbeddingCache.load(path).identity["format"] == 2
    assert np.abs(cache.pooled).sum() > 0  # real embeddings, not the old file's zeros


def test_stale_cache_names_the_changed_case_and_the_fix(tmp_path):
    c = _cache()
    c.text_sha = [text_sha(t) for t in ("x", "y", "z")]
    path = c.save(tmp_path / "c.npz")
    before = _sha(path)
    with pytest.raises(CacheError) as e:
        load_checked_cache(path, {"case_0": "x", "case_1": "CHANGED", "case_2": "z", "case_9": "new"})
    msg = str(e.value)
    assert f"The text embedding cache {path} does not match the current reports: 1 changed (e.g. ['case_1']), " \
           f"1 not encoded (e.g. ['case_9']). Run nnUNetv2_textseg_encode to update it." == msg
    assert _sha(path) == before


def test_cache_lookup_of_an_unknown_case(tmp_path):
    c = TextEmbeddingCache.load(_cache().save(tmp_path / "c.npz"))
    with pytest.raises(CacheError, match=re.escape(f"No cached report embedding for case(s) ['case_7'] in {c.path}. "
                                                   f"Add their reports to the report table and run "
                                                   f"nnUNetv2_textseg_encode again.")):
        c.select(["case_0", "case_7"])

# =========================================================================================
# Text encoders: identity = the model (weights, tokenizer, config), never its path; tokenizer; truncation
# =========================================================================================
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A 1-layer, 32-d BERT with MiniLM's tokenizer, saved like any downloaded model folder."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    folder = tmp_path_factory.mktemp("tiny_bert")
    tok = BertTokenizerFast.from_pretrained(str(bundled_minilm_path()))
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=37)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _copy_with_changed_weight(src: Path, dst: Path) -> Path:
    """A copy of a model folder with one weight changed (what fine-tuning or a bad download leaves)."""
    from safetensors.torch import load_file, save_file
    if not dst.exists():
        shutil.copytree(src, dst)
    weights = load_file(dst / "model.safetensors")
    name = sorted(weights)[0]
    weights[name] = weights[name].clone()
    weights[name].view(-1)[0] += 1.0
    save_file(weights, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_identity_is_the_model_not_its_path(tmp_path):
    """A byte-identical copy of the bundled encoder elsewhere is the same encoder (a model trained here predicts
    from an install at another path); the identity records where it came from, but does not compare it."""
    copy = shutil.copytree(bundled_minilm_path(), tmp_path / "somewhere else" / "minilm")
    bundled, copied = TextEncoder(), TextEncoder(EncoderSpec(str(copy)))
    a, b = bundled.identity(), copied.identity()
    assert identity_diff(a, b) == {} and {k: a[k] for k in IDENTITY_KEYS} == {k: b[k] for k in IDENTITY_KEYS}
    assert a["name_or_path"] != b["name_or_path"] and len(a["weights_sha"]) == 64
    assert not any(str(copy) in str(v) or str(bundled_minilm_path()) in str(v) for v in b.values() if v != b["name_or_path"])


def test_weights_changed_in_place_are_noticed_and_the_cache_refused(tmp_path, tiny_dir):
    folder = shutil.copytree(tiny_dir, tmp_path / "encoder")
    reports = {"a": "left lung", "b": "right lung"}
    path = tmp_path / "emb.npz"
    before_change = TextEncoder(EncoderSpec(str(folder)))
    build_or_update_cache(reports, path, before_change, progress=False)
    cached = _sha(path)
    _copy_with_changed_weight(tiny_dir, folder)  # same folder, same name, same config: other weights
    after_change = TextEncoder(EncoderSpec(str(folder)))
    assert set(identity_diff(before_change.identity(), after_change.identity())) == {"weights_sha"}
    for call in (lambda: build_or_update_cache(reports, path, after_change, progress=False),
                 lambda: build_or_update_cache(dict(reports, c="new"), path, after_change, progress=False),
                 lambda: load_checked_cache(path, reports, after_change.identity())):
        with pytest.raises(CacheError) as e:
            call()
        msg = str(e.value)
        assert f"The text embedding cache {path} was built by another encoder than {str(folder)!r}" in msg
        assert "weights_sha" in msg and f"Re-encode: delete {path} and run nnUNetv2_textseg_encode" in msg
    assert _sha(path) == cached


def test_tokenizer_changed_is_another_encoder(tmp_path, tiny_dir):
    folder = shutil.copytree(tiny_dir, tmp_path / "encoder")
    tok = json.loads((folder / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    vocab["lung"], vocab["heart"] = vocab["heart"], vocab["lung"]
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    diff = identity_diff(TextEncoder(EncoderSpec(str(tiny_dir))).identity(),
                         TextEncoder(EncoderSpec(str(folder))).identity())
    assert set(diff) == {"tokenizer_sha"}


def test_identity_recorded_by_the_previous_version_is_still_checked(tiny_dir):
    """Models trained before hashed the config with its path (format 1); they keep working from that path and are
    told apart from another model."""
    enc = TextEncoder(EncoderSpec(str(tiny_dir), precision="fp32"))  # they encoded in float32
    now = enc.identity()
    old = {"name_or_path": str(tiny_dir), "revision": None, "config_sha": now["legacy_config_sha"],
           "pooling": "mean", "max_length": 128, "dim": 32}
    assert identity_diff(old, now) == {}
    assert identity_diff(dict(old, config_sha="0" * 16), now) == {
        "config_sha": ("0" * 16, now["legacy_config_sha"]), "identity_format": (1, 2)}


def test_encoder_folder_without_tokenizer_is_refused(tmp_path, tiny_dir):
    """transformers then builds a tokenizer of the 5 special tokens: every report would become [UNK]s."""
    folder = shutil.copytree(tiny_dir, tmp_path / "no_tokenizer", ignore=shutil.ignore_patterns("tokenizer*",
                                                                                                "vocab.txt",
                                                                                                "special_tokens*"))
    before = _tree(folder)
    with pytest.raises(EncoderError) as e:
        TextEncoder(EncoderSpec(str(folder)))
    msg = str(e.value)
    assert f"The tokenizer of text encoder {str(folder)!r}" in msg and "the folder probably lacks its tokenizer" in msg
    assert "Copy the complete model folder" in msg and _tree(folder) == before


def test_encoder_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "models" / "cxr-bert"
    with pytest.raises(EncoderError, match=re.escape(f"the folder {missing} does not exist. Pass an existing local "
                                                     f"model folder or a Hugging Face model name.")):
        TextEncoder(EncoderSpec(str(missing)))
    assert not missing.exists()

def _text_of_tokens(tokenizer, n: int) -> str:
    """A text that the tokenizer turns into exactly ``n`` tokens (special tokens included)."""
    text = " ".join(["lung"] * (n - 2))
    assert len(tokenizer(text)["input_ids"]) == n
    return text


def test_long_reports_are_truncated_with_a_warning(tiny_dir):
    enc = TextEncoder(EncoderSpec(str(tiny_dir), max_length=8))
    at_limit = _text_of_tokens(enc.tokenizer, 8)
    long = _text_of_tokens(enc.tokenizer, 20)
    longer = _text_of_tokens(enc.tokenizer, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ReportTruncationWarning)
        enc.encode(["short.", at_limit])  # fits: no warning
    with pytest.warns(ReportTruncationWarning) as caught:
        out = enc.encode(["short.", long, at_limit, long, longer])
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "\n" not in msg
    assert "3 of 5 report(s) are longer than the text encoder's max_length of 8 tokens" in msg
    assert "--max_length N" in msg and "at most 512" in msg
    assert out.mask.shape[1] == 8 and out.mask[1].sum() == 8


def test_encode_cli_warns_in_one_line_and_takes_max_length(tiny_dir, tmp_path, monkeypatch, capsys):
    from nnunetv2_textseg.cli import encode_main
    from nnunetv2_textseg.reports import ReportTable, reports_path

    for k in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / k).mkdir()
        monkeypatch.setenv(k, str(tmp_path / k))
    tok = TextEncoder(EncoderSpec(str(tiny_dir))).tokenizer
    reports = {"a": "short.", "b": _text_of_tokens(tok, 30), "c": _text_of_tokens(tok, 12)}
    folder = tmp_path / "nnUNet_raw" / "Dataset991_X"
    (folder / "imagesTr").mkdir(parents=True)
    for case in reports:
        (folder / "imagesTr" / f"{case}_0000.png").write_bytes(b"")
    ReportTable(reports).write(reports_path(folder, "Tr"))
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "X"}, "labels": {"background": 0, "x": 1},
                                                     "numTraining": 3, "file_ending": ".png"}))
    table = _sha(reports_path(folder, "Tr"))
    encode_main(["-d", "991", "--encoder", str(tiny_dir), "--max_length", "10"])
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "max_length" in line]
    assert warning == [line for line in captured.err.splitlines() if line.startswith("WARNING: ")]
    assert len(warning) == 1 and warning[0].startswith("WARNING: 2 of 3 report(s)") and "max_length of 10" in warning[0]
    assert "nnUNetv2_textseg_encode --max_length N" in warning[0]
    assert "(3 report(s) encoded now)" in captured.out and _sha(reports_path(folder, "Tr")) == table
    # raising it as the message says: no warning any more
    encode_main(["-d", "991", "--encoder", str(tiny_dir), "--max_length", "40"])
    assert "WARNING" not in capsys.readouterr().err


# =========================================================================================
# Training: the text trainer's preparation (what runs before nnU-Net's first epoch), on a stand-in trainer
# =========================================================================================
@pytest.fixture
def trainer(tmp_path, monkeypatch, tiny_dir):
    """nnUNetTrainerText with just what prepare_text/initialize read (no plans, no data loading, no training):
    dataset Dataset991_T with cases a (train) and b (validation), the tiny encoder."""
    from nnunetv2_textseg.training.text_trainer import ENCODER_ENV, TRUST_ENV, nnUNetTrainerText

    raw = _raw_env(tmp_path, monkeypatch)
    monkeypatch.delenv(ENCODER_ENV, raising=False)
    monkeypatch.delenv(TRUST_ENV, raising=False)
    t = object.__new__(nnUNetTrainerText)
    t.text_encoder = EncoderSpec(str(tiny_dir), max_length=16)
    t.raw = raw / "Dataset991_T"
    t.raw.mkdir()
    t.preprocessed_dataset_folder_base = str(tmp_path / "nnUNet_preprocessed" / "Dataset991_T")
    t.output_folder_base = str(tmp_path / "nnUNet_results" / "Dataset991_T" / "nnUNetTrainerText__nnUNetPlans__2d")
    t.plans_manager = SimpleNamespace(dataset_name="Dataset991_T", plans={})
    t.do_split = lambda: (["a"], ["b"])
    t.local_rank, t.is_ddp, t.device = 0, False, torch.device("cpu")
    t.print_to_log_file = lambda *args, **kwargs: None
    return t


def test_training_with_a_broken_report_table(trainer):
    from nnunetv2_textseg.training.text_trainer import TextTrainingError

    table = _write(reports_path(trainer.raw), "case_id,report\na,left lung, right lung\nb,clear, no effusion\n")
    before = _sha(table)
    with pytest.raises(TextTrainingError) as e:
        trainer.prepare_text()
    msg = str(e.value)
    assert msg.startswith("nnUNetTrainerText needs a valid report per training case.") and str(table) in msg
    assert "quote the report column" in msg and _sha(table) == before
    assert not cache_folder(trainer.preprocessed_dataset_folder_base).exists()


def test_training_without_any_reports(trainer):
    from nnunetv2_textseg.training.text_trainer import TextTrainingError

    with pytest.raises(TextTrainingError, match=r"No reports for Dataset991_T: neither \$nnUNet_raw/Dataset991_T/"
                                                r"reportsTr\.csv nor a cache .*Attach reports with "
                                                r"nnUNetv2_textseg_attach_reports -d Dataset991_T"):
        trainer.prepare_text()


def test_training_case_without_report(trainer):
    from nnunetv2_textseg.training.text_trainer import TextTrainingError

    _write(reports_path(trainer.raw), "case_id,report\na,left lung\n")
    with pytest.raises(TextTrainingError, match=r"1 training case\(s\) have no report: \['b'\]\. Add a row per case "
                                                r"to \$nnUNet_raw/Dataset991_T/reportsTr\.csv"):
        trainer.prepare_text()


def test_training_with_a_cache_of_the_previous_format(trainer):
    reports = {"a": "left lung", "b": "right lung"}
    _write(reports_path(trainer.raw), "case_id,report\na,left lung\nb,right lung\n")
    path = cache_path(trainer.preprocessed_dataset_folder_base, trainer.text_encoder, "Tr")
    path.parent.mkdir(parents=True)
    _old_format_cache(path, reports, spec=trainer.text_encoder)
    table = _sha(reports_path(trainer.raw))
    # the cache is our own derived file: training re-encodes it (with a warning) instead of stopping
    with pytest.warns(UserWarning, match=re.escape(f"{path} was written by an older version")):
        trainer.prepare_text()
    assert TextEmbeddingCache.load(path).case_ids == ["a", "b"] and trainer.text_table.shape[0] == 2
    assert _sha(reports_path(trainer.raw)) == table
    with pytest.raises(OutdatedCacheError, match="Re-encode: run nnUNetv2_textseg_encode"):
        _old_format_cache(path, reports)
        TextEmbeddingCache.load(path)  # read anywhere else (prediction, tools), an old cache is refused


def test_training_with_an_unreadable_cache_names_it(trainer):
    """Choosing the encoder reads only the caches' recorded settings; a damaged file is named with the fix."""
    _write(reports_path(trainer.raw), "case_id,report\na,left lung\nb,right lung\n")
    path = cache_path(trainer.preprocessed_dataset_folder_base, trainer.text_encoder, "Tr")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a numpy archive")
    with pytest.raises(CacheError) as e:
        trainer.prepare_text()
    msg = str(e.value)
    assert msg.startswith(f"{path} is not a readable text embedding cache") and "nnUNetv2_textseg_encode" in msg
    assert path.read_bytes() == b"not a numpy archive"  # never replaced behind the user's back


def test_continued_training_refuses_reports_encoded_by_other_weights(trainer):
    """--c on a model folder whose encoder (recorded in its plans.json) is not the one that made the cache."""
    from nnunetv2_textseg.training.text_trainer import PLANS_KEY, TextTrainingError

    _write(reports_path(trainer.raw), "case_id,report\na,left lung\nb,right lung\n")
    trainer.prepare_text()  # builds the cache
    recorded = dict(trainer.plans_manager.plans[PLANS_KEY], encoder_identity=dict(
        trainer.plans_manager.plans[PLANS_KEY]["encoder_identity"], weights_sha="0" * 64))
    _write(Path(trainer.output_folder_base) / "plans.json", json.dumps({PLANS_KEY: recorded}))
    cache = cache_path(trainer.preprocessed_dataset_folder_base, trainer.text_encoder, "Tr")
    before = _sha(cache)
    with pytest.raises(TextTrainingError) as e:
        trainer.prepare_text()
    msg = str(e.value)
    assert msg.startswith("The reports were encoded by another model than this model folder's encoder.")
    assert "weights_sha" in msg and f"delete {cache}" in msg and _sha(cache) == before


def test_training_a_3d_configuration(trainer):
    from nnunetv2_textseg.training.text_trainer import TextTrainingError

    trainer.was_initialized = False
    trainer.configuration_manager = SimpleNamespace(patch_size=[16, 16, 16])
    trainer.configuration_name = "3d_fullres"
    with pytest.raises(TextTrainingError, match=r"nnUNetTrainerText supports nnU-Net's 2d configuration only, not "
                                                r"'3d_fullres': train with `nnUNetv2_train DATASET 2d FOLD`"):
        trainer.initialize()

# =========================================================================================
# Prediction: nnUNetv2_textseg_predict on a stand-in model folder
# =========================================================================================
class _Predict:
    """Runs ``nnUNetv2_textseg_predict`` in-process against a model folder that holds no network: what the command
    checks before it predicts needs only the model's dataset.json and its record of the text encoder (the tiny
    encoder here), so the trained model is stood in for and the prediction itself is only recorded."""

    def __init__(self, tmp_path: Path, monkeypatch, capsys, tiny_dir: Path):
        from nnunetv2_textseg import predictor as predictor_module

        self.capsys, self.predicted = capsys, []
        monkeypatch.setenv("nnUNet_results", str(tmp_path / "results"))
        (tmp_path / "results" / "Dataset992_P" / "nnUNetTrainerBiCLIP__nnUNetPlans__2d").mkdir(parents=True)
        spec = EncoderSpec(str(tiny_dir))
        self.record = {"encoder": spec_to_dict(spec), "encoder_identity": TextEncoder(spec).identity()}
        record, predicted = self.record, self.predicted

        def initialize(predictor, folder, use_folds, checkpoint_name="checkpoint_final.pth"):
            predictor.dataset_json = {"file_ending": ".png"}
            predictor.text_config = record
            predictor.network = torch.nn.Identity()

        def predict(predictor, input_folder, output_folder, **kwargs):
            predicted.append(sorted(predictor.embeddings))

        monkeypatch.setattr(predictor_module.nnUNetTextPredictor, "initialize_from_trained_model_folder", initialize)
        monkeypatch.setattr(predictor_module.nnUNetTextPredictor, "predict_from_files_sequential", predict)
        monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the CLI's CPU setting, not for the test process

    def __call__(self, inp: Path, out: Path, *extra: str, dataset: str = "Dataset992_P") -> tuple[int, str]:
        from nnunetv2_textseg.cli import _run, predict_main
        rc = _run(predict_main, ["-i", str(inp), "-o", str(out), "-d", dataset, "-c", "2d", "-f", "0",
                                 "-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar", *extra])
        return rc, self.capsys.readouterr().err


@pytest.fixture
def predict(tmp_path, monkeypatch, capsys, tiny_dir) -> _Predict:
    return _Predict(tmp_path, monkeypatch, capsys, tiny_dir)


def _input_folder(folder: Path, cases=("a", "b"), reports: str | None = "case_id,report\na,left lung\nb,clear\n"):
    folder.mkdir(parents=True)
    for case in cases:
        (folder / f"{case}_0000.png").write_bytes(b"")
    if reports is not None:
        (folder / "reports.csv").write_text(reports)
    return folder


def test_predict_stand_in_model_predicts_good_input(predict, tmp_path):
    """The reference for the cases below: the same call with good input gets as far as predicting."""
    rc, err = predict(_input_folder(tmp_path / "in"), tmp_path / "out")
    assert rc == 0 and predict.predicted == [["a", "b"]], err


def test_predict_with_an_empty_input_folder(predict, tmp_path):
    inp = tmp_path / "in"
    inp.mkdir()
    table = _write(tmp_path / "reports.csv", "case_id,report\na,x\n")
    rc, err = predict(inp, tmp_path / "out", "-reports", str(table))
    line = _one_error_line(err)
    assert rc == 2 and line == f"ERROR: No images ending in _0000.png in {inp}.", line
    assert not predict.predicted and not any((tmp_path / "out").iterdir())


def test_predict_without_a_report_table(predict, tmp_path):
    inp = _input_folder(tmp_path / "in", reports=None)
    rc, err = predict(inp, tmp_path / "out")
    line = _one_error_line(err)
    assert rc == 2 and f"No report table for {inp}: pass -reports FILE, or put reports.csv in the input" in line
    assert not predict.predicted


def test_predict_case_without_report(predict, tmp_path):
    inp = _input_folder(tmp_path / "in", cases=("a", "b", "c"))
    before = _tree(inp)
    rc, err = predict(inp, tmp_path / "out")
    line = _one_error_line(err)
    assert rc == 2 and "1 case(s) in" in line and "have no report: ['c']" in line, line
    assert "--allow_missing_reports" in line and not predict.predicted and _tree(inp) == before


def test_predict_with_an_unreadable_report_table(predict, tmp_path):
    inp = _input_folder(tmp_path / "in", reports="case_id,report\na,left lung, right lung\nb,clear, no effusion\n")
    before = _tree(inp)
    rc, err = predict(inp, tmp_path / "out")
    line = _one_error_line(err)
    assert rc == 2 and line.startswith(f"ERROR: {inp / 'reports.csv'}: cannot parse as CSV") and "quote the report" in line
    assert _tree(inp) == before and not predict.predicted


def test_predict_without_the_model_folder(predict, tmp_path):
    rc, err = predict(_input_folder(tmp_path / "in"), tmp_path / "out", dataset="Dataset993_None")
    line = _one_error_line(err)
    assert rc == 2 and "No trained model at" in line and "Dataset993_None" in line and "check -d, -tr, -p and -c" in line


def test_predict_into_an_existing_file(predict, tmp_path):
    out = _write(tmp_path / "out", "my notes")
    rc, err = predict(_input_folder(tmp_path / "in"), out)
    assert rc == 2 and _one_error_line(err) == f"ERROR: -o {out} is an existing file; give an output folder."
    assert out.read_text() == "my notes"


def test_predict_with_encoder_path_that_does_not_exist(predict, tmp_path):
    missing = tmp_path / "models" / "encoder"
    rc, err = predict(_input_folder(tmp_path / "in"), tmp_path / "out", "-encoder", str(missing))
    line = _one_error_line(err)
    assert rc == 2 and f"the folder {missing} does not exist. Pass an existing local model folder" in line
    assert not predict.predicted


def test_predict_with_a_copy_of_the_encoder_at_another_path(predict, tmp_path, tiny_dir):
    """A model trained here predicts from an install at another path: a byte-identical copy is the same encoder."""
    copy = shutil.copytree(tiny_dir, tmp_path / "elsewhere" / "encoder")
    rc, err = predict(_input_folder(tmp_path / "in"), tmp_path / "out", "-encoder", str(copy))
    assert rc == 0 and predict.predicted == [["a", "b"]], err


def test_predict_with_a_copy_of_the_encoder_with_other_weights(predict, tmp_path, tiny_dir):
    changed = _copy_with_changed_weight(tiny_dir, tmp_path / "elsewhere" / "encoder")
    rc, err = predict(_input_folder(tmp_path / "in"), tmp_path / "out", "-encoder", str(changed))
    line = _one_error_line(err)
    assert rc == 2 and f"The model was trained with text encoder {str(tiny_dir)!r}, but {str(changed)!r} differs" in line
    assert "'weights_sha'" in line and "Predict with the encoder the model was trained with" in line
    assert not predict.predicted


def test_predict_model_recorded_before_precisions(predict, tmp_path, tiny_dir):
    """A model of an earlier version recorded no precision: it was trained on float32 embeddings and predicts with
    float32 (by default, with -encoder, and through the Python API), never with the new bfloat16 default."""
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    fp32 = TextEncoder(EncoderSpec(str(tiny_dir), precision="fp32"))
    predict.record["encoder"] = {k: v for k, v in spec_to_dict(fp32.spec).items() if k != "precision"}
    predict.record["encoder_identity"] = {k: v for k, v in fp32.identity().items() if k != "precision"}
    copy = shutil.copytree(tiny_dir, tmp_path / "elsewhere" / "encoder")
    for i, extra in enumerate(((), ("-encoder", str(copy)))):
        rc, err = predict(_input_folder(tmp_path / f"in{i}"), tmp_path / f"out{i}", *extra)
        assert rc == 0, err
    assert predict.predicted == [["a", "b"], ["a", "b"]]
    api = nnUNetTextPredictor(device=torch.device("cpu"))
    api.text_config = predict.record
    assert api.load_encoder().spec.precision == "fp32"


def test_predict_model_recorded_with_remote_code(predict, tmp_path):
    predict.record["encoder"] = dict(predict.record["encoder"], trust_remote_code=True)
    rc, err = predict(_input_folder(tmp_path / "in"), tmp_path / "out")
    line = _one_error_line(err)
    assert rc == 2 and "runs its own code; pass --trust_remote_code if you trust it" in line
    assert not predict.predicted

def test_prediction_names_report_ids_that_differ_only_in_unicode_normalisation():
    """The report table spells 'café_01' in NFC (typed in a spreadsheet), the image file in NFD (macOS)."""
    import unicodedata

    from nnunetv2_textseg.predictor import TextPredictionError, nnUNetTextPredictor

    predictor = object.__new__(nnUNetTextPredictor)
    predictor.allow_missing_reports = False
    nfc, nfd = unicodedata.normalize("NFC", "café_01"), unicodedata.normalize("NFD", "café_01")
    predictor.embeddings = {nfc: None, "plain_02": None}
    with pytest.raises(TextPredictionError) as e:
        predictor.check_cases([nfd, "plain_02"], source="imagesTs")
    msg = str(e.value)
    assert msg.startswith("1 case(s) in imagesTs have no report") and "NFC vs NFD" in msg
    assert ascii(nfc) in msg and ascii(nfd) in msg and "as the image files spell them" in msg
    predictor.embeddings = {"other": None}
    with pytest.raises(TextPredictionError) as e:  # no twin: no hint
        predictor.check_cases(["plain_02"])
    assert "NFC" not in str(e.value)


# =========================================================================================
# Tools: degrade, convert_pretrained, encode, report variants, the one atomic write, file modes
# =========================================================================================
# ---- nnUNetv2_textseg_degrade --------------------------------------------------------------------------
def _png_folder(folder: Path, names=("case_000_0000.png", "case_001_0000.png")) -> Path:
    import SimpleITK as sitk
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (24, 24), dtype=np.uint8)), str(folder / name))
    return folder


def _raw_dataset_layout(root: Path) -> Path:
    """D/imagesTs + D/labelsTs + D/dataset.json + D/reportsTs.csv, as a user's raw dataset looks."""
    d = root / "Dataset500_X"
    _png_folder(d / "imagesTs")
    _png_folder(d / "labelsTs", names=("case_000.png", "case_001.png"))
    (d / "dataset.json").write_text(json.dumps({"file_ending": ".png"}))
    (d / "reportsTs.csv").write_text("case_id,report\ncase_000,a\ncase_001,b\n")
    return d


def test_degrade_refuses_output_that_contains_the_input_and_keeps_the_dataset(tmp_path, capsys):
    """The reported data loss: ``-i D/imagesTs -o D --overwrite`` run twice deleted all of D."""
    from nnunetv2_textseg.robustness import degrade_main

    d = _raw_dataset_layout(tmp_path)
    before = _tree(d)
    for _ in range(2):
        with pytest.raises(SystemExit) as e:
            degrade_main(["-i", str(d / "imagesTs"), "-o", str(d), "--kind", "gaussian", "--level", "0.1",
                          "--overwrite"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        error_lines = [line for line in err.splitlines() if "error:" in line]
        assert len(error_lines) == 1, err
        assert f"Output folder {d} contains the input folder {d / 'imagesTs'}" in error_lines[0]
        assert "separate folder" in error_lines[0]  # the fix
        assert _tree(d) == before
    # a folder further up as well
    with pytest.raises(SystemExit):
        degrade_main(["-i", str(d / "imagesTs"), "-o", str(tmp_path), "--kind", "gaussian", "--level", "0.1",
                      "--overwrite"])
    assert "contains the input folder" in capsys.readouterr().err
    assert _tree(d) == before


def test_degrade_refuses_output_inside_input_also_through_a_symlink(tmp_path):
    from nnunetv2_textseg.robustness import degrade_folder

    src = _png_folder(tmp_path / "imagesTs")
    before = _tree(src)
    link = tmp_path / "link"
    link.symlink_to(src, target_is_directory=True)
    with pytest.raises(ValueError, match="is the input folder.*separate folder"):
        degrade_folder(src, link, "gaussian", 0.1, overwrite=True, progress=False)
    with pytest.raises(ValueError, match="lies inside the input folder"):
        degrade_folder(src, link / "sub", "gaussian", 0.1, overwrite=True, progress=False)
    (tmp_path / "up").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(ValueError, match="contains the input folder"):
        degrade_folder(src, tmp_path / "up", "gaussian", 0.1, overwrite=True, progress=False)
    assert _tree(src) == before and not (src / "sub").exists()


def test_degrade_overwrite_deletes_only_files_it_wrote(tmp_path):
    """In a folder the user made, --overwrite removes the tool's earlier outputs (also cases no longer in the
    input) but never the user's own files, whatever their names."""
    from nnunetv2_textseg.robustness import DEGRADATION_FILE, degrade_folder

    src = _png_folder(tmp_path / "imagesTs", names=("a_0000.png", "b_0000.png", "c_0000.png"))
    (src / "reports.csv").write_text("case_id,report\na,x\nb,y\nc,z\n")
    out = tmp_path / "results"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("my notes")
    _png_folder(out, names=("mine_0000.png",))  # the user's own image, same ending as ours
    (out / "sub" / "keep.png").write_bytes(b"keep")
    user_files = _tree(out)
    src_before = _tree(src)

    degrade_folder(src, out, "gaussian", 0.1, overwrite=True, progress=False)
    (src / "c_0000.png").unlink()  # a case dropped from the input: its degraded copy is now stale
    src_before.pop("c_0000.png")
    degrade_folder(src, out, "gaussian", 0.2, overwrite=True, progress=False)
    now = _tree(out)
    assert {k: now.get(k) for k in user_files} == user_files  # every user file still there, unchanged
    assert _tree(src) == src_before
    assert not (out / "c_0000.png").exists()
    assert (out / "a_0000.png").is_file() and (out / "b_0000.png").is_file()
    meta = json.loads((out / DEGRADATION_FILE).read_text())
    assert sorted(meta["written_files"]) == sorted(["a_0000.png", "b_0000.png", "reports.csv", DEGRADATION_FILE])
    assert meta["created_output_folder"] is False


def test_degrade_manifest_cannot_name_files_outside_the_folder(tmp_path):
    """A (hand-edited or foreign) degradation.json naming other paths deletes nothing outside the folder."""
    from nnunetv2_textseg.robustness import DEGRADATION_FILE, degrade_folder

    src = _png_folder(tmp_path / "imagesTs")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    (out / "data" / "x.txt").write_text("x")
    (out / DEGRADATION_FILE).write_text(json.dumps({
        "files": {"../victim.txt": {}, str(victim): {}, "data": {}},
        "written_files": ["../victim.txt", str(victim), "data", "..", "."], "created_output_folder": False}))
    degrade_folder(src, out, "gaussian", 0.1, overwrite=True, progress=False)
    assert victim.read_text() == "precious" and (out / "data" / "x.txt").read_text() == "x"


def test_degrade_legacy_record_deletes_only_its_listed_files(tmp_path):
    """A degradation.json of an older version (no manifest) is not a licence to clear the folder."""
    from nnunetv2_textseg.robustness import DEGRADATION_FILE, degrade_folder

    src = _png_folder(tmp_path / "imagesTs", names=("a_0000.png",))
    out = _png_folder(tmp_path / "out", names=("old_0000.png", "user_0000.png"))
    (out / "user.txt").write_text("mine")
    (out / DEGRADATION_FILE).write_text(json.dumps({"files": {"old_0000.png": {"psnr": 1.0}}, "reports": None}))
    keep = {k: v for k, v in _tree(out).items() if k in ("user_0000.png", "user.txt")}
    degrade_folder(src, out, "gaussian", 0.1, overwrite=True, progress=False)
    assert not (out / "old_0000.png").exists()
    assert {k: _sha(out / k) for k in keep} == keep


# ---- nnUNetv2_textseg_convert_pretrained ---------------------------------------------------------------
def _nnunet_like_checkpoint() -> dict:
    """What nnU-Net's save_checkpoint writes: state dicts, its logger (numpy floats), init args (a torch.device),
    a tuple of axes."""
    from nnunetv2.training.logging.nnunet_logger import LocalLogger

    net = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.InstanceNorm2d(4, affine=True), torch.nn.Conv2d(4, 2, 1))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.99, nesterov=True)
    net(torch.randn(1, 1, 8, 8)).sum().backward()
    opt.step()
    logger = LocalLogger()  # what nnU-Net's MetaLogger.get_checkpoint returns
    for epoch in range(2):
        logger.log("mean_fg_dice", np.float64(0.5 + epoch / 10), epoch)
        logger.log("dice_per_class_or_region", [np.float64(0.4), np.float32(0.6)], epoch)
        logger.log("train_losses", np.float32(-0.3), epoch)
        logger.log("val_losses", np.float64(-0.2), epoch)
        logger.log("lrs", 0.01, epoch)
        logger.log("epoch_start_timestamps", 1.0, epoch)
        logger.log("epoch_end_timestamps", 2.0, epoch)
    return {"network_weights": net.state_dict(), "optimizer_state": opt.state_dict(), "grad_scaler_state": None,
            "logging": logger.get_checkpoint(), "_best_ema": np.float64(0.55), "current_epoch": 2,
            "init_args": {"plans": {"plans_name": "nnUNetPlans", "configurations": {"2d": {"patch_size": [8, 8]}}},
                          "configuration": "2d", "fold": 0, "dataset_json": {"file_ending": ".png"},
                          "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer", "inference_allowed_mirroring_axes": (0, 1)}


def test_nnunet_checkpoint_loads_with_weights_only(tmp_path):
    from nnunetv2_textseg.pretrained import load_checkpoint_safely

    ckpt = _nnunet_like_checkpoint()
    path = tmp_path / "checkpoint_final.pth"
    torch.save(ckpt, path)
    loaded = load_checkpoint_safely(path)
    assert loaded.keys() == ckpt.keys()
    for k, v in ckpt["network_weights"].items():
        torch.testing.assert_close(loaded["network_weights"][k], v)
    assert loaded["logging"]["mean_fg_dice"] == ckpt["logging"]["mean_fg_dice"]
    assert loaded["init_args"] == ckpt["init_args"] and loaded["_best_ema"] == ckpt["_best_ema"]


def _convert_cli(capsys, *args: str) -> tuple[int, str]:
    from nnunetv2_textseg.cli import _run, convert_pretrained_main
    rc = _run(convert_pretrained_main, ["-d", "999", *args])
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_convert_corrupt_checkpoint_is_one_error_line(tmp_path, capsys, damage):
    good = tmp_path / "good.pth"
    torch.save(_nnunet_like_checkpoint(), good)
    data = good.read_bytes()
    path = tmp_path / "checkpoint_final.pth"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x80\x02not a checkpoint",
                      "empty": b""}[damage])
    before = _sha(path)
    rc, err = _convert_cli(capsys, "-i", str(path), "-o", str(tmp_path / "out.pth"))
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"ERROR: {path} is not an nnU-Net checkpoint" in err and "checkpoint_final.pth" in err
    assert _sha(path) == before and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("how", ["same path", "other spelling", "symlink", "hardlink"])
def test_convert_refuses_to_overwrite_its_input(tmp_path, capsys, how):
    """``-i X.pth -o X.pth --overwrite`` would replace the user's only plain checkpoint."""
    src = tmp_path / "models" / "checkpoint_final.pth"
    src.parent.mkdir()
    torch.save(_nnunet_like_checkpoint(), src)
    before = _sha(src)
    if how == "same path":
        out = src
    elif how == "other spelling":
        (tmp_path / "sub").mkdir()
        out = tmp_path / "sub" / ".." / "models" / "checkpoint_final.pth"
    elif how == "symlink":
        out = tmp_path / "link.pth"
        out.symlink_to(src)
    else:
        out = tmp_path / "hard.pth"
        os.link(src, out)
    rc, err = _convert_cli(capsys, "-i", str(src), "-o", str(out), "--overwrite")
    assert rc == 2 and err.count("\n") == 1, err
    assert f"-o {out} is the input checkpoint -i {src} itself" in err and "Choose another output file" in err
    assert _sha(src) == before


# ---- nnUNetv2_textseg_encode -----------------------------------------------------------------------------
def _encode_dataset(tmp_path: Path, monkeypatch, reports: dict[str, str] | None) -> Path:
    raw = _raw_env(tmp_path, monkeypatch)
    d = _dataset(raw, cases=tuple(reports or ("a",)), name="Dataset994_E")
    if reports is not None:
        ReportTable(reports).write(reports_path(d))
    return d


def test_encode_cli_with_encoder_path_that_does_not_exist(tmp_path, monkeypatch, capsys):
    from nnunetv2_textseg.cli import _run, encode_main

    d = _encode_dataset(tmp_path, monkeypatch, {"a": "left lung"})
    before = _tree(d)
    missing = tmp_path / "no" / "encoder"
    rc = _run(encode_main, ["-d", "994", "--encoder", str(missing)])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and f"the folder {missing} does not exist. Pass an existing local model folder" in line
    assert _tree(d) == before and not list((tmp_path / "nnUNet_preprocessed").rglob("*.npz"))


def test_encode_cli_before_reports_are_attached(tmp_path, monkeypatch, capsys):
    from nnunetv2_textseg.cli import _run, encode_main

    d = _encode_dataset(tmp_path, monkeypatch, None)
    rc = _run(encode_main, ["-d", "994"])
    line = _one_error_line(capsys.readouterr().err)
    assert rc == 2 and line == (f"ERROR: {reports_path(d)}: not found. Attach the reports first: "
                                f"nnUNetv2_textseg_attach_reports -d {d.name} -i YOUR_TABLE")


# ---- nnUNetv2_textseg_report_variants --------------------------------------------------------------------
def test_report_variants_never_overwrite_their_input(tmp_path, capsys):
    from nnunetv2_textseg.report_variants import main, variant_table_name

    src = _write(tmp_path / "variants" / variant_table_name("original"), "case_id,report\na,left lung\n")
    before = _sha(src)
    assert main([str(src), str(src.parent)]) == 1
    err = capsys.readouterr().err
    assert f"{src}: writing the variant tables to {src.parent} would overwrite the input; choose another output" in err
    assert _sha(src) == before and sorted(p.name for p in src.parent.iterdir()) == [src.name]


# ---- the one atomic write: temp files left by a killed process --------------------------------------------
def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_with(writer: str, target: Path) -> None:
    if writer == "report table":
        ReportTable({"a": "x"}).write(target)
    elif writer == "cache":
        _cache().save(target)
    else:
        from nnunetv2_textseg.label_fraction_splits import _write_json
        _write_json(target, [{"train": ["a"], "val": ["b"]}])


@pytest.mark.parametrize("writer, name", [("report table", "reportsTr.csv"), ("cache", "enc__mean8__Tr.npz"),
                                          ("split file", "splits_final.json")])
def test_atomic_write_removes_only_its_own_stale_temp_files(tmp_path, writer, name):
    """A process killed mid-write leaves `.<name>.textseg-<pid>-<host>-<random>.tmp`; the next write of the same
    file removes those of processes that are gone, and nothing else: not a running writer's, not another host's
    (a shared folder), not another file's, not the user's."""
    from nnunetv2_textseg.atomic import temp_name

    target = tmp_path / name
    stale = _write(tmp_path / temp_name(target, pid=_dead_pid()), b"half a file")
    keep = [_write(tmp_path / temp_name(target, pid=os.getppid()), b"being written by a live process"),
            _write(tmp_path / temp_name(target, pid=_dead_pid(), host="000000"), b"another host's"),
            _write(tmp_path / temp_name(tmp_path / "other.csv", pid=_dead_pid()), b"another target's"),
            _write(tmp_path / f"{name}.tmp", b"the user's own"), _write(tmp_path / f".{name}.tmp", b"the user's own")]
    kept = {p.name: _sha(p) for p in keep}
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        seen.append(Path(src).name)
        return real_replace(src, dst)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "replace", replace)
        _write_with(writer, target)
    assert not stale.exists() and target.is_file()
    assert {p.name: _sha(p) for p in keep} == kept
    assert len(seen) == 1 and re.fullmatch(rf"\.{re.escape(name)}\.textseg-{os.getpid()}-[0-9a-f]{{6}}-[0-9a-f]{{6}}"
                                           r"\.tmp", seen[0]), seen
    assert not (tmp_path / seen[0]).exists()


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = _write(tmp_path / "reportsTr.csv", "case_id,report\na,old\n")
    before = _sha(target)

    def full_disk(data):
        raise OSError(28, "No space left on device")

    from nnunetv2_textseg.atomic import atomic_write
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, lambda f: full_disk(f))
    assert _sha(target) == before and sorted(p.name for p in tmp_path.iterdir()) == ["reportsTr.csv"]

# ---- file modes of atomically written outputs -----------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_atomic_writes_respect_the_umask(tmp_path, umask):
    from nnunetv2_textseg.reports import ReportTable

    old = os.umask(umask)
    try:
        cache = _cache().save(tmp_path / "c.npz")
        table = tmp_path / "reportsTr.csv"
        ReportTable({"a": "x"}).write(table)
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what open() gives a new file under this umask
    finally:
        os.umask(old)
    expected = 0o666 & ~umask
    assert (plain.stat().st_mode & 0o777) == expected
    assert (cache.stat().st_mode & 0o777) == expected
    assert (table.stat().st_mode & 0o777) == expected


# =========================================================================================
# Security: nothing unpickled, no remote code unless this run opts in, no formulas unannounced, no links followed
# =========================================================================================
def _make_dir(path: str) -> None:  # what a malicious pickle would run on load (module level: picklable)
    os.mkdir(path)


class _Payload:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return _make_dir, (self.marker,)


def test_convert_refuses_pickled_python_objects_without_running_them(tmp_path, capsys):
    ckpt = _nnunet_like_checkpoint()
    marker = tmp_path / "EXECUTED"
    ckpt["extra"] = _Payload(marker)
    path = tmp_path / "evil.pth"
    torch.save(ckpt, path)
    before = _sha(path)
    rc, err = _convert_cli(capsys, "-i", str(path), "-o", str(tmp_path / "out.pth"))
    assert rc == 2 and not marker.exists(), err  # refused, and the payload never ran
    assert err.count("\n") == 1 and err.startswith("ERROR: ") and "Traceback" not in err
    assert str(path) in err and "non-tensor Python objects" in err and "not unpickled, for safety" in err
    assert _sha(path) == before and not (tmp_path / "out.pth").exists()


@pytest.mark.parametrize("array", ["case_ids", "pooled", "identity"])
def test_cache_with_pickled_objects_is_never_unpickled(tmp_path, array):
    """Object arrays in a cache .npz are pickles: loading stays allow_pickle=False, so they are refused unrun."""
    marker = tmp_path / "EXECUTED"
    good = _cache().save(tmp_path / "good.npz")
    payload = np.empty(3 if array != "identity" else (), dtype=object)
    payload[...] = _Payload(marker) if array == "identity" else None
    if array != "identity":
        payload[:] = [_Payload(marker), "x", "y"]
    path = _npz(tmp_path / "evil.npz", good, **{array: payload})
    before = _sha(path)
    with pytest.raises(CacheError, match=r"Cannot read the text embedding cache .*evil\.npz.*Delete it"):
        TextEmbeddingCache.load(path)
    with pytest.raises(CacheError, match="Cannot read the text embedding cache"):
        build_or_update_cache({"case_0": "x"}, path, spec=EncoderSpec("enc", max_length=8), progress=False)
    assert not marker.exists() and _sha(path) == before


@pytest.fixture
def remote_code_model(tiny_dir, tmp_path, monkeypatch) -> tuple[Path, Path]:
    """A model folder whose architecture exists only as its own code; that code, if run, creates a marker."""
    import transformers.dynamic_module_utils as dmu
    marker = tmp_path / "EXECUTED"
    monkeypatch.setenv("TEXTSEG_TEST_MARKER", str(marker))
    monkeypatch.setattr(dmu, "HF_MODULES_CACHE", str(tmp_path / "modules"))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
        monkeypatch.delitem(sys.modules, name)
    dst = tmp_path / "remote_model"
    shutil.copytree(tiny_dir, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(auto_map={"AutoConfig": "custom_model.CustomConfig", "AutoModel": "custom_model.CustomModel"},
               model_type="cxr-bert-test")
    (dst / "config.json").write_text(json.dumps(cfg))
    (dst / "custom_model.py").write_text("import os, pathlib\n"
                                         "pathlib.Path(os.environ['TEXTSEG_TEST_MARKER']).write_text('executed')\n"
                                         "raise RuntimeError('custom code executed')\n")
    return dst, marker


def test_cache_record_never_turns_on_remote_code(tmp_path, remote_code_model, monkeypatch):
    """A cache .npz recording trust_remote_code=True must not make anything run the model's code: only the
    user's explicit opt-in for this run does."""
    from nnunetv2_textseg.training.text_trainer import (ENCODER_ENV, TRUST_ENV, TextTrainingError,
                                                        choose_encoder_spec)

    model, marker = remote_code_model
    monkeypatch.delenv(TRUST_ENV, raising=False)
    monkeypatch.delenv(ENCODER_ENV, raising=False)
    pre = tmp_path / "pre"
    record = dict(spec_to_dict(EncoderSpec(str(model))), trust_remote_code=True)
    path = _cache(spec=record).save(cache_folder(pre) / "remote__mean128__Tr.npz")
    before = _sha(path)
    cache = TextEmbeddingCache.load(path)

    # encoders: a recorded dict never opts in
    assert spec_from_record(cache.spec).trust_remote_code is False
    with pytest.raises(EncoderError, match="pass --trust_remote_code"):
        load_encoder(cache.spec)
    # training: the dataset's only cache chooses the encoder, but not remote code
    try:
        chosen = choose_encoder_spec(pre, EncoderSpec())
    except TextTrainingError as e:  # refused outright, naming the opt-in
        assert TRUST_ENV in str(e) and str(model) in str(e)
    else:
        assert chosen.name_or_path == str(model) and chosen.trust_remote_code is False
        with pytest.raises(EncoderError, match="pass --trust_remote_code"):
            TextEncoder(chosen)
    assert not marker.exists() and _sha(path) == before
    # the user's own, explicit choice still counts
    assert spec_from_record(cache.spec, trust_remote_code=True).trust_remote_code is True
    monkeypatch.setenv(TRUST_ENV, "1")
    assert choose_encoder_spec(pre, EncoderSpec()).trust_remote_code is True


# ---- spreadsheet formulas in the report tables we write ---------------------------------------------------
FORMULAS = {"a": '=HYPERLINK("http://example.invalid","click")', "b": "+1 cm nodule", "c": "-", "d": "@SUM(A1)",
            "e": "Clear lungs. No effusion = normal.", "=f": "no formula in the text, but in the id"}


def test_written_table_warns_once_about_formula_cells_and_keeps_them_verbatim(tmp_path):
    """Kept verbatim (the table is data our tools read back; a quote prefix would change the reports and their
    embeddings) and named once, so nobody double-clicks it into a spreadsheet unaware."""
    path = tmp_path / "reports_contradictory.csv"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ReportTable(FORMULAS).write(path)
    ours = [w for w in caught if issubclass(w.category, SpreadsheetFormulaWarning)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    msg = str(ours[0].message)
    assert msg.startswith(f"{path}: 5 report(s) start with =, +, -, @") and "'a', 'b', 'c', 'd', '=f'" in msg
    assert "'e'" not in msg and "written verbatim" in msg and "open the file as text" in msg
    assert ReportTable.read(path).reports == FORMULAS


def test_attach_warns_about_formula_cells(tmp_path):
    d = _dataset(tmp_path, cases=("a", "b"))
    src = _write(tmp_path / "src.csv", 'case_id,report\na,"=cmd|\' /C calc\'!A0"\nb,clear\n')
    before = _sha(src)
    with pytest.warns(SpreadsheetFormulaWarning, match=re.escape(f"{reports_path(d)}: 1 report(s) start with") +
                      r".*: 'a'\. They are written verbatim"):
        attach_reports(d, src)
    assert load_dataset_reports(d)["a"] == "=cmd|' /C calc'!A0" and _sha(src) == before


def test_ordinary_reports_are_written_without_formula_warning(tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SpreadsheetFormulaWarning)
        ReportTable({"a": "Left lower lobe opacity; no effusion.", "b": " -leading space"}).write(tmp_path / "r.csv")


# ---- links -----------------------------------------------------------------------------------------------
def test_attach_replaces_a_linked_reports_file_not_the_file_it_points_to(tmp_path):
    """reportsTr.csv as a symlink to the user's master table: --overwrite replaces the link, never the master."""
    d = _dataset(tmp_path)
    master = _write(tmp_path / "master" / "all_reports.csv", "case_id,report\na,old a\nb,old b\n")
    before = _sha(master)
    reports_path(d).symlink_to(master)
    src = _write(tmp_path / "src.csv", "case_id,report\na,new a\nb,new b\n")
    attach_reports(d, src, overwrite=True)
    assert _sha(master) == before
    assert not reports_path(d).is_symlink() and load_dataset_reports(d)["a"] == "new a"
