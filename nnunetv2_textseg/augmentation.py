"""IAC augmentation: after nnU-Net's shared spatial augmentation, the real image gets a weak and a
strong intensity augmentation; both views travel in one tensor (channels [weak | strong]).

Built from batchgeneratorsv2 transforms; the two degradations batchgeneratorsv2 lacks (low-dose-like
Poisson noise and linear motion blur) are small transforms here: their randomness is sampled in
``get_parameters`` and applied deterministically, as batchgeneratorsv2 does, by the functions of
:mod:`nnunetv2_textseg.degradations` that also make the degraded test sets — one implementation, one convention.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from batchgeneratorsv2.helpers.scalar_type import RandomScalar, sample_scalar
from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform, ImageOnlyTransform
from batchgeneratorsv2.transforms.intensity.brightness import MultiplicativeBrightnessTransform
from batchgeneratorsv2.transforms.intensity.contrast import BGContrast, ContrastTransform
from batchgeneratorsv2.transforms.intensity.gamma import GammaTransform
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform
from batchgeneratorsv2.transforms.spatial.low_resolution import SimulateLowResolutionTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform

from nnunetv2_textseg.degradations import lowdose_image, motion_blur

# nnU-Net's intensity transforms: what the weak view keeps and the shared (spatial) part drops.
INTENSITY_TRANSFORMS = (GaussianNoiseTransform, GaussianBlurTransform, MultiplicativeBrightnessTransform,
                        ContrastTransform, SimulateLowResolutionTransform, GammaTransform)


def is_intensity_transform(t: BasicTransform) -> bool:
    inner = t.transform if isinstance(t, RandomTransform) else t
    return isinstance(inner, INTENSITY_TRANSFORMS)


def _degrade_channels(img: torch.Tensor, apply: list[bool],
                      degrade: Callable[[np.ndarray], np.ndarray]) -> torch.Tensor:
    """Apply a 2D degradation of :mod:`nnunetv2_textseg.degradations` to the channels marked in ``apply``.

    The only torch/numpy conversion of the degradations: they are numpy (SciPy, scikit-image) functions, and
    nnU-Net's data augmentation runs on CPU tensors, where ``.numpy()`` shares memory instead of copying.
    """
    out = img.clone()
    for channel, selected in enumerate(apply):
        if selected:
            out[channel] = torch.from_numpy(degrade(img[channel].detach().cpu().numpy())).to(out)
    return out


class MotionBlurTransform(ImageOnlyTransform):
    """Linear motion blur (:func:`~nnunetv2_textseg.degradations.motion_blur`) of a random odd kernel size
    (``kernel_size`` k: smear length in pixels, as the test sets' "K7") in a random direction, per channel (2D)."""

    def __init__(self, kernel_size: RandomScalar = (3, 9), p_per_channel: float = 1.0):
        super().__init__()
        self.kernel_size = kernel_size
        self.p_per_channel = p_per_channel

    def get_parameters(self, **data_dict) -> dict:
        img = data_dict["image"]
        apply = [bool(torch.rand(1) < self.p_per_channel) for _ in range(img.shape[0])]
        # odd sizes only: the line then has a centre pixel, so blurring does not shift the image
        size = max(3, int(round(sample_scalar(self.kernel_size, img))) // 2 * 2 + 1)
        return {"apply": apply, "kernel_size": size, "angle_deg": float(torch.rand(1)) * 180.0}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        if img.ndim != 3:
            return img  # 2D only: nnU-Net's 3d configurations keep their own pipeline
        return _degrade_channels(img, params["apply"],
                                 lambda channel: motion_blur(channel, params["kernel_size"], params["angle_deg"]))


class LowDoseNoiseTransform(ImageOnlyTransform):
    """Low-dose-like quantum noise (:func:`~nnunetv2_textseg.degradations.lowdose_image`): each channel,
    rescaled to [0, 1], becomes Poisson counts at a sampled photon level (the expected count of its brightest
    pixel; fewer photons = noisier, as in a low-dose acquisition) and is mapped back.

    An image-domain approximation of projection-domain noise; it keeps the signal-dependent variance.
    """

    def __init__(self, photons: RandomScalar = (10, 100), p_per_channel: float = 1.0):
        super().__init__()
        self.photons = photons
        self.p_per_channel = p_per_channel

    def get_parameters(self, **data_dict) -> dict:
        img = data_dict["image"]
        return {"apply": [bool(torch.rand(1) < self.p_per_channel) for _ in range(img.shape[0])],
                "photons": float(sample_scalar(self.photons, img)),
                # the Poisson draw itself is seeded here, so `apply` is deterministic given the parameters
                "seed": int(torch.randint(0, 2 ** 62, (1,)))}

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        rng = np.random.default_rng(params["seed"])  # one stream over the channels, as the test sets use per file
        return _degrade_channels(img, params["apply"], lambda channel: lowdose_image(channel, params["photons"], rng))


def strong_intensity_transforms() -> ComposeTransforms:
    """More and harder than nnU-Net's defaults, including low-dose noise and motion blur."""
    return ComposeTransforms([
        RandomTransform(LowDoseNoiseTransform((10, 100)), apply_probability=0.4),
        RandomTransform(GaussianNoiseTransform(noise_variance=(0, 0.2), p_per_channel=1,
                                               synchronize_channels=True), apply_probability=0.4),
        RandomTransform(MotionBlurTransform((3, 9)), apply_probability=0.3),
        RandomTransform(GaussianBlurTransform(blur_sigma=(0.5, 1.5), synchronize_channels=False,
                                              synchronize_axes=False, p_per_channel=1), apply_probability=0.3),
        RandomTransform(MultiplicativeBrightnessTransform(BGContrast((0.6, 1.4)), synchronize_channels=False,
                                                          p_per_channel=1), apply_probability=0.4),
        RandomTransform(ContrastTransform(BGContrast((0.6, 1.4)), preserve_range=True, synchronize_channels=False,
                                          p_per_channel=1), apply_probability=0.4),
        RandomTransform(SimulateLowResolutionTransform(scale=(0.3, 1), synchronize_channels=False,
                                                       synchronize_axes=True, ignore_axes=None,
                                                       allowed_channels=None, p_per_channel=1),
                        apply_probability=0.4),
        RandomTransform(GammaTransform(BGContrast((0.5, 2.0)), p_invert_image=0, synchronize_channels=False,
                                       p_per_channel=1, p_retain_stats=1), apply_probability=0.4),
    ])


class TwoViewIntensityTransform(ImageOnlyTransform):
    """image (C, ...) -> (2C, ...): [weak view | strong view] of the same spatially augmented patch."""

    def __init__(self, weak: BasicTransform, strong: BasicTransform):
        super().__init__()
        self.weak = weak
        self.strong = strong

    def _apply_to_image(self, img: torch.Tensor, **params) -> torch.Tensor:
        weak = self.weak(image=img.clone())["image"]
        strong = self.strong(image=img.clone())["image"]
        return torch.cat([weak, strong], dim=0)


class _TwoViewMaskImageTransform(MaskImageTransform):
    """nnU-Net's MaskImageTransform (use_mask_for_norm) after the split: its channel indices refer to the
    C real channels, so each masked channel is masked in the weak (c) and the strong (c + C) view."""

    def __init__(self, inner: MaskImageTransform):
        super().__init__(list(inner.apply_to_channels), inner.channel_idx_in_seg, inner.set_outside_to)

    def apply(self, data_dict, **params):
        if len(self.apply_to_channels) == 0:
            return data_dict
        c = data_dict["image"].shape[0] // 2
        mask = data_dict["segmentation"][self.channel_idx_in_seg] < 0
        for a in self.apply_to_channels:
            data_dict["image"][a, mask] = self.set_outside_to
            data_dict["image"][a + c, mask] = self.set_outside_to
        return data_dict


def split_into_two_views(pipeline: ComposeTransforms, strong: BasicTransform | None = None) -> ComposeTransforms:
    """Rewrite nnU-Net's training pipeline: its intensity transforms become the weak view and a strong
    view is added beside it; spatial and label transforms stay shared, in their original order."""
    shared, weak, inserted = [], [], False
    for t in pipeline.transforms:
        if is_intensity_transform(t):
            weak.append(t)
            if not inserted:
                shared.append(None)  # placeholder: the two views split where intensity work began
                inserted = True
        elif inserted and isinstance(t, MaskImageTransform):
            shared.append(_TwoViewMaskImageTransform(t))
        else:
            shared.append(t)
    two_view = TwoViewIntensityTransform(ComposeTransforms(weak), strong or strong_intensity_transforms())
    if not inserted:
        shared.insert(1, None)
    return ComposeTransforms([two_view if t is None else t for t in shared])
