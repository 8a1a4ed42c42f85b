"""MedCLIPSeg modules and MedCLIPSegNetwork on small nnU-Net-style U-Nets (CPU, fast)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunetv2_textseg.architectures.medclipseg import MedCLIPSegNetwork, MedCLIPSegOutput
from nnunetv2_textseg.building_blocks.medclipseg import CrossModalAdapter, ProbabilisticCrossAttention, TwoWayLayer
from nnunetv2_textseg.losses import soft_contrastive_loss
from nnunetv2_textseg.uncertainty import mc_uncertainty

torch.set_num_threads(2)

TOK_DIM = 24
NUM_CLASSES = 3
NORM = dict(norm_op_kwargs={"eps": 1e-5, "affine": True}, nonlin=nn.LeakyReLU, nonlin_kwargs={"inplace": True})


def make_unet(channels: int = 1, features=(8, 16, 32, 64), residual: bool = False, conv=nn.Conv2d,
              norm=nn.InstanceNorm2d, deep_supervision: bool = True) -> nn.Module:
    n = len(features)
    strides = [1] + [2] * (n - 1)
    if residual:
        unet = ResidualEncoderUNet(channels, n, list(features), conv, 3, strides, 1, NUM_CLASSES, 1, conv_bias=True,
                                   norm_op=norm, deep_supervision=deep_supervision, **NORM)
    else:
        unet = PlainConvUNet(channels, n, list(features), conv, 3, strides, 2, NUM_CLASSES, 1, conv_bias=True,
                             norm_op=norm, deep_supervision=deep_supervision, **NORM)
    unet.apply(unet.initialize)
    return unet


def make_net(channels: int = 1, seed: int = 0, perturb: bool = True, residual: bool = False, **kwargs):
    torch.manual_seed(seed)
    net = MedCLIPSegNetwork(make_unet(channels, residual=residual), TOK_DIM, width=32, heads=4, **kwargs)
    if perturb:
        perturb_init(net)
    return net


def perturb_init(module: nn.Module, seed: int = 123) -> None:
    """Move away from the identity init (gates 0, zero last layers) so text actually changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("gate"):
                p.fill_(0.7)
            elif p.abs().max() == 0 and "null_tokens" not in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def report(b: int, length: int = 5, seed: int = 1, n_real=None):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, length, TOK_DIM, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    for i, n in enumerate(n_real or []):
        mask[i, n:] = False
    return tokens, mask


def seg_loss(seg, target: torch.Tensor) -> torch.Tensor:
    outs = seg if isinstance(seg, (list, tuple)) else [seg]
    loss = 0
    for w, o in zip([1 / 2 ** i for i in range(len(outs))], outs):
        t = F.interpolate(target[:, None].float(), size=o.shape[2:], mode="nearest")[:, 0].long()
        loss = loss + w * F.cross_entropy(o, t)
    return loss


# ----------------------------------------------------------------------------- attention

def test_attention_shapes_and_identity_at_init():
    torch.manual_seed(0)
    att = ProbabilisticCrossAttention(32, heads=4)
    q, ctx = torch.randn(2, 7, 32), torch.randn(2, 5, 32)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    for sample in (False, True):
        out = att(q, ctx, mask, sample=sample)
        assert out.shape == (2, 7, 32)
        assert torch.equal(out, q)  # tanh(0) = 0: identity at init
    layer = TwoWayLayer(32, heads=4)
    img, txt = layer(q, ctx, mask, sample=True)
    assert torch.equal(img, q) and torch.equal(txt, ctx)
    adapter = CrossModalAdapter(16, TOK_DIM, width=32)
    feat = torch.randn(2, 16, 6, 10)
    tokens = torch.randn(2, 5, TOK_DIM)
    feat2, txt2 = adapter(feat, tokens, mask, sample=True)
    assert torch.equal(feat2, feat) and txt2.shape == (2, 5, 32)
    with pytest.raises(ValueError):
        ProbabilisticCrossAttention(30, heads=4)


