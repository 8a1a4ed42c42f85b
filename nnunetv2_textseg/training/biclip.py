"""nnUNetTrainerBiCLIP: BiCLIP (BMF pseudo-image channel, cycle and generation losses, IAC) on
nnU-Net's planned U-Net, trained by unmodified ``nnUNetv2_train``.

Loss: nnU-Net's Dice+CE (deep supervision) + λgen·L1(pseudo, reference) + λcycle·‖t − t̂‖²
+ λIAC·(1 − cos(p_weak, p_strong)). λ defaults are 0.1 each (EF-UNet's L1 weight; the papers are silent
on the others). The generation reference defaults to EF-UNet's "image inside the lesion, 0 elsewhere"
(``generation_target = "masked_image"``); ``"mask"`` uses the plain lesion mask.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from nnunetv2_textseg.augmentation import split_into_two_views
from nnunetv2_textseg.modules.biclip import consistency_loss, cycle_loss, generation_loss
from nnunetv2_textseg.networks import BiCLIPNetwork
from nnunetv2_textseg.training.text_trainer import nnUNetTrainerText

AUX_LOSSES = ("seg", "gen", "cycle", "iac")


class nnUNetTrainerBiCLIP(nnUNetTrainerText):
    lambda_gen = 0.1
    lambda_cycle = 0.1
    lambda_iac = 0.1
    report_dropout = 0.1  # probability of training a sample with the learned null report
    generation_target = "masked_image"  # or "mask"
    text_dim = 784  # 28 x 28, as EF-UNet's pseudo-image seed
    bidirectional = True  # BMF refinement t' = t + g([t; i])
    ignore_text = False  # _noText: same network, null report always
    aux_losses = AUX_LOSSES
    method_name = "BiCLIP"

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned U-Net with one more input channel, inside a BiCLIPNetwork. A classmethod
        (nnU-Net calls it on the class at training and prediction time) so the ablations' switches apply."""
        if len(configuration_manager.patch_size) != 2:
            raise NotImplementedError(f"{cls.__name__} supports nnU-Net's 2d configuration only "
                                      f"(patch size {configuration_manager.patch_size}).")
        text = cls.text_plans(plans_manager)
        unet = cls.planned_unet(configuration_manager, num_input_channels + 1, num_output_channels, enable_deep_supervision)
        return BiCLIPNetwork(unet, num_input_channels, text["text_in_dim"], cls.text_dim,
                             bidirectional=cls.bidirectional, cycle=cls.lambda_cycle > 0, iac=cls.lambda_iac > 0,
                             ignore_text=cls.ignore_text)

    # ---- data: two intensity views for IAC -----------------------------------------------------
    def get_training_transforms(self, *args, **kwargs):
        pipeline = super().get_training_transforms(*args, **kwargs)
        return split_into_two_views(pipeline) if self.lambda_iac > 0 else pipeline

    # ---- training --------------------------------------------------------------------------------
    def lesion_mask(self, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Foreground (any label / region) and valid (not ignore-label) masks, each (B, 1, H, W)."""
        lm = self.label_manager
        if lm.has_regions:
            regions = target[:, :-1] if lm.has_ignore_label else target
            fg = regions.bool().any(1, keepdim=True)
            valid = ~target[:, -1:].bool() if lm.has_ignore_label else torch.ones_like(fg)
        else:
            valid = target != lm.ignore_label if lm.has_ignore_label else torch.ones_like(target, dtype=torch.bool)
            fg = (target > 0) & valid
        return fg, valid

    def generation_reference(self, image: torch.Tensor, lesion: torch.Tensor) -> torch.Tensor:
        lesion = lesion.to(image.dtype)
        if self.generation_target == "mask":
            return lesion
        return image.mean(1, keepdim=True) * lesion

    def compute_loss(self, out, data: torch.Tensor, target) -> tuple[torch.Tensor, dict]:
        seg = self.loss(out.seg, target)
        full_res = target[0] if isinstance(target, list) else target
        lesion, valid = self.lesion_mask(full_res)
        reference = self.generation_reference(data, lesion).float()
        # ignored pixels (nnU-Net's ignore label) say nothing about the lesion: no generation target there
        terms = {"seg": seg, "gen": generation_loss(out.pseudo.float() * valid, reference * valid)}
        if out.t_hat is not None:
            # t is detached as the cycle's target: the projection must not collapse t to make h's job easy.
            terms["cycle"] = cycle_loss(out.t.detach().float(), out.t_hat.float())
        if out.p_weak is not None:
            terms["iac"] = consistency_loss(out.p_weak.float(), out.p_strong.float())
        weights = {"seg": 1.0, "gen": self.lambda_gen, "cycle": self.lambda_cycle, "iac": self.lambda_iac}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, {k: float(v.detach().cpu()) for k, v in terms.items()}

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        c = self.num_input_channels
        weak, strong = (data[:, :c], data[:, c:]) if data.shape[1] == 2 * c else (data, None)
        text = self.text_for(batch["keys"])
        drop = torch.rand(text.shape[0], device=self.device) < self.report_dropout

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = self.network(weak, text=text, drop=drop, x_strong=strong, return_aux=True)
            loss, terms = self.compute_loss(out, weak, target)

        self.optimizer_step(loss)
        return {"loss": loss.detach().cpu().numpy(), **terms}
