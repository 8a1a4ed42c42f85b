"""Report-quality variants of chest-infection reports, for robustness studies of text-guided models.

Modelled on the BUSUC test-set variants (``shared/reports/busuc/Test_text_*.xlsx``), translated to the
vocabulary of QaTa-COV19 / MosMedData+ (LViT) and the demo data, e.g.
"Bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung.":

- ``original``: unchanged.
- ``contradictory``: the location contradicts the image. Left and right are swapped
  (:func:`~nnunetv2_textseg.report_parsing.swap_laterality`) and, where that leaves zones in place
  (bilateral findings), upper and lower too; the swap that overlaps the true zones least wins (ties: the
  simpler one). A finding that no swap moves (middle left + middle right) is replaced by the other zones of
  both lungs, one covering every zone by "no infection" (BUSUC: "..., but breast appears completely
  normal"). A negative report ("No pulmonary infection.") gets a lesion in one random zone. If a word-level
  swap cannot be read back (typos such as "lwoer"), the contradicting finding is written afresh with
  :func:`~nnunetv2_textseg.report_parsing.render_report` in the report's style.
- ``missing_location``: side, zone and laterality words (Bilateral/Unilateral) and the location phrases
  are removed, the finding is kept: "Pulmonary infection, two infected areas." (BUSUC: "... a malignant
  lesion in the breast quadrant").
- ``overdescriptive``: the original text, verbatim and first (so a text encoder that truncates still sees
  it), followed by plausible but segmentation-irrelevant detail ("Patchy ground-glass opacities with
  ill-defined margins. No pleural effusion. Heart size is normal."). Lesion descriptors are only added to
  positive reports; none of the added words names a side, zone or count.
- ``underdescriptive``: only the most generic statement: "Pulmonary infection." / "Abnormal chest
  radiograph." ("No infection." / "Normal study." for negative reports) (BUSUC: "Tumor present.").

:func:`make_variant` is deterministic given the generator; :func:`write_variant_tables` writes one
``reports_<kind>.csv`` (``case_id,report``) per kind, each case drawing from its own generator seeded by
(seed, kind, case id), so a case's variant does not depend on the table's other rows.
"""
from __future__ import annotations

import argparse
import re
import sys
import zlib
from pathlib import Path

import numpy as np

from nnunetv2_textseg.report_parsing import (LEVELS, NUMBER_WORDS, SIDES, Finding, _match_case, _tokens,
                                             parse_report, render_report, swap_laterality)
from nnunetv2_textseg.reports import ReportError, ReportTable, read_report_table

__all__ = ["VARIANT_KINDS", "make_variant", "write_variant_tables", "variant_table_name", "finding_only"]

VARIANT_KINDS: tuple[str, ...] = ("original", "contradictory", "missing_location", "overdescriptive",
                                  "underdescriptive")

# canonical tokens (report_parsing's lexicon) that place a lesion
_LOCATION_TOKENS = frozenset({"left", "right", "both", "upper", "middle", "lower", "all"})
_LATERALITY_TOKENS = frozenset({"bilat", "unilat"})
_COUNT_WORDS = frozenset(NUMBER_WORDS) | {"single", "multiple", "several"}
# words that only lead into a location phrase ("... regions with involvement of [the middle left lung]")
_CONNECTORS = frozenset({"with", "involvement", "involving", "of", "in", "the", "and", "affecting", "at", "on",
                         "within", "located", "mainly", "predominantly", "seen", "noted", "both", "a"})

# level words swapped by the vertical flip (whole words, case kept)
_LEVEL_SWAP = {"upper": "lower", "lower": "upper", "higher": "lower", "superior": "inferior",
               "inferior": "superior", "apical": "basal", "basal": "apical", "apex": "base", "base": "apex",
               "apices": "bases", "bases": "apices", "top": "bottom", "bottom": "top"}
_LEVEL_RE = re.compile(r"\b(" + "|".join(_LEVEL_SWAP) + r")\b", re.IGNORECASE)
_FLIP_LEVEL = {"upper": "lower", "middle": "middle", "lower": "upper"}
_MIRROR_SIDE = {"left": "right", "right": "left"}

_NEGATIVE_CONTRADICTION = ("No pulmonary infection, lungs are clear.", "No evidence of pulmonary infection.")

