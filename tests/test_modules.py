"""BiCLIP modules and BiCLIPNetwork on small nnU-Net-style U-Nets (CPU, fast).

The U-Nets are built exactly as nnU-Net builds its 2d configuration (PlainConvUNet with instance norm,
leaky ReLU, deep supervision, He init), only with few features.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from nnunetv2_textseg.architectures.biclip import BiCLIPNetwork, BiCLIPOutput
from nnunetv2_textseg.building_blocks.biclip import (AnatomyGate, AttentionPoolText, BidirectionalFusion,
                                                     GlobalImageEncoder, ImageToTextHead, MeanPoolText, ProjectionHead,
                                                     PseudoImageGenerator, TextProjection, gated_logits, masked_mean)
from nnunetv2_textseg.losses import (blur_mask, consistency_loss, cycle_loss, generation_loss,
                                     lesion_generation_loss)
from nnunetv2_textseg.patient_frame import POSITION_CHANNELS, with_position_channels

torch.set_num_threads(2)

TEXT_IN = 32
TEXT_DIM = 64  # 8 x 8 seed: small, still a square number as the generator requires
NUM_CLASSES = 3
PATCHES = [(64, 64), (128, 128), (224, 224), (96, 160), (80, 48)]


def make_unet(image_channels: int = 1, num_classes: int = NUM_CLASSES, features=(8, 16, 32, 64),
              deep_supervision: bool = True) -> PlainConvUNet:
    n = len(features)
    unet = PlainConvUNet(image_channels + 1 + POSITION_CHANNELS, n, list(features), nn.Conv2d, 3, [1] + [2] * (n - 1), 2, num_classes,
                         1, conv_bias=True, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    unet.apply(unet.initialize)  # what get_network_from_plans(allow_init=True) does
    return unet


def make_net(image_channels: int = 1, seed: int = 0, text_dim: int = TEXT_DIM, **kwargs) -> BiCLIPNetwork:
    torch.manual_seed(seed)
    return BiCLIPNetwork(make_unet(image_channels), image_channels, TEXT_IN, text_dim, image_dim=32, **kwargs)


def with_pos(image: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) image -> (B, C + 3, H, W) with each sample's whole-image position channels."""
    return torch.stack([with_position_channels(i[:, None])[:, 0] for i in image])


