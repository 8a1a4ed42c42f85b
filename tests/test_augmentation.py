"""IAC augmentation: nnU-Net's real 2d training pipeline split into a weak and a strong view, and the transforms
of the two extra degradations (motion blur, low-dose noise). The degradations' numbers, and that the test sets
apply the very same ones, are tested in test_degradations.py."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from batchgeneratorsv2.transforms.utils.nnunet_masking import MaskImageTransform
from batchgeneratorsv2.transforms.utils.random import RandomTransform
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_textseg.augmentation import (LowDoseNoiseTransform, MotionBlurTransform, TwoViewIntensityTransform,
                                           is_intensity_transform, split_into_two_views)

torch.set_num_threads(2)

PATCH = (64, 64)
DS_SCALES = [[1, 1], [0.5, 0.5], [0.25, 0.25]]


def nnunet_pipeline(mirror_axes=None, use_mask_for_norm=None) -> ComposeTransforms:
    return nnUNetTrainer.get_training_transforms(patch_size=PATCH, rotation_for_DA=(-0.26, 0.26),
                                                 deep_supervision_scales=DS_SCALES, mirror_axes=mirror_axes,
                                                 do_dummy_2d_data_aug=False, use_mask_for_norm=use_mask_for_norm)


def sample(seed: int):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(1, *PATCH, generator=g)
    seg = torch.zeros(1, *PATCH)
    seg[0, 16:40, 20:50] = 1
    seg[0, 45:60, 5:20] = 2
    return img, seg


def run(pipeline, img, seg, seed):
    torch.manual_seed(seed)
    return pipeline(image=img.clone(), segmentation=seg.clone())


def zero_probabilities(pipeline: ComposeTransforms) -> ComposeTransforms:
    """Copy of a pipeline whose intensity transforms never fire."""
    pipeline = copy.deepcopy(pipeline)
    for t in pipeline.transforms:
        if isinstance(t, RandomTransform) and is_intensity_transform(t):
            t.apply_probability = 0
    return pipeline


def test_pipeline_rewrite_structure():
    base = nnunet_pipeline(mirror_axes=(0, 1))
    split = split_into_two_views(base)
    kinds = [type(t).__name__ for t in split.transforms]
    assert sum(isinstance(t, TwoViewIntensityTransform) for t in split.transforms) == 1
    assert not any(is_intensity_transform(t) for t in split.transforms)
    # spatial first, the two views next, mirroring/label transforms after in their original order
    assert kinds[0] == "SpatialTransform" and kinds[1] == "TwoViewIntensityTransform"
    rest = [type(t).__name__ for t in base.transforms if not is_intensity_transform(t)][1:]
    assert kinds[2:] == rest
    two_view = split.transforms[1]
    assert len(two_view.weak.transforms) == sum(is_intensity_transform(t) for t in base.transforms) == 7  # incl. both gammas


@pytest.mark.parametrize("mirror_axes", [None, (0, 1)])
def test_two_view_shapes(mirror_axes):
    split = split_into_two_views(nnunet_pipeline(mirror_axes))
    img, seg = sample(0)
    out = run(split, img, seg, 0)
    assert out["image"].shape == (2, *PATCH)
    assert isinstance(out["segmentation"], list) and len(out["segmentation"]) == len(DS_SCALES)
    for s, scale in zip(out["segmentation"], DS_SCALES):
        assert s.shape == (1, round(PATCH[0] * scale[0]), round(PATCH[1] * scale[1]))
    assert out["segmentation"][0].min() >= 0  # -1 padding is removed as by nnU-Net


@pytest.mark.parametrize("mirror_axes", [None, (0, 1)])
def test_spatial_part_is_shared(mirror_axes):
    """Without intensity augmentation the two views are the same spatially augmented patch, and that patch is
    aligned with the (shared) segmentation."""
    split = split_into_two_views(zero_probabilities(nnunet_pipeline(mirror_axes)), strong=ComposeTransforms([]))
    moved = 0
    for seed in range(12):
        img, seg = sample(seed)
        # the image carries the label map, so image/segmentation alignment is visible after the spatial transform
        img = seg.clone() * 10 + 0.01 * img
        out = run(split, img, seg, seed)
        weak, strong = out["image"][0], out["image"][1]
        assert torch.equal(weak, strong)
        lab = out["segmentation"][0][0]
        agree = ((weak / 10).round() == lab).float().mean()
        assert agree > 0.9, (seed, float(agree))
        moved += not torch.allclose(weak, img[0])
    assert moved > 0  # the spatial transform / mirroring did something in some samples


def test_marker_pixel_lands_at_same_place():
    """With the real weak and strong augmentations: the unique bright marker lands at the same pixel in both views."""
    split = split_into_two_views(nnunet_pipeline(mirror_axes=(0, 1)))
    hits = 0
    for seed in range(8):
        img = torch.zeros(1, *PATCH)
        img[0, 20:23, 40:43] = 100.0  # 3x3 marker far brighter than anything the augmentation can create
        out = run(split, img, torch.zeros(1, *PATCH), seed)
        w, s = out["image"][0], out["image"][1]
        if w.abs().max() == 0 or s.abs().max() == 0:
            continue
        pw = divmod(int(w.abs().argmax()), PATCH[1])
        ps = divmod(int(s.abs().argmax()), PATCH[1])
        assert abs(pw[0] - ps[0]) <= 2 and abs(pw[1] - ps[1]) <= 2, (seed, pw, ps)
        hits += 1
    assert hits >= 4


def test_strong_view_differs_from_weak():
    split = split_into_two_views(nnunet_pipeline())
    diffs = []
    for seed in range(10):
        img, seg = sample(seed)
        out = run(split, img, seg, seed)
        diffs.append(float((out["image"][0] - out["image"][1]).abs().mean()))
    assert sum(d > 1e-6 for d in diffs) >= 5, diffs
    assert sum(diffs) / len(diffs) > 0.05, diffs


def test_mask_for_norm_masks_both_views():
    """nnU-Net's use_mask_for_norm masking runs after the split: both views must be masked outside the mask."""
    base = nnunet_pipeline(use_mask_for_norm=[True])
    spatial = base.transforms[0]
    spatial.p_rotation = spatial.p_scaling = spatial.p_elastic_deform = 0  # identity crop: mask stays put
    split = split_into_two_views(base)
    assert any(isinstance(t, MaskImageTransform) for t in split.transforms)
    img, seg = torch.randn(1, *PATCH) + 5, torch.zeros(1, *PATCH)
    seg[0, :, :10] = -1  # outside the nonzero mask, as nnU-Net's preprocessing marks it
    for seed in range(4):
        out = run(split, img, seg, seed)
        for view in out["image"]:
            assert (view[:, :10] == 0).all()
            assert (view[:, 10:] != 0).float().mean() > 0.99