def test_gate_sigmoid_style_init_is_configurable():
    att = ProbabilisticCrossAttention(16, heads=2, gate_init=0.5)
    assert att.gate.item() == 0.5
    q = torch.randn(1, 3, 16)
    assert not torch.allclose(att(q, torch.randn(1, 4, 16)), q)


def test_zero_variance_equals_deterministic_attention():
    torch.manual_seed(0)
    prob = ProbabilisticCrossAttention(32, heads=4, beta=2.35, eps=0.0)
    perturb_init(prob)
    with torch.no_grad():
        for head in (prob.k_var, prob.v_var):
            head.weight.zero_()
            head.bias.fill_(-60.0)  # softplus(-60) ~ 1e-26: variance ~ 0
    det = ProbabilisticCrossAttention(32, heads=4, deterministic=True)
    missing, unexpected = det.load_state_dict(prob.state_dict(), strict=False)
    assert not missing and set(unexpected) == {"k_var.weight", "k_var.bias", "v_var.weight", "v_var.bias"}
    assert not hasattr(det, "k_var")
    q, ctx = torch.randn(2, 6, 32), torch.randn(2, 4, 32)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ref = det(q, ctx, mask, sample=True)  # deterministic ignores `sample`
    assert torch.allclose(prob(q, ctx, mask, sample=False), ref, atol=1e-5)
    assert torch.allclose(prob(q, ctx, mask, sample=True), ref, atol=1e-5)
    # with real variance, the penalty and sampling change the result
    with torch.no_grad():
        prob.k_var.weight.normal_(0, 0.5)  # key-dependent variance (a constant one cancels in the softmax)
        prob.k_var.bias.zero_()
        prob.v_var.bias.fill_(1.0)
    assert not torch.allclose(prob(q, ctx, mask, sample=False), ref, atol=1e-3)


def test_gradients_reach_mean_and_variance_heads():
    torch.manual_seed(0)
    att = ProbabilisticCrossAttention(16, heads=2)
    perturb_init(att)
    q, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    att(q, ctx, sample=True).pow(2).sum().backward()
    for name in ("q_proj", "k_mu", "v_mu", "k_var", "v_var", "out_proj"):
        for p in getattr(att, name).parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert att.gate.grad is not None and att.gate.grad != 0
    # mean path in training (sample=False) keeps the value-variance head in the graph
    att.zero_grad(set_to_none=True)
    att(q, ctx, sample=False).sum().backward()
    assert all(p.grad is not None for p in att.parameters())


def test_gate_gets_gradient_at_identity_init():
    att = ProbabilisticCrossAttention(16, heads=2)
    att(torch.randn(2, 5, 16), torch.randn(2, 3, 16), sample=True).pow(2).sum().backward()
    assert att.gate.grad.abs() > 0
    assert all(p.grad is not None for p in att.parameters())


def test_sampling_is_stochastic_mean_path_is_not():
    torch.manual_seed(0)
    att = ProbabilisticCrossAttention(16, heads=2)
    perturb_init(att)
    q, ctx = torch.randn(1, 4, 16), torch.randn(1, 3, 16)
    assert torch.equal(att(q, ctx, sample=False), att(q, ctx, sample=False))
    assert not torch.allclose(att(q, ctx, sample=True), att(q, ctx, sample=True))


def test_key_padding_mask():
    torch.manual_seed(0)
    att = ProbabilisticCrossAttention(16, heads=2)
    perturb_init(att)
    q, ctx = torch.randn(2, 4, 16), torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    ctx2 = ctx.clone()
    ctx2[~mask] = 100 * torch.randn(int((~mask).sum()), 16)
    assert torch.allclose(att(q, ctx, mask), att(q, ctx2, mask), atol=1e-6)
    torch.manual_seed(5)
    a = att(q, ctx, mask, sample=True)
    torch.manual_seed(5)
    assert torch.allclose(a, att(q, ctx2, mask, sample=True), atol=1e-6)
    assert not torch.allclose(att(q, ctx), att(q, ctx2))  # unmasked, the same change matters
    # a row without real keys returns its query, finite
    none = torch.zeros(2, 6, dtype=torch.bool)
    none[1] = True
    out = att(q, ctx, none)
    assert torch.isfinite(out).all() and torch.equal(out[0], q[0]) and not torch.allclose(out[1], q[1])


