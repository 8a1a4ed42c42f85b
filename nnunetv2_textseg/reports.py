"""Report tables: the one place that reads, checks and writes radiology-report tables.

A raw nnU-Net dataset carries its reports as ``reportsTr.csv`` (next to ``imagesTr/``) and
``reportsTs.csv`` (next to ``imagesTs/``), columns ``case_id,report``, UTF-8, one row per case.
:func:`attach_reports` imports a user's table (our layout, LViT/MedCLIPSeg QaTa-COV19 XLSX/CSV,
MosMedData+ ``;``-separated CSV, ...) into that form; everything else loads it through
:func:`load_dataset_reports`.

Every problem a user can fix raises :class:`ReportError` whose message names the file, the
spreadsheet-style row (header = row 1) and/or the case, and says what to do.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import pandas as pd

from nnunetv2_textseg.atomic import atomic_write_bytes
from nnunetv2_textseg.errors import TextSegError

__all__ = [
    "ReportError",
    "ReportWarning",
    "SpreadsheetFormulaWarning",
    "MissingReportError",
    "ReportTable",
    "case_id_from_filename",
    "dataset_case_ids",
    "reports_path",
    "load_dataset_reports",
    "read_report_table",
    "attach_reports",
    "load_mapping",
]

ID_COLUMN_CANDIDATES: tuple[str, ...] = ("case_id", "Image", "image", "filename", "file", "id")
TEXT_COLUMN_CANDIDATES: tuple[str, ...] = ("report", "Description", "text", "description", "caption")
DELIMITERS = ",;\t"
EXCEL_SUFFIXES = (".xlsx", ".xlsm")
# How many ids an error message lists before summarising the rest as a count.
MAX_LISTED = 10
# A cell starting with one of these is run as a formula when a spreadsheet opens the CSV (OWASP "CSV injection").
FORMULA_PREFIXES: tuple[str, ...] = ("=", "+", "-", "@", "\t", "\r")

# nnU-Net image files are {case_id}_{XXXX}{file_ending}; only the first channel's suffix is
# stripped from table names, because many real case ids end in four digits (QaTa: covid_1000).
_CHANNEL_SUFFIX = re.compile(r"_0000$")
# Extension = a dot plus 1-5 chars starting with a letter (.png, .nii, .nrrd, .jpeg), so ids
# such as "case.1" are not mangled; ".gz" is peeled first to handle ".nii.gz".
_EXTENSION = re.compile(r"\.[A-Za-z][A-Za-z0-9]{0,4}$")
_GZ = re.compile(r"\.gz$", re.IGNORECASE)


class ReportError(TextSegError, ValueError):
    """A report table problem the user can fix; the message says where and how."""


class MissingReportError(ReportError, KeyError):
    """Raised by ``table[case_id]`` for an unknown case; also a KeyError for Mapping idioms."""

    __str__ = BaseException.__str__  # KeyError would repr() the whole message


class ReportWarning(UserWarning):
    """Something odd but harmless in a report table (e.g. the same row twice)."""


class SpreadsheetFormulaWarning(ReportWarning):
    """A written table has cells that a spreadsheet would run as formulas (they are written verbatim)."""


# --------------------------------------------------------------------------- case ids


def _split_extension(name: str) -> tuple[str, str]:
    """Return (stem, extension) with double extensions such as ``.nii.gz`` kept together."""
    stem, ext = name, ""
    gz = _GZ.search(stem)
    if gz:
        stem, ext = stem[: gz.start()], stem[gz.start():]
    m = _EXTENSION.search(stem)
    if m:
        stem, ext = stem[: m.start()], stem[m.start():] + ext
    return stem, ext


def case_id_from_filename(
    name: str,
    prefixes: Sequence[str] = ("mask_",),
    mapping: Mapping[str, str] | None = None,
) -> str:
    """Map a file name from a report table to an nnU-Net case id.

    ``mapping`` wins if it holds the name, its base name or its stem. Otherwise the directory,
    the extension (``.nii.gz`` counts as one), a first-channel suffix ``_0000`` and one leading
    prefix from ``prefixes`` are removed: ``mask_covid_1.png`` -> ``covid_1``,
    ``covid_1_0000.png`` -> ``covid_1``, ``case.nii.gz`` -> ``case``. A value without an
    extension is taken to be a case id already and returned unchanged (minus outer whitespace).
    """
    name = str(name).strip()
    if isinstance(prefixes, str):  # a bare "mask_" would otherwise iterate per character
        prefixes = (prefixes,)
    base = re.split(r"[\\/]", name)[-1]
    stem, ext = _split_extension(base)
    if mapping:
        for key in (name, base, stem):
            if key in mapping:
                return str(mapping[key]).strip()
    if not ext:
        return name
    for prefix in prefixes:
        if prefix and stem.startswith(prefix) and len(stem) > len(prefix):
            # Prefixed names are mask/label files, which never carry a channel suffix.
            return stem[len(prefix):]
    unchannelled = _CHANNEL_SUFFIX.sub("", stem)
    return unchannelled or stem


# --------------------------------------------------------------------------- raw table I/O


def _decode_utf8(raw: bytes, path: Path) -> str:
    """Decode UTF-8 (BOM allowed); otherwise say where the first bad byte sits."""
    if raw.startswith(b"PK\x03\x04"):
        raise ReportError(f"{path}: is a zip file (an Excel workbook?) with a {path.suffix or 'missing'} suffix. "
                          f"If it is a workbook, rename it to .xlsx; otherwise save the table as CSV UTF-8.")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ReportError(f"{path}: is UTF-16 encoded (e.g. Excel's 'Unicode Text'). Save it as UTF-8 (in Excel: "
                          f"'CSV UTF-8'; LibreOffice: character set 'Unicode (UTF-8)') and try again.")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        offset = e.start
        line = raw[:offset].count(b"\n") + 1
        col = offset - (raw.rfind(b"\n", 0, offset) + 1) + 1
        raise ReportError(
            f"{path}: not valid UTF-8 at line {line}, column {col} (byte offset {offset}, "
            f"byte 0x{raw[offset]:02X}). Save the file as UTF-8 (e.g. in Excel: 'CSV UTF-8'; "
            f"LibreOffice: character set 'Unicode (UTF-8)') and try again."
        ) from None


def _detect_delimiter(text: str) -> str:
    """Pick ``,`` ``;`` or tab: csv.Sniffer on the first lines, else count in the header."""
    lines = text.splitlines()
    header = lines[0] if lines else ""
    try:
        delim = csv.Sniffer().sniff("\n".join(lines[:20]), delimiters=DELIMITERS).delimiter
        if delim in header:  # the header is the most reliable witness of the separator
            return delim
    except csv.Error:
        pass
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def _delimiter_name(delim: str) -> str:
    return "tab" if delim == "\t" else repr(delim)


def _check_field_counts(text: str, delim: str, path: Path) -> None:
    """Refuse rows with more fields than the header. pandas would silently take the first column as the index
    and shift every column by one, and the error would then blame the case ids instead of the real cause:
    report text with the delimiter in it but no quotes around it."""
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    try:
        header = next(reader, [])
        long_rows, first, first_fields, rows = 0, 0, [], 0
        for fields in reader:
            if not fields:
                continue
            rows += 1
            if len(fields) > len(header):
                long_rows += 1
                if not first:
                    first, first_fields = reader.line_num, fields
    except csv.Error:
        return  # malformed quoting: pandas names the line below
    if not long_rows:
        return
    name = _delimiter_name(delim)
    if not any(f.strip() for f in first_fields[len(header):]):
        cause = f"Its rows end with extra {name} delimiter(s). Fix: remove them"
    else:
        cause = (f"The report text contains an unquoted {name}, which splits it into columns. Fix: quote the "
                 f"report column, i.e. enclose each report in double quotes (\"...\") as spreadsheet programs do "
                 f"when saving CSV")
    raise ReportError(
        f"{path}: cannot parse as CSV: line {first} has {len(first_fields)} fields but the header "
        f"({delim.join(header)}) has {len(header)}; {long_rows} of {rows} row(s) are like this. {cause}, "
        f"and try again."
    )


def _read_csv_frame(path: Path) -> pd.DataFrame:
    text = _decode_utf8(path.read_bytes(), path)
    if not text.strip():
        raise ReportError(f"{path}: the file is empty; it needs a header row and one row per case.")
    delim = _detect_delimiter(text)
    _check_field_counts(text, delim, path)
    try:
        # dtype=str + keep_default_na=False: "NA"/"None" stay text; blank lines are kept so that
        # row numbers in messages match what a spreadsheet shows.
        return pd.read_csv(
            io.StringIO(text),
            sep=delim,
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            skip_blank_lines=False,
        )
    except (pd.errors.ParserError, csv.Error, ValueError) as e:
        raise ReportError(
            f"{path}: cannot parse as CSV ({str(e).strip()}). Check that text containing the delimiter, quotes "
            f"or line breaks is enclosed in double quotes."
        ) from None


def _read_excel_frame(path: Path, sheet: str | None) -> pd.DataFrame:
    try:
        book = pd.ExcelFile(path, engine="openpyxl")
    except Exception as e:  # openpyxl raises many types for corrupt/non-xlsx files
        raise ReportError(f"{path}: cannot open as an Excel workbook ({e}).") from None
    with book:
        names = [str(s) for s in book.sheet_names]
        if sheet is None:
            if len(names) > 1:
                raise ReportError(
                    f"{path}: the workbook has {len(names)} sheets ({', '.join(map(repr, names))}); "
                    f"choose one with --sheet NAME (sheet=...)."
                )
            sheet = names[0]
        elif sheet not in names:
            raise ReportError(
                f"{path}: no sheet {sheet!r}; the workbook has {', '.join(map(repr, names))}."
            )
        return pd.read_excel(book, sheet_name=sheet, dtype=str, keep_default_na=False, na_filter=False)


def _read_frame(path: Path, sheet: str | None) -> pd.DataFrame:
    if not path.is_file():
        raise ReportError(f"{path}: report table not found.")
    suffix = path.suffix.lower()
    if suffix in EXCEL_SUFFIXES:
        return _read_excel_frame(path, sheet)
    if suffix == ".xls":
        raise ReportError(f"{path}: old .xls workbooks are not supported; save it as .xlsx or UTF-8 CSV.")
    return _read_csv_frame(path)


def _find_column(
    columns: Sequence[str], wanted: str | None, candidates: Sequence[str], kind: str, path: Path
) -> str:
    """Return the column to use: the explicit one, else the first known name (any case)."""
    stripped = {str(c).strip(): c for c in columns}
    lower = {k.lower(): v for k, v in reversed(list(stripped.items()))}
    names = [wanted] if wanted is not None else list(candidates)
    for n in names:
        if n in stripped:
            return stripped[n]
        if n.strip().lower() in lower:
            return lower[n.strip().lower()]
    flag = "--id-column" if kind == "id" else "--text-column"
    expected = repr(wanted) if wanted is not None else "one of " + ", ".join(map(repr, candidates))
    raise ReportError(
        f"{path}: no {kind} column; expected {expected}, found columns "
        f"{', '.join(repr(str(c)) for c in columns) or '(none)'}. "
        f"Name the column with {flag} (id_column/text_column) or rename it in the table."
    )


def _cell(value: object) -> str:
    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) else str(value)


def _frame_to_reports(
    df: pd.DataFrame,
    path: Path,
    id_column: str | None,
    text_column: str | None,
    to_case_id: Callable[[str], str],
) -> dict[str, str]:
    """Turn a raw frame into case_id -> text, checking every row and reporting its row number."""
    id_col = _find_column(list(df.columns), id_column, ID_COLUMN_CANDIDATES, "id", path)
    text_col = _find_column(list(df.columns), text_column, TEXT_COLUMN_CANDIDATES, "report text", path)
    reports: dict[str, str] = {}
    first_row: dict[str, int] = {}
    if not any(_cell(i).strip() or _cell(t).strip() for i, t in zip(df[id_col].tolist(), df[text_col].tolist())):
        raise ReportError(f"{path}: the table has a header ({id_col!r}, {text_col!r}) but no rows; add one row per "
                          f"case.")
    for i, (raw_id, text) in enumerate(zip(df[id_col].tolist(), df[text_col].tolist())):
        row = i + 2  # spreadsheet numbering: header is row 1
        raw_id, text = _cell(raw_id), _cell(text)
        if not raw_id.strip() and not text.strip():
            continue  # a blank line / empty spreadsheet row
        if not raw_id.strip():
            raise ReportError(
                f"{path}, row {row}: the id cell ({id_col!r}) is empty; fill in the case id or delete the row."
            )
        case = to_case_id(raw_id)
        if not text.strip():
            raise ReportError(
                f"{path}, row {row} (case {case!r}): the report ({text_col!r}) is empty; write the "
                f"report text or remove the case from the table and from images."
            )
        if case in reports:
            if reports[case] != text:
                raise ReportError(
                    f"{path}: case {case!r} appears in rows {first_row[case]} and {row} with "
                    f"different reports; keep one row per case."
                )
            warnings.warn(
                f"{path}: case {case!r} appears twice with the same report (rows "
                f"{first_row[case]} and {row}); keeping one.",
                ReportWarning,
                stacklevel=3,
            )
            continue
        reports[case] = text
        first_row[case] = row
    return reports


def _listing(ids: Sequence[str]) -> str:
    shown = ", ".join(map(repr, ids[:MAX_LISTED]))
    return shown + (f", ... ({len(ids) - MAX_LISTED} more)" if len(ids) > MAX_LISTED else "")


def _nfc(case_id: str) -> str:
    return unicodedata.normalize("NFC", case_id)


def unicode_twins(table_ids: Iterable[str], image_ids: Iterable[str]) -> list[tuple[str, str]]:
    """(table id, image id) pairs that are different strings but the same after NFC normalisation, e.g. an
    accent typed in a spreadsheet (NFC) and the same name in a file name from macOS (NFD). Only unambiguous
    pairs: an NFC form shared by two image ids matches neither."""
    by_nfc: dict[str, list[str]] = {}
    for c in image_ids:
        by_nfc.setdefault(_nfc(c), []).append(c)
    pairs = []
    for t in table_ids:
        candidates = by_nfc.get(_nfc(t), [])
        if len(candidates) == 1 and candidates[0] != t:
            pairs.append((t, candidates[0]))
    return pairs


def pair_listing(pairs: Sequence[tuple[str, str]], what: str) -> str:
    # ascii() shows the difference (NFC 'caf\xe9' vs NFD 'cafe\u0301'), which repr() would print identically
    shown = ", ".join(f"{ascii(t)} (table) vs {ascii(i)} ({what})" for t, i in pairs[:MAX_LISTED])
    return shown + (f", ... ({len(pairs) - MAX_LISTED} more)" if len(pairs) > MAX_LISTED else "")


def formula_like_cases(reports: Mapping[str, str]) -> list[str]:
    """Case ids whose id or report starts with a character that makes a spreadsheet run the cell as a formula."""
    return [c for c, t in reports.items() if str(c).startswith(FORMULA_PREFIXES) or t.startswith(FORMULA_PREFIXES)]


def _warn_formula_cells(reports: Mapping[str, str], path: Path, stacklevel: int = 3) -> None:
    """Warn once per written table. The cells stay verbatim: the table is data that our tools read back and
    encode, and a prefixed quote would change every such report's embedding (and the cache hashes)."""
    cases = formula_like_cases(reports)
    if cases:
        warnings.warn(
            f"{path}: {len(cases)} report(s) start with =, +, -, @, tab or CR, which a spreadsheet program runs as a "
            f"formula when it opens the file: {_listing(cases)}. They are written verbatim; open the file as "
            f"text (e.g. import it with the report column as 'Text'), not by double-clicking it.",
            SpreadsheetFormulaWarning,
            stacklevel=stacklevel,
        )


