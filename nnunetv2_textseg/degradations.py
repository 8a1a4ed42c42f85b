"""Image degradations, one pure function per kind: the single implementation behind both the training
augmentation (:mod:`nnunetv2_textseg.augmentation`) and the degraded test sets
(:mod:`nnunetv2_textseg.degraded_test_sets`).

Randomness is drawn by the caller, as in batchgeneratorsv2 (draw parameters, then apply): the augmentation draws
them in its transforms' ``get_parameters`` from torch's generator (which nnU-Net seeds per worker), the test sets
from one numpy generator per file. Given its parameters — for the noise kinds that includes the
``numpy.random.Generator`` the noise is drawn from — every function is deterministic.

Conventions, the same for both callers:

* **Arrays**: one 2D image ``(rows, columns)`` of any real dtype in, a new float64 array of the same shape out
  (the input is never modified). Callers with channels, volumes or torch tensors loop and convert: the
  augmentation per channel (``tensor.numpy()`` and back), the test sets per slice and colour component.
* **Low dose** (:func:`lowdose_image`, :func:`lowdose_projection`): ``photons`` is the dose; fewer photons, more
  noise, and halving it halves the dose. Each image is first rescaled to ``[0, 1]`` by its own minimum and
  maximum and mapped back afterwards, so the noise does not depend on the intensity units (HU, z-scores, 8 bit).
  A constant image has no contrast to scale and is returned unchanged.
* **Motion blur** (:func:`motion_blur`): ``kernel_size`` ``k`` is the length of the smear in pixels along its
  dominant image axis (the line crosses the ``k × k`` kernel from edge to edge at every angle, as in common
  MotionBlur augmentations: "K7" smears a point over 7 columns, 7 rows, or both at 45°); ``angle_deg`` is the
  motion direction, measured from the column (x) axis towards decreasing row index (counter-clockwise as
  displayed); borders are reflected.
* **Gaussian noise** (:func:`gaussian_noise`): ``rel_std`` is the noise std relative to the image's own std.
"""
from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["lowdose_image", "lowdose_projection", "motion_kernel", "motion_blur", "gaussian_noise"]


def _to_unit_range(image: ArrayLike) -> tuple[np.ndarray, float, float]:
    """Image -> (image rescaled to [0, 1] in float64, its minimum, its maximum); zeros if it is constant."""
    image = np.asarray(image, dtype=np.float64)
    lo, hi = float(image.min()), float(image.max())
    return ((image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)), lo, hi


def _check_photons(photons: float) -> None:
    if not photons > 0:  # also rejects NaN
        raise ValueError(f"Photon count must be positive, got {photons}.")


def lowdose_image(image: ArrayLike, photons: float, rng: np.random.Generator) -> np.ndarray:
    """Low-dose quantum noise in the image domain: Poisson counts of the rescaled image.

    The image rescaled to ``[0, 1]`` (see the module conventions) becomes counts
    ``N ~ Poisson(photons · u)`` and is mapped back as ``N / photons``, so ``photons`` is the expected count of
    the brightest pixel. The result is unbiased and its noise grows with intensity: at rescaled intensity ``u``
    the std is ``sqrt(u / photons) · (max − min)`` — ``(max − min) / sqrt(photons)`` at the maximum, none at
    the minimum. A fast proxy of :func:`lowdose_projection` (no streaks, other noise magnitude per photon); the
    training augmentation uses it at 10–100 photons.
    """
    _check_photons(photons)
    unit, lo, hi = _to_unit_range(image)
    if hi == lo:
        return unit + lo
    return rng.poisson(unit * photons) / photons * (hi - lo) + lo


