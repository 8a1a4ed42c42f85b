"""A trained BiCLIP puts "upper left" in the patient's upper left, whichever crop, rotation or mirror a sample
had (issue: spatial words in the patient's frame).

The images are pure noise and the lesion lies in the quadrant the report names, so the report and the
patient-frame position are the only way to the lesion. Training samples are 32² crops of 64² images through
nnU-Net's real spatial augmentation (±180° rotation, scaling, mirroring on both axes) with the position
channels protected as the text trainers do; prediction tiles the whole image as the sliding window does, also
mirrored and rotated. If the position channels did not follow the augmentation, "upper left" would point at a
random corner of each crop and no quadrant could be learnt.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from torch import nn

from nnunetv2_textseg.losses import blur_mask, lesion_generation_loss
from nnunetv2_textseg.architectures.biclip import BiCLIPNetwork
from nnunetv2_textseg.patient_frame import POSITION_CHANNELS, protect_position_channels, with_position_channels

pytestmark = pytest.mark.integration  # trains a small network (~30 s on 2 CPU cores)

SIZE, PATCH, TEXT_IN, LENGTH = 64, 32, 32, 6
QUADRANTS = ("upper left", "upper right", "lower left", "lower right")


def quadrant_slices(name: str, size: int = SIZE) -> tuple[slice, slice]:
    h = size // 2
    rows = slice(0, h) if name.startswith("upper") else slice(h, size)
    cols = slice(0, h) if name.endswith("left") else slice(h, size)
    return rows, cols


def make_case(rng: np.random.Generator, quadrant: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise image (1, S, S) and a disc lesion (1, S, S) inside the named quadrant (image rows/columns)."""
    rows, cols = quadrant_slices(quadrant)
    cy = rng.uniform(rows.start + 9, rows.stop - 9)
    cx = rng.uniform(cols.start + 9, cols.stop - 9)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    lesion = ((yy - cy) ** 2 + (xx - cx) ** 2 <= 7 ** 2).astype(np.int16)
    return torch.from_numpy(rng.standard_normal((1, SIZE, SIZE)).astype(np.float32)), torch.from_numpy(lesion[None])


def make_net() -> BiCLIPNetwork:
    unet = PlainConvUNet(1 + 1 + POSITION_CHANNELS, 3, [8, 16, 32], nn.Conv2d, 3, [1, 2, 2], 2, 2, 1, conv_bias=True,
                         norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU,
                         nonlin_kwargs={"inplace": True}, deep_supervision=False)
    unet.apply(unet.initialize)
    return BiCLIPNetwork(unet, 1, TEXT_IN, text_dim=64, image_dim=32, iac=False)


def spatial_pipeline():
    """nnU-Net's own 2D training pipeline (crop to the patch, rotation ±180°, scaling, mirroring), without its
    intensity transforms (noise images), with the position channels protected like the text trainers do."""
    pipeline = nnUNetTrainer.get_training_transforms(
        patch_size=(PATCH, PATCH), rotation_for_DA=(-np.pi, np.pi), deep_supervision_scales=None,
        mirror_axes=(0, 1), do_dummy_2d_data_aug=False)
    pipeline.transforms = [t for t in pipeline.transforms if type(t).__name__ != "RandomTransform"]
    for t in pipeline.transforms:
        if hasattr(t, "p_rotation"):
            t.p_rotation, t.p_scaling = 1.0, 0.5
    return protect_position_channels(pipeline)


def loader_crop(rng: np.random.Generator, data: torch.Tensor, seg: torch.Tensor, size: int = 46):
    """What nnU-Net's data loader does before the pipeline: a random crop of the initial (rotation-safe) patch
    size, anywhere in the image."""
    r, c = rng.integers(0, SIZE - size + 1, size=2)
    return data[:, r:r + size, c:c + size].clone(), seg[:, r:r + size, c:c + size].clone()