def test_uncertain_keys_are_attended_less():
    """Two identical-mean keys; raising one key's variance moves the output towards the other's value."""
    torch.manual_seed(0)
    att = ProbabilisticCrossAttention(8, heads=1, beta=2.35)
    with torch.no_grad():
        att.gate.fill_(10.0)  # tanh ~ 1: output ~ query + attention
        att.out_proj.weight.copy_(torch.eye(8))
        att.out_proj.bias.zero_()
        att.k_mu.weight.zero_()  # equal key means for all context tokens
        att.k_var.weight.zero_()
        att.k_var.weight[:, 0] = 5.0  # key variance grows with context feature 0
    q = torch.randn(1, 1, 8)
    ctx = torch.randn(1, 2, 8)
    ctx[0, 0, 0], ctx[0, 1, 0] = 2.0, -2.0  # token 0 uncertain, token 1 certain
    v = att.v_norm(att.v_mu(ctx))[0]
    out = (att(q, ctx) - q)[0, 0]
    assert (out - v[1]).norm() < (out - v[0]).norm()


# ----------------------------------------------------------------------------- contrastive loss

def _soft_ce(logits, targets):
    return -(targets * F.log_softmax(logits, 1)).sum(1).mean()


def test_soft_contrastive_equals_infonce_for_distinct_reports():
    torch.manual_seed(0)
    b, tau = 4, 0.02
    img = torch.randn(b, 8)
    txt = torch.eye(b, 8) + 0.01 * torch.randn(b, 8)  # mutually ~orthogonal reports
    logits = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).t() / tau
    info_nce = (F.cross_entropy(logits, torch.arange(b)) + F.cross_entropy(logits.t(), torch.arange(b))) / 2
    assert torch.allclose(soft_contrastive_loss(img, txt, tau), info_nce, atol=1e-4)


def test_soft_contrastive_identical_reports_share_targets():
    torch.manual_seed(0)
    tau = 0.05
    img, txt = torch.randn(3, 6), torch.randn(3, 6)
    rep = torch.eye(3, 6)
    rep[1] = rep[0]  # reports 0 and 1 identical, report 2 orthogonal
    targets = torch.tensor([[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]])
    logits = F.normalize(img, dim=1) @ F.normalize(txt, dim=1).t() / tau
    expected = (_soft_ce(logits, targets) + _soft_ce(logits.t(), targets.t())) / 2
    assert torch.allclose(soft_contrastive_loss(img, txt, tau, target_emb=rep), expected, atol=1e-5)
    # swapping which identical report goes with which image changes nothing on the target side
    perm = torch.tensor([1, 0, 2])
    assert torch.allclose(soft_contrastive_loss(img, txt, tau, target_emb=rep[perm]),
                          soft_contrastive_loss(img, txt, tau, target_emb=rep))


def test_soft_contrastive_hand_computed_2x2():
    img = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: e1, e2
    txt = torch.tensor([[3.0, 0.0], [0.6, 0.8]])  # normalised: e1, (0.6, 0.8)
    tau = 0.5
    # logits = [[1, .6], [0, .8]] / .5 = [[2, 1.2], [0, 1.6]]; targets: cos(t) = [[1, .6], [.6, 1]] / .5
    a = math.exp(2) / (math.exp(2) + math.exp(1.2))
    t = [[a, 1 - a], [1 - a, a]]

    def lsm(row):
        m = math.log(sum(math.exp(v) for v in row))
        return [v - m for v in row]

    i2t = [lsm([2, 1.2]), lsm([0, 1.6])]
    t2i = [lsm([2, 0]), lsm([1.2, 1.6])]
    l_i2t = -sum(t[i][j] * i2t[i][j] for i in range(2) for j in range(2)) / 2
    l_t2i = -sum(t[j][i] * t2i[i][j] for i in range(2) for j in range(2)) / 2
    expected = (l_i2t + l_t2i) / 2
    assert soft_contrastive_loss(img, txt, tau).item() == pytest.approx(expected, rel=1e-5)