def report(batch: int = 1, length: int = 7, seed: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token embeddings (B, L, TEXT_IN) and a mask with some padding."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    tokens = torch.randn(batch, length, TEXT_IN, generator=g)
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[:, -2:] = False
    return tokens, mask


def seg_like_loss(seg, target_full: torch.Tensor) -> torch.Tensor:
    """Deep-supervision CE over every output (each output must receive gradient, as with nnU-Net's loss)."""
    outs = seg if isinstance(seg, (list, tuple)) else [seg]
    loss = 0
    for w, o in zip([1 / 2 ** i for i in range(len(outs))], outs):
        tgt = F.interpolate(target_full[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + w * F.cross_entropy(o, tgt)
    return loss


def trainer_style_loss(out: BiCLIPOutput, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The terms of nnUNetTrainerBiCLIP.compute_loss (lesion BCE+Dice generation loss, detached cycle target)."""
    lesion = (target[:, None] > 0)
    total = seg_like_loss(out.seg, target) + lesion_generation_loss(out.generated, lesion, out.inside > 0.5)
    if out.t_hat is not None:
        total = total + 0.1 * cycle_loss(out.t.detach(), out.t_hat)
    if out.p_weak is not None:
        total = total + 0.1 * consistency_loss(out.p_weak, out.p_strong)
    return total


# ---------------------------------------------------------------------------------------------
# shapes
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", PATCHES)
def test_generator_and_encoder_shapes(size):
    torch.manual_seed(0)
    gen = PseudoImageGenerator(TEXT_DIM, width=8)
    assert gen(torch.randn(2, TEXT_DIM), size).shape == (2, 1, *size)
    assert gen(torch.randn(2, TEXT_DIM)).shape == (2, 1, 32, 32)  # native whole-image map: 4 x the 8 x 8 seed
    enc = GlobalImageEncoder(2, out_dim=24, width=4)
    assert enc(torch.randn(2, 2, *size)).shape == (2, 24)
    assert ImageToTextHead(TEXT_DIM, width=4)(torch.randn(2, 1, *size)).shape == (2, TEXT_DIM)


def test_generator_default_784():
    gen = PseudoImageGenerator()  # 28 x 28 seed as in EF-UNet
    assert gen(torch.randn(1, 784), (96, 160)).shape == (1, 1, 96, 160)
    assert gen(torch.randn(1, 784)).shape == (1, 1, 112, 112)
    with pytest.raises(ValueError):
        PseudoImageGenerator(100 + 1)


def test_small_modules_shapes():
    assert TextProjection(TEXT_IN, TEXT_DIM, hidden=16)(torch.randn(3, TEXT_IN)).shape == (3, TEXT_DIM)
    tokens, mask = report(3)
    assert AttentionPoolText(TEXT_IN, TEXT_DIM, queries=4, width=8, hidden=16)(tokens, mask).shape == (3, TEXT_DIM)
    assert MeanPoolText(TEXT_IN, TEXT_DIM, hidden=16)(tokens, mask).shape == (3, TEXT_DIM)
    fusion = BidirectionalFusion(TEXT_DIM, 32, hidden=16)
    t = torch.randn(3, TEXT_DIM)
    # zero-initialised last layer: t' = t at the start of training
    assert torch.equal(fusion(t, torch.randn(3, 32)), t)
    assert ProjectionHead(64, 16, 8)(torch.randn(3, 64)).shape == (3, 16)


def test_text_pooling_ignores_padding_and_separates_location_words():
    """Padding tokens change nothing; attention pooling can tell reports apart that differ in one token
    while their mean is almost identical (the mean-pooling failure mode)."""
    torch.manual_seed(0)
    pool = AttentionPoolText(TEXT_IN, TEXT_DIM, queries=4, width=8, hidden=16).eval()
    tokens, mask = report(1, 9, seed=1)
    padded = tokens.clone()
    padded[:, -2:] = 100.0  # garbage where the mask says padding
    assert torch.allclose(pool(tokens, mask), pool(padded, mask), atol=1e-6)
    assert torch.allclose(masked_mean(tokens, mask), masked_mean(padded, mask))
    # two reports sharing 6 of 7 real tokens
    other = tokens.clone()
    other[:, 3] = torch.randn(TEXT_IN)
    assert not torch.allclose(pool(tokens, mask), pool(other, mask), atol=1e-4)


@pytest.mark.parametrize("size", PATCHES)
def test_network_shapes(size):
    net = make_net(image_channels=2)
    x, xs = with_pos(torch.randn(2, 2, *size)), torch.randn(2, 2, *size)
    tokens, mask = report(2)
    seg = net(x, tokens, mask)
    assert isinstance(seg, (list, tuple)) and len(seg) == 3  # n_stages - 1 outputs
    assert seg[0].shape == (2, NUM_CLASSES, *size)
    assert seg[1].shape == (2, NUM_CLASSES, size[0] // 2, size[1] // 2)

    out = net(x, tokens, mask, x_strong=xs, return_aux=True)
    assert isinstance(out, BiCLIPOutput)
    assert out.seg[0].shape == (2, NUM_CLASSES, *size)
    assert out.pseudo.shape == out.pseudo_logits.shape == out.inside.shape == (2, 1, *size)
    assert ((out.pseudo >= 0) & (out.pseudo <= 1)).all()  # a probability map
    assert out.t.shape == (2, TEXT_DIM) and out.t_hat.shape == (2, TEXT_DIM)
    assert out.p_weak.shape == out.p_strong.shape == (2, 128)

    out = net(x, tokens, mask, return_aux=True)  # no strong view: no IAC projections
    assert out.p_weak is None and out.p_strong is None


def test_deep_supervision_toggle():
    """nnU-Net switches deep supervision off through network.decoder.deep_supervision."""
    net = make_net()
    net.decoder.deep_supervision = False
    seg = net(with_pos(torch.randn(1, 1, 64, 64)), *report())
    assert torch.is_tensor(seg) and seg.shape == (1, NUM_CLASSES, 64, 64)


@pytest.mark.integration  # builds and runs every variant, ~8 s CPU
def test_variants():
    x, xs, (tokens, mask) = with_pos(torch.randn(2, 1, 64, 96)), torch.randn(2, 1, 64, 96), report(2)
    uni = make_net(bidirectional=False)
    assert uni.image_encoder is None and uni.fusion is None
    out = uni(x, tokens, mask, x_strong=xs, return_aux=True)
    assert out.pseudo.shape == (2, 1, 64, 96) and out.t_hat is not None

    no_cycle = make_net(cycle=False)
    assert no_cycle.image_to_text is None
    assert no_cycle(x, tokens, mask, x_strong=xs, return_aux=True).t_hat is None

    no_iac = make_net(iac=False)
    assert no_iac.iac_head is None
    out = no_iac(x, tokens, mask, x_strong=xs, return_aux=True)
    assert out.p_weak is None and out.p_strong is None

    paper = make_net(text_pooling="mean", pseudo_activation="linear")
    out = paper(x, tokens, mask, return_aux=True)
    assert out.pseudo_logits is None and isinstance(paper.text_pool, MeanPoolText)
    with pytest.raises(ValueError):
        make_net(text_pooling="max")

    ign = make_net(ignore_text=True).eval()
    with torch.no_grad():
        a = ign(x, tokens, mask, return_aux=True)
        b = ign(x, *report(2, seed=5), return_aux=True)
        c = ign(x, None, return_aux=True)
    assert torch.equal(a.pseudo, b.pseudo) and torch.equal(a.seg[0], b.seg[0])
    assert torch.allclose(a.seg[0], c.seg[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# gradients (DDP with find_unused_parameters=False needs a gradient for every parameter)
# ---------------------------------------------------------------------------------------------
def _grads(net, x, xs, text, target, drop):
    net.zero_grad(set_to_none=True)
    out = net(x, *text, drop=drop, x_strong=xs, return_aux=True)
    trainer_style_loss(out, x, target).backward()
    return {n: p.grad for n, p in net.named_parameters()}


# At initialisation BidirectionalFusion's last layer is zero, so d loss / d (fusion hidden) = 0: the fusion's
# first layer and the whole GlobalImageEncoder (reached only through that layer) get gradients that exist
# but are exactly zero. After the last layer has moved (one optimiser step), they become non-zero.
ZERO_AT_INIT = ("fusion.mlp.0.", "image_encoder.")


@pytest.mark.integration  # full network backward pass, ~4 s CPU each
@pytest.mark.parametrize("drop_mode", ["none", "some", "all"])
def test_every_parameter_gets_a_gradient(drop_mode):
    net = make_net().train()
    torch.manual_seed(1)
    x, xs = with_pos(torch.randn(2, 1, 48, 48)), torch.randn(2, 1, 48, 48)
    target = (torch.rand(2, 48, 48) * NUM_CLASSES).long()
    text = report(2)
    drop = {"none": None, "some": torch.tensor([True, False]), "all": torch.ones(2, dtype=torch.bool)}[drop_mode]
    grads = _grads(net, x, xs, text, target, drop)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    zero = [n for n, g in grads.items() if not g.any()]
    allowed = ZERO_AT_INIT + (("null_text",) if drop_mode == "none" else ())
    if drop_mode == "all":  # no report reaches the pooling at all
        allowed += ("text_pool.",)
    assert all(n.startswith(allowed) for n in zero), f"unexpected all-zero gradients: {zero}"
    assert len([n for n in zero if not n.startswith("text_pool.")]) < 0.25 * len(grads)
    for name in ("fusion.mlp.2.weight", "generator.decoder.0.0.weight", "image_to_text.head.weight",
                 "iac_head.net.0.weight"):
        assert grads[name].abs().sum() > 0, name
    if drop_mode != "all":
        assert grads["text_pool.queries"].abs().sum() > 0 and grads["text_pool.out.3.weight"].abs().sum() > 0
    if drop_mode != "none":
        assert grads["null_text"].abs().sum() > 0

    # one step moves the fusion's last layer off zero; then the image encoder is trained too
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.05 * p.grad
    grads = _grads(net, x, xs, text, target, drop)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["fusion.mlp.0.weight"].abs().sum() > 0
    assert grads["image_encoder.head.weight"].abs().sum() > 0


@pytest.mark.integration  # backward pass of every variant, ~16 s CPU
def test_variants_every_parameter_gets_a_gradient():
    x, xs = with_pos(torch.randn(2, 1, 48, 48)), torch.randn(2, 1, 48, 48)
    target = (torch.rand(2, 48, 48) * NUM_CLASSES).long()
    for kwargs in ({"bidirectional": False}, {"cycle": False}, {"ignore_text": True}, {"anatomy_gate": True}):
        net = make_net(**kwargs)
        grads = _grads(net, x, xs, report(2), target, torch.tensor([False, True]))
        assert all(g is not None for g in grads.values()), kwargs
    # iac=False: the trainer then has no strong view (lambda_iac = 0)
    net = make_net(iac=False)
    grads = _grads(net, x, None, report(2), target, None)
    assert all(g is not None for g in grads.values())


@pytest.mark.integration  # full network backward passes, ~6 s CPU
def test_pseudo_image_channel_gets_a_comparable_gradient():
    """The sigmoid pseudo-image enters at the image's scale ((p - 0.5) / 0.25): at initialisation the first
    convolution's gradient on its channel is several times larger, relative to the image channel's, than with
    the paper's unbounded pseudo-image (whose spatial std is ~0.01 against the z-scored image's 1)."""
    def ratio(**kwargs) -> float:
        net = make_net(**kwargs).train()
        torch.manual_seed(2)
        x = with_pos(torch.randn(4, 1, 64, 64))
        target = (torch.rand(4, 64, 64) > 0.8).long()
        net.zero_grad()
        out = net(x, *report(4, seed=2), return_aux=True)
        seg_like_loss(out.seg, target).backward()
        g = net.unet.encoder.stages[0][0].convs[0].conv.weight.grad.abs().sum(dim=(0, 2, 3))
        return float(g[1] / g[0])

    assert ratio() > 3 * ratio(pseudo_activation="linear")


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def test_cycle_and_consistency_losses():
    torch.manual_seed(0)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    assert cycle_loss(a, a.clone()).item() == 0
    assert cycle_loss(a, b).item() > 0
    assert math.isclose(cycle_loss(a, b).item(), ((a - b) ** 2).mean().item(), rel_tol=1e-6)
    # normalized: the same for any scale and offset of either vector, unlike the raw form
    n = cycle_loss(a, b, normalized=True)
    assert torch.isclose(cycle_loss(10 * a + 3, 0.5 * b - 2, normalized=True), n, rtol=1e-3)  # up to LayerNorm eps
    assert not torch.isclose(cycle_loss(10 * a, b), cycle_loss(a, b))
    assert cycle_loss(a, 5 * a + 1, normalized=True).item() < 1e-6
    assert abs(consistency_loss(a, a.clone()).item()) < 1e-6
    assert consistency_loss(a, b).item() > 0
    # scale invariant (cosine): positive rescaling of either side changes nothing
    assert math.isclose(consistency_loss(3.0 * a, 0.5 * b).item(), consistency_loss(a, b).item(), rel_tol=1e-5)
    assert abs(consistency_loss(a, 7.0 * a).item()) < 1e-6
    assert math.isclose(consistency_loss(a, -a).item(), 2.0, rel_tol=1e-5)


def test_generation_loss_by_hand():
    pseudo = torch.tensor([[[[0.0, 1.0], [2.0, -1.0]]]])
    ref = torch.tensor([[[[0.5, 1.0], [0.0, 0.0]]]])
    # |0-0.5| + |1-1| + |2-0| + |-1-0| = 3.5 over 4 pixels
    assert math.isclose(generation_loss(pseudo, ref).item(), 3.5 / 4)
    assert generation_loss(ref, ref.clone()).item() == 0


def test_lesion_generation_loss_by_hand():
    logits = torch.tensor([[[[0.0, 2.0], [-2.0, 5.0]]]])
    lesion = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.bool)
    weight = torch.tensor([[[[1, 1], [1, 0]]]], dtype=torch.bool)  # the last pixel is ignored / padding
    p = torch.sigmoid(logits)
    bce = -(math.log(1 - p[0, 0, 0, 0]) + math.log(p[0, 0, 0, 1]) + math.log(1 - p[0, 0, 1, 0])) / 3
    inter, psum, lsum = float(p[0, 0, 0, 1]), float(p[0, 0, 0, 0] + p[0, 0, 0, 1] + p[0, 0, 1, 0]), 1.0
    expected = bce + 1 - (2 * inter + 1) / (psum + lsum + 1)
    assert math.isclose(lesion_generation_loss(logits, lesion, weight).item(), expected, rel_tol=1e-5)
    # the optimum is the mask itself; an empty map is far from it (what L1 to image x mask rewarded)
    good = lesion_generation_loss(torch.where(lesion, 20.0, -20.0).float(), lesion, torch.ones_like(lesion))
    empty = lesion_generation_loss(torch.full((1, 1, 2, 2), -20.0), lesion, torch.ones_like(lesion))
    assert good.item() < 0.01 < 0.5 < empty.item()


def test_blur_mask_is_a_zone_scale_soft_target():
    m = torch.zeros(2, 1, 64, 64)
    m[0, :, 20:30, 10:20] = 1
    b = blur_mask(m, 4.0)
    assert b.shape == m.shape and b.max() <= 1 and b[0].max() == 1  # the peak stays at 1
    assert (b[1] == 0).all()  # an empty mask stays empty
    assert (b[0] > 0.05).sum() > 2 * m[0].sum()  # spread around the lesion
    assert b[0, 0, 25, 15] > b[0, 0, 25, 28] > b[0, 0, 25, 40]
    assert torch.equal(blur_mask(m, 0), m)


def test_coarse_frame_cannot_draw_an_outline():
    """frame_resolution: the whole-image map is average-pooled to zone scale, so it is smooth at pixel level."""
    coarse, fine = make_net(frame_resolution=8).eval(), make_net(frame_resolution=None).eval()
    x = with_pos(torch.randn(1, 1, 64, 64))
    with torch.no_grad():
        t = coarse.text_embedding(*report(1), 1)
        assert coarse.pseudo_image(x, t)[2].shape[-1] == 8
        assert fine.pseudo_image(x, t)[2].shape[-1] == 4 * int(TEXT_DIM ** 0.5)


# ---------------------------------------------------------------------------------------------
# text conditioning and the patient frame
# ---------------------------------------------------------------------------------------------
def test_generation_target_is_the_report_alone():
    """generation_source="text": the map the generation loss trains is G(t) — the same for any image, so only
    the report can lower that loss — while the U-Net gets the BMF-refined G(t'); "fused" trains G(t')."""
    net = make_net(generation_source="text")
    with torch.no_grad():  # a trained BMF: its zero-initialised last layer has moved
        net.fusion.mlp[-1].weight.normal_(0, 0.5)
    tokens, mask = report(1, seed=1)
    x1, x2 = with_pos(torch.randn(1, 1, 64, 64)), with_pos(3 * torch.randn(1, 1, 64, 64))
    o1, o2 = net(x1, tokens, mask, return_aux=True), net(x2, tokens, mask, return_aux=True)
    torch.testing.assert_close(o1.generated, o2.generated)
    assert not torch.allclose(o1.pseudo_logits, o2.pseudo_logits)  # the U-Net's pseudo-image reads the image too
    lesion_generation_loss(o1.generated, torch.ones_like(o1.generated), o1.inside > 0.5).backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.image_encoder.parameters())
    assert net.text_pool.out[-1].weight.grad.abs().sum() > 0

    fused = make_net()  # the default: the paper's
    o = fused(x1, tokens, mask, return_aux=True)
    assert o.generated is o.pseudo_logits
    with pytest.raises(ValueError, match="generation_source"):
        make_net(generation_source="image")


def test_report_changes_pseudo_image_and_logits():
    net = make_net().eval()
    torch.manual_seed(3)
    x = with_pos(torch.randn(1, 1, 64, 64))
    r1, r2 = report(1, seed=1), report(1, seed=2)
    with torch.no_grad():
        o1, o2 = net(x, *r1, return_aux=True), net(x, *r2, return_aux=True)
        o_null = net(x, None, return_aux=True)
    assert not torch.allclose(o1.pseudo, o2.pseudo)
    assert not torch.allclose(o1.seg[0], o2.seg[0])
    assert not torch.allclose(o1.pseudo, o_null.pseudo)
    assert not torch.allclose(o1.seg[0], o_null.seg[0])


def test_tile_pseudo_image_is_the_crop_of_the_whole_image_pseudo_image():
    """A tile (a crop of a larger image, with its position channels) gets exactly the crop of the case's
    whole-image pseudo-image; a mirrored tile gets the mirrored crop (what test-time mirroring does)."""
    net = make_net(bidirectional=False).eval()  # BMF mixes in the tile's own content; see the trainer docs
    torch.manual_seed(6)
    whole = with_position_channels(torch.randn(1, 128, 128))[None]  # (1, 1 + 3, 128, 128)
    tokens, mask = report(1, seed=3)
    with torch.no_grad():
        t = net.text_embedding(tokens, mask, 1)
        full = net.pseudo_image(whole, t)[0]
        tile = whole[:, :, 32:96, 64:128]
        crop = net.pseudo_image(tile, t)[0]
        mirrored = net.pseudo_image(torch.flip(tile, dims=(3,)), t)[0]
    assert torch.allclose(crop, full[:, :, 32:96, 64:128], atol=1e-5)
    assert torch.allclose(mirrored, torch.flip(full[:, :, 32:96, 64:128], dims=(3,)), atol=1e-5)
    # padding (outside the image: all three position channels 0) gets no pseudo-image
    padded = torch.nn.functional.pad(tile, (0, 8, 0, 0))
    with torch.no_grad():
        p = net.pseudo_image(padded, t)[0]
    assert (p[..., -8:] == 0).all() and torch.allclose(p[..., :-8], crop, atol=1e-5)


def test_set_text_broadcasts_over_tiles():
    net = make_net().eval()
    torch.manual_seed(4)
    tiles = with_pos(torch.randn(3, 1, 64, 64))
    tokens, mask = report(1, seed=7)
    with torch.no_grad():
        per_sample = net(tiles, tokens.expand(3, -1, -1).clone(), mask.expand(3, -1).clone())[0]
        net.set_text(tokens, mask)
        broadcast = net(tiles)[0]
        net.set_text(tokens[0], mask[0])  # (L, D) and (L,) also accepted
        broadcast_1d = net(tiles)[0]
        net.set_text(None)
        with pytest.warns(UserWarning, match="null report"):
            null_set = net(tiles)[0]
        null_arg = net(tiles, None)[0]
    assert torch.allclose(per_sample, broadcast, atol=1e-5)
    assert torch.allclose(per_sample, broadcast_1d, atol=1e-5)
    assert torch.allclose(null_set, null_arg)
    assert not torch.allclose(null_set, per_sample)
    # tiles of one case are independent of each other (no batch coupling)
    with torch.no_grad():
        net.set_text(tokens, mask)
        single = net(tiles[1:2])[0]
    assert torch.allclose(single, broadcast[1:2], atol=1e-5)


def test_drop_mask_uses_null_report():
    net = make_net().eval()
    x = with_pos(torch.randn(2, 1, 64, 64))
    tokens, mask = report(2)
    with torch.no_grad():
        dropped = net(x, tokens, mask, drop=torch.tensor([True, False]), return_aux=True)
        null = net(x, None, return_aux=True)
        real = net(x, tokens, mask, return_aux=True)
    assert torch.allclose(dropped.t[0], null.t[0]) and torch.allclose(dropped.t[1], real.t[1])


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    net = make_net(seed=0)
    with torch.no_grad():  # make every parameter non-trivial (null_text and fusion start at zero)
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.set_text(*report(1, seed=8))
    sd = net.state_dict()
    assert not any(k.endswith(("_tokens", "_mask")) for k in sd)
    assert "null_text" in sd
    fresh = make_net(seed=123)
    fresh.load_state_dict(sd)
    net.eval(), fresh.eval()
    x, text = with_pos(torch.randn(2, 1, 96, 64)), report(2)
    with torch.no_grad():
        a, b = net(x, *text, return_aux=True), fresh(x, *text, return_aux=True)
        with_report = net(x)[0]  # uses the report set on `net`
        net.set_text(None)
        na, nb = net(x, None)[0], fresh(x, None)[0]
    assert torch.equal(a.seg[0], b.seg[0]) and torch.equal(a.pseudo, b.pseudo)
    assert torch.equal(na, nb)
    assert not torch.allclose(with_report, na)
    assert fresh._tokens is None  # the per-case report is not restored from a checkpoint


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (16, 64), (32, 8)])
def test_global_encoder_small_inputs(size):
    """Instance norm needs > 1 spatial element in training; 4 stride-2 stages on 16x16 used to end at 1x1."""
    enc = GlobalImageEncoder(1, out_dim=8, width=4).train()
    assert enc(torch.randn(2, 1, *size)).shape == (2, 8)
    assert ImageToTextHead(TEXT_DIM, width=4).train()(torch.randn(2, 1, *size)).shape == (2, TEXT_DIM)


@pytest.mark.parametrize("through", [True, False])
def test_segmentation_gradient_reaches_the_text_modules_only_when_asked(through):
    """seg_gradient_to_text=False: the segmentation loss trains the U-Net (its pseudo-image input channel
    included) but not the modules that draw the pseudo-image; the generation loss still trains them."""
    torch.set_num_threads(1)
    net = make_net(seg_gradient_to_text=through, iac=False, cycle=False).train()
    torch.manual_seed(2)
    x = with_pos(torch.randn(2, 1, 32, 32))
    tokens, mask = report(2)
    out = net(x, tokens=tokens, mask=mask, return_aux=True)
    seg = out.seg[0] if isinstance(out.seg, list) else out.seg
    seg.square().mean().backward(retain_graph=True)
    text_grad = sum(p.grad.abs().sum() for n, p in net.named_parameters()
                    if n.startswith(("text_pool.", "generator.")) and p.grad is not None)
    assert (text_grad > 0) == through
    first_conv = next(m for m in net.unet.modules() if isinstance(m, torch.nn.Conv2d))
    assert first_conv.weight.grad[:, 1].abs().sum() > 0  # the U-Net still learns to read the pseudo-image
    net.zero_grad()
    out.generated.square().mean().backward()
    assert net.generator.decoder[-1].weight.grad.abs().sum() > 0


def test_cross_fitting_feeds_the_unet_the_other_pathways_map():
    """cross_fit=2: a case of fold k is fitted by pathway 1 - k only (generation and cycle losses), while the U-Net
    sees pathway k's map of it (never fitted on that case); without ``fold`` (prediction) the U-Net sees the
    pathways' mean. One pathway keeps the state-dict names of every model so far."""
    torch.set_num_threads(1)
    net = make_net(cross_fit=2, seg_gradient_to_text=False, iac=False).train()
    single = set(make_net(iac=False).state_dict())
    assert single < set(net.state_dict()) and all(n.startswith("cross_fit_twin.") for n in set(net.state_dict()) - single)
    x = with_pos(torch.randn(2, 1, 32, 32))
    tokens, mask = report(2)
    fold = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="fold"):
        net(x, tokens=tokens, mask=mask, return_aux=True)
    with pytest.raises(ValueError, match="does not fit"):
        net(x, tokens=tokens, mask=mask, return_aux=True, fold=fold, fit=fold)
    out = net(x, tokens=tokens, mask=mask, return_aux=True, fold=fold)
    maps = [net.pseudo_image(x, net.text_embedding(tokens, mask, 2, pathway=k), pathway=k) for k in (0, 1)]
    assert not torch.allclose(maps[0][0], maps[1][0])  # two independently initialised pathways
    torch.testing.assert_close(out.pseudo[0], maps[1][0][0])  # case 0 (fold 1): the U-Net reads pathway 1's
    torch.testing.assert_close(out.pseudo[1], maps[0][0][1])
    torch.testing.assert_close(out.generated[0], maps[0][1][0])  # ... and the generation loss trains pathway 0's
    torch.testing.assert_close(out.generated[1], maps[1][1][1])
    # case 0's generation and cycle losses reach pathway 0 only
    (lesion_generation_loss(out.generated[:1], torch.ones_like(out.generated[:1]), out.inside[:1] > 0.5)
     + cycle_loss(out.t[:1].detach(), out.t_hat[:1], normalized=True)).backward()
    grads = {n: (p.grad is not None and p.grad.abs().sum() > 0) for n, p in net.named_parameters()}
    assert grads["generator.decoder.0.0.weight"] and grads["text_pool.queries"] and grads["image_to_text.head.weight"]
    assert not any(g for n, g in grads.items() if n.startswith("cross_fit_twin."))
    net.eval()
    net.set_text(tokens[:1], mask[:1])
    with torch.no_grad():
        both = [net.pseudo_image(x[:1], net.text_embedding(tokens[:1], mask[:1], 1, pathway=k), pathway=k)[0]
                for k in (0, 1)]
        torch.testing.assert_close(net.current_pseudo_image(x[:1]), (both[0] + both[1]) / 2)
    with pytest.raises(ValueError, match="cross_fit"):
        make_net(cross_fit=0)


def test_four_cross_fitted_pathways_route_by_fold_and_fit():
    """cross_fit=4: the U-Net reads the fold's pathway, the losses train the ``fit`` pathway (required: with more
    than two pathways it is drawn by the trainer), prediction reads the mean of all four."""
    torch.set_num_threads(1)
    net = make_net(cross_fit=4, seg_gradient_to_text=False, iac=False).train()
    assert len(net.pathways) == 4 and len({id(p.generator) for p in net.pathways}) == 4
    x = with_pos(torch.randn(3, 1, 32, 32))
    tokens, mask = report(3)
    fold, fit = torch.tensor([3, 0, 2]), torch.tensor([1, 2, 0])
    with pytest.raises(ValueError, match="fit"):
        net(x, tokens=tokens, mask=mask, return_aux=True, fold=fold)
    out = net(x, tokens=tokens, mask=mask, return_aux=True, fold=fold, fit=fit)
    maps = [net.pseudo_image(x, net.text_embedding(tokens, mask, 3, pathway=k), pathway=k) for k in range(4)]
    for b in range(3):
        torch.testing.assert_close(out.pseudo[b], maps[int(fold[b])][0][b])
        torch.testing.assert_close(out.generated[b], maps[int(fit[b])][1][b])
    out.generated[:1].square().mean().backward()  # case 0 is fitted by pathway 1 only
    touched = {n.split(".")[0] + ("." + n.split(".")[1] if n.startswith("cross_fit_more") else "")
               for n, p in net.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == {"cross_fit_twin"}
    net.eval()
    net.set_text(tokens[:1], mask[:1])
    with torch.no_grad():
        torch.testing.assert_close(net.current_pseudo_image(x[:1]), torch.stack([m[0][:1] for m in maps]).mean(0))


def test_training_outputs_carry_the_fitted_pathways_whole_image_map():
    """BiCLIPOutput.frame is the whole-image map of the pathway each sample fits (what the whole-case generation
    loss trains): read at the sample's positions it is that sample's ``generated`` map, in every training path."""
    from nnunetv2_textseg.patient_frame import sample_patient_frame
    torch.manual_seed(0)
    x = with_pos(torch.randn(3, 1, 32, 32))
    tokens, mask = report(3)
    pos = x[:, -POSITION_CHANNELS:]
    net = make_net(cross_fit=4, seg_gradient_to_text=False, iac=False).train()
    fold, fit = torch.tensor([3, 0, 2]), torch.tensor([1, 2, 0])
    for out in (net(x, tokens=tokens, mask=mask, return_aux=True, fold=fold, fit=fit),
                net.report_pathways_forward(x, tokens=tokens, mask=mask, fold=fold, fit=fit)):
        assert out.frame.shape == (3, 1, 16, 16)
        torch.testing.assert_close(sample_patient_frame(out.frame, pos), out.generated)
    single = make_net(iac=False).train()
    out = single(x, tokens=tokens, mask=mask, return_aux=True)
    torch.testing.assert_close(sample_patient_frame(out.frame, pos), out.generated)
    out.frame.sum().backward()
    grads = {n.split(".")[0] for n, p in single.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {"text_pool", "generator", "fusion"} <= grads and "unet" not in grads


def test_token_zone_maps_unite_phrases_and_skip_dropped_reports():
    """Per-token maps are united by noisy-OR: a report's map is at least each of its tokens' maps; masked tokens
    add nothing; in BiCLIP the token maps join the generator's map, and a dropped report (or no report) gets the
    null report's map alone."""
    from nnunetv2_textseg.building_blocks.biclip import TokenZoneMaps, noisy_or_logits
    torch.manual_seed(0)
    maps = TokenZoneMaps(TEXT_IN, side=8, out_bias=0.0)
    tokens, mask = report(1, length=5)
    union = torch.sigmoid(maps(tokens, mask))
    alone = [torch.sigmoid(maps(tokens[:, i:i + 1], mask[:, i:i + 1])) for i in range(3)]
    assert union.shape == (1, 1, 8, 8)
    for a in alone:
        assert bool((union >= a - 1e-5).all())
    expected = 1 - torch.stack([1 - a for a in alone]).prod(0)  # tokens 3, 4 are padding
    torch.testing.assert_close(union, expected, atol=1e-5, rtol=1e-4)
    z = torch.tensor([-3.0, 0.0, 2.0])
    torch.testing.assert_close(torch.sigmoid(noisy_or_logits(z, z)), 1 - (1 - torch.sigmoid(z)) ** 2)
    net = make_net(token_maps=True, iac=False, bidirectional=False).eval()
    x = with_pos(torch.randn(2, 1, 32, 32))
    tokens, mask = report(2)
    with torch.no_grad():
        out = net(x, tokens=tokens, mask=mask, drop=torch.tensor([False, True]), return_aux=True)
        with_tokens = net.pseudo_image(x, net.text_embedding(tokens, mask, 2), tokens=tokens, mask=mask)[0]
        generator_only = net.pseudo_image(x, net.text_embedding(tokens, mask, 2))[0]
        null = net.pseudo_image(x, net.text_embedding(None, None, 2))[0]
    torch.testing.assert_close(out.pseudo[0], with_tokens[0])
    torch.testing.assert_close(out.pseudo[1], null[1])
    assert bool((with_tokens >= generator_only - 1e-6).all()) and not torch.allclose(with_tokens, generator_only)
    out = net.train()(x, tokens=tokens, mask=mask, return_aux=True)
    out.generated.square().mean().backward()
    assert net.token_maps.decoder[0].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="frame_resolution"):
        make_net(token_maps=True, frame_resolution=None)


def test_token_window_binds_side_to_level_where_single_token_maps_cannot():
    """Reports "<level> <side>" whose lesion lies in the quadrant of that level *and* side: per-token maps united by
    noisy-OR (window 1) cannot draw it — a level token must light its whole half, since it occurs with both sides —
    while maps drawn from a window of 3 tokens learn each quadrant. Padding past the report's end is never read."""
    from nnunetv2_textseg.building_blocks.biclip import TokenZoneMaps
    from nnunetv2_textseg.losses import lesion_generation_loss
    torch.manual_seed(0)
    words = torch.randn(4, TEXT_IN)  # upper, lower, left, right: context-free embeddings
    tokens = torch.stack([torch.stack([words[level], words[2 + side]]) for level in (0, 1) for side in (0, 1)])
    mask = torch.ones(4, 2, dtype=torch.bool)
    target = torch.zeros(4, 1, 8, 8)
    for i, (level, side) in enumerate((l, s) for l in (0, 1) for s in (0, 1)):
        target[i, 0, 4 * level:4 * level + 4, 4 * side:4 * side + 4] = 1

    def fitted_quadrant_share(window: int) -> float:
        maps = TokenZoneMaps(TEXT_IN, side=8, rank=32, window=window)
        opt = torch.optim.Adam(maps.parameters(), lr=3e-3)
        for _ in range(300):
            loss = lesion_generation_loss(maps(tokens, mask), target, torch.ones_like(target, dtype=torch.bool))
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            p = torch.sigmoid(maps(tokens, mask))
        return float((p * target).sum() / p.sum())  # share of the map inside the named quadrant

    assert fitted_quadrant_share(3) > 0.9
    assert fitted_quadrant_share(1) < 0.6
    maps = TokenZoneMaps(TEXT_IN, side=8, window=3).eval()
    padded = torch.cat([tokens, torch.randn(4, 3, TEXT_IN)], 1)
    padded_mask = torch.cat([mask, torch.zeros(4, 3, dtype=torch.bool)], 1)
    with torch.no_grad():
        torch.testing.assert_close(maps(padded, padded_mask), maps(tokens, mask))
    with pytest.raises(ValueError, match="odd"):
        TokenZoneMaps(TEXT_IN, window=2)


def test_cross_fitted_training_forward_routes_each_sample_through_two_pathways_with_the_same_numbers():
    """Training with 4 cross-fitted pathways, each sample passes only its fold's pathway (the U-Net's map) and its
    fitting one (the losses' inputs): segmentation, map, generated map, t and t̂ equal those of drawing every
    pathway's map for every sample; the segmentation gradient stops at the map (a pathway that only drew maps for
    the U-Net gets none), and IAC still runs."""
    from nnunetv2_textseg.architectures.biclip import _per_sample
    net = make_net(cross_fit=4, token_maps=True, token_window=3, seg_gradient_to_text=False, iac=True).eval()
    x = with_pos(torch.randn(4, 1, 32, 32))
    tokens, mask = report(4)
    drop = torch.tensor([False, True, False, False])
    fold = torch.tensor([0, 1, 0, 1])
    fit = torch.tensor([2, 2, 3, 2])
    out = net(x, tokens=tokens, mask=mask, drop=drop, return_aux=True, fold=fold, fit=fit, x_strong=x[:, :1] * 2)
    with torch.no_grad():
        image, position, ts, maps, _ = net._report_pathways(x, tokens, mask, drop, fold, fit, True)
        seen = _per_sample(fold, [m[0] for m in maps])
        seg = net.unet.decoder(net.unet.encoder(net.unet_input(image, seen, position)))
        want = net._fitted_outputs(position, ts, maps, fit, seg, seen)
    first = (lambda v: v[0] if isinstance(v, (list, tuple)) else v)
    torch.testing.assert_close(first(out.seg), first(want.seg), atol=1e-5, rtol=1e-4)
    for name in ("pseudo", "generated", "t", "t_hat", "inside"):
        torch.testing.assert_close(getattr(out, name), getattr(want, name), atol=1e-5, rtol=1e-4)
    assert out.p_weak is not None and out.p_strong is not None
    first(out.seg).square().mean().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in net.pathways[1].parameters())  # fold 1 reads it
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.unet.parameters())


def test_report_pathways_alone_match_the_full_forward_and_leave_the_unet_out():
    """report_pathways_forward (the warm-up's pass: each sample through the one pathway it fits) gives the losses'
    inputs of the full forward pass — same generated map, t and t̂ per sample, dropped reports included — with no
    segmentation and no U-Net gradient."""
    net = make_net(cross_fit=4, token_maps=True, token_window=3, seg_gradient_to_text=False, iac=False).eval()
    x = with_pos(torch.randn(5, 1, 32, 32))
    tokens, mask = report(5)
    drop = torch.tensor([False, True, False, False, True])
    fold = torch.tensor([0, 1, 2, 3, 0])
    fit = torch.tensor([1, 3, 0, 2, 2])
    with torch.no_grad():
        full = net(x, tokens=tokens, mask=mask, drop=drop, return_aux=True, fold=fold, fit=fit)
    alone = net.report_pathways_forward(x, tokens=tokens, mask=mask, drop=drop, fold=fold, fit=fit)
    assert alone.seg is None and alone.generated.shape == full.generated.shape
    for name in ("generated", "t", "t_hat", "inside"):
        torch.testing.assert_close(getattr(alone, name), getattr(full, name), atol=1e-5, rtol=1e-4)
    alone.generated.square().mean().backward()
    assert all(p.grad is None for p in net.unet.parameters())
    assert net.cross_fit_more[0].token_maps.decoder[0].weight.grad.abs().sum() > 0  # pathway 2 fitted sample 3
    with pytest.raises(ValueError, match="fit != fold"):
        net.report_pathways_forward(x, tokens=tokens, mask=mask, fold=fold, fit=fold)


class _HostReads(TorchDispatchMode):
    """Counts the ops that make the host wait for a tensor's value (on a GPU: a sync that stops the host from
    queueing the next kernels): scalar reads, boolean indexing, unique."""
    READS = ("aten._local_scalar_dense", "aten.nonzero", "aten._unique", "aten.unique", "aten.masked_select",
             "aten.is_nonzero", "aten.item")

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        boolean_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            torch.is_tensor(i) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else ()) or ())
        if name.startswith(self.READS) or boolean_index:  # a boolean index is a nonzero inside the kernel
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_cross_fitted_training_step_reads_no_device_value():
    """The default's training pass (4 cross-fitted pathways routed per sample, IAC) and its losses' backward pass
    read no tensor value on the host: routing is grouped from the trainer's host-side fold/fit. Routing every sample
    through one pathway gives the numbers of drawing every pathway's map (the shortcut without indexing)."""
    net = make_net(cross_fit=4, token_maps=True, token_window=3, seg_gradient_to_text=False, iac=True).train()
    x = with_pos(torch.randn(3, 1, 32, 32))
    tokens, mask = report(3)
    target = (torch.rand(3, 32, 32) * NUM_CLASSES).long()
    drop = torch.tensor([False, True, False])
    fold, fit = torch.tensor([0, 1, 0]), torch.tensor([2, 3, 1])
    reads = _HostReads()
    with reads:
        out = net(x, tokens=tokens, mask=mask, drop=drop, return_aux=True, fold=fold, fit=fit, x_strong=x[:, :1] * 2)
        trainer_style_loss(out, x, target).backward()
    assert reads.reads == []
    net.eval()
    same = torch.tensor([3, 3, 3])
    with torch.no_grad():
        out = net(x, tokens=tokens, mask=mask, drop=drop, return_aux=True, fold=fold, fit=same)
        _, _, ts, maps, _ = net._report_pathways(x, tokens, mask, drop, fold, same, True)
    torch.testing.assert_close(out.generated, maps[3][1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.t, ts[3], atol=1e-5, rtol=1e-4)


def test_host_read_counter_sees_boolean_indexing():
    """The counter of the no-host-read tests flags a boolean index and a boolean-mask assignment (each a nonzero on
    the device), not an integer index."""
    x, m = torch.randn(4, 3), torch.tensor([True, False, True, False])
    reads = _HostReads()
    with reads:
        x[torch.tensor([0, 2])]
    assert reads.reads == []
    with reads:
        x[m]
        x[m] = 0.0
    assert len(reads.reads) == 2


def test_cross_fitting_routes_stay_on_the_host_whatever_the_training_device():
    """The trainer's folds and fitting draw are host tensors (the network groups samples with tolist, which on a
    GPU tensor would wait for the device), also when the trainer's device is not the CPU."""
    from types import SimpleNamespace

    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    stub = SimpleNamespace(cross_fit=4, training_case_ids=[f"c{i}" for i in range(8)], device=torch.device("meta"))
    folds = nnUNetTrainerBiCLIP.cross_fit_folds(stub, ["c3", "c6", "x"])
    fit = nnUNetTrainerBiCLIP.fitting_pathways(stub, folds)
    assert folds.device.type == "cpu" and fit.device.type == "cpu"
    assert folds.tolist()[:2] == [3, 2] and all(a != b for a, b in zip(fit.tolist(), folds.tolist()))


def test_unrouted_pathways_get_zero_gradients_in_one_process_as_under_ddp(monkeypatch):
    """Under DDP every pathway stays in the graph at weight 0 (find_unused_parameters=False); in one process the
    trainer fills the same zero gradients after the backward pass instead (nnUNetTrainerBiCLIP.complete_gradients):
    every gradient, and the parameters after an AdamW step (which moves a parameter with a zero gradient by its
    moments, but skips one without a gradient), equal those of the in-graph version — also when the zeroed buffer is
    reused by the next step after last step's zero gradients were changed in place."""
    from types import SimpleNamespace

    import nnunetv2_textseg.architectures.biclip as biclip_module
    from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
    x = with_pos(torch.randn(2, 1, 32, 32))
    tokens, mask = report(2)
    target = (torch.rand(2, 32, 32) * NUM_CLASSES).long()
    fold, fit = torch.tensor([0, 0]), torch.tensor([1, 1])  # pathways 2 and 3: no sample routed through them
    nets = []
    for distributed in (True, False):
        monkeypatch.setattr(biclip_module, "_distributed", lambda: distributed)
        net = make_net(cross_fit=4, token_maps=True, token_window=3, seg_gradient_to_text=False).train()
        opt = torch.optim.AdamW([p for n, p in net.named_parameters() if not n.startswith("unet.")], lr=1e-2)
        trainer = SimpleNamespace(cross_fit=4, is_ddp=False, unwrapped_network=lambda: net)
        for step in range(3):  # later steps move the unrouted pathways by the moments of the first
            opt.zero_grad(set_to_none=True)
            f = fit if step != 1 else torch.tensor([2, 3])
            trainer_style_loss(net(x, tokens=tokens, mask=mask, return_aux=True, fold=fold, fit=f), x, target).backward()
            if not distributed:
                nnUNetTrainerBiCLIP.complete_gradients(trainer)
            if step == 0:
                grads = {n: p.grad for n, p in net.named_parameters() if not n.startswith("unet.")}
                assert all(g is not None for g in grads.values())
                assert all(float(g.abs().sum()) == 0 for n, g in grads.items() if n.startswith("cross_fit_more"))
            opt.step()
            if step == 0 and not distributed:  # a zero gradient changed in place (e.g. accumulated into) after use
                for name, q in net.named_parameters():
                    if name.startswith("cross_fit_more"):
                        q.grad.add_(1.0)
        nets.append(net)
    for (name, a), b in zip(nets[0].named_parameters(), nets[1].parameters()):
        torch.testing.assert_close(a, b, msg=name)


def test_map_logit_prior_adds_the_weighted_log_odds_at_every_output():
    """MapLogitPrior: logits_c + w_c · logit(clamp(p)), the map resized to each deep-supervision output."""
    from nnunetv2_textseg.building_blocks.biclip import MapLogitPrior

    prior = MapLogitPrior(NUM_CLASSES)
    with torch.no_grad():
        prior.weight.copy_(torch.tensor([0.0, 1.0, 0.5]))
    p = torch.rand(2, 1, 32, 32)
    p[0, 0, 0, 0], p[0, 0, 0, 1] = 0.0, 1.0  # clamped: the prior stays finite
    logits = [torch.randn(2, NUM_CLASSES, 32 // 2 ** i, 32 // 2 ** i) for i in range(3)]
    out = prior(logits, p)
    z = torch.log(p.clamp(0.02, 0.98) / (1 - p.clamp(0.02, 0.98)))
    assert [o.shape for o in out] == [o.shape for o in logits]
    assert torch.allclose(out[0] - logits[0], torch.cat([0 * z, z, 0.5 * z], 1), atol=1e-5)
    assert torch.allclose(out[1][:, 1:2] - logits[1][:, 1:2], F.avg_pool2d(z, 2), atol=1e-5)
    assert torch.isfinite(out[0]).all() and float((out[0] - logits[0]).detach().abs().max()) <= math.log(0.98 / 0.02) + 1e-5
    single = prior(logits[0], p)  # a plain tensor (no deep supervision) stays one
    assert torch.equal(single, out[0])
    sum(o.sum() for o in out).backward()
    assert prior.weight.grad is not None and prior.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="floor"):
        MapLogitPrior(2, floor=0.5)


def _text_only_and_variant(structured_map: bool = False, **variant) -> tuple[BiCLIPNetwork, BiCLIPNetwork,
                                                                             torch.Tensor, list[str]]:
    """A cross-fitted network with the segmentation gradient stopped and the same network with ``variant``'s extra
    module(s), sharing every other weight, in eval mode with one report set; plus a batch of two 64² images and the
    variant's parameter names the plain network lacks. ``structured_map``: perturb the generator and token maps first
    (an untrained generator draws a flat map)."""
    plain = make_net(seed=3, cross_fit=2, seg_gradient_to_text=False)
    other = make_net(seed=3, cross_fit=2, seg_gradient_to_text=False, **variant)
    if structured_map:
        torch.manual_seed(4)
        with torch.no_grad():
            for n, p in plain.named_parameters():
                if "generator" in n or "token_maps" in n:
                    p.add_(0.5 * torch.randn_like(p))
    missing, unexpected = other.load_state_dict(plain.state_dict(), strict=False)
    assert not unexpected
    plain.eval(), other.eval()
    tokens, mask = report(1, seed=5)
    for net in (plain, other):
        net.set_text(tokens, mask)
    return plain, other, with_pos(torch.randn(2, 1, 64, 64)), missing


def test_map_prior_raises_the_logits_where_the_report_map_is_bright():
    """BiCLIPNetwork(map_prior=True): the same network's logits plus w · logit(pseudo-image) — at prediction, with
    the report set, and in the cross-fitted training forward, where the segmentation loss trains the prior's weight
    but (seg_gradient_to_text False) not the report pathway."""
    plain, prior, x, missing = _text_only_and_variant(structured_map=True, map_prior=True)
    assert missing == ["map_prior.weight"]
    with torch.no_grad():
        pseudo = prior.current_pseudo_image(x)
        z = prior.map_prior.log_odds(pseudo)
        base, shifted = plain(x)[0], prior(x)[0]
    assert torch.allclose(shifted - base, z.expand_as(base), atol=1e-4)  # weight 1 on every class at construction
    assert float(z.std()) > 0.01  # the map is not flat: the prior moves some pixels more than others

    prior.train()
    tgt = (torch.rand(2, 64, 64) > 0.8).long()
    tk, mk = report(2, seed=6)
    out = prior(x, tk, mk, fold=torch.tensor([0, 1]), return_aux=True)
    seg_like_loss(out.seg, tgt).backward()
    assert prior.map_prior.weight.grad.abs().sum() > 0
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in prior.named_parameters()
               if n.startswith(("generator", "text_pool", "token_maps", "cross_fit_twin")))
    with pytest.raises(ValueError, match="sigmoid"):
        make_net(map_prior=True, pseudo_activation="linear")


def test_diagnosis_reads_the_map_prior_weight():
    """nnUNetv2_textseg_diagnose reports the prior's learned weights (None for a network without a prior)."""
    from nnunetv2_textseg.diagnose import format_table, map_prior_weights

    assert map_prior_weights(make_net()) is None
    net = make_net(map_prior=True)
    with torch.no_grad():
        net.map_prior.weight.copy_(torch.tensor([0.0, 0.75, 1.5]))
    assert map_prior_weights(net) == [0.0, 0.75, 1.5]
    table = format_table({"dice": {}, "text_sensitivity": 0.1, "reliance": 0.02, "side": {},
                          "map_prior_weight": [0.0, 0.75, 1.5]})
    assert "map prior weight per output channel" in table and "0.750" in table


def test_gated_logits_is_the_product_of_the_probabilities():
    """gated_logits(a, b) is logit(σ(a) · σ(b)), finite for extreme logits, and a nearly open gate keeps the map."""
    a = torch.tensor([-30.0, -3.0, 0.0, 2.0, 30.0])
    b = torch.tensor([4.0, -1.0, 0.5, -20.0, 30.0])
    z = gated_logits(a, b)
    assert torch.isfinite(z).all()
    assert torch.allclose(torch.sigmoid(z), torch.sigmoid(a) * torch.sigmoid(b), atol=1e-6)
    assert torch.allclose(gated_logits(a[1:4], torch.full((3,), 12.0)), a[1:4], atol=1e-3)


def test_anatomy_gate_can_only_lower_the_report_map_and_learns_from_the_generation_loss():
    """BiCLIPNetwork(anatomy_gate=True): at construction every pathway's gate is nearly open (the map is the
    text-only network's, ×σ(4)); the gated map is never above the text-only one; the gate reads the image (two images
    give two maps for one report) and gets a gradient from the generation loss; the whole-image map stays the text's."""
    plain, gated, x, missing = _text_only_and_variant(anatomy_gate=True)
    assert missing and all(".anatomy_gate." in f".{m}" for m in missing)
    assert isinstance(gated.anatomy_gate, AnatomyGate) and isinstance(gated.cross_fit_twin.anatomy_gate, AnatomyGate)
    with torch.no_grad():
        p_text, p_gated = plain.current_pseudo_image(x), gated.current_pseudo_image(x)
    assert torch.allclose(p_gated, p_text * torch.sigmoid(torch.tensor(4.0)), atol=1e-5)
    with torch.no_grad():  # a trained gate: give its last convolution weights
        for path in gated.pathways:
            path.anatomy_gate.out.weight.normal_(0, 0.5)
        p_gated = gated.current_pseudo_image(x)
    assert (p_gated <= p_text + 1e-6).all() and float((p_text - p_gated).abs().max()) > 0.05
    assert not torch.allclose(p_gated[0], p_gated[1])  # two images, one report: the gate differs
    with torch.no_grad():  # the whole-image map (cycle head, whole-case loss) is the report's alone
        t = plain.text_embedding(*report(2, seed=7), batch=2)
        for k in range(2):
            assert torch.equal(gated.pseudo_image(x, t, pathway=k)[2], plain.pseudo_image(x, t, pathway=k)[2])

    gated.train()
    tk, mk = report(2, seed=6)
    out = gated(x, tk, mk, fold=torch.tensor([0, 1]), fit=torch.tensor([1, 0]), return_aux=True)
    assert out.frame.shape == (2, 1, 16, 16) and out.generated.shape == (2, 1, 64, 64)
    target = (torch.rand(2, 1, 64, 64) > 0.8).float()
    lesion_generation_loss(out.generated, target, torch.ones_like(target, dtype=torch.bool)).backward()
    for path in gated.pathways:
        assert path.anatomy_gate.out.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sigmoid"):
        make_net(anatomy_gate=True, pseudo_activation="linear")


def test_deep_map_starts_as_the_network_without_it_and_learns_from_the_segmentation_loss():
    """BiCLIPNetwork(deep_map=True): one zero-started 1×1 convolution per last-two encoder stage; at construction the
    network computes what it computes without them; given weights, the output moves; the segmentation loss trains
    them, in the cross-fitted training forward too, while (seg_gradient_to_text False) the report pathway gets none
    of it."""
    from nnunetv2_textseg.building_blocks.biclip import DeepMapInjection
    plain, deep, x, missing = _text_only_and_variant(structured_map=True, deep_map=True)
    stages = len(deep.unet.encoder.stages)
    assert sorted(missing) == sorted(f"deep_map.{s}.proj.{w}" for s in (stages - 2, stages - 1)
                                     for w in ("weight", "bias"))
    assert all(isinstance(m, DeepMapInjection) for m in deep.deep_map.values())
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], deep(x)[0], atol=1e-6)
        for m in deep.deep_map.values():
            m.proj.weight.normal_(0, 0.5)
        moved = deep(x)[0] - plain(x)[0]
    assert float(moved.abs().max()) > 1e-3

    deep.train()
    tgt = (torch.rand(2, 64, 64) > 0.8).long()
    tk, mk = report(2, seed=6)
    out = deep(x, tk, mk, fold=torch.tensor([0, 1]), return_aux=True)
    seg_like_loss(out.seg, tgt).backward()
    assert all(m.proj.weight.grad.abs().sum() > 0 for m in deep.deep_map.values())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in deep.named_parameters()
               if n.startswith(("generator", "text_pool", "token_maps", "cross_fit_twin")))