def lowdose_projection(image: ArrayLike, photons: float, rng: np.random.Generator,
                       max_line_integral: float = 4.0, n_angles: int | None = None) -> np.ndarray:
    """Low-dose CT noise simulated on the scan: ``photons`` incident photons per detector bin and angle (``I0``).

    Intensities are rescaled to attenuation ``[0, μmax]`` (minimum = air), with ``μmax`` chosen so that the most
    attenuating ray has line integral ``max_line_integral`` (transmission e⁻⁴ ≈ 2 % by default, typical of a body
    scan), which makes the noise level independent of image size. The sinogram ``p``
    (``skimage.transform.radon``, ``n_angles`` angles over 180°, default one per pixel of the longer side) is
    turned into counts ``I ~ Poisson(I0 · exp(−p))``, clamped to ≥ 1 (log of zero), and back into line integrals
    ``−log(I / I0)``, whose noise variance is ``≈ 1 / (I0 · exp(−p))``: halving ``I0`` halves the dose and
    multiplies the noise std by √2.

    Only the noise is reconstructed (ramp-filtered ``iradon`` of noisy − clean sinogram, exact because filtered
    back-projection is linear) and added to the image: reconstructing the clean discretised sinogram would blur
    and ring, which would confound dose with reconstruction error. The result is mapped back to the original
    intensity range (not clipped).
    """
    from skimage.transform import iradon, radon  # lazily: skimage's transform module loads slowly

    _check_photons(photons)
    unit, lo, hi = _to_unit_range(image)
    if hi == lo:
        return unit + lo
    rows, cols = unit.shape
    size = max(rows, cols)
    square = np.zeros((size, size))  # radon needs a square image; the padding is air
    top, left = (size - rows) // 2, (size - cols) // 2
    square[top:top + rows, left:left + cols] = unit
    theta = np.linspace(0.0, 180.0, n_angles or size, endpoint=False)

    sinogram_unit = radon(square, theta=theta, circle=False)
    mu_max = max_line_integral / sinogram_unit.max()
    sinogram = sinogram_unit * mu_max
    counts = np.maximum(rng.poisson(photons * np.exp(-sinogram)), 1)
    noise_sinogram = -np.log(counts / photons) - sinogram
    noise = iradon(noise_sinogram, theta=theta, output_size=size, filter_name="ramp", circle=False)
    return (unit + noise[top:top + rows, left:left + cols] / mu_max) * (hi - lo) + lo


def motion_kernel(kernel_size: int, angle_deg: float) -> np.ndarray:
    """Normalised ``k × k`` kernel of linear motion: a line through the centre at ``angle_deg``.

    The line is stretched to the edge of the box, so it has ``k`` taps along its dominant axis at every angle
    (see the module conventions); pixels are chosen by ``skimage.draw.line``. Its taps sum to 1, so blurring
    keeps the mean intensity.
    """
    from skimage.draw import line

    size = int(kernel_size)
    if size < 1 or size != kernel_size:
        raise ValueError(f"Motion kernel size must be a positive integer, got {kernel_size}.")
    half = (size - 1) / 2.0
    # direction in (row, column); rows grow downwards, so counter-clockwise as displayed is -sin for rows
    d_row, d_col = -math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))
    to_edge = half / max(abs(d_row), abs(d_col))
    d_row, d_col = d_row * to_edge, d_col * to_edge
    rows, cols = line(round(half - d_row), round(half - d_col), round(half + d_row), round(half + d_col))
    kernel = np.zeros((size, size))
    kernel[np.clip(rows, 0, size - 1), np.clip(cols, 0, size - 1)] = 1.0
    return kernel / kernel.sum()


def motion_blur(image: ArrayLike, kernel_size: int, angle_deg: float) -> np.ndarray:
    """Linear motion blur: convolution with :func:`motion_kernel` (``kernel_size``, ``angle_deg``), borders
    reflected (``scipy.ndimage.convolve``, mode ``"reflect"``) so that edges are neither darkened nor brightened."""
    from scipy.ndimage import convolve

    return convolve(np.asarray(image, dtype=np.float64), motion_kernel(kernel_size, angle_deg), mode="reflect")


def gaussian_noise(image: ArrayLike, rel_std: float, rng: np.random.Generator) -> np.ndarray:
    """Additive white Gaussian noise whose std is ``rel_std`` × the image's own intensity std."""
    if not rel_std >= 0:
        raise ValueError(f"Relative noise std must be ≥ 0, got {rel_std}.")
    image = np.asarray(image, dtype=np.float64)
    return image + rng.normal(0.0, rel_std * float(image.std()), image.shape)
