"""Which reports a text model has seen the like of: the guard against wording it was never trained on.

A text model learns what its training reports' words mean for the image. A report worded unlike any of them
("Signs of infection in the lungs." for a model trained on "Unilateral pulmonary infection, one infected area,
upper left lung.") is not read as "no information": measured on BiCLIP at 5 % of the labels, such wordings dimmed
its pseudo-image and cost 0.23-0.31 Dice on one of three seeds, far more than the learned null report costs. So
each trained fold keeps its training reports' pooled embeddings (``report_reference.npz``, plain arrays) and the
predictor gives a report whose nearest training report is less similar than a threshold the null report instead,
saying which cases (``--keep_unfamiliar_reports`` reads them anyway).

The threshold is the lower of a fixed cosine (0.70 for mean-pooled sentence embeddings: paraphrases of one report
lie above it, unrelated sentences of the same field below) and the 5th percentile of the training reports' own
leave-one-out nearest-neighbour similarity, so training sets of diverse free text (where near neighbours are far
apart) are not flagged against themselves.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from nnunetv2_textseg.atomic import atomic_write
from nnunetv2_textseg.errors import TextSegError

REFERENCE_FILE = "report_reference.npz"
REFERENCE_FORMAT = 1
MAX_THRESHOLD = 0.70  # cosine; the threshold never exceeds it
TRAINING_QUANTILE = 0.05  # of the training reports' leave-one-out nearest-neighbour similarity


class ReportReferenceError(TextSegError, RuntimeError):
    """A report reference file cannot be used (damaged, foreign encoder)."""


def _unit_rows(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, dtype=np.float32)
    return v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)


@dataclass
class ReportReference:
    """Unit-length pooled embeddings of one fold's distinct training reports and the familiarity threshold."""
    vectors: np.ndarray  # (N, D) float32, unit rows, one per distinct training report
    threshold: float  # cosine to the nearest training report below which a report is unfamiliar
    encoder_identity: dict  # the encoder that produced the vectors (TextEncoder.identity())

    @classmethod
    def from_training_reports(cls, pooled: np.ndarray, encoder_identity: dict,
                              max_threshold: float = MAX_THRESHOLD,
                              quantile: float = TRAINING_QUANTILE) -> "ReportReference":
        """pooled: (N, D) embeddings of the training reports (repeated texts allowed; they count once)."""
        if pooled.ndim != 2 or len(pooled) == 0:
            raise ReportReferenceError(f"Need a (N, D) array of training report embeddings, got shape {pooled.shape}.")
        vectors = np.unique(_unit_rows(pooled), axis=0)
        threshold = max_threshold
        if len(vectors) > 1:
            sim = vectors @ vectors.T
            np.fill_diagonal(sim, -np.inf)
            threshold = min(max_threshold, float(np.quantile(sim.max(1), quantile)))
        return cls(vectors, threshold, dict(encoder_identity))

    def nearest_similarity(self, pooled: np.ndarray) -> np.ndarray:
        """(M, D) report embeddings -> (M,) cosine to the nearest training report."""
        return (_unit_rows(pooled) @ self.vectors.T).max(1)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        atomic_write(path, lambda f: np.savez(
            f, format=np.array(REFERENCE_FORMAT), vectors=self.vectors.astype(np.float32),
            threshold=np.array(self.threshold, dtype=np.float64),
            encoder_identity=np.array(json.dumps(self.encoder_identity, sort_keys=True))))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ReportReference":
        """Plain arrays (``allow_pickle=False``), checked: format, shapes, finite unit rows, threshold in [-1, 1]."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as z:
                fmt = int(z["format"])
                vectors, threshold = z["vectors"], float(z["threshold"])
                identity = json.loads(str(z["encoder_identity"]))
        except Exception as e:  # noqa: BLE001 - whatever is wrong with the file, the fix is the same
            raise ReportReferenceError(f"{path} is not a readable report reference ({type(e).__name__}: {e}). Delete "
                                       f"it to predict without the unfamiliar-report check, or retrain the fold.") from e
        problem = None
        if fmt != REFERENCE_FORMAT:
            problem = f"format {fmt}, expected {REFERENCE_FORMAT}"
        elif vectors.ndim != 2 or len(vectors) == 0 or not np.issubdtype(vectors.dtype, np.floating):
            problem = f"'vectors' has shape {vectors.shape} and dtype {vectors.dtype}, expected (N, D) floats"
        elif not np.isfinite(vectors).all() or not np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-3):
            problem = "'vectors' are not finite unit-length rows"
        elif not -1 <= threshold <= 1:
            problem = f"threshold {threshold} is not a cosine in [-1, 1]"
        elif not isinstance(identity, dict):
            problem = "its encoder record is not a JSON object"
        if problem:
            raise ReportReferenceError(f"The report reference {path} is damaged: {problem}. Delete it to predict "
                                       f"without the unfamiliar-report check, or retrain the fold.")
        return cls(vectors.astype(np.float32), threshold, identity)


def load_reference_for_model(path: str | Path, encoder_identity: dict) -> ReportReference:
    """The reference at ``path``, checked (:meth:`ReportReference.load`) and made with the model's encoder
    (``encoder_identity``, the model's plans record): another encoder's vectors cannot be compared with the reports
    the model encodes."""
    from nnunetv2_textseg.encoders import identity_diff
    ref = ReportReference.load(path)
    diff = identity_diff(encoder_identity, ref.encoder_identity)
    if diff:
        raise ReportReferenceError(f"{path} was made with another text encoder than the model's ({diff}); delete it "
                                   f"or retrain the fold.")
    return ref


def _similarities(references: Sequence[ReportReference], pooled: Mapping[str, np.ndarray]) -> np.ndarray:
    """(R, M): each reference's (fold's) cosine to its nearest training report, per report."""
    stacked = np.stack([np.asarray(v, dtype=np.float32).reshape(-1) for v in pooled.values()])
    return np.stack([ref.nearest_similarity(stacked) for ref in references])


def nearest_cosine(references: Sequence[ReportReference], pooled: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per key: cosine to the nearest training report of any reference (fold)."""
    if not references or not pooled:
        return {}
    return {k: float(c) for k, c in zip(pooled, _similarities(references, pooled).max(0))}


def familiarity(references: Sequence[ReportReference], pooled: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Per key: its margin above the threshold, best over the references (folds); < 0 means unfamiliar to all."""
    if not references or not pooled:
        return {}
    thresholds = np.array([ref.threshold for ref in references])[:, None]
    return {k: float(m) for k, m in zip(pooled, (_similarities(references, pooled) - thresholds).max(0))}