def test_deep_map_is_recorded_in_the_plans():
    from nnunetv2_textseg.training.variants import nnUNetTrainerBiCLIP, nnUNetTrainerBiCLIP_deepMap
    assert nnUNetTrainerBiCLIP_deepMap.network_plans_entry()["deep_map"] is True
    assert nnUNetTrainerBiCLIP.network_plans_entry()["deep_map"] is False
    assert nnUNetTrainerBiCLIP.network_plans_defaults["deep_map"] is False  # models from before the entry: none


def test_text_adapters_start_as_the_network_without_them_and_read_the_report():
    """BiCLIPNetwork(text_adapters=True): MedCLIPSeg's adapters after the last two encoder stages and a per-class
    logit affine, all identity at construction (same output as without them); given weights, the report changes the
    output through them even when the map is the null report's; the segmentation loss trains them and the adapters'
    null report (dropped rows), in the cross-fitted training forward too, while (seg_gradient_to_text False) the report
    pathway gets none of it."""
    from nnunetv2_textseg.building_blocks.medclipseg import CrossModalAdapter
    plain, adapted, x, missing = _text_only_and_variant(structured_map=True, text_adapters=True)
    stages = len(adapted.unet.encoder.stages)
    assert sorted(adapted.text_adapters) == [str(stages - 2), str(stages - 1)]
    assert all(isinstance(m, CrossModalAdapter) for m in adapted.text_adapters.values())
    assert all(n.startswith(("text_adapters.", "adapter_null_tokens", "adapter_logit_film.")) for n in missing)
    with torch.no_grad():
        assert torch.allclose(plain(x)[0], adapted(x)[0], atol=1e-6)
        torch.manual_seed(7)
        for name, p in adapted.named_parameters():
            if name.startswith(("text_adapters.", "adapter_logit_film.")):
                p.normal_(0, 0.3)
        moved = adapted(x)[0] - plain(x)[0]
        assert float(moved.abs().max()) > 1e-3
        # the adapters read the report itself, not only its map: another report moves the output with the map fixed
        tk2, mk2 = report(1, seed=9)
        first = adapted.segment(*_skips_and_text(adapted, x))
        adapted.set_text(tk2, mk2)
        second = adapted.segment(*_skips_and_text(adapted, x, map_from=plain))
    assert float((first[0] - second[0]).abs().max()) > 1e-3

    adapted.train()
    tgt = (torch.rand(2, 64, 64) > 0.8).long()
    tk, mk = report(2, seed=6)
    out = adapted(x, tk, mk, drop=torch.tensor([False, True]), fold=torch.tensor([0, 1]), return_aux=True)
    seg_like_loss(out.seg, tgt).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in adapted.named_parameters()
               if n.startswith(("text_adapters.", "adapter_logit_film.")) and "var" not in n and "gate" not in n)
    assert adapted.adapter_null_tokens.grad is not None
    assert all(p.grad is None or p.grad.abs().sum() == 0 for n, p in adapted.named_parameters()
               if n.startswith(("generator", "text_pool", "token_maps", "cross_fit_twin")))


