"""MedCLIPSegNetwork: nnU-Net's planned U-Net with MedCLIPSeg cross-modal adapters in its encoder.

The U-Net keeps its planned input channels (no extra channel). Its encoder is run stage by stage;
after each chosen stage a :class:`~nnunetv2_textseg.building_blocks.medclipseg.CrossModalAdapter` lets the
stage's feature map and the report's token embeddings attend to each other (probabilistic
cross-attention), and the updated map is both the skip and the next stage's input. The text tokens
are carried from adapter to adapter (width ``width`` after the first one).

Decoder conditioning (choice): the final fused text tokens, pooled over real tokens, predict a
per-class scale and bias for the logits, ``logit_k · (1 + γ_k(t)) + δ_k(t)``, applied identically to
every deep-supervision output. Why this and not FiLM of decoder features or a pixel·text dot
product (the reference's mask head): the spatial text guidance already reaches the decoder through
the adapted bottleneck/deep skips, which the whole upsampling path consumes; a logit-level affine
adds the global, report-driven prior ("no effusion" -> lower foreground) without hooks, without
re-implementing ``UNetDecoder.forward`` and without changing the U-Net's state-dict keys, so any
dynamic-network-architectures decoder that returns logits works and all deep-supervision outputs
stay consistent. The affine is zero-initialised and every adapter starts as the identity, so a
fresh network computes exactly the planned U-Net.

nnU-Net's predictor calls ``network(x)`` per sliding-window tile with no side input; set the case's
report with :meth:`MedCLIPSegNetwork.set_text` first (without one, the learned null report is used).
In eval the mean path (V = V_μ) runs, so tiles are deterministic; :meth:`MedCLIPSegNetwork.mc_forward`
samples for uncertainty (:func:`~nnunetv2_textseg.uncertainty.mc_uncertainty`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nnunetv2_textseg.architectures.base import TextConditionedNetwork
from nnunetv2_textseg.patient_frame import ensure_position_channels
from nnunetv2_textseg.building_blocks.biclip import masked_mean
from nnunetv2_textseg.building_blocks.medclipseg import (FOURIER_POSITION_FEATURES, CrossModalAdapter, film_logits,
                                                         fourier_position_features, tokens_or_null_report)


@dataclass
class MedCLIPSegOutput:
    """What a ``return_aux`` forward pass returns.

    For the contrastive loss use ``soft_contrastive_loss(img_emb, txt_emb, tau, target_emb=report_emb)``.
    """
    seg: torch.Tensor | list[torch.Tensor]
    img_emb: torch.Tensor  # (B, width): projected mean-pooled bottleneck (after its adapter, if any)
    txt_emb: torch.Tensor  # (B, width): projected mean of the fused text tokens (real tokens only)
    report_emb: torch.Tensor  # (B, D): mean of the input report tokens (null report where dropped); no grad


class MedCLIPSegNetwork(TextConditionedNetwork):
    """Text-conditioned U-Net after MedCLIPSeg.

    Args:
        unet: nnU-Net's planned U-Net (dynamic-network-architectures ``PlainConvUNet`` or
            ``ResidualEncoderUNet``), built with the image's channel count.
        text_token_dim: width D of the frozen text encoder's token embeddings.
        adapter_stages: encoder stages (0-based, negative allowed) followed by an adapter;
            default the last two (small token counts).
        width: adapter width d.
        heads: attention heads (``width`` must be divisible by it).
        beta: key-uncertainty penalty weight β.
        deterministic: plain (non-probabilistic) attention, the ``_noProb`` ablation.
        ignore_text: always use the null report (the ``_noText`` ablation).
        position_channels: patient-frame position channels at the end of the input (0: none).
        adapter_position: each adapter's image tokens also get their patient-frame position (Fourier features of
            the position channels averaged over the token's cell), so the attention can bind a report's place
            words to where a token lies. Needs ``position_channels``.
    """

    text_input = "tokens"  # what set_text expects: token embeddings + mask (the predictor checks this)

    def __init__(self, unet: nn.Module, text_token_dim: int, adapter_stages: Sequence[int] | None = None,
                 width: int = 64, heads: int = 4, beta: float = 2.35, deterministic: bool = False,
                 ignore_text: bool = False, position_channels: int = 0, adapter_position: bool = False):
        super().__init__()
        if adapter_position and not position_channels:
            raise ValueError("adapter_position reads the patient-frame position channels: set position_channels")
        self.position_channels = position_channels  # patient-frame channels at the end of the input (0: none)
        self.adapter_position = adapter_position
        self.input_channels = next(m.in_channels for m in unet.modules() if isinstance(m, nn.modules.conv._ConvNd))
        self.sample_at_inference = False  # Monte-Carlo prediction: sample attention values in eval too
        enc = getattr(unet, "encoder", None)
        if enc is None or not hasattr(unet, "decoder") or not hasattr(enc, "stages"):
            raise TypeError(f"{type(unet).__name__} has no encoder.stages/decoder; MedCLIPSeg needs a "
                            f"dynamic-network-architectures U-Net (PlainConvUNet, ResidualEncoderUNet).")
        self.unet = unet
        n = len(enc.stages)
        stages = [n - 2, n - 1] if adapter_stages is None else list(adapter_stages)
        stages = sorted({s % n if -n <= s < n else _bad_stage(s, n) for s in stages})
        self.adapter_stages = tuple(stages)
        self.adapters = nn.ModuleDict()
        txt_dim = text_token_dim
        for s in stages:
            self.adapters[str(s)] = CrossModalAdapter(
                enc.output_channels[s], txt_dim, width, heads, beta, deterministic,
                position_dim=FOURIER_POSITION_FEATURES if adapter_position else 0)
            txt_dim = width
        self.text_width = txt_dim  # width of the fused text tokens (D if there are no adapters)
        self.num_classes = unet.decoder.num_classes
        self.null_tokens = nn.Parameter(torch.zeros(1, 1, text_token_dim))
        self.logit_film = nn.Linear(txt_dim, 2 * self.num_classes)
        nn.init.zeros_(self.logit_film.weight)
        nn.init.zeros_(self.logit_film.bias)
        self.img_proj = nn.Linear(enc.output_channels[-1], width)
        self.txt_proj = nn.Linear(txt_dim, width)
        self.text_token_dim = text_token_dim
        self.deterministic = deterministic
        self.ignore_text = ignore_text
        self._tokens: torch.Tensor | None = None  # set per case at inference; not in the state dict
        self._mask: torch.Tensor | None = None
        self._warned_null = False

    @property
    def can_sample(self) -> bool:
        return not self.deterministic

    def set_sampling(self, on: bool) -> None:
        super().set_sampling(on)
        self.sample_at_inference = bool(on)

    def set_text(self, tokens: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        """Report used by the next ``forward(x)`` calls without tokens: tokens (L, D) or (1, L, D) (broadcast
        over tiles) or (B, L, D); mask (L,) / (1, L) / (B, L) bool, True = real token (default: all real).
        None: the learned null report."""
        if tokens is None:
            self._tokens = self._mask = None
            return
        tokens = tokens.unsqueeze(0) if tokens.ndim == 2 else tokens
        if mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        self._tokens, self._mask = tokens, (mask.unsqueeze(0) if mask.ndim == 1 else mask).to(torch.bool)

    def prepare_text(self, tokens: torch.Tensor | None, mask: torch.Tensor | None, batch: int,
                     drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Report tokens (B, L, D) and mask (B, L) with the null report (one real token) in rows that are
        dropped, have no real token, or all rows if tokens is None / ``ignore_text``."""
        return tokens_or_null_report(self.null_tokens, tokens, mask, batch, drop, self.ignore_text)

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, sample: bool | None = None, return_aux: bool = False):
        """x: (B, C, *spatial) image; tokens (B or 1, L, D) report token embeddings, mask (B or 1, L) bool
        (True = real token) (default: the report set with ``set_text``, else the null report); drop (B,)
        bool: rows that use the null report (report dropout); sample: sample the attention values
        (default: in training only). Returns the U-Net output (a list with deep supervision), or a
        :class:`MedCLIPSegOutput` with ``return_aux``."""
        tokens, mask = self.report_for_forward(tokens, mask)
        sample = (self.training or self.sample_at_inference) if sample is None else bool(sample)
        txt, txt_mask = self.prepare_text(tokens, mask, x.shape[0], drop)
        report_emb = masked_mean(txt.detach(), txt_mask) if return_aux else None

        enc = self.unet.encoder
        if self.position_channels:
            x = ensure_position_channels(x, self.input_channels, type(self).__name__)
        h = x
        if getattr(enc, "stem", None) is not None:
            h = enc.stem(h)
        skips = []
        for i, stage in enumerate(enc.stages):
            h = stage(h)
            if i in self.adapter_stages:
                position = self._token_position(x, h) if self.adapter_position else None
                h, txt = self.adapters[str(i)](h, txt, txt_mask, sample, position)
            skips.append(h)
        seg = self.unet.decoder(skips)

        pooled_txt = masked_mean(txt, txt_mask)  # (B, text_width)
        seg = film_logits(seg, self.logit_film(pooled_txt))
        if not return_aux:
            return seg
        bottleneck = skips[-1].flatten(2).mean(2)
        return MedCLIPSegOutput(seg, self.img_proj(bottleneck), self.txt_proj(pooled_txt), report_emb)

    def _token_position(self, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        """Fourier features of the patient-frame position of each of ``feat``'s tokens: the input's position channels
        averaged over the token's cell (2D: the encoder's grid divides the input's)."""
        position = x[:, -self.position_channels:].float()
        pooled = torch.nn.functional.adaptive_avg_pool2d(position, feat.shape[2:]) if feat.ndim == 4 else \
            torch.nn.functional.adaptive_avg_pool3d(position, feat.shape[2:])
        return fourier_position_features(pooled)

    def mc_forward(self, x: torch.Tensor, n: int, tokens: torch.Tensor | None = None,
                   mask: torch.Tensor | None = None, max_batch: int | None = None) -> torch.Tensor:
        """n stochastic passes (sampled attention values) -> softmax probabilities (n, B, K, *spatial).

        The batch is repeated n times and run in one forward (or in chunks of at most ``max_batch``
        rows). Runs under the caller's grad mode (wrap in ``torch.no_grad()`` for inference); only the
        full-resolution output is used when deep supervision is on.
        """
        b = x.shape[0]
        if tokens is None:
            tokens, mask = self._tokens, self._mask
        if tokens is not None:
            tokens = tokens.unsqueeze(0) if tokens.ndim == 2 else tokens
            if mask is None:
                mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            mask = mask.unsqueeze(0) if mask.ndim == 1 else mask
            if tokens.shape[0] == 1:
                tokens, mask = tokens.expand(b, -1, -1), mask.expand(b, -1)
        rows = n * b
        step = rows if max_batch is None else max(1, int(max_batch))
        xs = x.repeat(n, *([1] * (x.ndim - 1)))
        ts = None if tokens is None else tokens.repeat(n, 1, 1)
        ms = None if mask is None else mask.repeat(n, 1)
        outs = []
        for start in range(0, rows, step):
            sl = slice(start, start + step)
            out = self.forward(xs[sl], None if ts is None else ts[sl], None if ms is None else ms[sl],
                               sample=True)
            out = out[0] if isinstance(out, (list, tuple)) else out
            outs.append(torch.softmax(out.float(), dim=1))
        probs = torch.cat(outs, 0)
        return probs.view(n, b, *probs.shape[1:])


def _bad_stage(s: int, n: int) -> int:
    raise ValueError(f"adapter stage {s} out of range for an encoder with {n} stages")
