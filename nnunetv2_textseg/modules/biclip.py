"""BiCLIP building blocks: text projection, image encoder, bidirectional fusion (BMF), pseudo-image
generator, image-to-text head and the IAC projection head.

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
    """Decodes a text embedding (B, D = side²) to a one-channel pseudo-image (B, 1, H, W).

    As in EF-UNet, the D-dim embedding is read as a side×side map (784 = 28×28) and upsampled by
    two transposed convolutions (×4); the result is resized to the patch size, so any planned
    (also non-square) patch works.
    """

    def __init__(self, text_dim: int = 784, width: int = 32):
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

    def forward(self, t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.decoder(t.view(-1, 1, self.side, self.side))
        return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class ImageToTextHead(nn.Module):
    """h: pseudo-image (B, 1, H, W) -> reconstructed text embedding t̂ (B, D), for the cycle loss."""

    def __init__(self, text_dim: int = 784, width: int = 16, depth: int = 3):
        super().__init__()
        self.encoder = GlobalImageEncoder(1, text_dim, width, depth)

    def forward(self, pseudo: torch.Tensor) -> torch.Tensor:
        return self.encoder(pseudo)


class ProjectionHead(nn.Module):
    """IAC head: pooled U-Net features (B, C) -> projection p (B, P)."""

    def __init__(self, in_dim: int, out_dim: int = 128, hidden: int = 256):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, out_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


def cycle_loss(t: torch.Tensor, t_hat: torch.Tensor) -> torch.Tensor:
    """‖t − t̂‖², averaged over batch and dimensions (0 iff identical)."""
    return F.mse_loss(t_hat, t)


def consistency_loss(p_weak: torch.Tensor, p_strong: torch.Tensor) -> torch.Tensor:
    """IAC: 1 − cos(p_w, p_s), averaged over the batch (0 for identical directions)."""
    return (1 - F.cosine_similarity(p_weak, p_strong, dim=1, eps=1e-6)).mean()


def generation_loss(pseudo: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """L1 between the pseudo-image and its reference (e.g. the image masked by the lesion)."""
    return F.l1_loss(pseudo, reference)