# --------------------------------------------------------------------------- ReportTable


@dataclass
class ReportTable:
    """Case id -> report text (insertion-ordered) plus the file it came from."""

    reports: dict[str, str] = field(default_factory=dict)
    source: Path | None = None

    # ---- construction

    @classmethod
    def read(
        cls,
        path: str | os.PathLike,
        id_column: str | None = None,
        text_column: str | None = None,
        sheet: str | None = None,
        prefixes: Sequence[str] = ("mask_",),
        mapping: Mapping[str, str] | None = None,
    ) -> "ReportTable":
        """Read a CSV (``,`` ``;`` or tab) or XLSX report table.

        Columns are detected unless given (id: case_id/Image/filename/file/id; text:
        report/Description/text/caption, any case). Ids are mapped with
        :func:`case_id_from_filename`; report text is kept byte for byte.
        """
        path = Path(path)
        df = _read_frame(path, sheet)
        reports = _frame_to_reports(
            df, path, id_column, text_column,
            lambda n: case_id_from_filename(n, prefixes=prefixes, mapping=mapping),
        )
        return cls(reports=reports, source=path)

    # ---- mapping protocol

    def __getitem__(self, case_id: str) -> str:
        try:
            return self.reports[case_id]
        except KeyError:
            raise MissingReportError(
                f"{self._name}: no report for case {case_id!r}; add a row for it."
            ) from None

    def __len__(self) -> int:
        return len(self.reports)

    def __contains__(self, case_id: object) -> bool:
        return case_id in self.reports

    def __iter__(self) -> Iterator[str]:
        return iter(self.reports)

    @property
    def case_ids(self) -> list[str]:
        """Case ids in table order."""
        return list(self.reports)

    def texts(self, case_ids: Iterable[str]) -> list[str]:
        """Reports for ``case_ids`` in that order; ReportError naming any case without one."""
        case_ids = list(case_ids)
        missing = [c for c in case_ids if c not in self.reports]
        if missing:
            raise ReportError(
                f"{self._name}: {len(missing)} case(s) have no report: {_listing(missing)}. "
                f"Add a row per case to the table."
            )
        return [self.reports[c] for c in case_ids]

    def subset(self, case_ids: Iterable[str]) -> "ReportTable":
        """A new table with only ``case_ids`` (that exist here), in the given order."""
        return ReportTable({c: self.reports[c] for c in case_ids if c in self.reports}, self.source)

    # ---- checks

    def validate_against(
        self,
        case_ids: Iterable[str],
        what: str = "imagesTr",
        allow_missing: bool = False,
        allow_extra: bool = False,
    ) -> None:
        """Check that every case in ``case_ids`` has a report and every report has a case."""
        wanted = list(dict.fromkeys(case_ids))
        wanted_set = set(wanted)
        missing = [] if allow_missing else [c for c in wanted if c not in self.reports]
        extra = [] if allow_extra else [c for c in self.reports if c not in wanted_set]
        if not missing and not extra:
            return
        parts = [f"{self._name} does not match {what} ({len(wanted)} cases, {len(self)} reports)."]
        twins = unicode_twins([c for c in self.reports if c not in wanted_set],
                               [c for c in wanted if c not in self.reports])
        if twins:
            parts.append(
                f"{len(twins)} report id(s) differ from a case id in {what} only in Unicode normalisation (NFC vs "
                f"NFD, e.g. an accent typed in a spreadsheet vs the same name from a macOS file name): "
                f"{pair_listing(twins, what)}. Fix: import the table with nnUNetv2_textseg_attach_reports, which "
                f"matches such ids to the image names, or write the ids exactly as the image file names."
            )
        if missing:
            parts.append(
                f"{len(missing)} case(s) in {what} have no report: {_listing(missing)}. "
                f"Fix: add one row per case to the table (or allow_missing=True)."
            )
        if extra:
            parts.append(
                f"{len(extra)} report id(s) match no image in {what}: {_listing(extra)}. "
                f"Fix: check the id mapping (--prefix, --mapping FILE), or remove these rows "
                f"(or pass --allow-extra to drop them)."
            )
        raise ReportError(" ".join(parts))

    # ---- output

    def to_csv_bytes(self) -> bytes:
        """The canonical file content: UTF-8 (no BOM), ``case_id,report``, minimal quoting."""
        buf = io.StringIO(newline="")
        frame = pd.DataFrame(
            {"case_id": list(self.reports), "report": list(self.reports.values())}, dtype=object
        )
        frame.to_csv(buf, index=False, lineterminator="\n", quoting=csv.QUOTE_MINIMAL)
        return buf.getvalue().encode("utf-8")

    def write(self, path: str | os.PathLike) -> None:
        """Write atomically: a reader sees the old file or the complete new one, never half. Cells that a
        spreadsheet would run as formulas are written verbatim, with one :class:`SpreadsheetFormulaWarning`."""
        path = Path(path)
        data = self.to_csv_bytes()
        _warn_formula_cells(self.reports, path)
        atomic_write_bytes(path, data)

    @property
    def _name(self) -> str:
        return str(self.source) if self.source is not None else "report table (in memory)"