def test_soft_contrastive_gradients_and_no_target_gradient():
    img = torch.randn(4, 8, requires_grad=True)
    txt = torch.randn(4, 8, requires_grad=True)
    rep = torch.randn(4, 8, requires_grad=True)
    soft_contrastive_loss(img, txt, 0.2, target_emb=rep).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0 and rep.grad is None


# ----------------------------------------------------------------------------- MC uncertainty

def test_mc_uncertainty_known_answers():
    p = torch.tensor([0.7, 0.2, 0.1])[:, None, None].expand(3, 4, 5)
    same = mc_uncertainty(p.unsqueeze(0).repeat(6, 1, 1, 1))
    h = -(p[:, 0, 0] * p[:, 0, 0].log()).sum()
    assert same["mean"].shape == (3, 4, 5) and same["entropy"].shape == (4, 5)
    assert torch.allclose(same["entropy"], h.expand(4, 5)) and torch.allclose(same["expected_entropy"], h.expand(4, 5))
    assert same["mutual_information"].abs().max() < 1e-6 and same["variance"].abs().max() < 1e-12
    # two confident, disagreeing samples: total = epistemic = log 2, no aleatoric part
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])[:, :, None]  # (N=2, K=2, 1)
    u = mc_uncertainty(a)
    assert torch.allclose(u["mean"], torch.full((2, 1), 0.5))
    assert u["entropy"].item() == pytest.approx(math.log(2))
    assert u["expected_entropy"].item() == pytest.approx(0.0, abs=1e-7)
    assert u["mutual_information"].item() == pytest.approx(math.log(2))
    assert torch.allclose(u["variance"], torch.full((2, 1), 0.25))
    # samples/batch/classes layout of mc_forward
    probs = torch.softmax(torch.randn(5, 2, 3, 4, 4), dim=2)
    v = mc_uncertainty(probs, class_dim=2)
    assert v["mean"].shape == (2, 3, 4, 4) and v["mutual_information"].shape == (2, 4, 4)
    assert (v["mutual_information"] > 0).all()
    assert torch.allclose(v["entropy"], v["expected_entropy"] + v["mutual_information"], atol=1e-6)


def test_uncertainty_accumulator_matches_stacked_formulas():
    """Streaming sums give the textbook stacked statistics (mean, entropy of the mean, mean entropy, variance)."""
    from nnunetv2_textseg.uncertainty import UncertaintyAccumulator
    probs = torch.softmax(3 * torch.randn(7, 3, 5, 6), dim=1)  # (N, K, H, W)
    acc = UncertaintyAccumulator(class_dim=0)
    for p in probs:
        acc.add(p)
    u = acc.result()
    mean = probs.mean(0)
    h = -(mean * mean.log()).sum(0)
    eh = -(probs * probs.log()).sum(1).mean(0)
    assert acc.n == 7
    torch.testing.assert_close(u["mean"], mean)
    torch.testing.assert_close(u["entropy"], h)
    torch.testing.assert_close(u["expected_entropy"], eh)
    torch.testing.assert_close(u["mutual_information"], (h - eh).clamp_min(0))
    torch.testing.assert_close(u["variance"], probs.var(0, unbiased=False), atol=1e-6, rtol=1e-4)
    with pytest.raises(ValueError, match="no member"):
        UncertaintyAccumulator().result()


# ----------------------------------------------------------------------------- network

