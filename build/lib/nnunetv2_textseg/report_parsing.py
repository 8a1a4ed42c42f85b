"""Parse and generate chest-infection reports in the vocabulary of public text-guided datasets.

The reports of QaTa-COV19 / MosMedData+ (LViT annotations) follow one template::

    "Bilateral pulmonary infection, two infected areas, all left lung and middle lower right lung."

MedCLIPSeg rephrases them freely ("... involving two regions with involvement of all left lung and
the middle lower right lung"). The annotations are hand-typed, so they contain typos
("lwoer", "midddle", "lowerright", "leflung"); the parser tolerates one edit per word and words
glued together.

Zones are given as (side, level) with side in {"left", "right"} (the patient's side, as written
in the report) and level in {"upper", "middle", "lower"}.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

SIDES: tuple[str, ...] = ("left", "right")
LEVELS: tuple[str, ...] = ("upper", "middle", "lower")

NUMBER_WORDS: dict[str, int] = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}
_COUNT_WORDS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")

# Canonical token for every word the grammar cares about; everything else is ignored.
_LEXICON: dict[str, str] = {
    "left": "left", "right": "right", "both": "both", "bilateral": "bilat",
    "upper": "upper", "higher": "upper", "superior": "upper", "top": "upper", "apical": "upper",
    "apex": "upper", "apices": "upper",
    "middle": "middle", "mid": "middle", "central": "middle",
    "lower": "lower", "inferior": "lower", "basal": "lower", "bottom": "lower", "base": "lower",
    "bases": "lower",
    "all": "all", "entire": "all", "whole": "all", "complete": "all", "diffuse": "all",
    "lung": "lung", "lungs": "lung", "and": "and",
    "infected": "infected", "infection": "infection", "area": "area", "areas": "area",
    "region": "area", "regions": "area", "lesion": "area", "lesions": "area",
    "zone": "zone", "zones": "zone", "pulmonary": "pulmonary", "unilateral": "unilat",
    **{w: w for w in _COUNT_WORDS},
}
# Words that fuzzy matching may recover (long enough that one edit is not ambiguous).
# Number words are excluded: "there" is one transposition away from "three".
_FUZZY_TARGETS = tuple(
    w for w in _LEXICON if len(w) >= 4 and w not in ("both", "base", "zone") and w not in _COUNT_WORDS
)

_NEGATIVE_RE = re.compile(
    r"\b(no|without|negative for|free of|absence of)\b[^.;]{0,40}"
    r"\b(infection|infected|opacit\w*|lesions?|consolidation|abnormalit\w*|findings?)\b"
    r"|\b(lungs? (are|is) clear|clear lungs?|normal (chest|lungs?|study|radiograph))\b",
    re.IGNORECASE,
)
_SIDE_RE = re.compile(r"\b(left|right)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    """What a report says: infected zones and, if stated, the number of infected areas.

    ``zones`` empty with ``count == 0`` means an explicitly negative report ("no infection").
    """

    zones: frozenset[tuple[str, str]]
    count: int | None = None

    @property
    def sides(self) -> frozenset[str]:
        """Sides (patient's left/right) that carry at least one infected zone."""
        return frozenset(side for side, _ in self.zones)

    @property
    def is_negative(self) -> bool:
        return not self.zones and self.count == 0

    def levels(self, side: str) -> tuple[str, ...]:
        """Levels stated for ``side`` in anatomical order (upper → lower)."""
        return tuple(lv for lv in LEVELS if (side, lv) in self.zones)


# --------------------------------------------------------------------------------------------
# tokenisation
# --------------------------------------------------------------------------------------------
def _damerau1(a: str, b: str) -> bool:
    """True if ``a`` and ``b`` differ by at most one insertion/deletion/substitution/transposition."""
    if a == b:
        return True
    la, lb = len(a), len(b)
    if abs(la - lb) > 1:
        return False
    if la == lb:
        diff = [i for i in range(la) if a[i] != b[i]]
        if len(diff) == 1:
            return True
        return len(diff) == 2 and diff[1] == diff[0] + 1 and a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
    short, long_ = (a, b) if la < lb else (b, a)
    i = 0
    while i < len(short) and short[i] == long_[i]:
        i += 1
    return short[i:] == long_[i + 1:]


@lru_cache(maxsize=4096)
def _canon_word(word: str) -> str | None:
    """Map one word (possibly misspelt) to its canonical token, or None if irrelevant."""
    if word in _LEXICON:
        return _LEXICON[word]
    if len(word) >= 3:
        # Collapse tripled letters first ("midddle", "alll") — a very common typing slip.
        squeezed = re.sub(r"(.)\1+", r"\1\1", word)
        if squeezed in _LEXICON:
            return _LEXICON[squeezed]
        matches = {_LEXICON[t] for t in _FUZZY_TARGETS if _damerau1(word, t)}
        if len(matches) == 1:
            return matches.pop()
    return None


@lru_cache(maxsize=4096)
def _canon_chunk(chunk: str) -> tuple[str, ...]:
    """Canonical tokens of one whitespace-free chunk, splitting glued words ("lowerright")."""
    single = _canon_word(chunk)
    if single is not None:
        return (single,)
    if len(chunk) < 6:
        return ()
    # Try a split into two recognised words; prefer splits where the pieces are exact words.
    best: tuple[str, ...] = ()
    best_score = -1
    for i in range(2, len(chunk) - 1):
        head, tail = chunk[:i], chunk[i:]
        h, t = _canon_word(head), _canon_word(tail)
        if h is None or t is None:
            continue
        score = (head in _LEXICON) + (tail in _LEXICON)
        if score > best_score:
            best, best_score = (h, t), score
    return best


def _tokens(text: str) -> list[str]:
    """Canonical token stream of a report; digits are kept as count tokens."""
    out: list[str] = []
    for chunk in re.split(r"[^a-z0-9]+", text.lower()):
        if not chunk:
            continue
        if chunk.isdigit():
            out.append(chunk)
            continue
        out.extend(_canon_chunk(chunk))
    return out


# --------------------------------------------------------------------------------------------
# parsing
# --------------------------------------------------------------------------------------------
def _parse_count(tokens: list[str]) -> int | None:
    """Number of infected areas: a number word/digit shortly before 'area'/'infected'."""
    for i, tok in enumerate(tokens):
        value = int(tok) if tok.isdigit() else NUMBER_WORDS.get(tok)
        if value is None:
            continue
        # "two one infected area" (a real typo) -> take the first number of the run.
        following = tokens[i + 1:i + 4]
        if any(t in ("area", "infected") for t in following):
            return value
    return None


def _parse_zones(tokens: list[str]) -> set[tuple[str, str]]:
    """Collect (side, level) pairs: level words accumulate until a side word consumes them.

    "middle lower right" -> right middle+lower; "all left" or a bare "left lung" -> all three
    levels; "both lungs" applies the pending levels to both sides.
    """
    zones: set[tuple[str, str]] = set()
    pending: list[str] = []
    for tok in tokens:
        if tok in LEVELS or tok == "all":
            pending.append(tok)
        elif tok in ("left", "right", "both"):
            levels = [lv for lv in pending if lv in LEVELS] or list(LEVELS)
            sides = SIDES if tok == "both" else (tok,)
            zones.update((s, lv) for s in sides for lv in levels)
            pending = []
    return zones


def parse_report(text: str) -> Finding | None:
    """Extract infected zones and the number of infected areas from a report.

    Returns ``Finding(frozenset(), 0)`` for explicitly negative reports ("No pulmonary
    infection."), and None when no lung zone can be found (a count alone cannot place a lesion).
    """
    if not isinstance(text, str) or not text.strip():
        return None
    tokens = _tokens(text)
    zones = _parse_zones(tokens)
    count = _parse_count(tokens)
    if not zones:
        if _NEGATIVE_RE.search(text):
            return Finding(frozenset(), 0)
        return None
    return Finding(frozenset(zones), count)


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
_NEGATIVE_TEMPLATES = (
    "No pulmonary infection.",
    "No pulmonary infection, no infected area.",
    "No evidence of pulmonary infection.",
    "Lungs are clear, no infected area.",
)
_LEVEL_SYNONYMS = {"upper": ("upper", "upper", "upper", "higher"), "middle": ("middle",), "lower": ("lower",)}
_INFECTION_SYNONYMS = ("pulmonary infection", "pulmonary infection", "pulmonary infection", "lung infection")
_AREA_SYNONYMS = (("infected area", "infected areas"),) * 3 + (("infected region", "infected regions"),)


def _count_word(n: int) -> str:
    return _COUNT_WORDS[n - 1] if 1 <= n <= len(_COUNT_WORDS) else str(n)


def _side_phrase(finding: Finding, side: str, rng: np.random.Generator, medclip: bool) -> str:
    levels = finding.levels(side)
    if len(levels) == len(LEVELS) and rng.random() < 0.85:
        words = "all"
    else:
        words = " ".join(str(rng.choice(_LEVEL_SYNONYMS[lv])) for lv in levels)
    article = "the " if medclip and words != "all" else ""
    return f"{article}{words} {side} lung"


def _add_typo(text: str, rng: np.random.Generator) -> str:
    """One hand-typing slip of the kinds seen in the real tables (dropped/doubled/swapped letter,
    missing space). Number words are left alone so the count stays readable."""
    words = text.split(" ")
    candidates = [i for i, w in enumerate(words) if len(w.strip(",.")) >= 4]
    if not candidates:
        return text
    i = int(rng.choice(candidates))
    w = words[i]
    core = w.rstrip(",.")
    tail = w[len(core):]
    kind = int(rng.integers(4))
    j = int(rng.integers(1, len(core) - 1))
    if kind == 0:
        core = core[:j] + core[j + 1:]
    elif kind == 1:
        core = core[:j] + core[j] + core[j:]
    elif kind == 2:
        core = core[:j - 1] + core[j] + core[j - 1] + core[j + 1:]
    elif i + 1 < len(words) and not tail:
        # Glue with the next word ("lowerright").
        words[i:i + 2] = [core + words[i + 1]]
        return " ".join(words)
    words[i] = core + tail
    return " ".join(words)


def render_report(finding: Finding, rng: np.random.Generator, style: str = "lvit",
                  typo_prob: float = 0.05) -> str:
    """Write a report for ``finding`` in the LViT template (``style="lvit"``) or a MedCLIPSeg-like
    rephrasing (``style="medclipseg"``), with occasional synonyms and, with probability
    ``typo_prob``, one typing slip. Left is written before right, as in the real tables."""
    if style not in ("lvit", "medclipseg"):
        raise ValueError(f"unknown report style {style!r}; use 'lvit' or 'medclipseg'")
    if not finding.zones:
        return str(rng.choice(_NEGATIVE_TEMPLATES))
    medclip = style == "medclipseg"
    sides = [s for s in SIDES if s in finding.sides]
    laterality = "Bilateral" if len(sides) == 2 else "Unilateral"
    count = finding.count if finding.count is not None else len(sides)
    infection = str(rng.choice(_INFECTION_SYNONYMS))
    area_sing, area_plur = _AREA_SYNONYMS[int(rng.integers(len(_AREA_SYNONYMS)))]
    location = " and ".join(_side_phrase(finding, s, rng, medclip) for s in sides)
    if medclip:
        regions = "region" if count == 1 else "regions"
        text = (f"{laterality} {infection} involving {_count_word(count)} {regions} "
                f"with involvement of {location}")
    else:
        area = area_sing if count == 1 else area_plur
        text = f"{laterality} {infection}, {_count_word(count)} {area}, {location}."
    if rng.random() < typo_prob:
        text = _add_typo(text, rng)
    return text


# --------------------------------------------------------------------------------------------
# laterality
# --------------------------------------------------------------------------------------------
def _match_case(template: str, word: str) -> str:
    if template.isupper():
        return word.upper()
    if template[:1].isupper():
        return word.capitalize()
    return word


def swap_laterality(text: str) -> str:
    """Swap the words left and right (whole words, case preserved), e.g. for mirrored images."""
    def repl(m: re.Match[str]) -> str:
        word = m.group(0)
        return _match_case(word, "right" if word.lower() == "left" else "left")

    return _SIDE_RE.sub(repl, text)
