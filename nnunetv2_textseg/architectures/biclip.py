"""BiCLIPNetwork: nnU-Net's planned U-Net with extra input channels: the report's pseudo-image and the
patient-frame position.

Every BiCLIP module lives in this one ``nn.Module``, so nnU-Net's checkpoints, ``--c`` resume,
``torch.compile`` and DDP cover them without special cases. nnU-Net's predictor calls
``network(x)`` once per sliding-window tile and has no way to pass a report, so the report of the
case being predicted is set beforehand with :meth:`BiCLIPNetwork.set_text`; with no text set, the
learned null report is used (the same one report dropout trains).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnunetv2_textseg.architectures.base import TextConditionedNetwork
from nnunetv2_textseg.building_blocks.biclip import (AnatomyGate, AttentionPoolText, BidirectionalFusion,
                                                     DeepMapInjection, GlobalImageEncoder, ImageToTextHead,
                                                     MapLogitPrior, MeanPoolText, ProjectionHead, PseudoImageGenerator,
                                                     TokenZoneMaps, gated_logits, masked_mean, noisy_or_logits)
from nnunetv2_textseg.building_blocks.medclipseg import CrossModalAdapter, film_logits, tokens_or_null_report
from nnunetv2_textseg.patient_frame import (POSITION_CHANNELS, ensure_position_channels, sample_patient_frame,
                                            split_position)

ADAPTER_WIDTH = 64  # text_adapters' token width (MedCLIPSeg's default)


@dataclass
class BiCLIPOutput:
    """What one training forward pass returns besides the segmentation."""
    seg: torch.Tensor | list[torch.Tensor] | None  # None: the report pathways alone (report_pathways_forward)
    pseudo: torch.Tensor  # (B, 1, H, W) on the sample, as the U-Net sees it (before input normalisation)
    pseudo_logits: torch.Tensor | None  # (B, 1, H, W) before the sigmoid (None for a linear pseudo-image)
    generated: torch.Tensor  # (B, 1, H, W) what the generation loss trains (logits, or the linear map), see
    #                           BiCLIPNetwork's generation_source
    inside: torch.Tensor  # (B, 1, H, W) 1 inside the patient image, 0 on padding
    t: torch.Tensor  # projected text (B, D)
    t_hat: torch.Tensor | None  # reconstructed from the whole-image pseudo-image (B, D)
    p_weak: torch.Tensor | None  # IAC projections (B, P)
    p_strong: torch.Tensor | None
    frame: torch.Tensor | None = None  # (B, 1, S, S) the fitted pathway's whole-image map (logits for a sigmoid
    #                                    pseudo-image), in the patient frame the sample's report describes


class BiCLIPNetwork(TextConditionedNetwork):
    """Text-conditioned U-Net.

    Input ``x``: (B, C + 3, H, W) — the image's C channels, then the 3 patient-frame position channels
    (:mod:`nnunetv2_textseg.patient_frame`), which nnU-Net's loader and our predictor append. The report's
    pseudo-image is decoded in whole-image coordinates and read at each pixel's position, so "upper left"
    is the patient's upper left in every crop, rotation, mirror and sliding-window tile. The U-Net gets
    [image, pseudo-image, position].

    Args:
        unet: nnU-Net's planned U-Net (dynamic-network-architectures), built with ``image_channels + 4``
            input channels; must expose ``encoder`` and ``decoder``.
        image_channels: channels of the real image (C).
        text_in_dim: width of the frozen encoder's token embeddings (e.g. 384 for MiniLM).
        text_dim: compact text width D (a square number; 784 = 28² as in EF-UNet).
        bidirectional: BMF refinement t' = t + g([t; i]); False gives the LViT-style
            unidirectional baseline (text conditions vision, no image-to-text refinement).
        cycle: build the image-to-text head for the cycle loss.
        iac: build the IAC projection head.
        ignore_text: always use the null report (the _noText ablation: same network, no report).
        text_pooling: "attention" (learned queries over the tokens) or "mean" (the paper's mean pooling).
        pseudo_activation: "sigmoid" (a lesion-probability map, fed as (p − 0.5) / 0.25 like EF-UNet's
            input normalisation) or "linear" (the paper's unbounded pseudo-image, fed as is).
        position_to_unet: also give the U-Net the position channels (its input is then C + 1 + 3 channels,
            else C + 1: the pseudo-image alone carries the patient frame).
        frame_resolution: side of the whole-image pseudo-image map (the generator's output is average-pooled
            to it; read bilinearly at each pixel). None keeps the generator's 4·√D (the paper's).
        generation_source: what the generation loss trains. "fused" (the paper's): the BMF-refined G(t') the
            U-Net sees. "text": the generator's map of the report alone, G(t), so the image embedding cannot
            stand in for the report in that loss; the U-Net still gets G(t'), which BMF then moves by the
            segmentation loss alone (measured: it drifted away from a lesion map).
        seg_gradient_to_text: let the segmentation loss's gradient flow through the pseudo-image into the text
            modules (end to end, the paper's). False: the pseudo-image is what the generation (and cycle) losses
            make of the report — a map of where it puts the lesion — and the U-Net learns to read that map,
            but cannot reshape it into whatever fits its few training images.
        cross_fit: 1, or K ≥ 2 report pathways (text pooling, null report, BMF, generator, token maps, image-to-text
            head each), cross-fitted: the training cases are dealt into K folds; pathway k never fits fold k's cases
            and is the one whose map the U-Net reads for them (see :meth:`forward`), so the U-Net learns to trust a
            map as much as a new report's map deserves instead of one drawn by a generator that has fitted that very
            case. With K = 2 each pathway fits half the cases; with K = 4, three quarters.
        token_maps: add per-token zone maps (:class:`TokenZoneMaps`) to the generator's whole-image map by noisy-OR,
            so a report with several findings is the union of one map per phrase (needs ``frame_resolution``).
        token_window: tokens each per-token map is drawn from (odd; 1 = the token alone), see :class:`TokenZoneMaps`.
        map_prior: also add the pseudo-image's log-odds, with a learned weight per output channel, to the U-Net's
            segmentation logits (:class:`MapLogitPrior`): the map is then a prior the U-Net corrects, not only an
            input it may learn to ignore. Needs a sigmoid pseudo-image.
        anatomy_gate: each report pathway also gets an :class:`AnatomyGate` that reads the sample's image and
            position and keeps the report's map only where this image allows it (p · σ(gate)): the report says
            where, the image where not. Needs a sigmoid pseudo-image.
        deep_map: also add the map, pooled to their grids, to the last two encoder stages' features
            (:class:`DeepMapInjection`, zero at construction), where zone-scale place words concern the image.
        text_adapters: also let the report's tokens and the last two encoder stages' features attend to each other
            (MedCLIPSeg's :class:`CrossModalAdapter`, identity at construction) and the fused tokens scale and shift
            the logits per class (zero at construction): the report then also reaches the U-Net where its features
            know the image's anatomy, not only as a map drawn from the text. Not cross-fitted: trained by the
            segmentation loss, like MedCLIPSeg's.
    """

    text_input = "tokens"  # what set_text expects: token embeddings + mask
    has_pseudo_image = True

    def __init__(self, unet: nn.Module, image_channels: int, text_in_dim: int, text_dim: int = 784,
                 image_dim: int = 128, bidirectional: bool = True, cycle: bool = True, iac: bool = True,
                 ignore_text: bool = False, text_pooling: str = "attention", pseudo_activation: str = "sigmoid",
                 frame_resolution: int | None = 16, position_to_unet: bool = True, generation_source: str = "fused",
                 seg_gradient_to_text: bool = True, cross_fit: int = 1, token_maps: bool = False,
                 token_window: int = 1, map_prior: bool = False, anatomy_gate: bool = False, deep_map: bool = False,
                 text_adapters: bool = False):
        super().__init__()
        if not (hasattr(unet, "encoder") and hasattr(unet, "decoder")):
            raise TypeError(f"{type(unet).__name__} has no encoder/decoder; BiCLIP needs a "
                            f"dynamic-network-architectures U-Net (PlainConvUNet, ResidualEncoderUNet).")
        if text_pooling not in ("attention", "mean") or pseudo_activation not in ("sigmoid", "linear") \
                or generation_source not in ("text", "fused"):
            raise ValueError(f"text_pooling must be 'attention' or 'mean', pseudo_activation 'sigmoid' or 'linear' "
                             f"and generation_source 'text' or 'fused', got {text_pooling!r}, {pseudo_activation!r}, "
                             f"{generation_source!r}")
        self.unet = unet
        self.image_channels = image_channels
        if not isinstance(cross_fit, int) or not 1 <= cross_fit <= 8:
            raise ValueError(f"cross_fit must be 1 (one report pathway) or 2..8 (cross-fitted), got {cross_fit!r}")
        if token_maps and not frame_resolution:
            raise ValueError("token_maps needs a zone-scale whole-image map: set frame_resolution (e.g. 16)")
        self.sigmoid = pseudo_activation == "sigmoid"
        if anatomy_gate and not self.sigmoid:
            raise ValueError("anatomy_gate multiplies the map's probability by the gate's: it needs pseudo_activation "
                             "'sigmoid'")
        self.frame_resolution = frame_resolution
        self.position_to_unet = position_to_unet
        self.generation_source = generation_source
        self.seg_gradient_to_text = seg_gradient_to_text
        pathway = dict(image_channels=image_channels, text_in_dim=text_in_dim, text_dim=text_dim,
                       image_dim=image_dim, bidirectional=bidirectional, cycle=cycle, text_pooling=text_pooling,
                       token_maps=token_maps, token_window=token_window, anatomy_gate=anatomy_gate)
        # the report pathway's modules live on the network itself (pathway 0; the state-dict names of every
        # model trained so far), the cross-fitted twin's in ``cross_fit_twin`` (pathway 1), further ones in
        # ``cross_fit_more`` (pathways 2..K-1)
        self._add_report_pathway(self, **pathway)
        self.cross_fit_twin = self._add_report_pathway(nn.Module(), **pathway) if cross_fit >= 2 else None
        self.cross_fit_more = nn.ModuleList(self._add_report_pathway(nn.Module(), **pathway)
                                            for _ in range(cross_fit - 2)) if cross_fit > 2 else None
        self.iac_head = ProjectionHead(unet.encoder.output_channels[-1]) if iac else None
        if map_prior and not self.sigmoid:
            raise ValueError("map_prior adds the pseudo-image's log-odds to the logits: it needs pseudo_activation "
                             "'sigmoid'")
        self.map_prior = MapLogitPrior(unet.decoder.num_classes) if map_prior else None
        stages = len(unet.encoder.stages)
        self.deep_map = nn.ModuleDict({str(s): DeepMapInjection(unet.encoder.output_channels[s], unet.encoder.conv_op)
                                       for s in (stages - 2, stages - 1)}) if deep_map else None
        self.text_adapters = self.adapter_null_tokens = self.adapter_logit_film = None
        if text_adapters:
            width, txt_dim = ADAPTER_WIDTH, text_in_dim
            self.text_adapters = nn.ModuleDict()
            for s in (stages - 2, stages - 1):  # the text tokens are carried from one adapter to the next
                self.text_adapters[str(s)] = CrossModalAdapter(unet.encoder.output_channels[s], txt_dim, width)
                txt_dim = width
            self.adapter_null_tokens = nn.Parameter(torch.zeros(1, 1, text_in_dim))
            self.adapter_logit_film = nn.Linear(width, 2 * unet.decoder.num_classes)
            nn.init.zeros_(self.adapter_logit_film.weight)
            nn.init.zeros_(self.adapter_logit_film.bias)
        self.ignore_text = ignore_text
        self._tokens: torch.Tensor | None = None  # set per case at inference; not part of the state dict
        self._mask: torch.Tensor | None = None
        self._warned_null = False

    def _add_report_pathway(self, owner: nn.Module, image_channels: int, text_in_dim: int, text_dim: int,
                            image_dim: int, bidirectional: bool, cycle: bool, text_pooling: str,
                            token_maps: bool, token_window: int = 1, anatomy_gate: bool = False) -> nn.Module:
        """Put one report pathway's modules on ``owner``: text pooling, null report, BMF (image encoder and
        fusion), generator, token maps, anatomy gate and image-to-text head."""
        owner.text_pool = AttentionPoolText(text_in_dim, text_dim) if text_pooling == "attention" \
            else MeanPoolText(text_in_dim, text_dim)
        # The learned "no report" text, used for dropped reports and cases without one (small, not zero:
        # a zero text would give the generator's first convolution no gradient while every report is dropped)
        owner.null_text = nn.Parameter(0.02 * torch.randn(text_dim))
        owner.image_encoder = GlobalImageEncoder(image_channels, image_dim) if bidirectional else None
        owner.fusion = BidirectionalFusion(text_dim, image_dim) if bidirectional else None
        # lesions are rare: start the probability map low (sigmoid(-2) ~ 0.12) rather than at 0.5
        owner.generator = PseudoImageGenerator(text_dim, out_bias=-2.0 if self.sigmoid else 0.0)
        owner.token_maps = TokenZoneMaps(text_in_dim, self.frame_resolution, window=token_window) if token_maps \
            else None
        owner.image_to_text = ImageToTextHead(text_dim) if cycle else None
        # reads the image and the position channels (a mirrored sample's patient side is in the position)
        owner.anatomy_gate = AnatomyGate(image_channels + POSITION_CHANNELS) if anatomy_gate else None
        return owner

    @property
    def pathways(self) -> list[nn.Module]:
        """The report pathways: [self] or, cross-fitted, [self, cross_fit_twin, *cross_fit_more]."""
        if self.cross_fit_twin is None:
            return [self]
        return [self, self.cross_fit_twin, *(self.cross_fit_more if self.cross_fit_more is not None else [])]

    def set_text(self, tokens: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        """Report used by the next plain ``forward(x)`` calls: token embeddings (1, L, D_in) (or (L, D_in))
        and mask (1, L) of one case, broadcast over tiles; None for the learned null report."""
        if tokens is not None and tokens.ndim == 2:
            tokens = tokens[None]
        if tokens is not None and mask is None:
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        self._tokens, self._mask = tokens, (mask[None] if mask is not None and mask.ndim == 1 else mask)

    def current_pseudo_image(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C + 3, H, W) -> the pseudo-image (B, 1, H, W) of the report set with :meth:`set_text` (the null
        report if none), as the U-Net sees it before input normalisation (cross-fitted: the pathways' mean)."""
        tokens, mask = self._tokens, self._mask
        if tokens is not None:
            tokens, mask = tokens.to(x.device), mask.to(x.device)
        maps = [self.pseudo_image(x, self.text_embedding(tokens, mask, x.shape[0], pathway=k), pathway=k,
                                  tokens=tokens, mask=self.token_mask(tokens, mask, x.shape[0]))[0]
                for k in range(len(self.pathways))]
        return maps[0] if len(maps) == 1 else torch.stack(maps).mean(0)

    def text_embedding(self, tokens: torch.Tensor | None, mask: torch.Tensor | None, batch: int,
                       drop: torch.Tensor | None = None, pathway: int = 0) -> torch.Tensor:
        """Projected text t (B, D); rows with ``drop`` True (or all, if tokens is None) use the null report."""
        path = self.pathways[pathway]
        null = path.null_text.unsqueeze(0).expand(batch, -1)
        if tokens is None:
            return null
        t = path.text_pool(tokens.to(null.dtype), mask)
        t = t.expand(batch, -1) if t.shape[0] == 1 else t
        if self.ignore_text:
            drop = torch.ones(batch, dtype=torch.bool, device=null.device)
        if drop is None:
            return t + 0 * null  # null_text stays in the graph (DDP, find_unused_parameters=False)
        # torch.where keeps both branches in the graph: every parameter gets a gradient each step
        return torch.where(drop[:, None], null, t)

    def token_mask(self, tokens: torch.Tensor | None, mask: torch.Tensor | None, batch: int,
                   drop: torch.Tensor | None = None) -> torch.Tensor | None:
        """The token mask (B, L) the token maps read: none for dropped reports (and all, with ``ignore_text``),
        whose map is the null report's alone."""
        if tokens is None:
            return None
        mask = mask.expand(batch, -1) if mask.shape[0] == 1 else mask
        if self.ignore_text:
            return torch.zeros_like(mask)
        return mask if drop is None else mask & ~drop[:, None]

    def frame_pseudo_image(self, image: torch.Tensor, t: torch.Tensor, pathway: int = 0,
                           tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """BMF: refine t with the image's global embedding and decode it to the whole-image pseudo-image
        (B, 1, S, S) (logits for a sigmoid pseudo-image); with token maps, united with the report's per-token
        maps (``mask`` (B, L): the tokens to read, see :meth:`token_mask`)."""
        path = self.pathways[pathway]
        if path.fusion is not None:
            t = path.fusion(t, path.image_encoder(image))
        frame = self.decode_frame(t, pathway)
        if path.token_maps is not None and tokens is not None:
            tokens = tokens.expand(frame.shape[0], -1, -1) if tokens.shape[0] == 1 else tokens
            frame = noisy_or_logits(frame, path.token_maps(tokens.to(frame.dtype), mask))
        return frame

    def decode_frame(self, t: torch.Tensor, pathway: int = 0) -> torch.Tensor:
        """t (B, D) -> whole-image map (B, 1, S, S) at zone scale."""
        frame = self.pathways[pathway].generator(t)
        if self.frame_resolution and frame.shape[-1] > self.frame_resolution:
            # zone scale: a report says where (which lung, which third), not the lesion's outline; a coarse map
            # cannot memorise training masks, so the U-Net keeps taking the outline from the image
            frame = F.adaptive_avg_pool2d(frame, self.frame_resolution)
        return frame

    def pseudo_image(self, x: torch.Tensor, t: torch.Tensor, pathway: int = 0, tokens: torch.Tensor | None = None,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C + 3, H, W) -> (pseudo-image on the sample (B, 1, H, W), its logits (or the linear map),
        whole-image map (B, 1, S, S))."""
        image, position = split_position(x)
        frame = self.frame_pseudo_image(image, t, pathway, tokens, mask)
        raw = sample_patient_frame(frame, position)
        gate = self.pathways[pathway].anatomy_gate
        if gate is not None:  # the report's map, kept where this image allows it (the whole-image map stays text's)
            raw = gated_logits(raw, gate(x))  # x is [image, position]: the gate reads both
        pseudo = torch.sigmoid(raw) * (position[:, 2:3] > 0.5).to(raw.dtype) if self.sigmoid else raw
        return pseudo, raw, frame

    def unet_input(self, image: torch.Tensor, pseudo: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        # a probability map is shifted/scaled to the z-scored image's range (EF-UNet's (p - 0.5) / 0.25), so
        # the U-Net's first convolution sees it at the same scale as the image from the start
        p = (pseudo - 0.5) / 0.25 if self.sigmoid else pseudo
        parts = [image, p.to(image.dtype)] + ([position.to(image.dtype)] if self.position_to_unet else [])
        return torch.cat(parts, dim=1)

    def encode(self, image: torch.Tensor, seen: torch.Tensor, position: torch.Tensor,
               report: tuple[torch.Tensor, torch.Tensor] | None = None
               ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """The U-Net encoder's skips for [image, pseudo-image, position], and with ``text_adapters`` the report's fused
        tokens pooled (B, width) (else None); ``report``: the adapters' tokens and mask (:meth:`adapter_report`). With
        ``deep_map`` the map is also added to the last two stages' features, with ``text_adapters`` the report attends
        to them."""
        x = self.unet_input(image, seen, position)
        if self.deep_map is None and self.text_adapters is None:
            return self.unet.encoder(x), None
        enc = self.unet.encoder
        m = x[:, self.image_channels:self.image_channels + 1]  # the map as the U-Net's input channel carries it
        txt, txt_mask = report if report is not None else (None, None)
        if getattr(enc, "stem", None) is not None:
            x = enc.stem(x)
        skips = []
        for i, stage in enumerate(enc.stages):
            x = stage(x)
            if self.deep_map is not None and str(i) in self.deep_map:
                x = self.deep_map[str(i)](x, m)
            if self.text_adapters is not None and str(i) in self.text_adapters:
                # attention values sampled in training, the mean path in prediction (as MedCLIPSeg's)
                x, txt = self.text_adapters[str(i)](x, txt, txt_mask, self.training)
            skips.append(x)
        return skips, (None if self.text_adapters is None else masked_mean(txt, txt_mask))

    def adapter_report(self, tokens: torch.Tensor | None, mask: torch.Tensor | None, batch: int,
                       drop: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The adapters' report tokens (B, L, D_in) and mask (B, L), the learned null report in dropped rows; None
        without ``text_adapters``."""
        if self.text_adapters is None:
            return None
        return tokens_or_null_report(self.adapter_null_tokens, tokens, mask, batch, drop, self.ignore_text)

    def segment(self, skips: list[torch.Tensor], seen: torch.Tensor, fused_text: torch.Tensor | None = None
                ) -> torch.Tensor | list[torch.Tensor]:
        """The U-Net decoder's logits (a list with deep supervision), plus the map's prior with ``map_prior`` and the
        report's per-class affine with ``text_adapters`` (``fused_text``: :meth:`encode`'s pooled tokens)."""
        seg = self.unet.decoder(skips)
        seg = seg if self.map_prior is None else self.map_prior(seg, seen)
        return seg if fused_text is None else film_logits(seg, self.adapter_logit_film(fused_text))

    def forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                drop: torch.Tensor | None = None, x_strong: torch.Tensor | None = None, return_aux: bool = False,
                fold: torch.Tensor | None = None, fit: torch.Tensor | None = None):
        """x: (B, C + 3, H, W) image + position channels; tokens (B or 1, L, D_in), mask (B or 1, L): the
        report (default: the one set with ``set_text``, else the null report). Returns the U-Net output (a
        list with deep supervision), or a :class:`BiCLIPOutput` with ``return_aux``. ``x_strong`` (B, C, H, W)
        is the strongly augmented image for IAC: it shares the pseudo-image and position and only passes
        the U-Net encoder (its decoder output is unused).

        Cross-fitted (K pathways), ``fold`` (B,) in {0..K-1} says which fold each training case belongs to: the
        U-Net sees pathway ``fold``'s map, drawn by a generator that never fits this case — as uncertain as a new
        report's — and the generation and cycle losses train one of the other pathways on it (``fit`` (B,), drawn
        per step by the trainer; with K = 2 it is the other one). Without ``fold`` (prediction, validation) the
        U-Net sees the pathways' mean."""
        if fold is not None and len(self.pathways) > 1 and return_aux:
            return self._cross_fitted_training_forward(x, tokens, mask, drop, x_strong, fold, fit)
        tokens, mask = self.report_for_forward(tokens, mask)
        image, position, ts, maps, fit = self._report_pathways(x, tokens, mask, drop, fold, fit, return_aux)
        n = len(self.pathways)
        if n == 1:
            pseudo = maps[0][0]
        elif fold is None:
            pseudo = torch.stack([m[0] for m in maps]).mean(0)
        else:
            pseudo = _per_sample(fold, [m[0] for m in maps])
        seen = pseudo if self.seg_gradient_to_text else pseudo.detach()
        report = self.adapter_report(tokens, mask, x.shape[0], drop)
        strong = x_strong if return_aux and self.iac_head is not None else None
        skips, fused_text, strong_bottleneck = self.encode_views(image, strong, seen, position, report)
        seg = self.segment(skips, seen, fused_text)
        if not return_aux:
            return seg
        out = self._fitted_outputs(position, ts, maps, fit, seg, pseudo)
        self._consistency_outputs(out, skips[-1], strong_bottleneck)
        return out

    def report_pathways_forward(self, x: torch.Tensor, tokens: torch.Tensor | None = None,
                                mask: torch.Tensor | None = None, drop: torch.Tensor | None = None,
                                fold: torch.Tensor | None = None, fit: torch.Tensor | None = None) -> BiCLIPOutput:
        """The report pathways alone, without the U-Net: what the generation and cycle losses need (``seg`` is
        None; ``pseudo`` is the map of the fitted pathway). Used to train the pathways before the U-Net starts
        (the trainer's pathway warm-up); arguments as in :meth:`forward`. Each sample passes only the pathway it
        fits (the training forward also draws its fold's map for the U-Net)."""
        x, tokens, mask = self._batch_report(x, tokens, mask)
        fit = self._routing(fold, fit, True)
        fit = torch.zeros(x.shape[0], dtype=torch.long) if fit is None else fit  # on the host, as the trainer's
        pseudo, raw, generated, t, t_hat, frame = self._routed_pathways(x, tokens, mask, drop, fit, losses=True)
        return BiCLIPOutput(None, pseudo, raw if self.sigmoid else None, generated, split_position(x)[1][:, 2:3], t,
                            t_hat, None, None, frame)

    def _cross_fitted_training_forward(self, x, tokens, mask, drop, x_strong, fold, fit) -> BiCLIPOutput:
        """Training with K > 1 cross-fitted pathways: each sample passes two pathways instead of all K — its fold's,
        whose map the U-Net reads, and the one that fits it (the losses' inputs) — the same numbers as drawing every
        pathway's map for every sample (tested), at 2/K of the pathway work."""
        x, tokens, mask = self._batch_report(x, tokens, mask)
        fit = self._routing(fold, fit, True)
        image, position = split_position(x)
        fitted = self._routed_pathways(x, tokens, mask, drop, fit, losses=True)
        # the map the U-Net reads carries no gradient to the text modules unless the segmentation loss trains them
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.seg_gradient_to_text):
            pseudo = self._routed_pathways(x, tokens, mask, drop, fold, losses=False)[0]
        seen = pseudo if self.seg_gradient_to_text else pseudo.detach()
        report = self.adapter_report(tokens, mask, x.shape[0], drop)
        strong = x_strong if self.iac_head is not None else None
        skips, fused_text, strong_bottleneck = self.encode_views(image, strong, seen, position, report)
        _, raw, generated, t, t_hat, frame = fitted
        if torch.is_grad_enabled() and _distributed():
            # nnU-Net's DDP (find_unused_parameters=False) needs a gradient for every parameter on every rank, and a
            # pathway no sample of this rank's batch was routed through has none: keep it in the graph at weight 0.
            # Only under DDP: it is one small op per parameter, forward and backward (~1200 GPU kernels a step)
            generated = generated + 0.0 * sum(q.flatten()[0] for name, q in self.named_parameters()
                                              if q.requires_grad and not name.startswith("unet."))
        out = BiCLIPOutput(self.segment(skips, seen, fused_text), pseudo, raw if self.sigmoid else None, generated,
                           position[:, 2:3], t, t_hat, None, None, frame)
        self._consistency_outputs(out, skips[-1], strong_bottleneck)
        return out

    def encode_views(self, image: torch.Tensor, strong: torch.Tensor | None, seen: torch.Tensor,
                     position: torch.Tensor, report: tuple[torch.Tensor, torch.Tensor] | None = None
                     ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """:meth:`encode` of the image and, for IAC, of its strongly augmented view ``strong`` (B, C, H, W; None:
        none), which shares the pseudo-image, position and report: (the image's skips, its fused text, the strong
        view's bottleneck or None).

        Both views pass the encoder as one batch of 2B: per sample the same computation as two passes (instance
        norm, attention and adapters are per sample; sampled attention values are drawn for all 2B rows), in half
        the kernel launches — what bounds a GPU step at small batches. An encoder with batch norm, whose statistics
        span the batch, gets two passes."""
        if strong is None:
            return (*self.encode(image, seen, position, report), None)
        if self._batch_statistics_in_encoder():
            skips, fused_text = self.encode(image, seen, position, report)
            return skips, fused_text, self.encode(strong, seen, position, report)[0][-1]
        b = image.shape[0]
        both = (lambda v: None if v is None else torch.cat([v, v]))
        report2 = None if report is None else (both(report[0]), both(report[1]))
        skips, fused_text = self.encode(torch.cat([image, strong.to(image.dtype)]), both(seen), both(position),
                                        report2)
        return [s[:b] for s in skips], (None if fused_text is None else fused_text[:b]), skips[-1][b:]

    def _batch_statistics_in_encoder(self) -> bool:
        """Whether a norm in the encoder pools statistics over the batch (then the two views cannot share a batch);
        looked up once."""
        if not hasattr(self, "_encoder_batch_norm"):
            self._encoder_batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                           for m in self.unet.encoder.modules())
        return self._encoder_batch_norm

    def _consistency_outputs(self, out: BiCLIPOutput, bottleneck: torch.Tensor, strong_bottleneck: torch.Tensor | None
                             ) -> None:
        """IAC's projected pooled bottlenecks of the two views (``out.p_weak`` / ``p_strong``), with a strong view."""
        if self.iac_head is not None and strong_bottleneck is not None:
            pooled = torch.cat([bottleneck, strong_bottleneck]).mean(dim=(2, 3))
            out.p_weak, out.p_strong = self.iac_head(pooled).chunk(2)

    def _batch_report(self, x, tokens, mask):
        """x with its position channels checked, and the report's tokens / mask on its device, one row per sample."""
        tokens, mask = self.report_for_forward(tokens, mask)
        x = ensure_position_channels(x, self.image_channels + POSITION_CHANNELS, type(self).__name__)
        if tokens is not None:
            tokens, mask = tokens.to(x.device), mask.to(x.device)
            if tokens.shape[0] == 1:
                tokens, mask = tokens.expand(x.shape[0], -1, -1), mask.expand(x.shape[0], -1)
        return x, tokens, mask

    @torch.compiler.disable
    def _routed_pathways(self, x, tokens, mask, drop, route: torch.Tensor, losses: bool) -> tuple:
        """Each sample b through pathway ``route[b]`` only: (pseudo, raw, generated, t, t_hat, whole-image map) in
        batch order; with ``losses`` False only pseudo (the rest None).

        The samples are grouped on the host (the trainer keeps ``route`` there), so routing waits for no device
        work: on a GPU a sync mid-step stops the host from queueing the next kernels. Not compiled (nnU-Net compiles
        the network on CUDA): the grouping is Python on the routes' values, and every new routing pattern would be
        compiled again."""
        groups: dict[int, list[int]] = {}
        for b, k in enumerate(route.tolist()):
            groups.setdefault(int(k), []).append(b)
        parts, order = [], []
        for k, members in sorted(groups.items(), key=lambda item: item[1][0]):
            if members == list(range(members[0], members[-1] + 1)):  # a run of samples: a view, no gather kernel
                sub = (lambda v, a=members[0], b=members[-1] + 1: None if v is None else v[a:b])
            else:
                idx = torch.tensor(members).to(x.device, non_blocking=True)
                sub = (lambda v, idx=idx: None if v is None else v[idx])
            t = self.text_embedding(sub(tokens), sub(mask), len(members), sub(drop), pathway=k)
            read = self.token_mask(sub(tokens), sub(mask), len(members), sub(drop))
            xk = sub(x)
            pseudo, raw, frame = self.pseudo_image(xk, t, pathway=k, tokens=sub(tokens), mask=read)
            t_hat, generated = self._loss_inputs(k, t, raw, frame, split_position(xk)[1]) if losses else (None, None)
            parts.append((pseudo, raw if losses else None, generated, t if losses else None, t_hat,
                          frame if losses else None))
            order.extend(members)
        if len(parts) == 1:
            return parts[0]
        back = None if order == sorted(order) else \
            torch.tensor(sorted(range(len(order)), key=order.__getitem__)).to(x.device, non_blocking=True)
        return tuple(None if parts[0][i] is None else
                     (torch.cat([q[i] for q in parts]) if back is None else torch.cat([q[i] for q in parts])[back])
                     for i in range(6))

    def _routing(self, fold: torch.Tensor | None, fit: torch.Tensor | None, training_losses: bool
                 ) -> torch.Tensor | None:
        """Checks the cross-fitting routing and returns ``fit`` (defaulted to the other pathway for K = 2). Read on
        the host (``tolist``): the trainer keeps the routing there."""
        n = len(self.pathways)
        if n > 1 and training_losses and fold is None:
            raise ValueError("a cross-fitted BiCLIPNetwork trains with fold: which pathway never fits each case")
        if fold is not None and fit is None:
            if n != 2:
                raise ValueError("with more than 2 cross-fitted pathways, say which pathway fits each case (fit)")
            fit = 1 - fold
        if fold is not None and any(a == b for a, b in zip(fit.tolist(), fold.tolist())):
            raise ValueError("a case's map for the U-Net must come from a pathway that does not fit it (fit != fold)")
        return fit

    def _report_pathways(self, x, tokens, mask, drop, fold, fit, training_losses: bool):
        """Every pathway's text embedding and maps of the batch's reports: (image, position, ts, maps, fit) with maps
        a (pseudo, raw, frame) triple per pathway and ``fit`` checked (defaulted for K = 2)."""
        tokens, mask = self.report_for_forward(tokens, mask)
        if tokens is not None:
            tokens, mask = tokens.to(x.device), mask.to(x.device)
        x = ensure_position_channels(x, self.image_channels + POSITION_CHANNELS, type(self).__name__)
        image, position = split_position(x)
        n = len(self.pathways)
        fit = self._routing(fold, fit, training_losses)
        ts = [self.text_embedding(tokens, mask, x.shape[0], drop, pathway=k) for k in range(n)]
        read = self.token_mask(tokens, mask, x.shape[0], drop)
        maps = [self.pseudo_image(x, ts[k], pathway=k, tokens=tokens, mask=read)
                for k in range(n)]  # (pseudo, raw, frame) per pathway
        return image, position, ts, maps, fit

    def _loss_inputs(self, k: int, t: torch.Tensor, raw: torch.Tensor, frame: torch.Tensor, position: torch.Tensor
                     ) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Pathway ``k``'s cycle-loss reconstruction t̂ (None without the cycle head) and what its generation loss
        trains (the map on the sample, or with generation_source "text" the report's own map G(t))."""
        path = self.pathways[k]
        t_hat = path.image_to_text(torch.sigmoid(frame) if self.sigmoid else frame) \
            if self.image_to_text is not None else None
        generated = raw
        if self.generation_source == "text" and self.fusion is not None:
            generated = sample_patient_frame(self.decode_frame(t, k), position)
        return t_hat, generated

    def _fitted_outputs(self, position, ts, maps, fit, seg, pseudo) -> BiCLIPOutput:
        """The loss inputs of the pathway each sample fits (``fit``; the only one without cross-fitting)."""
        n = len(self.pathways)
        own = (lambda values: values[0]) if n == 1 else (lambda values: _per_sample(fit, values))
        raw, t = own([m[1] for m in maps]), own(ts)
        t_hat, generated = zip(*(self._loss_inputs(k, ts[k], m[1], m[2], position) for k, m in enumerate(maps)))
        t_hat, generated = (None if t_hat[0] is None else own(list(t_hat))), own(list(generated))
        return BiCLIPOutput(seg, pseudo, raw if self.sigmoid else None, generated, position[:, 2:3], t, t_hat,
                            None, None, own([m[2] for m in maps]))


def _distributed() -> bool:
    """True in a torch.distributed process group (nnU-Net's DDP training)."""
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _per_sample(index: torch.Tensor, values: list[torch.Tensor]) -> torch.Tensor:
    """values[index[b]][b] for each sample b: (B, ...) from K tensors of (B, ...)."""
    stacked = torch.stack(values)  # (K, B, ...)
    picked = index.to(stacked.device).long().view(1, -1, *([1] * (stacked.ndim - 2))).expand(1, *stacked.shape[1:])
    return stacked.gather(0, picked)[0]