# --------------------------------------------------------------------------- dataset level


def reports_path(dataset_folder: Path, split: str = "Tr") -> Path:
    """Where a dataset's report table lives: ``reportsTr.csv`` / ``reportsTs.csv``."""
    return Path(dataset_folder) / f"reports{split}.csv"


def _dataset_json(dataset_folder: Path) -> dict:
    path = Path(dataset_folder) / "dataset.json"
    if not path.is_file():
        raise ReportError(f"{path}: not found; {dataset_folder} is not an nnU-Net raw dataset folder.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: invalid JSON ({e}).") from None


def dataset_case_ids(dataset_folder: Path, split: str = "Tr") -> list[str]:
    """Sorted unique case ids of ``images{split}`` (files ``{case_id}_XXXX{file_ending}``).

    Implemented here rather than via nnunetv2's get_identifiers_from_splitted_dataset_folder,
    which crops blindly and would turn a misnamed file into a silently wrong id.
    """
    dataset_folder = Path(dataset_folder)
    meta = _dataset_json(dataset_folder)
    ending = meta.get("file_ending")
    if not ending:
        raise ReportError(f"{dataset_folder / 'dataset.json'}: missing 'file_ending' (e.g. \".nii.gz\").")
    # nnU-Net >= 2.4 may list cases explicitly instead of using imagesTr/.
    if split == "Tr" and isinstance(meta.get("dataset"), dict):
        return sorted(str(k) for k in meta["dataset"])
    folder = dataset_folder / f"images{split}"
    if not folder.is_dir():
        raise ReportError(f"{folder}: folder not found.")
    pattern = re.compile(r"(.+)_\d{4}" + re.escape(ending))
    ids: set[str] = set()
    for f in folder.iterdir():
        if not f.is_file() or not f.name.endswith(ending):
            continue
        m = pattern.fullmatch(f.name)
        if not m:
            raise ReportError(
                f"{f}: image name lacks the nnU-Net channel suffix; rename it to "
                f"'{{case_id}}_0000{ending}'."
            )
        ids.add(m.group(1))
    return sorted(ids)