def tile_predict(net: BiCLIPNetwork, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Foreground probability (S, S) of x (1, 1 + 3, S, S), predicted tile by tile (PATCH², no overlap) as the
    sliding window does: each tile carries its own crop of the whole image's position channels."""
    prob = torch.zeros(SIZE, SIZE)
    for r in range(0, SIZE, PATCH):
        for c in range(0, SIZE, PATCH):
            logits = net(x[..., r:r + PATCH, c:c + PATCH], tokens, torch.ones(tokens.shape[:2], dtype=torch.bool))
            prob[r:r + PATCH, c:c + PATCH] = logits.softmax(1)[0, 1]
    return prob


@pytest.fixture()
def one_thread():
    """Small tensors: one thread is fastest and does not fight other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_report_location_lands_in_the_patients_quadrant_under_any_crop_rotation_or_mirror(one_thread):
    torch.manual_seed(0)
    np.random.seed(0)  # batchgeneratorsv2 draws some parameters from numpy's global generator
    rng = np.random.default_rng(0)
    reports = {q: torch.randn(1, LENGTH, TEXT_IN) for q in QUADRANTS}  # one fixed token sequence per report
    cases = [(q, *make_case(rng, q)) for q in QUADRANTS for _ in range(12)]
    pipeline = spatial_pipeline()
    net = make_net()
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    seg_loss = DC_and_CE_loss({"batch_dice": True, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                              dice_class=MemoryEfficientSoftDiceLoss)  # nnU-Net's 2d loss
    # a pool of augmented samples (each case several times, each time another crop, rotation, scale, mirror)
    pool = []
    for i in rng.integers(len(cases), size=480):
        q, img, seg = cases[i]
        sample = pipeline(**dict(zip(("image", "segmentation"), loader_crop(rng, with_position_channels(img), seg))))
        pool.append((q, sample["image"], sample["segmentation"]))
    for step in range(600):
        batch = [pool[i] for i in rng.integers(len(pool), size=8)]
        x = torch.stack([b[1] for b in batch])
        target = torch.stack([b[2] for b in batch])
        tokens = torch.cat([reports[b[0]] for b in batch])
        out = net(x, tokens, torch.ones(tokens.shape[:2], dtype=torch.bool), return_aux=True)
        lesion = (target > 0).float()
        loss = seg_loss(out.seg, target) + lesion_generation_loss(
            out.generated, blur_mask(lesion, PATCH / 16), out.inside > 0.5)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    net.eval()
    image = torch.from_numpy(np.random.default_rng(1).standard_normal((1, 1, SIZE, SIZE)).astype(np.float32))
    x = with_position_channels(image[0])[None]  # the whole image's channels, as our predictor appends them
    views = {"as is": (lambda t: t, lambda p: p),
             "mirrored": (lambda t: t.flip(-1, -2), lambda p: p.flip(-1, -2)),  # nnU-Net's TTA mirroring
             "rotated 90°": (lambda t: t.rot90(1, (-2, -1)), lambda p: p.rot90(-1, (-2, -1)))}
    with torch.no_grad():
        for q in QUADRANTS:
            # the whole-image pseudo-image (read at 1/4 resolution: 16² frame for the 64² image) marks the quadrant
            frame = torch.sigmoid(net.frame_pseudo_image(x[:, :1], net.text_embedding(
                reports[q], torch.ones(1, LENGTH, dtype=torch.bool), 1)))[0, 0]
            frame_means = {o: float(frame[tuple(slice(s.start // 4, s.stop // 4) for s in quadrant_slices(o))].mean())
                           for o in QUADRANTS}
            assert max(frame_means, key=frame_means.get) == q, (q, frame_means)
            assert frame_means[q] > 4 * max(v for k, v in frame_means.items() if k != q), (q, frame_means)
            for view, (forward, back) in views.items():
                prob = back(tile_predict(net, forward(x), reports[q]))
                means = {other: float(prob[quadrant_slices(other)].mean()) for other in QUADRANTS}
                best = max(means, key=means.get)
                assert best == q, f"report {q!r}, {view}: foreground by quadrant {means}"
                assert means[q] > 1.5 * max(v for k, v in means.items() if k != q), (q, view, means)