def test_both_iac_views_in_one_encoder_pass_equal_two_passes():
    """encode_views runs the image and IAC's strong view through the encoder (adapters included) as one batch of 2B:
    the image's skips and fused text, the strong view's bottleneck and every gradient equal two separate passes. An
    encoder with batch norm (statistics over the batch) gets two passes."""
    from nnunetv2_textseg.patient_frame import split_position
    _, net, x, _ = _text_only_and_variant(structured_map=True, text_adapters=True)
    torch.manual_seed(8)
    with torch.no_grad():  # adapters that do something
        for name, p in net.named_parameters():
            if name.startswith(("text_adapters.", "adapter_logit_film.")):
                p.normal_(0, 0.3)
    image, position = split_position(x)
    strong = image * 1.7 + 0.3 * torch.randn_like(image)
    seen = net.current_pseudo_image(x).detach()
    tokens, mask = report(2, seed=5)

    def run(batched: bool):
        net.zero_grad(set_to_none=True)
        rep = net.adapter_report(tokens, mask, 2, drop=torch.tensor([False, True]))
        if batched:
            skips, fused, strong_bottleneck = net.encode_views(image, strong, seen, position, rep)
        else:
            skips, fused = net.encode(image, seen, position, rep)
            strong_bottleneck = net.encode(strong, seen, position, rep)[0][-1]
        loss = sum((s ** 2).mean() for s in skips) + fused.square().sum() + strong_bottleneck.abs().mean()
        loss.backward()
        return [s.detach() for s in skips] + [fused.detach(), strong_bottleneck.detach()], \
            {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    one, grads_one = run(True)
    two, grads_two = run(False)
    assert all(a.shape == b.shape and torch.allclose(a, b, atol=1e-5) for a, b in zip(one, two))
    assert one[-1].shape[0] == 2 and grads_one.keys() == grads_two.keys() and len(grads_one) > 10
    assert all(torch.allclose(grads_one[n], grads_two[n], atol=1e-5, rtol=1e-4) for n in grads_one)
    assert not net._batch_statistics_in_encoder()
    bn = make_net()
    bn.unet.encoder.stages[0][0].convs[0].norm = nn.BatchNorm2d(8)
    assert bn._batch_statistics_in_encoder()


def _skips_and_text(net, x, map_from=None):
    """The encoder's skips, the seen map and the fused text for the report set on ``net`` (segment's arguments); the
    map drawn by ``map_from``
    (the same weights without adapters) if given, else by ``net`` — so only the adapters' report differs."""
    from nnunetv2_textseg.patient_frame import split_position
    image, position = split_position(x)
    seen = (map_from or net).current_pseudo_image(x)
    skips, fused = net.encode(image, seen, position, net.adapter_report(net._tokens, net._mask, x.shape[0]))
    return skips, seen, fused


def test_text_adapters_are_recorded_in_the_plans():
    from nnunetv2_textseg.training import variants as v
    assert v.nnUNetTrainerBiCLIP.network_plans_entry()["text_adapters"] is True  # the default since fe37a5d
    assert v.nnUNetTrainerBiCLIP_textAdapters.network_plans_entry() == v.nnUNetTrainerBiCLIP.network_plans_entry()
    # the earlier default, and the variants measured against it, keep the map-only network their models recorded
    for earlier in (v.nnUNetTrainerBiCLIP_mapOnly, v.nnUNetTrainerBiCLIP_endToEnd, v.nnUNetTrainerBiCLIP_locationFree,
                    v.nnUNetTrainerBiCLIP_efunet, v.nnUNetTrainerBiCLIP_longWarmup, v.nnUNetTrainerBiCLIP_mapPrior,
                    v.nnUNetTrainerBiCLIP_wholeCase, v.nnUNetTrainerBiCLIP_anatomyGate, v.nnUNetTrainerBiCLIP_deepMap):
        assert earlier.network_plans_entry()["text_adapters"] is False, earlier.__name__
    assert v.nnUNetTrainerBiCLIP_noIAC.network_plans_entry()["text_adapters"] is True  # ablations of the default
    assert v.nnUNetTrainerBiCLIP.network_plans_defaults["text_adapters"] is False  # models from before the entry: none
