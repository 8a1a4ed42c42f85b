"""BiCLIP building blocks: text pooling and projection, image encoder, bidirectional fusion (BMF),
pseudo-image generator, image-to-text head and the IAC projection head (its losses: :mod:`nnunetv2_textseg.losses`).

All modules are plain ``nn.Module``s configured by constructor arguments; 2D only (the dimension
of nnU-Net's ``2d`` configuration). Shapes use B = batch, D = text width, H×W = patch size.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TextProjection(nn.Module):
    """Frozen-encoder embedding (B, D_in) -> compact text embedding t (B, D)."""

    def __init__(self, in_dim: int, out_dim: int = 784, hidden: int = 512):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tokens (B, L, D), mask (B, L) bool -> (B, D): the mean over real tokens (the encoder's mean pooling)."""
    w = mask.to(tokens.dtype).unsqueeze(-1)
    return (tokens * w).sum(1) / w.sum(1).clamp_min(1)


class MeanPoolText(nn.Module):
    """Token embeddings (B, L, D_in) + mask -> t (B, D): masked mean, then :class:`TextProjection`.

    The paper's text vector. Reports that differ only in location words ("upper left" vs "upper right")
    give nearly the same mean (cosine ~0.99 for all-MiniLM-L6-v2), so location barely reaches ``t``."""

    def __init__(self, in_dim: int, out_dim: int = 784, hidden: int = 512):
        super().__init__()
        self.projection = TextProjection(in_dim, out_dim, hidden)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.projection(masked_mean(tokens, mask))


class AttentionPoolText(nn.Module):
    """Token embeddings (B, L, D_in) + mask (B, L) -> t (B, D) by attention pooling.

    ``queries`` learned queries each attend over the (layer-normed) tokens and pick out what they need —
    e.g. one the side, one the zone — so location words stand out instead of being averaged away with
    the rest of the report. The queries' outputs are concatenated and projected to D."""

    def __init__(self, in_dim: int, out_dim: int = 784, queries: int = 8, width: int = 64, hidden: int = 512):
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.keys = nn.Linear(in_dim, width)
        self.values = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(queries, width) / width ** 0.5)
        self.out = nn.Sequential(nn.LayerNorm(queries * width), nn.Linear(queries * width, hidden), nn.GELU(),
                                 nn.Linear(hidden, out_dim))
        self.scale = width ** -0.5

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm(tokens)
        k, v = self.keys(h), self.values(h)  # (B, L, w)
        scores = torch.einsum("qw,blw->bql", self.queries, k) * self.scale
        scores = scores.masked_fill(~mask[:, None, :], torch.finfo(scores.dtype).min)
        pooled = torch.einsum("bql,blw->bqw", scores.softmax(-1), v)  # (B, Q, w)
        return self.out(pooled.flatten(1))


