"""Patient-frame position channels: values, the trip through nnU-Net's real augmentation pipeline, reading a
whole-image map at each pixel's position, and the dataset class that adds them (fast, CPU)."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from batchgeneratorsv2.transforms.intensity.gaussian_noise import GaussianNoiseTransform
from batchgeneratorsv2.transforms.utils.compose import ComposeTransforms
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_textseg.patient_frame import (POSITION_CHANNELS, ensure_position_channels, patient_frame_dataset,
                                            position_channels, protect_position_channels, sample_patient_frame,
                                            with_position_channels)


def test_position_channels_values():
    pos = position_channels((1, 4, 8))
    assert pos.shape == (3, 1, 4, 8) and pos.dtype == np.float32
    # pixel centres in grid_sample's align_corners=False convention: -1 + 1/n ... 1 - 1/n
    assert np.allclose(pos[0, 0, :, 0], [-0.75, -0.25, 0.25, 0.75])
    assert np.allclose(pos[1, 0, 0, :], np.linspace(-1 + 1 / 8, 1 - 1 / 8, 8))
    assert (pos[2] == 1).all()
    data = np.zeros((2, 1, 4, 8), np.float32)
    assert with_position_channels(data).shape == (5, 1, 4, 8)
    assert with_position_channels(torch.zeros(2, 1, 4, 8)).shape == (5, 1, 4, 8)


def test_sampling_at_the_own_positions_returns_the_map():
    torch.manual_seed(0)
    frame = torch.randn(1, 1, 32, 48)
    pos = torch.from_numpy(position_channels((32, 48)))[None]
    assert torch.allclose(sample_patient_frame(frame, pos), frame, atol=1e-5)
    padded = torch.nn.functional.pad(pos, (0, 0, 4, 0))  # 4 rows of padding: all-zero position channels
    out = sample_patient_frame(frame, padded)
    assert (out[:, :, :4] == 0).all() and torch.allclose(out[:, :, 4:], frame, atol=1e-5)


def _pipeline(mirror_axes, intensity: bool) -> ComposeTransforms:
    pipeline = nnUNetTrainer.get_training_transforms(
        patch_size=(48, 48), rotation_for_DA=(-np.pi, np.pi), deep_supervision_scales=None, mirror_axes=mirror_axes,
        do_dummy_2d_data_aug=False)
    if not intensity:
        pipeline.transforms = [t for t in pipeline.transforms if type(t).__name__ != "RandomTransform"]
    for t in pipeline.transforms:  # make rotation and scaling happen in every sample
        if hasattr(t, "p_rotation"):
            t.p_rotation, t.p_scaling = 1.0, 1.0
    return protect_position_channels(pipeline)


@pytest.mark.parametrize("seed", range(6))
def test_position_channels_follow_nnunets_spatial_augmentation(seed):
    """After nnU-Net's crop, rotation (±180°), scaling and mirroring, each pixel's position channels point at
    where the pixel came from in the whole image: the whole image read there reproduces the sample."""
    torch.manual_seed(seed)
    h, w = 80, 64
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing="ij")
    image = (torch.sin(3 * yy) + 0.5 * xx + 0.3 * torch.cos(5 * xx * yy))[None]  # smooth, not symmetric
    data = with_position_channels(image)  # (1 + 3, H, W), as our dataset's load_case returns it
    seg = (yy > 0.3)[None].to(torch.int16)
    out = _pipeline((0, 1), intensity=False)(image=data.clone(), segmentation=seg)
    x = out["image"]
    assert x.shape == (1 + POSITION_CHANNELS, 48, 48)
    sample, pos = x[:1], x[1:]
    inside = pos[2] > 0.999
    assert inside.sum() > 100
    reread = sample_patient_frame(image[None], pos[None])[0]
    assert torch.allclose(reread[:, inside], sample[:, inside], atol=0.05)


def test_intensity_transforms_never_touch_the_position_channels():
    data = with_position_channels(torch.randn(2, 32, 32))
    noisy = protect_position_channels(ComposeTransforms([GaussianNoiseTransform(noise_variance=(1.0, 1.0),
                                                                                p_per_channel=1)]))
    out = noisy(image=data.clone(), segmentation=torch.zeros(1, 32, 32, dtype=torch.int16))["image"]
    assert torch.equal(out[2:], data[2:]) and not torch.equal(out[:2], data[:2])
    assert "regression_target" not in noisy(image=data.clone())


def test_missing_position_channels_are_added_with_a_warning():
    x = torch.randn(2, 1, 16, 16)
    with pytest.warns(UserWarning, match="nnUNetv2_textseg_predict"):
        y = ensure_position_channels(x, 4, "Net")
    assert y.shape == (2, 4, 16, 16) and torch.equal(y[:, :1], x)
    assert ensure_position_channels(y, 4, "Net") is y
    with pytest.raises(ValueError, match="expected 4 input channels"):
        ensure_position_channels(torch.randn(2, 2, 16, 16), 4, "Net")
    volume = torch.randn(2, 1, 3, 8, 8)  # a 3D tile: positions of the last two axes, repeated along depth
    with pytest.warns(UserWarning, match="nnUNetv2_textseg_predict"):
        z = ensure_position_channels(volume, 4, "Net")
    assert z.shape == (2, 4, 3, 8, 8) and torch.equal(z[:, :1], volume) and torch.equal(z[:, 1:, 0], z[:, 1:, 2])


def test_dataset_class_appends_channels_and_pickles(tmp_path):
    class Base:  # nnU-Net's dataset interface: load_case -> data, seg, seg_prev, properties
        def load_case(self, identifier):
            return np.ones((1, 1, 6, 10), np.float32), np.zeros((1, 1, 6, 10), np.int16), None, {"id": identifier}

    globals()["Base"] = Base  # picklable by reference, like nnU-Net's classes
    Base.__qualname__ = "Base"
    cls = patient_frame_dataset(Base)
    assert patient_frame_dataset(Base) is cls and patient_frame_dataset(cls) is cls
    data, seg, _, props = cls().load_case("a")
    assert data.shape == (4, 1, 6, 10) and props == {"id": "a"}
    assert np.array_equal(data[1:], position_channels((1, 6, 10)))
    assert pickle.loads(pickle.dumps(cls)) is cls