@pytest.mark.parametrize("patch", [(64, 64), (48, 80)])
def test_network_ds_shapes_and_identity_at_init(patch):
    torch.manual_seed(0)
    unet = make_unet(2)
    net = MedCLIPSegNetwork(unet, TOK_DIM, width=32)
    assert net.adapter_stages == (2, 3) and net.decoder is unet.decoder and net.encoder is unet.encoder
    x = torch.randn(2, 2, *patch)
    tokens, mask = report(2, n_real=[3])
    net.train()
    seg = net(x, tokens, mask)
    assert isinstance(seg, list) and len(seg) == 3
    for i, o in enumerate(seg):
        assert o.shape == (2, NUM_CLASSES, patch[0] // 2 ** i, patch[1] // 2 ** i)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x, tokens, mask)[0], unet(x)[0], atol=1e-6)  # fresh net == planned U-Net
        net.decoder.deep_supervision = False
        out = net(x, tokens, mask)
    assert out.shape == (2, NUM_CLASSES, *patch)


@pytest.mark.integration  # full network backward pass, ~3 s CPU
def test_network_all_parameters_get_gradients():
    net = make_net(2)
    net.train()
    x = torch.randn(3, 2, 64, 64)
    tokens, mask = report(3, n_real=[2, 5, 4])
    drop = torch.tensor([True, False, False])
    out = net(x, tokens, mask, drop=drop, return_aux=True)
    assert isinstance(out, MedCLIPSegOutput)
    assert out.img_emb.shape == (3, 32) and out.txt_emb.shape == (3, 32) and out.report_emb.shape == (3, TOK_DIM)
    assert not out.report_emb.requires_grad
    target = torch.randint(0, NUM_CLASSES, (3, 64, 64))
    loss = seg_loss(out.seg, target) + soft_contrastive_loss(out.img_emb, out.txt_emb, 0.2, out.report_emb)
    loss.backward()
    missing = [n for n, p in net.named_parameters() if p.grad is None]
    assert not missing, missing
    zero = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
    assert not zero, zero
    # also without any dropped row (null report stays in the graph) and at the identity init
    net = make_net(2, perturb=False)
    out = net(x, tokens, mask, return_aux=True)
    (seg_loss(out.seg, target) + soft_contrastive_loss(out.img_emb, out.txt_emb)).backward()
    assert all(p.grad is not None for p in net.parameters())


@pytest.mark.integration  # many full forward passes, ~4.5 s CPU
def test_network_mean_path_deterministic_sampling_stochastic():
    net = make_net()
    x = torch.randn(2, 1, 64, 64)
    tokens, mask = report(2)
    net.eval()
    with torch.no_grad():
        a, b = net(x, tokens, mask)[0], net(x, tokens, mask)[0]
        assert torch.equal(a, b)
        s1, s2 = net(x, tokens, mask, sample=True)[0], net(x, tokens, mask, sample=True)[0]
        assert not torch.allclose(s1, s2)
        net.train()
        assert not torch.allclose(net(x, tokens, mask)[0], net(x, tokens, mask)[0])  # training samples


def test_network_deterministic_ablation():
    net = make_net(deterministic=True)
    assert not any("var" in n for n, _ in net.named_parameters())
    x = torch.randn(2, 1, 32, 32)
    tokens, mask = report(2)
    with torch.no_grad():
        assert torch.equal(net(x, tokens, mask, sample=True)[0], net(x, tokens, mask, sample=True)[0])
        u = mc_uncertainty(net.mc_forward(x, 3, tokens, mask), class_dim=2)
    assert u["mutual_information"].abs().max() < 1e-5


def test_set_text_broadcast_equals_per_sample_text():
    net = make_net().eval()
    x = torch.randn(3, 1, 64, 64)
    tokens, mask = report(1, n_real=[3])
    with torch.no_grad():
        per_sample = net(x, tokens.expand(3, -1, -1), mask.expand(3, -1))[0]
        net.set_text(tokens[0], mask[0])  # (L, D), (L,)
        broadcast = net(x)[0]
        net.set_text(tokens, mask)  # (1, L, D), (1, L)
        broadcast2 = net(x)[0]
    assert torch.allclose(per_sample, broadcast, atol=1e-5) and torch.allclose(per_sample, broadcast2, atol=1e-5)
    assert not any(k.startswith("_") for k in net.state_dict())
    net.set_text(None)
    with pytest.warns(UserWarning, match="null report"), torch.no_grad():
        null_out = net(x)[0]
    with torch.no_grad():
        assert not torch.allclose(null_out, per_sample)


def test_report_changes_logits_and_drop_means_null():
    net = make_net().eval()
    x = torch.randn(2, 1, 64, 64)
    t1, m1 = report(2, seed=1)
    t2, m2 = report(2, seed=2)
    with torch.no_grad():
        a = net(x, t1, m1)[0]
        b = net(x, t2, m2)[0]
        assert (a - b).abs().max() > 1e-4
        # padding content is ignored
        m = m1.clone()
        m[:, 3:] = False
        t1b = t1.clone()
        t1b[:, 3:] = 50.0
        assert torch.allclose(net(x, t1, m)[0], net(x, t1b, m)[0], atol=1e-5)
        # dropped row == null report; rows without real tokens == null report
        dropped = net(x, t1, m1, drop=torch.tensor([True, False]))[0]
        net.set_text(None)
        with pytest.warns(UserWarning):
            null = net(x)[0]
        assert torch.allclose(dropped[0], null[0], atol=1e-5) and torch.allclose(dropped[1], a[1], atol=1e-5)
        empty = m1.clone()
        empty[0] = False
        assert torch.allclose(net(x, t1, empty)[0][0], null[0], atol=1e-5)


def test_ignore_text_output_independent_of_text():
    net = make_net(ignore_text=True).eval()
    x = torch.randn(2, 1, 32, 48)
    t1, m1 = report(2, seed=1)
    t2, m2 = report(2, seed=2, n_real=[1, 2])
    with torch.no_grad():
        assert torch.equal(net(x, t1, m1)[0], net(x, t2, m2)[0])
        assert torch.equal(net(x, t1, m1)[0], net(x)[0])


def test_state_dict_round_trip():
    net = make_net(seed=0).eval()
    other = make_net(seed=7, perturb=False).eval()
    other.load_state_dict(net.state_dict())
    x = torch.randn(2, 1, 64, 64)
    tokens, mask = report(2)
    with torch.no_grad():
        assert torch.equal(net(x, tokens, mask)[0], other(x, tokens, mask)[0])
    assert "null_tokens" in net.state_dict() and any(k.startswith("unet.decoder.seg_layers") for k in net.state_dict())


def test_residual_encoder_unet():
    net = make_net(2, residual=True)
    assert net.encoder.stem is not None
    x = torch.randn(2, 2, 32, 48)
    tokens, mask = report(2, n_real=[2])
    net.train()
    out = net(x, tokens, mask, drop=torch.tensor([False, True]), return_aux=True)
    assert [o.shape[2:] for o in out.seg] == [(32, 48), (16, 24), (8, 12)]
    (seg_loss(out.seg, torch.randint(0, NUM_CLASSES, (2, 32, 48)))
     + soft_contrastive_loss(out.img_emb, out.txt_emb, 0.2, out.report_emb)).backward()
    assert all(p.grad is not None for p in net.parameters())
    fresh = MedCLIPSegNetwork(make_unet(2, residual=True), TOK_DIM, width=32).eval()
    with torch.no_grad():
        assert torch.allclose(fresh(x, tokens, mask)[0], fresh.unet(x)[0], atol=1e-6)


def test_mc_forward_shapes_and_uncertainty():
    net = make_net().eval()
    x = torch.randn(2, 1, 32, 48)
    tokens, mask = report(1)
    with torch.no_grad():
        probs = net.mc_forward(x, 4, tokens, mask)
        chunked = net.mc_forward(x, 3, tokens, mask, max_batch=4)
        net.set_text(tokens, mask)
        from_set = net.mc_forward(x, 2)
    assert probs.shape == (4, 2, NUM_CLASSES, 32, 48) and chunked.shape == (3, 2, NUM_CLASSES, 32, 48)
    assert from_set.shape == (2, 2, NUM_CLASSES, 32, 48)
    assert torch.allclose(probs.sum(2), torch.ones(4, 2, 32, 48), atol=1e-5)
    u = mc_uncertainty(probs, class_dim=2)
    assert u["mutual_information"].max() > 0 and u["mean"].shape == (2, NUM_CLASSES, 32, 48)
    assert not net.training


def test_adapter_stage_selection_and_3d():
    torch.manual_seed(0)
    net = MedCLIPSegNetwork(make_unet(), TOK_DIM, adapter_stages=[1, -1], width=16, heads=2)
    assert net.adapter_stages == (1, 3) and set(net.adapters) == {"1", "3"}
    assert net.adapters["1"].txt_down.in_features == TOK_DIM and net.adapters["3"].txt_down.in_features == 16
    with pytest.raises(ValueError):
        MedCLIPSegNetwork(make_unet(), TOK_DIM, adapter_stages=[4])
    torch.manual_seed(0)
    unet3d = make_unet(1, features=(4, 8, 16), conv=nn.Conv3d, norm=nn.InstanceNorm3d)
    net3d = MedCLIPSegNetwork(unet3d, TOK_DIM, width=16, heads=2)
    perturb_init(net3d)
    tokens, mask = report(2)
    seg = net3d(torch.randn(2, 1, 16, 16, 24), tokens, mask)
    assert [tuple(o.shape) for o in seg] == [(2, NUM_CLASSES, 16, 16, 24), (2, NUM_CLASSES, 8, 8, 12)]
    with pytest.raises(TypeError):
        MedCLIPSegNetwork(nn.Conv2d(1, 1, 1), TOK_DIM)


def test_fourier_position_features_make_zones_linear():
    from nnunetv2_textseg.building_blocks.medclipseg import fourier_position_features
    from nnunetv2_textseg.patient_frame import position_channels
    pos = torch.from_numpy(position_channels((8, 8)))[None]  # (1, 3, 8, 8): rows, columns, inside
    feats = fourier_position_features(pos)
    assert feats.shape == (1, 13, 8, 8)
    torch.testing.assert_close(feats[:, 0], torch.sin(torch.pi * pos[:, 0]))  # f = 1, rows
    torch.testing.assert_close(feats[:, 3], torch.cos(torch.pi * pos[:, 1]))  # f = 1, columns
    torch.testing.assert_close(feats[:, -1], pos[:, 2])  # the inside flag as it is
    # "upper half" vs "lower half" is one sign of the f = 1 row sine: linear in the features
    assert (feats[0, 0, :4] < 0).all() and (feats[0, 0, 4:] > 0).all()


def test_adapter_position_steers_the_tokens_and_keeps_the_identity_at_init():
    """With ``adapter_position`` a fresh network is still the planned U-Net; once trained (perturbed), the same
    features and report give other outputs at another patient-frame position, and pos_down gets a gradient. A
    position-aware adapter called without positions is refused."""
    from nnunetv2_textseg.patient_frame import with_position_channels
    torch.manual_seed(0)
    unet = make_unet(1 + 3)
    net = MedCLIPSegNetwork(unet, TOK_DIM, width=32, position_channels=3, adapter_position=True)
    x = torch.stack([with_position_channels(torch.randn(1, 64, 64)) for _ in range(2)])
    tokens, mask = report(2)
    net.eval()
    with torch.no_grad():
        assert torch.allclose(net(x, tokens, mask)[0], unet(x)[0], atol=1e-6)
    perturb_init(net)
    adapter = net.adapters[str(net.adapter_stages[0])]  # the one that reads the encoder's token width
    feat = torch.randn(2, adapter.img_down.in_features, 4, 4)
    here = torch.randn(2, adapter.pos_down.in_features, 4, 4)
    a, _ = adapter(feat, tokens, mask, position=here)
    b, _ = adapter(feat, tokens, mask, position=here.flip(-1))
    assert not torch.allclose(a, b)
    net.train()
    net(x, tokens, mask)[0].sum().backward()
    assert all(a.pos_down.weight.grad.abs().sum() > 0 for a in net.adapters.values())
    with pytest.raises(ValueError, match="position"):
        adapter(feat, tokens, mask)
    with pytest.raises(ValueError, match="position_channels"):
        MedCLIPSegNetwork(make_unet(1), TOK_DIM, adapter_position=True)