def _read_own_table(path: Path) -> ReportTable:
    """Read a ``reports{split}.csv`` we wrote: ids are taken literally, no name mapping."""
    df = _read_frame(path, None)
    return ReportTable(_frame_to_reports(df, path, "case_id", "report", str.strip), path)


def read_report_table(path: str | Path) -> ReportTable:
    """Any report table: one in our own format (header ``case_id,report``) with ids taken literally, anything
    else (LViT/MedCLIPSeg layouts, XLSX, ...) through the importer's file-name rules."""
    path = Path(path)
    if path.suffix.lower() in (".csv", ".tsv", ".txt") and path.is_file():
        with open(path, encoding="utf-8-sig", errors="replace") as f:
            if f.readline().strip().replace(" ", "") == "case_id,report":
                return _read_own_table(path)
    return ReportTable.read(path)


def load_dataset_reports(dataset_folder: Path, split: str = "Tr", validate: bool = True) -> ReportTable:
    """Load ``reports{split}.csv`` of a raw dataset, optionally checking it against the images."""
    path = reports_path(dataset_folder, split)
    if not path.is_file():
        raise ReportError(
            f"{path}: not found. Attach the reports first: "
            f"nnUNetv2_textseg_attach_reports -d {Path(dataset_folder).name} -i YOUR_TABLE"
            + ("" if split == "Tr" else f" --split {split}")
        )
    table = _read_own_table(path)
    if validate:
        table.validate_against(dataset_case_ids(dataset_folder, split), what=f"images{split}")
    return table


