"""What every text-conditioned network of nnunetv2-textseg is: a module around nnU-Net's planned U-Net, with the
contract the trainers, the predictor and the diagnosis rely on (instead of probing attributes)."""
from __future__ import annotations

import warnings

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

    def report_for_forward(self, tokens: torch.Tensor | None, mask: torch.Tensor | None
                           ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The report a forward pass uses: the one passed, else the one set with :meth:`set_text` (subclasses keep
        it in ``_tokens``/``_mask``); None means the learned null report, which is warned about once when
        predicting (plain ``nnUNetv2_predict`` cannot give a report)."""
        if tokens is not None:
            return tokens, mask
        tokens, mask = self._tokens, self._mask
        if tokens is None and not self.training and not self._warned_null and not self.ignore_text:
            warnings.warn(f"{type(self).__name__}: no report set, predicting with the learned null report. "
                          f"Use nnUNetv2_textseg_predict to give each case its report.")
            self._warned_null = True
        return tokens, mask

    @property
    def can_sample(self) -> bool:
        return False

    def set_sampling(self, on: bool) -> None:
        if on and not self.can_sample:
            raise ValueError(f"{type(self).__name__} is deterministic: it cannot draw Monte-Carlo samples")

    def current_pseudo_image(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} draws no pseudo-image")