# segmentation-irrelevant detail: lesion texture (positive reports only) and the rest of a chest film
_LESION_DETAILS = (
    "Patchy ground-glass opacities with ill-defined margins.",
    "Ground-glass opacity with ill-defined margins and reticular pattern.",
    "Mixed ground-glass and consolidative opacities with air bronchograms.",
    "Hazy opacification with indistinct borders, consistent with viral pneumonia.",
    "Interstitial thickening with a crazy-paving appearance.",
)
_NEUTRAL_DETAILS = (
    "No pleural effusion.",
    "No pneumothorax.",
    "Heart size is normal.",
    "Cardiomediastinal silhouette within normal limits.",
    "Sharp costophrenic angles.",
    "Trachea is midline.",
    "Unremarkable bony structures and soft tissues.",
    "Portable AP projection with adequate inspiration.",
    "Smooth diaphragmatic contours.",
    "No rib fracture is seen.",
)
_GENERIC_POSITIVE = ("Pulmonary infection.", "Pulmonary infection.", "Pulmonary infection.",
                     "Abnormal chest radiograph.")
_GENERIC_NEGATIVE = ("No infection.", "Normal study.")


def variant_table_name(kind: str) -> str:
    """File name of a variant's report table: ``reports_<kind>.csv``."""
    _check_kind(kind)
    return f"reports_{kind}.csv"


def _check_kind(kind: str) -> None:
    if kind not in VARIANT_KINDS:
        raise ValueError(f"unknown report variant {kind!r}; use one of {', '.join(VARIANT_KINDS)}")


def _style(text: str) -> str:
    """The report's phrasing for re-rendering: MedCLIPSeg's rephrasing or LViT's template."""
    low = text.lower()
    return "medclipseg" if ("involving" in low or "involvement" in low) else "lvit"


def _word_tokens(word: str) -> set[str]:
    return set(_tokens(word))


def _swap_levels(text: str) -> str:
    return _LEVEL_RE.sub(lambda m: _match_case(m.group(0), _LEVEL_SWAP[m.group(0).lower()]), text)


def _sentence(parts: list[str]) -> str:
    text = ", ".join(p for p in parts if p)
    text = re.sub(r"\s+", " ", text).strip()
    return (text[:1].upper() + text[1:] + ".") if text else ""


# ---------------------------------------------------------------------------------------------------
# the variants
# ---------------------------------------------------------------------------------------------------
def _contradictory(text: str, rng: np.random.Generator) -> str:
    finding = parse_report(text)
    style = _style(text)
    if finding is None:  # no zone to contradict: swap whatever side words there are
        return swap_laterality(text)
    if not finding.zones:  # negative report: state a lesion somewhere
        side, level = str(rng.choice(SIDES)), str(rng.choice(LEVELS))
        return render_report(Finding(frozenset({(side, level)}), 1), rng, style=style, typo_prob=0.0)
    zones = finding.zones
    candidates = (  # (mirror sides, flip levels) in order of preference on ties
        (True, False), (True, True), (False, True))
    best, best_zones, best_overlap = None, None, len(zones) + 1
    for mirror, flip in candidates:
        z = frozenset((_MIRROR_SIDE[s] if mirror else s, _FLIP_LEVEL[lv] if flip else lv) for s, lv in zones)
        overlap = len(z & zones)
        if overlap < best_overlap:
            best, best_zones, best_overlap = (mirror, flip), z, overlap
    if best_zones == zones:  # symmetric under every swap: the rest of both lungs, or nothing at all
        rest = frozenset((s, lv) for s in SIDES for lv in LEVELS) - zones
        if not rest:
            return str(rng.choice(_NEGATIVE_CONTRADICTION))
        return render_report(Finding(rest, finding.count), rng, style=style, typo_prob=0.0)
    mirror, flip = best
    out = swap_laterality(text) if mirror else text
    out = _swap_levels(out) if flip else out
    parsed = parse_report(out)
    if parsed is not None and parsed.zones == best_zones:
        return out
    # a misspelt level/side word kept the swap from taking: write the contradicting finding afresh
    return render_report(Finding(best_zones, finding.count), rng, style=style, typo_prob=0.0)


def _strip_location(clause: str) -> str:
    """A clause without its location phrase and laterality words ('' if nothing else is left)."""
    words = clause.split()
    cut = next((i for i, w in enumerate(words) if _word_tokens(w) & _LOCATION_TOKENS), None)
    if cut is not None:
        words = words[:cut]
        while words and words[-1].lower().strip(":-") in _CONNECTORS:
            words.pop()
    words = [w for w in words if not _word_tokens(w) & _LATERALITY_TOKENS]
    return " ".join(words).strip(" :-")