def attach_reports(
    dataset_folder: Path,
    source: Path,
    split: str = "Tr",
    id_column: str | None = None,
    text_column: str | None = None,
    sheet: str | None = None,
    prefixes: Sequence[str] = ("mask_",),
    mapping: Mapping[str, str] | None = None,
    allow_missing: bool = False,
    allow_extra: bool = False,
    overwrite: bool = False,
) -> Path:
    """Import ``source`` as the dataset's ``reports{split}.csv`` and return its path.

    Rows are checked against ``images{split}``; with ``allow_extra`` rows matching no image are
    dropped (real tables such as QaTa's cover more cases than a user's subset). The source is
    only read. An existing, different ``reports{split}.csv`` is replaced only with ``overwrite``.
    """
    dataset_folder, source = Path(dataset_folder), Path(source)
    target = reports_path(dataset_folder, split)
    table = ReportTable.read(source, id_column, text_column, sheet, prefixes, mapping)
    ids = dataset_case_ids(dataset_folder, split)
    table, twins = _match_unicode_forms(table, ids)
    if twins:
        warnings.warn(
            f"{source}: {len(twins)} report id(s) match a case in images{split} only after Unicode NFC "
            f"normalisation: {pair_listing(twins, f'images{split}')}; matched, and {target.name} uses the "
            f"image names' spelling.",
            ReportWarning,
            stacklevel=2,
        )
    if allow_extra:
        known = set(ids)
        extra = [c for c in table.case_ids if c not in known]
        if extra:
            warnings.warn(
                f"{source}: dropping {len(extra)} of {len(table)} rows that match no image in "
                f"images{split} (e.g. {_listing(extra[:3])}).",
                ReportWarning,
                stacklevel=2,
            )
    table.validate_against(ids, what=f"images{split}", allow_missing=allow_missing, allow_extra=allow_extra)
    # Canonical order (the dataset's) so re-attaching the same reports gives identical bytes.
    out = ReportTable(table.subset(ids).reports, target)
    data = out.to_csv_bytes()
    if target.exists():
        if target.read_bytes() == data:
            return target
        if target.resolve() == source.resolve():
            raise ReportError(
                f"{source}: is the dataset's own {target.name}; copy it elsewhere and attach the copy "
                f"so the source is never rewritten."
            )
        if not overwrite:
            raise ReportError(
                f"{target}: exists with different content; pass --overwrite (overwrite=True) to replace it."
            )
    _warn_formula_cells(out.reports, target)
    atomic_write_bytes(target, data)
    return target


