"""Calibration and uncertainty-quality metrics on synthetic maps with known answers."""
import numpy as np
import pytest

from nnunetv2_textseg.calibration import error_retrieval_auc, expected_calibration_error


def test_ece_zero_for_calibrated_probabilities():
    rng = np.random.default_rng(0)
    prob = np.repeat(np.linspace(0.05, 0.95, 10), 10000)
    label = rng.random(prob.size) < prob  # foreground with exactly the predicted frequency
    assert expected_calibration_error(prob, label, n_bins=10) < 0.01


def test_ece_of_overconfident_prediction_is_known():
    # always says 0.9 foreground, truth is foreground half the time -> ECE = |0.9 - 0.5| = 0.4
    prob = np.full(1000, 0.9)
    label = np.arange(1000) % 2 == 0
    assert expected_calibration_error(prob, label) == pytest.approx(0.4)


def test_ece_hand_computed_two_bins():
    prob = np.array([0.1, 0.1, 0.8, 0.8])
    label = np.array([0, 0, 1, 0], bool)
    # bin(0.1): conf 0.1, acc 0 -> 2/4*0.1 ; bin(0.8): conf 0.8, acc 0.5 -> 2/4*0.3
    assert expected_calibration_error(prob, label, n_bins=10) == pytest.approx(0.05 + 0.15)


def test_error_retrieval_auc_perfect_random_and_constant():
    rng = np.random.default_rng(0)
    err = rng.random(100000) < 0.1
    perfect = error_retrieval_auc(err.astype(float), err)
    assert perfect == pytest.approx(1 - 0.1 / 2, abs=2e-3)  # best possible: 1 - e/2
    assert error_retrieval_auc(rng.random(err.size), err) == pytest.approx(0.5, abs=0.01)
    assert error_retrieval_auc(np.ones(err.size), err) == pytest.approx(0.5)  # uninformative
    assert error_retrieval_auc(-err.astype(float), err) < 0.1  # errors last


def test_error_retrieval_auc_tiny_example():
    # 4 pixels, one error, ranked second: curve (0,0) (.25,0) (.5,1) (1,1) -> area 0.125 + 0.5 = 0.625
    unc = np.array([0.9, 0.8, 0.2, 0.1])
    err = np.array([False, True, False, False])
    assert error_retrieval_auc(unc, err) == pytest.approx(0.625)
