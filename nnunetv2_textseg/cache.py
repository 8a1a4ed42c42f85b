"""Per-dataset cache of report embeddings, one file per encoder and split.

Stored as a plain ``.npz`` (loaded with ``allow_pickle=False``) under
``nnUNet_preprocessed/DatasetXXX_Name/text_embeddings/``. Each row carries the case id and the
SHA-256 of the report text, so a changed report is re-encoded and a stale row is never used.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from nnunetv2_textseg.atomic import atomic_write
from nnunetv2_textseg.encoders import (EncoderSpec, TextEncoder, TextEncoding, identity_diff, load_encoder,
                                       spec_diff, spec_to_dict)
from nnunetv2_textseg.errors import TextSegError

# 2: the encoder identity hashes the weights, tokenizer and config (format 1 hashed a config holding the path)
CACHE_FORMAT = 2
# Formats whose caches are ours but cannot be checked any more: re-encoded, never used.
OUTDATED_FORMATS = (1,)


class CacheError(TextSegError, RuntimeError):
    """A cache cannot be used as asked (foreign encoder, stale text, missing case)."""


class OutdatedCacheError(CacheError):
    """A cache written by an older version: refused wherever it is read; nnUNetv2_textseg_encode replaces it."""


def text_sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_folder(preprocessed_dataset_folder: str | Path) -> Path:
    return Path(preprocessed_dataset_folder) / "text_embeddings"


def cache_path(preprocessed_dataset_folder: str | Path, spec: EncoderSpec, split: str = "Tr") -> Path:
    return cache_folder(preprocessed_dataset_folder) / f"{spec.slug()}__{split}.npz"


@dataclass
class TextEmbeddingCache:
    """Embeddings of one split of one dataset by one encoder; row i belongs to ``case_ids[i]``."""
    case_ids: list[str]
    text_sha: list[str]
    pooled: np.ndarray  # (N, D) float32
    tokens: np.ndarray  # (N, L, D) float16
    mask: np.ndarray  # (N, L) bool
    identity: dict  # encoder identity, see TextEncoder.identity()
    spec: dict  # how to rebuild the encoder
    path: Path | None = None

    def __post_init__(self):
        self._row = {c: i for i, c in enumerate(self.case_ids)}

    @property
    def dim(self) -> int:
        return int(self.pooled.shape[1])

    def __contains__(self, case_id: str) -> bool:
        return case_id in self._row

    def rows(self, case_ids: Sequence[str]) -> np.ndarray:
        missing = [c for c in case_ids if c not in self._row]
        if missing:
            raise CacheError(f"No cached report embedding for case(s) {missing[:10]} in {self.path}. "
                             f"Add their reports to the report table and run nnUNetv2_textseg_encode again.")
        return np.array([self._row[c] for c in case_ids], dtype=np.int64)

    def check_texts(self, reports: dict[str, str]) -> None:
        """Refuse a cache whose text differs from the current report table (stale)."""
        stale = [c for c, t in reports.items() if c in self._row and self.text_sha[self._row[c]] != text_sha(t)]
        missing = [c for c in reports if c not in self._row]
        if stale or missing:
            raise CacheError(f"The text embedding cache {self.path} does not match the current reports: "
                             f"{len(stale)} changed (e.g. {stale[:5]}), {len(missing)} not encoded "
                             f"(e.g. {missing[:5]}). Run nnUNetv2_textseg_encode to update it.")

    def check_identity(self, identity: dict) -> None:
        """Refuse embeddings made by another encoder than the one ``identity`` describes (weights, tokenizer,
        config, pooling, max_length; not where the encoder folder lies)."""
        diff = identity_diff(identity, self.identity)
        if diff:
            diff = {k: (cache, expected) for k, (expected, cache) in diff.items()}
            raise CacheError(f"The text embedding cache {self.path} was built by another encoder than "
                             f"{identity.get('name_or_path')!r} (cache vs expected: {diff}); its embeddings do not "
                             f"match that encoder's. Re-encode: delete {self.path} and run nnUNetv2_textseg_encode "
                             f"with the expected encoder (--encoder ...), or use the encoder that made the cache.")

    # ---- storage -------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write atomically: a crash mid-write leaves the previous file untouched."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda f: np.savez(
            f, format=np.array(CACHE_FORMAT), case_ids=np.array(self.case_ids, dtype=str),
            text_sha=np.array(self.text_sha, dtype=str), pooled=self.pooled.astype(np.float32),
            tokens=self.tokens.astype(np.float16), mask=self.mask.astype(bool),
            identity=np.array(json.dumps(self.identity, sort_keys=True)),
            spec=np.array(json.dumps(self.spec, sort_keys=True))))
        self.path = path
        return path

    @staticmethod
    def read_spec(path: str | Path) -> dict:
        """Only the encoder settings a cache (of any format) was written with: enough to choose the encoder, also
        for a cache of an older format that training will re-encode. Plain arrays, ``allow_pickle=False``."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                spec = json.loads(str(z["spec"]))
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, the message is the same
            raise CacheError(f"{path} is not a readable text embedding cache ({type(e).__name__}: {e}); delete it "
                             f"and run nnUNetv2_textseg_encode (or train again: training re-encodes).") from e
        if not isinstance(spec, dict):
            raise CacheError(f"{path} records no encoder settings; delete it and run nnUNetv2_textseg_encode.")
        return spec

    @classmethod
    def load(cls, path: str | Path) -> "TextEmbeddingCache":
        """Read a cache (plain arrays, ``allow_pickle=False``) and check it is whole: one row of ``pooled``,
        ``tokens``, ``mask`` and ``text_sha`` per case id, consistent shapes, finite values, unique ids.

        The recorded encoder ``spec`` is data, never permission: build an encoder from it with
        :func:`~nnunetv2_textseg.encoders.spec_from_record`, which ignores its ``trust_remote_code``."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["format"]) in OUTDATED_FORMATS:
                    raise OutdatedCacheError(
                        f"The text embedding cache {path} was written by an older version of nnunetv2_textseg "
                        f"(cache format {int(z['format'])}), which recorded its encoder by folder path rather "
                        f"than by weights, so it cannot be checked against an encoder. Re-encode: run "
                        f"nnUNetv2_textseg_encode -d DATASET (it replaces this file).")
                if int(z["format"]) != CACHE_FORMAT:
                    raise CacheError(f"{path} has cache format {int(z['format'])}, expected {CACHE_FORMAT}; "
                                     f"delete it and run nnUNetv2_textseg_encode.")
                cache = cls(case_ids=[str(c) for c in z["case_ids"]], text_sha=[str(s) for s in z["text_sha"]],
                            pooled=z["pooled"], tokens=z["tokens"], mask=z["mask"],
                            identity=json.loads(str(z["identity"])), spec=json.loads(str(z["spec"])), path=path)
        except CacheError:
            raise
        except Exception as e:
            raise CacheError(f"Cannot read the text embedding cache {path} ({type(e).__name__}: {e}). "
                             f"Delete it and run nnUNetv2_textseg_encode again.") from e
        problem = cache._problem()
        if problem:
            raise CacheError(f"The text embedding cache {path} is damaged: {problem}. Delete it and run "
                             f"nnUNetv2_textseg_encode again.")
        return cache

    def _problem(self) -> str | None:
        """What is inconsistent in this cache, or None."""
        n = len(self.case_ids)
        if not isinstance(self.identity, dict) or not isinstance(self.spec, dict):
            return "its encoder record (identity/spec) is not a JSON object"
        if len(set(self.case_ids)) != n:
            return f"{n - len(set(self.case_ids))} duplicate case id(s)"
        if len(self.text_sha) != n:
            return f"{len(self.text_sha)} report hashes for {n} case ids"
        if self.pooled.ndim != 2 or self.pooled.shape[0] != n:
            return f"'pooled' has shape {self.pooled.shape}, expected ({n}, D) for {n} case ids"
        if self.tokens.ndim != 3 or self.tokens.shape[0] != n or self.tokens.shape[2] != self.pooled.shape[1]:
            return (f"'tokens' has shape {self.tokens.shape}, expected ({n}, L, {self.pooled.shape[1]}) "
                    f"for {n} case ids")
        if self.mask.shape != self.tokens.shape[:2]:
            return f"'mask' has shape {self.mask.shape}, expected {self.tokens.shape[:2]} (as 'tokens')"
        if self.mask.dtype != bool:
            return f"'mask' has dtype {self.mask.dtype}, expected bool"
        dim = self.identity.get("dim")
        if dim is not None and dim != self.pooled.shape[1]:
            return f"embeddings have {self.pooled.shape[1]} dimensions, its encoder record says {dim}"
        for name in ("pooled", "tokens"):
            values = getattr(self, name)
            if not np.issubdtype(values.dtype, np.floating):
                return f"'{name}' has dtype {values.dtype}, expected floating point"
            step = max(1, (1 << 24) // max(1, values[:1].size))  # in chunks: no full-size temporary for big caches
            bad = sum(int(np.count_nonzero(~np.isfinite(values[i:i + step]))) for i in range(0, n, step))
            if bad:
                return f"'{name}' holds {bad} non-finite value(s) (NaN/inf)"
        return None

    def select(self, case_ids: Sequence[str]) -> TextEncoding:
        r = self.rows(case_ids)
        return TextEncoding(self.pooled[r], self.tokens[r], self.mask[r])


def _pad_tokens(a: np.ndarray, m: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
    if a.shape[1] >= length:
        return a, m
    pad = length - a.shape[1]
    return (np.pad(a, ((0, 0), (0, pad), (0, 0))), np.pad(m, ((0, 0), (0, pad))))


def build_or_update_cache(reports: dict[str, str], path: str | Path, encoder: TextEncoder | None = None,
                          spec: EncoderSpec | None = None, batch_size: int = 64,
                          progress: bool = True) -> tuple[TextEmbeddingCache, int]:
    """Encode the reports that the cache at ``path`` lacks or holds stale; return (cache, n_encoded).

    An existing cache from another encoder raises :class:`CacheError` instead of being mixed in.
    The encoder is only loaded when something needs encoding.
    """
    path = Path(path)
    spec = encoder.spec if encoder is not None else (spec or EncoderSpec())
    try:
        old = TextEmbeddingCache.load(path) if path.exists() else None
    except OutdatedCacheError:
        # our own derived file whose encoder can no longer be verified: encode everything again, replace it
        warnings.warn(f"{path} was written by an older version of nnunetv2_textseg; re-encoding all reports "
                      f"into it.", stacklevel=2)
        old = None
    if old is not None:
        diff = spec_diff(old.spec, spec)  # name, pooling, max_length, revision, precision
        if diff:
            raise CacheError(f"{path} holds embeddings of another encoder configuration (cache vs asked: {diff}); "
                             f"delete it or encode into another file.")
    ids = list(reports)
    shas = [text_sha(reports[c]) for c in ids]
    reuse = {}
    if old is not None:
        reuse = {c: old._row[c] for c, s in zip(ids, shas) if c in old._row and old.text_sha[old._row[c]] == s}
    todo = [c for c in ids if c not in reuse]
    if old is not None and encoder is not None:
        # Also when nothing needs encoding: a loaded encoder that differs from the cache's (same
        # name, other weights/config) must not be handed a cache it did not make.
        old.check_identity(encoder.identity())
    if not todo and old is not None and len(old.case_ids) == len(ids):
        return old, 0
    if todo and encoder is None:
        encoder = TextEncoder(spec)
        if old is not None:
            old.check_identity(encoder.identity())
    identity = encoder.identity() if encoder is not None else old.identity
    dim = identity["dim"]
    new = encoder.encode([reports[c] for c in todo], batch_size, progress) if todo else \
        TextEncoding(np.zeros((0, dim), np.float32), np.zeros((0, 1, dim), np.float16), np.zeros((0, 1), bool))
    length = max(new.tokens.shape[1], old.tokens.shape[1] if old is not None and reuse else 1)
    new_tok, new_mask = _pad_tokens(new.tokens, new.mask, length)
    pooled = np.zeros((len(ids), dim), np.float32)
    tokens = np.zeros((len(ids), length, dim), np.float16)
    mask = np.zeros((len(ids), length), bool)
    new_row = {c: i for i, c in enumerate(todo)}
    for i, c in enumerate(ids):
        if c in reuse:
            r = reuse[c]
            pooled[i] = old.pooled[r]
            t = old.tokens[r]
            tokens[i, :t.shape[0]] = t
            mask[i, :t.shape[0]] = old.mask[r]
        else:
            r = new_row[c]
            pooled[i], tokens[i], mask[i] = new.pooled[r], new_tok[r], new_mask[r]
    # Trim token padding nobody uses any more (e.g. after the longest report was shortened).
    used = max(int(mask.any(0).nonzero()[0].max()) + 1 if mask.any() else 1, 1)
    cache = TextEmbeddingCache(ids, shas, pooled, tokens[:, :used], mask[:, :used], identity, spec_to_dict(spec))
    cache.save(path)
    return cache, len(todo)


def load_checked_cache(path: str | Path, reports: dict[str, str], identity: dict | None = None,
                       spec: EncoderSpec | None = None) -> TextEmbeddingCache:
    """Load a cache and verify it covers the current texts (and, if given, the expected encoder identity
    and the encoder configuration it was asked for)."""
    path = Path(path)
    if not path.exists():
        raise CacheError(f"No text embedding cache at {path}. Run nnUNetv2_textseg_encode -d DATASET first.")
    cache = TextEmbeddingCache.load(path)
    if identity is not None:
        cache.check_identity(identity)
    if spec is not None:
        diff = spec_diff(cache.spec, spec)
        if diff:
            raise CacheError(f"{path} was built by another encoder configuration (cache vs asked: {diff}).")
    cache.check_texts(reports)
    return cache


def encode_dataset(dataset: str | int, spec: EncoderSpec | None = None, splits: Iterable[str] = ("Tr", "Ts"),
                   batch_size: int = 64, progress: bool = True, encoder: TextEncoder | None = None
                   ) -> dict[str, tuple[Path, int]]:
    """Encode the reports of every split a dataset has (what ``nnUNetv2_textseg_encode`` runs).

    Returns {split: (cache path, number of reports encoded now)}.
    """
    from nnunetv2_textseg.paths import preprocessed_dataset_folder, raw_dataset_folder
    from nnunetv2_textseg.reports import load_dataset_reports, reports_path

    raw = raw_dataset_folder(dataset)
    pre = preprocessed_dataset_folder(dataset, create=True)
    spec = encoder.spec if encoder is not None else (spec or EncoderSpec())
    out = {}
    for split in splits:
        if split != "Tr" and not reports_path(raw, split).exists():
            continue
        table = load_dataset_reports(raw, split)
        path = cache_path(pre, spec, split)
        if encoder is None:
            up_to_date, needs_encoder = _cache_state(path, table.reports, spec)
            if up_to_date:  # the cache holds exactly these reports: read once, nothing to write, no encoder
                out[split] = (path, 0)
                continue
            # Load the encoder once, and only if some split has new or changed reports.
            if needs_encoder:
                encoder = TextEncoder(spec)
        cache, n = build_or_update_cache(table.reports, path, encoder, spec, batch_size, progress)
        out[split] = (cache.path, n)
    return out


def _cache_state(path: Path, reports: dict[str, str], spec: EncoderSpec) -> tuple[bool, bool]:
    """(up to date, needs the encoder) for the cache at ``path``, read once (no torch, no model).

    Up to date: it holds exactly ``reports`` (same case ids, same texts) and was built with ``spec``'s encoder
    configuration. Needs the encoder: some report is new or changed and the cache may take it (a cache of another
    configuration is refused by :func:`build_or_update_cache` before any encoder is loaded)."""
    if not path.exists():
        return False, True
    try:
        cache = TextEmbeddingCache.load(path)
    except CacheError:  # of an older format (re-encoded) or unreadable (build_or_update_cache says so)
        return False, True
    changed = any(c not in cache or cache.text_sha[cache._row[c]] != text_sha(t) for c, t in reports.items())
    same_spec = not spec_diff(cache.spec, spec)
    return (same_spec and not changed and len(cache.case_ids) == len(reports)), (same_spec and changed)