# -------------------------------------------------------------------------------------------------
# extra degradations
# -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", [5, 7, 9])
@pytest.mark.parametrize("angle_deg", [0.0, 17.0, 45.0, 115.0])
def test_motion_blur_spreads_impulse_along_a_line(size, angle_deg):
    img = torch.zeros(1, 31, 31)
    img[0, 15, 15] = 1.0
    t = MotionBlurTransform(kernel_size=size)
    params = t.get_parameters(image=img)
    params.update(kernel_size=size, angle_deg=angle_deg)
    out = t._apply_to_image(img, **params)
    assert out.shape == img.shape and out.dtype == img.dtype
    assert math.isclose(float(out.sum()), 1.0, rel_tol=1e-5)  # mass preserved away from the border
    ys, xs = torch.nonzero(out[0] > 0, as_tuple=True)
    # the test sets' convention: k pixels along the dominant axis ("K7" = 7), at every angle
    assert max(int(ys.max() - ys.min()), int(xs.max() - xs.min())) + 1 == size
    # all smeared pixels lie on the line through the impulse, counter-clockwise from the x axis as displayed
    direction = torch.tensor([-math.sin(math.radians(angle_deg)), math.cos(math.radians(angle_deg))])
    rel = torch.stack([ys, xs], 1).float() - 15
    off = (rel - (rel @ direction)[:, None] * direction).norm(dim=1)
    assert off.max() <= 0.75


def test_motion_blur_transform_sampling():
    torch.manual_seed(0)
    img = torch.randn(2, 32, 40)
    t = MotionBlurTransform((3, 9))
    for _ in range(5):
        params = t.get_parameters(image=img)
        assert params["kernel_size"] % 2 == 1 and 3 <= params["kernel_size"] <= 9
        assert 0 <= params["angle_deg"] < 180
        a = t.apply({"image": img.clone()}, **params)["image"]
        b = t.apply({"image": img.clone()}, **params)["image"]
        assert torch.equal(a, b)  # randomness lives in get_parameters
        assert a.shape == img.shape and a.dtype == img.dtype
        assert not torch.equal(a, img)
    assert MotionBlurTransform(5)(image=torch.randn(1, 8, 8, 8))["image"].shape == (1, 8, 8, 8)  # 3D untouched
    params = t.get_parameters(image=img)
    params["apply"] = [False, True]
    out = t.apply({"image": img.clone()}, **params)["image"]
    assert torch.equal(out[0], img[0]) and not torch.equal(out[1], img[1])  # per channel


def test_low_dose_noise():
    torch.manual_seed(0)
    img = torch.linspace(-1, 3, 64 * 64).reshape(1, 64, 64)
    t = LowDoseNoiseTransform()
    devs = {}
    for photons in (5, 50, 500, 5000):
        params = t.get_parameters(image=img)
        params["photons"] = float(photons)
        a = t.apply({"image": img.clone()}, **params)["image"]
        b = t.apply({"image": img.clone()}, **params)["image"]
        assert torch.equal(a, b)  # randomness (the Poisson draw, via its seed) lives in get_parameters
        assert a.shape == img.shape and a.dtype == img.dtype
        devs[photons] = float((a - img).abs().mean())
    assert devs[5] > devs[50] > devs[500] > devs[5000] > 0, devs
    # mean preserved (Poisson is unbiased), noise is signal dependent (brighter = noisier, in absolute terms)
    params = t.get_parameters(image=img)
    params["photons"] = 20.0
    a = t.apply({"image": img.clone()}, **params)["image"]
    assert abs(float(a.mean() - img.mean())) < 0.05
    lo_err = (a - img)[0, :16].std()
    hi_err = (a - img)[0, -16:].std()
    assert hi_err > lo_err
    # different samples of the parameters give different noise
    p2 = t.get_parameters(image=img)
    p2["photons"] = 20.0
    assert not torch.equal(a, t.apply({"image": img.clone()}, **p2)["image"])


def test_low_dose_noise_per_channel_and_constant():
    t = LowDoseNoiseTransform(p_per_channel=1.0)
    img = torch.stack([torch.full((16, 16), 2.0), torch.rand(16, 16)])
    out = t(image=img.clone())["image"]
    assert torch.equal(out[0], img[0])  # a constant channel has nothing to scale: stays as it is
    assert torch.isfinite(out).all()
    params = t.get_parameters(image=img)
    params["apply"] = [False, False]
    assert torch.equal(t.apply({"image": img.clone()}, **params)["image"], img)