def _match_unicode_forms(table: ReportTable, ids: Sequence[str]) -> tuple[ReportTable, list[tuple[str, str]]]:
    """Rename table ids that equal an image case id only after NFC normalisation to that case id (the spelling
    the image files, and so nnU-Net, use). Nothing is renamed onto an id the table already has."""
    known = set(ids)
    twins = dict(unicode_twins([c for c in table.reports if c not in known], ids))
    if not twins:
        return table, []
    reports: dict[str, str] = {}
    done = []
    for case, text in table.reports.items():
        target = twins.get(case)
        if target is not None and target not in table.reports and target not in reports:
            done.append((case, target))
            case = target
        reports[case] = text
    return ReportTable(reports, table.source), done


def load_mapping(path: str | os.PathLike) -> dict[str, str]:
    """Read a user mapping CSV ``filename,case_id`` (header required) into a dict."""
    path = Path(path)
    df = _read_frame(path, None)
    cols = [str(c).strip().lower() for c in df.columns]
    if "filename" in cols and "case_id" in cols:
        name_col, id_col = df.columns[cols.index("filename")], df.columns[cols.index("case_id")]
    elif len(df.columns) == 2:
        name_col, id_col = df.columns
    else:
        raise ReportError(
            f"{path}: a mapping file needs the two columns 'filename,case_id'; found "
            f"{', '.join(repr(str(c)) for c in df.columns)}."
        )
    mapping: dict[str, str] = {}
    for i, (name, case) in enumerate(zip(df[name_col].tolist(), df[id_col].tolist())):
        row = i + 2
        name, case = _cell(name).strip(), _cell(case).strip()
        if not name and not case:
            continue
        if not name or not case:
            raise ReportError(f"{path}, row {row}: empty cell; every row needs a filename and a case_id.")
        if name in mapping and mapping[name] != case:
            raise ReportError(
                f"{path}, row {row}: {name!r} is mapped twice ({mapping[name]!r} and {case!r}); keep one."
            )
        mapping[name] = case
    return mapping
