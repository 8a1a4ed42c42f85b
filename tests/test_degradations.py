"""The degradations (nnunetv2_textseg.degradations): their numbers, their determinism given parameters, and that
the training augmentation and the degraded test sets apply exactly the same ones (fast, CPU)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunetv2_textseg.augmentation import LowDoseNoiseTransform, MotionBlurTransform
from nnunetv2_textseg.degradations import (gaussian_noise, lowdose_image, lowdose_projection, motion_blur,
                                           motion_kernel)
from nnunetv2_textseg.degraded_test_sets import degrade_image

ANGLES = (0.0, 17.0, 37.0, 45.0, 90.0, 115.0, 135.0, 179.0)


def _body(n: int = 48) -> np.ndarray:
    """CT-like slice in HU: air, an elliptic body, a brighter core."""
    y, x = np.mgrid[:n, :n] / (n - 1) * 2 - 1
    return 100.0 * ((x / 0.8) ** 2 + (y / 0.6) ** 2 < 1) + 50.0 * ((x / 0.2) ** 2 + (y / 0.2) ** 2 < 1) - 1000.0


def _random_image(seed: int = 0, shape: tuple[int, int] = (40, 52)) -> np.ndarray:
    return np.random.default_rng(seed).normal(3.0, 2.0, shape).astype(np.float32)


# -------------------------------------------------------------------------------------------------
# low dose
# -------------------------------------------------------------------------------------------------
def test_lowdose_image_noise_std_at_a_given_dose():
    """photons = expected count of the brightest pixel: there the std is range / sqrt(photons); none at the
    minimum; unbiased."""
    img = np.full((64, 128), 10.0)
    img[:, 64:] = 30.0
    out = lowdose_image(img, 25.0, np.random.default_rng(0))
    assert np.array_equal(out[:, :64], img[:, :64])  # zero counts expected: no noise at the minimum
    bright = out[:, 64:]
    assert bright.std() == pytest.approx(20.0 / math.sqrt(25.0), rel=0.05)
    assert bright.mean() == pytest.approx(30.0, abs=0.3)
    # a four times higher dose halves the noise
    assert lowdose_image(img, 100.0, np.random.default_rng(0))[:, 64:].std() == pytest.approx(2.0, rel=0.05)


def test_lowdose_constant_image_unchanged_and_bad_dose_rejected():
    flat = np.full((8, 8), 7.5)
    for fn in (lowdose_image, lowdose_projection):
        assert np.array_equal(fn(flat, 10.0, np.random.default_rng(0)), flat)
        for photons in (0, -5, float("nan")):
            with pytest.raises(ValueError, match="Photon count"):
                fn(flat, photons, np.random.default_rng(0))


def test_lowdose_projection_noise_std_scales_with_dose():
    """Line-integral variance ~ 1 / I0: a quarter of the dose doubles the noise std in the image."""
    img = _body()
    std = {photons: np.mean([np.std(lowdose_projection(img, photons, np.random.default_rng(k)) - img)
                             for k in range(2)]) for photons in (2e4, 5e3)}
    assert std[5e3] / std[2e4] == pytest.approx(2.0, rel=0.1)


def test_lowdose_projection_keeps_intensity_scale_and_shape():
    img = _body()
    out = lowdose_projection(img, 2e4, np.random.default_rng(0))
    assert out.shape == img.shape
    assert abs(out.mean() - img.mean()) < 0.02 * (img.max() - img.min())
    assert lowdose_projection(img[:, :36], 1e4, np.random.default_rng(0)).shape == (48, 36)  # not square


# -------------------------------------------------------------------------------------------------
# motion blur
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [1, 3, 4, 7, 9])
@pytest.mark.parametrize("angle_deg", ANGLES)
def test_motion_kernel_has_k_taps_along_its_dominant_axis(size, angle_deg):
    kernel = motion_kernel(size, angle_deg)
    assert kernel.shape == (size, size)
    assert kernel.sum() == pytest.approx(1.0)
    rows, cols = np.nonzero(kernel)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == size  # "K7" = 7 pixels, at every angle
    if size % 2:
        assert kernel[size // 2, size // 2] > 0  # through the centre


@pytest.mark.parametrize("size", [3, 7, 9])
@pytest.mark.parametrize("angle_deg", ANGLES)
def test_motion_blur_smears_an_impulse_along_the_motion_direction(size, angle_deg):
    impulse = np.zeros((31, 31))
    impulse[15, 15] = 1.0
    out = motion_blur(impulse, size, angle_deg)
    assert out.sum() == pytest.approx(1.0)
    rows, cols = np.nonzero(out > 1e-12)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == size
    # on the line through the impulse, counter-clockwise from the x axis as displayed (rows grow downwards)
    direction = np.array([-math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))])
    offsets = np.stack([rows, cols], 1) - 15.0
    assert np.abs(offsets @ np.array([direction[1], -direction[0]])).max() <= 0.75


def test_motion_blur_direction_and_length_examples():
    impulse = np.zeros((21, 21))
    impulse[10, 10] = 1.0
    horizontal = motion_blur(impulse, 7, 0.0)
    assert np.count_nonzero(horizontal) == 7 and np.allclose(horizontal[10, 7:14], 1 / 7)
    diagonal = motion_blur(impulse, 5, 45.0)  # up and to the right as displayed
    assert np.allclose([diagonal[10 - d, 10 + d] for d in range(-2, 3)], 1 / 5)
    assert diagonal[8, 8] == 0


def test_motion_blur_preserves_mean_and_blurs_more_with_longer_kernels():
    flat = np.full((16, 20), 3.25)
    assert np.allclose(motion_blur(flat, 9, 30.0), flat)  # reflected borders: no dark or bright rim
    img = _random_image().astype(np.float64)
    assert motion_blur(img, 7, 30.0).mean() == pytest.approx(img.mean(), abs=0.01 * img.std())
    roughness = [np.mean(np.abs(np.diff(motion_blur(img, k, 0.0), axis=1))) for k in (1, 3, 7)]
    assert roughness[0] > roughness[1] > roughness[2]
    assert np.allclose(motion_blur(img, 1, 10.0), img)  # K1 is the identity
    with pytest.raises(ValueError, match="positive integer"):
        motion_kernel(2.5, 0.0)


# -------------------------------------------------------------------------------------------------
# Gaussian noise, determinism
# -------------------------------------------------------------------------------------------------
def test_gaussian_noise_std_matches_level():
    img = _random_image().astype(np.float64)
    out = gaussian_noise(img, 0.2, np.random.default_rng(0))
    assert np.std(out - img) == pytest.approx(0.2 * img.std(), rel=0.05)
    with pytest.raises(ValueError, match="≥ 0"):
        gaussian_noise(img, -0.1, np.random.default_rng(0))


@pytest.mark.parametrize("degrade", [
    lambda img, rng: lowdose_image(img, 30.0, rng),
    lambda img, rng: lowdose_projection(img, 5e3, rng),
    lambda img, rng: gaussian_noise(img, 0.3, rng),
])
def test_noise_is_deterministic_given_its_generator(degrade):
    img = _body(32)
    before = img.copy()
    a, b = (degrade(img, np.random.default_rng([4, 2])) for _ in range(2))
    assert np.array_equal(a, b) and a.dtype == np.float64
    assert not np.array_equal(a, degrade(img, np.random.default_rng([4, 3])))
    assert np.array_equal(img, before)  # the input is never modified


def test_motion_blur_is_a_function_of_its_parameters():
    img = _random_image()
    assert np.array_equal(motion_blur(img, 7, 33.0), motion_blur(img.copy(), 7, 33.0))
    assert not np.array_equal(motion_blur(img, 7, 33.0), motion_blur(img, 7, 123.0))


# -------------------------------------------------------------------------------------------------
# one implementation: the augmentation and the test sets give the same output for the same parameters
# -------------------------------------------------------------------------------------------------
def _test_set_version(img: np.ndarray, kind: str, level: float, seed: int, method: str = "projection") -> np.ndarray:
    degraded = degrade_image(sitk.GetImageFromArray(img), kind, level, np.random.default_rng(seed), method)
    return sitk.GetArrayFromImage(degraded)


@pytest.mark.parametrize("seed", [0, 11])
def test_augmentation_and_test_sets_share_the_low_dose_noise(seed):
    img = _random_image(seed)
    augmented = LowDoseNoiseTransform().apply({"image": torch.from_numpy(img.copy())[None]},
                                              apply=[True], photons=40.0, seed=seed)["image"]
    assert augmented.dtype == torch.float32
    assert np.array_equal(augmented[0].numpy(), _test_set_version(img, "lowdose", 40.0, seed, method="image"))


@pytest.mark.parametrize("seed", [0, 11])
def test_augmentation_and_test_sets_share_the_motion_blur(seed):
    img = _random_image(seed)
    angle_deg = float(np.random.default_rng(seed).uniform(0.0, 180.0))  # the angle the test set draws per image
    augmented = MotionBlurTransform().apply({"image": torch.from_numpy(img.copy())[None]},
                                            apply=[True], kernel_size=7, angle_deg=angle_deg)["image"]
    assert np.array_equal(augmented[0].numpy(), _test_set_version(img, "motion", 7, seed))
