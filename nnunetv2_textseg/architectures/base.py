"""What every text-conditioned network of nnunetv2-textseg is: a module around nnU-Net's planned U-Net, with the
contract the trainers, the predictor and the diagnosis rely on (instead of probing attributes)."""
from __future__ import annotations

import torch
from torch import nn


class PlannedUNetWrapper(nn.Module):
    """A module around nnU-Net's planned U-Net (``self.unet``). nnU-Net toggles deep supervision through
    ``network.decoder.deep_supervision``, so the wrapper exposes the U-Net's decoder (and encoder)."""

    @property
    def decoder(self) -> nn.Module:
        return self.unet.decoder

    @property
    def encoder(self) -> nn.Module:
        return self.unet.encoder


class TextConditionedNetwork(PlannedUNetWrapper):
    """A planned U-Net that reads a report.

    Contract:

    * ``text_input``: what :meth:`set_text` takes — ``"tokens"``: the encoder's token embeddings (1, L, D_in) and
      their mask (1, L) of one case.
    * :meth:`set_text`: the report for the following plain ``forward(x)`` calls (nnU-Net's sliding window calls
      ``network(tile)`` and cannot pass one); ``None``: the learned null report. Training passes the reports
      of the batch to ``forward`` instead.
    * :attr:`can_sample` / :meth:`set_sampling`: whether the network can draw Monte-Carlo samples at inference,
      and switching that on and off.
    * :attr:`has_pseudo_image` / :meth:`current_pseudo_image`: networks that draw the report as an image.
    """

    text_input: str = "tokens"
    has_pseudo_image: bool = False

    def set_text(self, tokens: torch.Tensor | None, mask: torch.Tensor | None = None) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement set_text")

    @property
    def can_sample(self) -> bool:
        return False

    def set_sampling(self, on: bool) -> None:
        if on and not self.can_sample:
            raise ValueError(f"{type(self).__name__} is deterministic: it cannot draw Monte-Carlo samples")

    def current_pseudo_image(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} draws no pseudo-image")
