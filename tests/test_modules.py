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

from nnunetv2_textseg.modules.biclip import (BidirectionalFusion, GlobalImageEncoder, ImageToTextHead,
                                             ProjectionHead, PseudoImageGenerator, TextProjection,
                                             consistency_loss, cycle_loss, generation_loss)
from nnunetv2_textseg.networks import BiCLIPNetwork, BiCLIPOutput

torch.set_num_threads(2)

TEXT_IN = 32
TEXT_DIM = 64  # 8 x 8 seed: small, still a square number as the generator requires
NUM_CLASSES = 3
PATCHES = [(64, 64), (128, 128), (224, 224), (96, 160), (80, 48)]


def make_unet(image_channels: int = 1, num_classes: int = NUM_CLASSES, features=(8, 16, 32, 64),
              deep_supervision: bool = True) -> PlainConvUNet:
    n = len(features)
    unet = PlainConvUNet(image_channels + 1, n, list(features), nn.Conv2d, 3, [1] + [2] * (n - 1), 2, num_classes,
                         1, conv_bias=True, norm_op=nn.InstanceNorm2d, norm_op_kwargs={"eps": 1e-5, "affine": True},
                         nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True}, deep_supervision=deep_supervision)
    unet.apply(unet.initialize)  # what get_network_from_plans(allow_init=True) does
    return unet


def make_net(image_channels: int = 1, seed: int = 0, text_dim: int = TEXT_DIM, **kwargs) -> BiCLIPNetwork:
    torch.manual_seed(seed)
    return BiCLIPNetwork(make_unet(image_channels), image_channels, TEXT_IN, text_dim, image_dim=32, **kwargs)


