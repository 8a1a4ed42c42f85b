"""The unfamiliar-report guard: the threshold rule, the reference file, and the real encoder on demo reports."""
from __future__ import annotations

import numpy as np
import pytest

from nnunetv2_textseg.report_familiarity import (MAX_THRESHOLD, REFERENCE_FILE, ReportReference, ReportReferenceError,
                                                 familiarity, nearest_cosine)

IDENTITY = {"dim": 4, "weights_sha": "abc"}


def test_near_duplicate_training_reports_keep_the_fixed_threshold_and_count_once():
    base = np.array([1.0, 0.0, 0.0, 0.0])
    pooled = np.stack([base, base * 3, base + [0, 0.05, 0, 0], base + [0, 0, 0.05, 0]])
    ref = ReportReference.from_training_reports(pooled, IDENTITY)
    assert len(ref.vectors) == 3  # base and 3 * base are the same report direction
    assert ref.threshold == MAX_THRESHOLD  # their neighbours are ~0.999 apart: the cap decides
    np.testing.assert_allclose(np.linalg.norm(ref.vectors, axis=1), 1, atol=1e-6)


def test_diverse_training_reports_lower_the_threshold_to_their_own_spread():
    # orthogonal reports: each one's nearest other report has cosine 0, so a new report at cosine 0.5 is familiar
    ref = ReportReference.from_training_reports(np.eye(4) * 2, IDENTITY)
    assert ref.threshold == pytest.approx(0.0, abs=1e-6)
    m = familiarity([ref], {"half": np.array([1, 1, 0, 0.0]), "opposite": -np.ones(4)})
    assert m["half"] == pytest.approx(np.sqrt(0.5), abs=1e-5) and m["opposite"] == pytest.approx(-0.5, abs=1e-5)


def test_familiar_to_any_fold_is_familiar():
    fold_a = ReportReference.from_training_reports(np.array([[1.0, 0, 0, 0], [0.99, 0.1, 0, 0]]), IDENTITY)
    fold_b = ReportReference.from_training_reports(np.array([[0, 0, 1.0, 0], [0, 0, 0.99, 0.1]]), IDENTITY)
    m = familiarity([fold_a, fold_b], {"a": np.array([1.0, 0, 0, 0]), "b": np.array([0, 0, 1.0, 0]),
                                       "neither": np.array([0, 1.0, 0, 0])})
    assert m["a"] == pytest.approx(1 - fold_a.threshold, abs=1e-5) and m["b"] > 0 and m["neither"] < 0
    assert familiarity([], {"a": np.ones(4)}) == {}
    # what is reported is the cosine itself, the best over the folds (not a margin plus some threshold)
    c = nearest_cosine([fold_a, fold_b], {"mixed": np.array([0.6, 0, 0.8, 0])})
    assert c["mixed"] == pytest.approx(0.8, abs=1e-5)


def test_reference_round_trip_and_damaged_files_name_the_file(tmp_path):
    ref = ReportReference.from_training_reports(np.random.default_rng(0).normal(size=(6, 4)), IDENTITY)
    path = ref.save(tmp_path / REFERENCE_FILE)
    back = ReportReference.load(path)
    np.testing.assert_array_equal(back.vectors, ref.vectors)
    assert back.threshold == pytest.approx(ref.threshold) and back.encoder_identity == IDENTITY

    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, format=np.array(1), vectors=np.array([{"x": 1}], dtype=object), threshold=np.array(0.5),
             encoder_identity=np.array("{}"))
    not_unit = tmp_path / "not_unit.npz"
    np.savez(not_unit, format=np.array(1), vectors=np.ones((2, 4), np.float32), threshold=np.array(0.5),
             encoder_identity=np.array("{}"))
    for bad, message in ((pickled, "not a readable report reference"), (not_unit, "not finite unit-length rows"),
                         (tmp_path / "absent.npz", "not a readable report reference")):
        with pytest.raises(ReportReferenceError, match=message) as e:
            ReportReference.load(bad)
        assert str(bad) in str(e.value)
    with pytest.raises(ReportReferenceError, match="shape"):
        ReportReference.from_training_reports(np.zeros((0, 4)), IDENTITY)


def test_default_encoder_tells_unseen_wording_from_new_combinations_of_seen_wording(tmp_path):
    """With the bundled MiniLM and 25 demo training reports (5 % of the benchmark's 500): the demo's test reports
    (new combinations of the same wording) are familiar, place-free reports worded otherwise are not."""
    from nnunetv2_textseg.demo_data import generate_demo_dataset
    from nnunetv2_textseg.encoders import EncoderSpec, TextEncoder
    from nnunetv2_textseg.reports import read_report_table

    folder = generate_demo_dataset(tmp_path, 991, n_train=25, n_test=40, image_size=16, seed=3)
    train = list(read_report_table(folder / "reportsTr.csv").reports.values())
    test = list(read_report_table(folder / "reportsTs.csv").reports.values())
    unseen = ["Findings consistent with pneumonia.", "Lung opacities are present.", "Heart size normal, lungs clear."]
    enc = TextEncoder(EncoderSpec(), device="cpu")
    ref = ReportReference.from_training_reports(enc.encode(train).pooled, enc.identity())
    m = familiarity([ref], dict(enumerate(enc.encode(test + unseen).pooled)))
    margins = np.array([m[i] for i in range(len(test) + len(unseen))])
    assert (margins[:len(test)] >= 0.02).all(), margins[:len(test)]  # with room: not a coin flip of the CPU
    assert (margins[len(test):] <= -0.02).all(), margins[len(test):]