def _missing_location(text: str, rng: np.random.Generator) -> str:
    clauses = [c.strip() for c in re.split(r"[,;.\n]+", text)]
    out = _sentence([_strip_location(c) for c in clauses if c])
    finding = parse_report(out) if out else None
    if out and (finding is None or not finding.zones):
        return out
    # something location-like survived (should not happen with the known vocabulary): the bare finding
    original = parse_report(text)
    if original is not None and original.is_negative:
        return "No pulmonary infection."
    count = original.count if original is not None else None
    if count:
        return f"Pulmonary infection, {count} infected area{'s' if count != 1 else ''}."
    return "Pulmonary infection."


def finding_only(text: str) -> str:
    """The report's first statement without place and count: "Bilateral pulmonary infection, two infected areas,
    upper left lung." -> "Pulmonary infection." A training rewrite (not a variant kind): a terse report that says
    only *what* is seen, so a model also learns that no place and no count is not "nowhere". Built from the
    report's own words (the ``missing_location`` rewrite, cut at its first clause and its first count word)."""
    stripped = _missing_location(text, np.random.default_rng(0))  # draws nothing
    first = re.split(r"[,;.\n]+", stripped)[0].split()
    cut = next((i for i, w in enumerate(first) if w.lower().strip(":-") in _COUNT_WORDS or w.isdigit()), None)
    if cut is not None and cut > 0:
        first = first[:cut]
        while first and first[-1].lower().strip(":-") in _CONNECTORS | {"involving"}:
            first.pop()
    return _sentence([" ".join(first)]) or stripped


def _overdescriptive(text: str, rng: np.random.Generator) -> str:
    finding = parse_report(text)
    positive = finding is None or not finding.is_negative
    base = text.rstrip()
    if not base.endswith((".", "!", "?")):
        base += "."
    details: list[str] = []
    if positive:
        details.append(str(rng.choice(_LESION_DETAILS)))
    n_neutral = 2 if positive else 3
    picks = rng.choice(len(_NEUTRAL_DETAILS), size=n_neutral, replace=False)
    details += [_NEUTRAL_DETAILS[int(i)] for i in sorted(picks)]
    return base + " " + " ".join(details)


def _underdescriptive(text: str, rng: np.random.Generator) -> str:
    finding = parse_report(text)
    pool = _GENERIC_NEGATIVE if finding is not None and finding.is_negative else _GENERIC_POSITIVE
    out = str(rng.choice(pool))
    if len(out) >= len(text.strip()):  # keep it shorter than an already terse report
        out = min(pool, key=len)
    return out


_MAKERS = {"contradictory": _contradictory, "missing_location": _missing_location,
           "overdescriptive": _overdescriptive, "underdescriptive": _underdescriptive}


def make_variant(text: str, kind: str, rng: np.random.Generator) -> str:
    """The ``kind`` variant (one of :data:`VARIANT_KINDS`) of report ``text``; deterministic given ``rng``."""
    _check_kind(kind)
    if kind == "original":
        return text
    if not isinstance(text, str) or not text.strip():
        raise ValueError("make_variant needs a non-empty report text")
    return _MAKERS[kind](text, rng)


# ---------------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------------
def _case_rng(seed: int, kind: str, case_id: str) -> np.random.Generator:
    return np.random.default_rng([int(seed), VARIANT_KINDS.index(kind), zlib.crc32(case_id.encode("utf-8"))])


def write_variant_tables(reports_csv: Path, out_dir: Path, seed: int = 0) -> dict[str, Path]:
    """Write ``out_dir/reports_<kind>.csv`` (``case_id,report``, atomically) for every kind of
    :data:`VARIANT_KINDS` from the table ``reports_csv``; returns kind -> path. The input is never
    overwritten (ReportError if an output would be the input file)."""
    reports_csv, out_dir = Path(reports_csv), Path(out_dir)
    table = read_report_table(reports_csv)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = reports_csv.resolve()
    paths = {kind: out_dir / variant_table_name(kind) for kind in VARIANT_KINDS}
    clash = [p for p in paths.values() if p.resolve() == source]
    if clash:
        raise ReportError(f"{reports_csv}: writing the variant tables to {out_dir} would overwrite the input; "
                          f"choose another output folder or rename the input.")
    for kind, path in paths.items():
        variant = {case: make_variant(text, kind, _case_rng(seed, kind, case)) for case, text in table.reports.items()}
        ReportTable(variant, path).write(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write report-quality variants (reports_<kind>.csv for "
                                            f"{', '.join(VARIANT_KINDS)}) of a case_id,report table.")
    p.add_argument("reports", type=Path, help="input report table (case_id,report CSV)")
    p.add_argument("out_dir", type=Path, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        paths = write_variant_tables(a.reports, a.out_dir, a.seed)
    except ReportError as err:
        print(f"report_variants: {err}", file=sys.stderr)
        return 1
    for kind, path in paths.items():
        print(f"{kind}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