class TokenZoneMaps(nn.Module):
    """Token embeddings (B, L, D_in) + mask (B, L) -> whole-image lesion map logits (B, 1, S, S): every token
    draws its own zone-scale map, and the maps are united by noisy-OR, p = 1 − Π_l (1 − p_l).

    Why per token: a pooled report vector must hold *all* its findings in one vector, so "upper left and lower
    right" and "upper right and lower left" differ by a sliver (pooled cosine ~0.99) and the generator has to
    learn to bind side to level from a few cases. With per-token maps a report with two findings is the union of
    two maps, and every labelled case teaches each of its phrases. Tokens that say nothing about place (they occur
    in every report) learn empty maps: noisy-OR punishes a token that lights up where lesions are absent.

    ``window`` > 1: each token's map is drawn from the ``window`` tokens around it (a masked 1D convolution over
    the sequence), so "lower", "left" and "lung" of "lower left lung" draw one map together. Why: with
    ``window`` = 1 the union lets "lower" learn both lower zones and "left" the whole left lung — the contextual
    embedding of "lower" barely says which side it goes with — and the side is lost (measured: trained alone on 20
    cases, maps for unilateral reports put no more on the named side than on the other, 59 % of cases right;
    with a window of 5, 98 %)."""

    def __init__(self, in_dim: int, side: int = 16, rank: int | None = None, out_bias: float = -5.0, window: int = 1):
        super().__init__()
        if window < 1 or window % 2 == 0:
            raise ValueError(f"window must be an odd number of tokens (1, 3, 5, ...), got {window}")
        # default rank: 64 for one token; a window reads more, so 128 (measured with the pathway trained alone: rank
        # 128 kept the side on both development datasets, 64 on one)
        rank = rank if rank is not None else (64 if window == 1 else 128)
        self.side = side
        self.window = window
        self.norm = nn.LayerNorm(in_dim)
        first = nn.Linear(in_dim, rank) if window == 1 else nn.Conv1d(in_dim, rank, window, padding=window // 2)
        self.decoder = nn.Sequential(first, nn.GELU(), nn.Linear(rank, side * side))
        # each token starts nearly empty (sigmoid(-5) ~ 0.007), so the union starts near the empty map
        nn.init.constant_(self.decoder[-1].bias, out_bias)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        weight = mask[..., None].to(tokens.dtype)
        h = self.norm(tokens)
        if self.window == 1:
            h = self.decoder[0](h)
        else:  # padding tokens are zeroed, so a window never reads past the report's end
            h = self.decoder[0]((h * weight).transpose(1, 2)).transpose(1, 2)
        logits = self.decoder[2](self.decoder[1](h))  # (B, L, S²)
        log_absent = (F.logsigmoid(-logits) * weight).sum(1)  # log Π (1 − p_l)
        return absent_to_logits(log_absent).view(-1, 1, self.side, self.side)


def absent_to_logits(log_absent: torch.Tensor) -> torch.Tensor:
    """log P(no lesion) (≤ 0) -> logit of P(lesion) = log(1 − e^s) − s, stable near s = 0."""
    s = log_absent.clamp(max=-1e-6)
    return torch.log(-torch.expm1(s)) - s


def noisy_or_logits(*logits: torch.Tensor) -> torch.Tensor:
    """Logits of independent causes -> logit of their union, 1 − Π (1 − p_k)."""
    return absent_to_logits(sum(F.logsigmoid(-z) for z in logits))


def gated_logits(report_logits: torch.Tensor, gate_logits: torch.Tensor) -> torch.Tensor:
    """Logit of σ(report) · σ(gate): the report's probability, kept only where the gate allows it (stable in
    log space: logit(e^s) = −logit(1 − e^s) with s = log σ(a) + log σ(b))."""
    return -absent_to_logits(F.logsigmoid(report_logits) + F.logsigmoid(gate_logits))


def _conv_block(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.InstanceNorm2d(cout, affine=True),
                         nn.LeakyReLU(0.01, inplace=True))


class GlobalImageEncoder(nn.Module):
    """Light CNN: image (B, C, H, W) -> global embedding i (B, E). Works for any H, W (small inputs are upsampled)."""

    def __init__(self, in_channels: int, out_dim: int = 128, width: int = 16, depth: int = 4):
        super().__init__()
        layers, c = [], in_channels
        for d in range(depth):
            layers.append(_conv_block(c, width * 2 ** d, stride=2))
            c = width * 2 ** d
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, out_dim)
        self.depth = depth

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # `depth` stride-2 convolutions: instance norm needs > 1 spatial element after the last one,
        # i.e. max(H, W) > 2**depth; smaller inputs (e.g. 8x8, 16x16) are upsampled first.
        if max(x.shape[2:]) <= 2 ** self.depth:
            f = 2 ** self.depth // max(x.shape[2:]) + 1
            x = F.interpolate(x, scale_factor=f, mode="bilinear", align_corners=False)
        return self.head(self.features(x).mean(dim=(2, 3)))


