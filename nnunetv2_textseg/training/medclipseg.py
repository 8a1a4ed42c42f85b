"""nnUNetTrainerMedCLIPSeg: MedCLIPSeg's probabilistic, bidirectional text–image attention inside nnU-Net's
planned U-Net, trained by unmodified ``nnUNetv2_train``.

Loss: nnU-Net's Dice+CE (deep supervision) + λ·soft contrastive loss (λ = 0.1, τ = 0.2 as in the
paper's code; the paper's 0.5·Dice + 0.5·BCE segmentation loss is replaced by nnU-Net's own).
Reports enter as token embeddings + masks from the same embedding cache as BiCLIP.
"""
from __future__ import annotations

import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_textseg.architectures.medclipseg import MedCLIPSegNetwork
from nnunetv2_textseg.losses import soft_contrastive_loss
from nnunetv2_textseg.training.text_trainer import nnUNetTrainerText

AUX_LOSSES = ("seg", "contrastive")


class nnUNetTrainerMedCLIPSeg(nnUNetTrainerText):
    lambda_contrastive = 0.1
    tau = 0.2
    beta = 2.35
    report_dropout = 0.1
    # a quarter of the samples read their report without place words, half of those the bare finding (see
    # nnUNetTrainerText.strip_locations): trained on reports that all name places, MedCLIPSeg read a report naming
    # none as "nowhere" (_reportsAsWritten at 10 % of the labels: -0.51 Dice with the location words removed)
    location_free_reports = 0.25
    deterministic = False  # _noProb: plain attention
    adapter_width = 64
    adapter_heads = 4
    adapter_stages = None  # default: the last two encoder stages
    adapter_position = False  # the adapters' image tokens also get their patient-frame position (MedCLIPSegNetwork)
    ignore_text = False
    uses_token_text = True
    aux_losses = AUX_LOSSES
    method_name = "MedCLIPSeg"

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        text = cls.text_plans(plans_manager)
        # + the patient-frame position channels (models trained before they existed record none)
        unet = cls.planned_unet(configuration_manager, num_input_channels + int(text.get("position_channels", 0)),
                                num_output_channels, enable_deep_supervision)
        return MedCLIPSegNetwork(unet, text["text_in_dim"], cls.adapter_stages, cls.adapter_width, cls.adapter_heads,
                                 cls.beta, cls.deterministic, cls.ignore_text,
                                 position_channels=int(text.get("position_channels", 0)),
                                 adapter_position=bool(text.get("adapter_position", False)))

    # recorded in the plans, so a model predicts with its own network whatever the class default
    network_plans_defaults = {"adapter_position": False}

    @classmethod
    def network_plans_entry(cls) -> dict:
        return {"adapter_position": bool(cls.adapter_position)}

    def compute_step(self, data, target, tokens, mask, drop, keys=None) -> tuple[torch.Tensor, dict]:
        out = self.network(data, tokens=tokens, mask=mask, drop=drop, return_aux=True)
        seg = self.loss(out.seg, target)
        con = soft_contrastive_loss(out.img_emb.float(), out.txt_emb.float(), self.tau,
                                    target_emb=out.report_emb.float())
        # detached tensors: the train step reads them with its loss at its end
        return seg + self.lambda_contrastive * con, {"seg": seg.detach(), "contrastive": con.detach()}
