"""BiCLIPNetwork: nnU-Net's planned U-Net with one extra input channel, the report's pseudo-image.

Every BiCLIP module lives in this one ``nn.Module``, so nnU-Net's checkpoints, ``--c`` resume,
``torch.compile`` and DDP cover them without special cases. nnU-Net's predictor calls
``network(x)`` once per sliding-window tile and has no way to pass a report, so the report of the
case being predicted is set beforehand with :meth:`BiCLIPNetwork.set_text`; with no text set, the
learned null report is used (the same one report dropout trains).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import nn

from nnunetv2_textseg.modules.biclip import (BidirectionalFusion, GlobalImageEncoder, ImageToTextHead,
                                             ProjectionHead, PseudoImageGenerator, TextProjection)


@dataclass
class BiCLIPOutput:
    """What one training forward pass returns besides the segmentation."""
    seg: torch.Tensor | list[torch.Tensor]
    pseudo: torch.Tensor  # (B, 1, H, W)
    t: torch.Tensor  # projected text (B, D)
    t_hat: torch.Tensor | None  # reconstructed from the pseudo-image (B, D)
    p_weak: torch.Tensor | None  # IAC projections (B, P)
    p_strong: torch.Tensor | None


class PlannedUNetWrapper(nn.Module):
    """A module around nnU-Net's planned U-Net (``self.unet``). nnU-Net toggles deep supervision through
    ``network.decoder.deep_supervision``, so the wrapper exposes the U-Net's decoder (and encoder)."""

    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.unet.encoder


class BiCLIPNetwork(PlannedUNetWrapper):
    """Text-conditioned U-Net.

    Args:
        unet: nnU-Net's planned U-Net (dynamic-network-architectures), built with
            ``image_channels + 1`` input channels; must expose ``encoder`` and ``decoder``.
        image_channels: channels of the real image (C).
        text_in_dim: width of the frozen encoder's pooled embedding (e.g. 384 for MiniLM).
        text_dim: compact text width D (a square number; 784 = 28² as in EF-UNet).
        bidirectional: BMF refinement t' = t + g([t; i]); False gives the LViT-style
            unidirectional baseline (text conditions vision, no image-to-text refinement).
        cycle: build the image-to-text head for the cycle loss.
        iac: build the IAC projection head.
        ignore_text: always use the null report (the _noText ablation: same network, no report).
    """

    text_input = "pooled"  # what set_text expects: one pooled report embedding per case

    def __init__(self, unet: nn.Module, image_channels: int, text_in_dim: int, text_dim: int = 784,
                 image_dim: int = 128, bidirectional: bool = True, cycle: bool = True, iac: bool = True,
                 ignore_text: bool = False):
        super().__init__()
        if not (hasattr(unet, "encoder") and hasattr(unet, "decoder")):
            raise TypeError(f"{type(unet).__name__} has no encoder/decoder; BiCLIP needs a "
                            f"dynamic-network-architectures U-Net (PlainConvUNet, ResidualEncoderUNet).")
        self.unet = unet
        self.image_channels = image_channels
        self.text_projection = TextProjection(text_in_dim, text_dim)
        # The learned "no report" embedding lives in the encoder's space so it passes the same projection.
        self.null_text = nn.Parameter(torch.zeros(text_in_dim))
        self.image_encoder = GlobalImageEncoder(image_channels, image_dim) if bidirectional else None
        self.fusion = BidirectionalFusion(text_dim, image_dim) if bidirectional else None
        self.generator = PseudoImageGenerator(text_dim)
        self.image_to_text = ImageToTextHead(text_dim) if cycle else None
        self.iac_head = ProjectionHead(unet.encoder.output_channels[-1]) if iac else None
        self.ignore_text = ignore_text
        self._text: torch.Tensor | None = None  # set per case at inference; not part of the state dict
        self._warned_null = False

    def set_text(self, text: torch.Tensor | None) -> None:
        """Report embedding(s) used by the next plain ``forward(x)`` calls: (D_in,) or (1, D_in) for one
        case (broadcast over tiles), or None for the learned null report."""
        self._text = None if text is None else text.reshape(1, -1) if text.ndim == 1 else text

    def text_embedding(self, text: torch.Tensor | None, batch: int, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Projected text t (B, D); rows with ``drop`` True (or all, if text is None) use the null report."""
        null = self.null_text.unsqueeze(0).expand(batch, -1)
        if self.ignore_text and text is not None:
            drop = torch.ones(batch, dtype=torch.bool, device=null.device)
        if text is None:
            raw = null
        else:
            raw = text.to(null.dtype).expand(batch, -1) if text.shape[0] == 1 else text.to(null.dtype)
            if drop is not None:
                # torch.where keeps both branches in the graph: every parameter gets a gradient each
                # step (DDP with find_unused_parameters=False requires it).
                raw = torch.where(drop[:, None], null, raw)
            else:
                raw = raw + 0 * null  # same reason: null_text stays in the graph
        return self.text_projection(raw)

    def pseudo_image(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """BMF: refine t with the image's global embedding and decode it to (B, 1, H, W)."""
        if self.fusion is not None:
            t = self.fusion(t, self.image_encoder(x))
        return self.generator(t, x.shape[2:])

    def forward(self, x: torch.Tensor, text: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                x_strong: torch.Tensor | None = None, return_aux: bool = False):
        """x: (B, C, H, W) image; text: (B or 1, D_in) pooled report embedding (default: the one set with
        ``set_text``, else the null report). Returns the U-Net output (a list with deep supervision),
        or a :class:`BiCLIPOutput` with ``return_aux``. ``x_strong`` is the strongly augmented view for IAC:
        it shares the pseudo-image and only passes the U-Net encoder (its decoder output is unused)."""
        if text is None:
            text = self._text
            if text is None and not self.training and not self._warned_null:
                warnings.warn("BiCLIPNetwork: no report set, predicting with the learned null report. "
                              "Use nnUNetv2_textseg_predict to give each case its report.")
                self._warned_null = True
        if text is not None:
            text = text.to(x.device)
        t = self.text_embedding(text, x.shape[0], drop)
        pseudo = self.pseudo_image(x, t)
        skips = self.unet.encoder(torch.cat([x, pseudo.to(x.dtype)], dim=1))
        seg = self.unet.decoder(skips)
        if not return_aux:
            return seg
        t_hat = self.image_to_text(pseudo) if self.image_to_text is not None else None
        p_weak = p_strong = None
        if self.iac_head is not None and x_strong is not None:
            strong_bottleneck = self.unet.encoder(torch.cat([x_strong, pseudo.to(x.dtype)], dim=1))[-1]
            p_weak = self.iac_head(skips[-1].mean(dim=(2, 3)))
            p_strong = self.iac_head(strong_bottleneck.mean(dim=(2, 3)))
        return BiCLIPOutput(seg, pseudo, t, t_hat, p_weak, p_strong)