class AnatomyGate(nn.Module):
    """Image and patient-frame position (B, C, H, W) -> gate logits (B, 1, H, W): where on *this* image a lesion
    the report names can lie. The report's map p is then p · σ(gate) (:func:`gated_logits`).

    Why: the report's map is drawn in the patient frame from the text alone, so "lower left zone" lands on the
    average patient's lower left lung, blurred over every patient's. Measured with oracle maps (README, "What a
    perfect reader could hand the U-Net"): the named zones drawn on the case's own lungs gave plain nnU-Net
    +0.075 Dice on the benchmark's clean images, the same zones on the average lung +0.048. The gate lets the
    image say where the zone is *not* (outside this patient's lungs, say) while the report alone says where it
    is: it can only lower the map, never light up what the report does not name.

    Computed at 1/4 resolution (two stride-2 convolutions) and upsampled bilinearly: it follows the anatomy, not
    the lesion's outline, which stays the U-Net's to draw. Its last convolution starts at zero weights and a
    bias of ``out_bias`` (σ(4) ≈ 0.98): training starts from the text-only map."""

    def __init__(self, in_channels: int, width: int = 16, out_bias: float = 4.0):
        super().__init__()
        self.features = nn.Sequential(_conv_block(in_channels, width, stride=2),
                                      _conv_block(width, 2 * width, stride=2),
                                      _conv_block(2 * width, 2 * width))
        self.out = nn.Conv2d(2 * width, 1, 3, 1, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.constant_(self.out.bias, out_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = tuple(x.shape[2:])
        # instance norm needs > 1 spatial element after the two stride-2 stages: upsample tiny inputs first
        if min(size) < 8:
            x = F.interpolate(x, size=(max(8, size[0]), max(8, size[1])), mode="bilinear", align_corners=False)
        return F.interpolate(self.out(self.features(x)), size=size, mode="bilinear", align_corners=False)


class BidirectionalFusion(nn.Module):
    """BMF text refinement: Δt = g([t; i]), t' = t + Δt.

    The last layer starts at zero so that training begins from t' = t (the text as reported) and
    the image only moves it once that helps.
    """

    def __init__(self, text_dim: int, image_dim: int, hidden: int = 512):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(text_dim + image_dim, hidden), nn.GELU(), nn.Linear(hidden, text_dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, t: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """t: (B, D), i: (B, E) -> t': (B, D)"""
        return t + self.mlp(torch.cat([t, i], dim=1))


class PseudoImageGenerator(nn.Module):
    """Decodes a text embedding (B, D = side²) to a one-channel pseudo-image (B, 1, 4·side, 4·side).

    As in EF-UNet, the D-dim embedding is read as a side×side map (784 = 28×28) and upsampled by
    two transposed convolutions (×4). Without ``size`` the native map is returned (BiCLIP reads it as the
    whole patient image, see :mod:`nnunetv2_textseg.patient_frame`); with ``size`` it is resized.
    ``out_bias`` initialises the output (e.g. a negative logit: lesions are rare).
    """

    def __init__(self, text_dim: int = 784, width: int = 32, out_bias: float = 0.0):
        super().__init__()
        side = int(round(text_dim ** 0.5))
        if side * side != text_dim:
            raise ValueError(f"text_dim must be a square number (e.g. 784 = 28²), got {text_dim}")
        self.side = side
        self.decoder = nn.Sequential(
            _conv_block(1, width),
            nn.ConvTranspose2d(width, width, 2, 2), nn.LeakyReLU(0.01, inplace=True),
            nn.ConvTranspose2d(width, width // 2, 2, 2), nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(width // 2, 1, 3, 1, 1),
        )
        nn.init.constant_(self.decoder[-1].bias, out_bias)

    def forward(self, t: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        x = self.decoder(t.view(-1, 1, self.side, self.side))
        return x if size is None else F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ImageToTextHead(nn.Module):
    """h: pseudo-image (B, 1, H, W) -> reconstructed text embedding t̂ (B, D), for the cycle loss.

    Keeps the spatial layout: strided convolutions down to a ``grid``×``grid`` map that is flattened
    (not averaged) into t̂, so *where* the pseudo-image is bright is what must carry the report back."""

    def __init__(self, text_dim: int = 784, width: int = 16, depth: int = 3, grid: int = 7):
        super().__init__()
        layers, c = [], 1
        for d in range(depth):
            layers.append(_conv_block(c, width * 2 ** d, stride=2))
            c = width * 2 ** d
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(grid))
        self.head = nn.Linear(c * grid * grid, text_dim)
        self.depth = depth

    def forward(self, pseudo: torch.Tensor) -> torch.Tensor:
        # instance norm needs > 1 spatial element after the last stride-2 stage: upsample small maps first
        if min(pseudo.shape[2:]) <= 2 ** self.depth:
            f = 2 ** self.depth // min(pseudo.shape[2:]) + 1
            pseudo = F.interpolate(pseudo, scale_factor=f, mode="bilinear", align_corners=False)
        return self.head(self.features(pseudo).flatten(1))


class ProjectionHead(nn.Module):
    """IAC head: pooled U-Net features (B, C) -> projection p (B, P)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class MapLogitPrior(nn.Module):
    """Segmentation logits + the report map's log-odds: ``logits_c + w_c · logit(p)`` per output channel c.

    Why: fed only as an input channel, a zone-scale map is something the U-Net may learn to use; with few
    labelled images it fits them from the image first and then has no reason left to read the map (measured:
    images larger than the patch, no report cost 0.001 Dice). Added to the output, the map *is* part of the
    prediction from the first step — a prior the U-Net corrects from the image, as Bayes' rule combines
    p(lesion | report) with the image's evidence — and a learned weight per channel (``w``) says how far it is
    trusted. The U-Net still gets the map as an input channel too.

    Args:
        channels: output channels of the segmentation head (classes or regions).
        weight: initial ``w`` for every channel (the trainer zeroes the background class's).
        floor: p is clamped to [floor, 1 − floor], so the prior's log-odds stay within ±logit(1 − floor).

    Shapes: logits (B, K, h, w) or a deep-supervision list of them at decreasing resolution (h ≤ H, w ≤ W);
    p (B, 1, H, W) in [0, 1], its log-odds area-pooled to each output's size.
    """

    def __init__(self, channels: int, weight: float = 1.0, floor: float = 0.02):
        super().__init__()
        if not 0 < floor < 0.5:
            raise ValueError(f"floor must lie in (0, 0.5), got {floor}")
        self.weight = nn.Parameter(torch.full((channels,), float(weight)))
        self.floor = floor

    def log_odds(self, p: torch.Tensor) -> torch.Tensor:
        return torch.logit(p, eps=self.floor)  # p clamped to [floor, 1 − floor] first

    def forward(self, logits: torch.Tensor | list[torch.Tensor], p: torch.Tensor
                ) -> torch.Tensor | list[torch.Tensor]:
        z = self.log_odds(p.float())
        outputs = logits if isinstance(logits, (list, tuple)) else [logits]
        shifted = []
        for out in outputs:
            size = tuple(out.shape[2:])  # a U-Net's outputs are never larger than its input
            zs = z if tuple(z.shape[2:]) == size else F.adaptive_avg_pool2d(z, size)
            shifted.append(out + (self.weight.view(1, -1, 1, 1) * zs).to(out.dtype))
        return shifted if isinstance(logits, (list, tuple)) else shifted[0]


class DeepMapInjection(nn.Module):
    """Adds the report's map to a deep encoder stage's features: ``feat + conv1x1(pool(m))``, ``m`` the map as the
    U-Net's input channel carries it ((p − 0.5) / 0.25), area-pooled to the stage's grid.

    Why: as an input channel the map meets the image at full resolution, where the first convolutions learn local
    intensity features from the few labelled images; zone-scale words ("lower left") concern the coarse grids of the
    deepest stages, where MedCLIPSeg's report enters. The convolution starts at zero: a fresh network computes what
    it did without the injection, and learns how far to lean on the map.

    Args:
        channels: the stage's output channels.
        conv_op: nn.Conv2d (or nn.Conv3d).

    Shapes: feat (B, C, *grid), m (B, 1, *spatial) with every grid side dividing the map's -> (B, C, *grid).
    """

    def __init__(self, channels: int, conv_op: type[nn.Module] = nn.Conv2d):
        super().__init__()
        self.proj = conv_op(1, channels, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, feat: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        pool = F.adaptive_avg_pool2d if feat.ndim == 4 else F.adaptive_avg_pool3d
        return feat + self.proj(pool(m.to(feat.dtype), feat.shape[2:]))