def seg_like_loss(seg, target_full: torch.Tensor) -> torch.Tensor:
    """Deep-supervision CE over every output (each output must receive gradient, as with nnU-Net's loss)."""
    outs = seg if isinstance(seg, (list, tuple)) else [seg]
    loss = 0
    for w, o in zip([1 / 2 ** i for i in range(len(outs))], outs):
        tgt = F.interpolate(target_full[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + w * F.cross_entropy(o, tgt)
    return loss


def trainer_style_loss(out: BiCLIPOutput, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mirrors nnUNetTrainerBiCLIP.compute_loss (masked-image generation target, detached cycle target)."""
    ref = x.mean(1, keepdim=True) * (target[:, None] > 0).to(x.dtype)
    total = seg_like_loss(out.seg, target) + 0.1 * generation_loss(out.pseudo, ref)
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
    enc = GlobalImageEncoder(2, out_dim=24, width=4)
    assert enc(torch.randn(2, 2, *size)).shape == (2, 24)
    assert ImageToTextHead(TEXT_DIM, width=4)(torch.randn(2, 1, *size)).shape == (2, TEXT_DIM)


def test_generator_default_784():
    gen = PseudoImageGenerator()  # 28 x 28 seed as in EF-UNet
    assert gen(torch.randn(1, 784), (96, 160)).shape == (1, 1, 96, 160)
    with pytest.raises(ValueError):
        PseudoImageGenerator(100 + 1)


def test_small_modules_shapes():
    assert TextProjection(TEXT_IN, TEXT_DIM, hidden=16)(torch.randn(3, TEXT_IN)).shape == (3, TEXT_DIM)
    fusion = BidirectionalFusion(TEXT_DIM, 32, hidden=16)
    t = torch.randn(3, TEXT_DIM)
    # zero-initialised last layer: t' = t at the start of training
    assert torch.equal(fusion(t, torch.randn(3, 32)), t)
    assert ProjectionHead(64, 16, 8)(torch.randn(3, 64)).shape == (3, 16)


@pytest.mark.parametrize("size", PATCHES)
def test_network_shapes(size):
    net = make_net(image_channels=2)
    x, xs = torch.randn(2, 2, *size), torch.randn(2, 2, *size)
    text = torch.randn(2, TEXT_IN)
    seg = net(x, text=text)
    assert isinstance(seg, (list, tuple)) and len(seg) == 3  # n_stages - 1 outputs
    assert seg[0].shape == (2, NUM_CLASSES, *size)
    assert seg[1].shape == (2, NUM_CLASSES, size[0] // 2, size[1] // 2)

    out = net(x, text=text, x_strong=xs, return_aux=True)
    assert isinstance(out, BiCLIPOutput)
    assert out.seg[0].shape == (2, NUM_CLASSES, *size)
    assert out.pseudo.shape == (2, 1, *size)
    assert out.t.shape == (2, TEXT_DIM) and out.t_hat.shape == (2, TEXT_DIM)
    assert out.p_weak.shape == out.p_strong.shape == (2, 128)

    out = net(x, text=text, return_aux=True)  # no strong view: no IAC projections
    assert out.p_weak is None and out.p_strong is None


def test_deep_supervision_toggle():
    """nnU-Net switches deep supervision off through network.decoder.deep_supervision."""
    net = make_net()
    net.decoder.deep_supervision = False
    seg = net(torch.randn(1, 1, 64, 64), text=torch.randn(1, TEXT_IN))
    assert torch.is_tensor(seg) and seg.shape == (1, NUM_CLASSES, 64, 64)


def test_variants():
    x, xs, text = torch.randn(2, 1, 64, 96), torch.randn(2, 1, 64, 96), torch.randn(2, TEXT_IN)
    uni = make_net(bidirectional=False)
    assert uni.image_encoder is None and uni.fusion is None
    out = uni(x, text=text, x_strong=xs, return_aux=True)
    assert out.pseudo.shape == (2, 1, 64, 96) and out.t_hat is not None

    no_cycle = make_net(cycle=False)
    assert no_cycle.image_to_text is None
    assert no_cycle(x, text=text, x_strong=xs, return_aux=True).t_hat is None

    no_iac = make_net(iac=False)
    assert no_iac.iac_head is None
    out = no_iac(x, text=text, x_strong=xs, return_aux=True)
    assert out.p_weak is None and out.p_strong is None

    ign = make_net(ignore_text=True).eval()
    with torch.no_grad():
        a = ign(x, text=text, return_aux=True)
        b = ign(x, text=torch.randn(2, TEXT_IN), return_aux=True)
        c = ign(x, text=None, return_aux=True)
    assert torch.equal(a.pseudo, b.pseudo) and torch.equal(a.seg[0], b.seg[0])
    assert torch.allclose(a.seg[0], c.seg[0], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# gradients (DDP with find_unused_parameters=False needs a gradient for every parameter)
# ---------------------------------------------------------------------------------------------
def _grads(net, x, xs, text, target, drop):
    net.zero_grad(set_to_none=True)
    out = net(x, text=text, drop=drop, x_strong=xs, return_aux=True)
    trainer_style_loss(out, x, target).backward()
    return {n: p.grad for n, p in net.named_parameters()}


# At initialisation BidirectionalFusion's last layer is zero, so d loss / d (fusion hidden) = 0: the fusion's
# first layer and the whole GlobalImageEncoder (reached only through that layer) get gradients that exist
# but are exactly zero. After the last layer has moved (one optimiser step), they become non-zero.
ZERO_AT_INIT = ("fusion.mlp.0.", "image_encoder.")


@pytest.mark.parametrize("drop_mode", ["none", "some", "all"])
def test_every_parameter_gets_a_gradient(drop_mode):
    net = make_net().train()
    torch.manual_seed(1)
    x, xs = torch.randn(2, 1, 48, 48), torch.randn(2, 1, 48, 48)
    target = (torch.rand(2, 48, 48) * NUM_CLASSES).long()
    text = torch.randn(2, TEXT_IN)
    drop = {"none": None, "some": torch.tensor([True, False]), "all": torch.ones(2, dtype=torch.bool)}[drop_mode]
    grads = _grads(net, x, xs, text, target, drop)
    missing = [n for n, g in grads.items() if g is None]
    assert not missing, f"parameters without gradient: {missing}"
    assert all(torch.isfinite(g).all() for g in grads.values())
    zero = [n for n, g in grads.items() if not g.any()]
    allowed = ZERO_AT_INIT + (("null_text",) if drop_mode == "none" else ())
    if drop_mode == "all":
        # every row is the null report, which starts at zero: the projection's first weight sees a zero
        # input (its gradient is an outer product with it) until null_text has moved
        allowed += ("text_projection.net.0.weight",)
    assert all(n.startswith(allowed) for n in zero), f"unexpected all-zero gradients: {zero}"
    assert len(zero) < 0.25 * len(grads)
    for name in ("text_projection.net.2.weight", "fusion.mlp.2.weight", "generator.decoder.0.0.weight",
                 "image_to_text.encoder.head.weight", "iac_head.net.0.weight"):
        assert grads[name].abs().sum() > 0, name
    if drop_mode != "all":
        assert grads["text_projection.net.0.weight"].abs().sum() > 0
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


def test_variants_every_parameter_gets_a_gradient():
    x, xs = torch.randn(2, 1, 48, 48), torch.randn(2, 1, 48, 48)
    target = (torch.rand(2, 48, 48) * NUM_CLASSES).long()
    for kwargs in ({"bidirectional": False}, {"cycle": False}, {"ignore_text": True}):
        net = make_net(**kwargs)
        grads = _grads(net, x, xs, torch.randn(2, TEXT_IN), target, torch.tensor([False, True]))
        assert all(g is not None for g in grads.values()), kwargs
    # iac=False: the trainer then has no strong view (lambda_iac = 0)
    net = make_net(iac=False)
    grads = _grads(net, x, None, torch.randn(2, TEXT_IN), target, None)
    assert all(g is not None for g in grads.values())


# ---------------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------------
def test_cycle_and_consistency_losses():
    torch.manual_seed(0)
    a, b = torch.randn(4, 16), torch.randn(4, 16)
    assert cycle_loss(a, a.clone()).item() == 0
    assert cycle_loss(a, b).item() > 0
    assert math.isclose(cycle_loss(a, b).item(), ((a - b) ** 2).mean().item(), rel_tol=1e-6)
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


# ---------------------------------------------------------------------------------------------
# text conditioning
# ---------------------------------------------------------------------------------------------
def test_report_changes_pseudo_image_and_logits():
    net = make_net().eval()
    torch.manual_seed(3)
    x = torch.randn(1, 1, 64, 64)
    t1, t2 = torch.randn(1, TEXT_IN), torch.randn(1, TEXT_IN)
    with torch.no_grad():
        o1, o2 = net(x, text=t1, return_aux=True), net(x, text=t2, return_aux=True)
        o_null = net(x, text=None, return_aux=True)
    assert not torch.allclose(o1.pseudo, o2.pseudo)
    assert not torch.allclose(o1.seg[0], o2.seg[0])
    assert not torch.allclose(o1.pseudo, o_null.pseudo)
    assert not torch.allclose(o1.seg[0], o_null.seg[0])


def test_set_text_broadcasts_over_tiles():
    net = make_net().eval()
    torch.manual_seed(4)
    tiles = torch.randn(3, 1, 64, 64)
    report = torch.randn(1, TEXT_IN)
    with torch.no_grad():
        per_sample = net(tiles, text=report.expand(3, -1).clone())[0]
        net.set_text(report)
        broadcast = net(tiles)[0]
        net.set_text(report[0])  # (D,) also accepted
        broadcast_1d = net(tiles)[0]
        net.set_text(None)
        with pytest.warns(UserWarning, match="null report"):
            null_set = net(tiles)[0]
        null_arg = net(tiles, text=None)[0]
    assert torch.allclose(per_sample, broadcast, atol=1e-6)
    assert torch.allclose(per_sample, broadcast_1d, atol=1e-6)
    assert torch.allclose(null_set, null_arg)
    assert not torch.allclose(null_set, per_sample)
    # tiles of one case are independent of each other (no batch coupling)
    with torch.no_grad():
        net.set_text(report)
        single = net(tiles[1:2])[0]
    assert torch.allclose(single, broadcast[1:2], atol=1e-5)


def test_drop_mask_uses_null_report():
    net = make_net().eval()
    x = torch.randn(2, 1, 64, 64)
    text = torch.randn(2, TEXT_IN)
    with torch.no_grad():
        dropped = net(x, text=text, drop=torch.tensor([True, False]), return_aux=True)
        null = net(x, text=None, return_aux=True)
        real = net(x, text=text, return_aux=True)
    assert torch.allclose(dropped.t[0], null.t[0]) and torch.allclose(dropped.t[1], real.t[1])


# ---------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------
def test_state_dict_round_trip():
    net = make_net(seed=0)
    with torch.no_grad():  # make every parameter non-trivial (null_text and fusion start at zero)
        for p in net.parameters():
            p.add_(0.01 * torch.randn_like(p))
    net.set_text(torch.randn(1, TEXT_IN))
    sd = net.state_dict()
    assert not any(k == "_text" or k.endswith("._text") for k in sd)
    assert "null_text" in sd
    fresh = make_net(seed=123)
    fresh.load_state_dict(sd)
    net.eval(), fresh.eval()
    x, text = torch.randn(2, 1, 96, 64), torch.randn(2, TEXT_IN)
    with torch.no_grad():
        a, b = net(x, text=text, return_aux=True), fresh(x, text=text, return_aux=True)
        with_report = net(x)[0]  # uses the report set on `net`
        net.set_text(None)
        na, nb = net(x, text=None)[0], fresh(x, text=None)[0]
    assert torch.equal(a.seg[0], b.seg[0]) and torch.equal(a.pseudo, b.pseudo)
    assert torch.equal(na, nb)
    assert not torch.allclose(with_report, na)
    assert fresh._text is None  # the per-case report is not restored from a checkpoint


@pytest.mark.parametrize("size", [(8, 8), (16, 16), (16, 64), (32, 8)])
def test_global_encoder_small_inputs(size):
    """Instance norm needs > 1 spatial element in training; 4 stride-2 stages on 16x16 used to end at 1x1."""
    enc = GlobalImageEncoder(1, out_dim=8, width=4).train()
    assert enc(torch.randn(2, 1, *size)).shape == (2, 8)
    assert ImageToTextHead(TEXT_DIM, width=4).train()(torch.randn(2, 1, *size)).shape == (2, TEXT_DIM)
