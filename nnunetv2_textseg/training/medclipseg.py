"""nnUNetTrainerMedCLIPSeg: MedCLIPSeg's probabilistic, bidirectional text–image attention inside nnU-Net's
planned U-Net, trained by unmodified ``nnUNetv2_train``.

Loss: nnU-Net's Dice+CE (deep supervision) + λ·soft contrastive loss (λ = 0.1, τ = 0.2 as in the
paper's code; the paper's 0.5·Dice + 0.5·BCE segmentation loss is replaced by nnU-Net's own).
Reports enter as token embeddings + masks from the same embedding cache as BiCLIP.
"""
from __future__ import annotations

import numpy as np
import torch
from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import autocast, nn

from nnunetv2_textseg.medclipseg_network import MedCLIPSegNetwork
from nnunetv2_textseg.modules.medclipseg import soft_contrastive_loss
from nnunetv2_textseg.training.text_trainer import nnUNetTrainerText

AUX_LOSSES = ("seg", "contrastive")


class nnUNetTrainerMedCLIPSeg(nnUNetTrainerText):
    lambda_contrastive = 0.1
    tau = 0.2
    beta = 2.35
    report_dropout = 0.1
    deterministic = False  # _noProb: plain attention
    adapter_width = 64
    adapter_heads = 4
    adapter_stages = None  # default: the last two encoder stages
    ignore_text = False

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        text = cls.text_plans(plans_manager)
        unet = get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)
        return MedCLIPSegNetwork(unet, text["text_in_dim"], cls.adapter_stages, cls.adapter_width, cls.adapter_heads,
                                 cls.beta, cls.deterministic, cls.ignore_text)

    def set_network_text(self, keys) -> None:
        self.unwrapped_network().set_text(*self.tokens_for(keys))

    def on_train_start(self):
        super().on_train_start()
        for k in AUX_LOSSES:
            self.logger.local_logger.my_fantastic_logging.setdefault(f"train_{k}_loss", [])

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        for k in AUX_LOSSES:
            value = float(np.mean([o[k] for o in train_outputs if k in o] or [np.nan]))
            if self.is_ddp:
                import torch.distributed as dist
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.nanmean(gathered))
            self.logger.log(f"train_{k}_loss", value, self.current_epoch)

    def on_epoch_end(self):
        if self.local_rank == 0:
            terms = ", ".join(f"{k} {self.logger.get_value(f'train_{k}_loss', step=-1):.4f}" for k in AUX_LOSSES)
            self.print_to_log_file(f"MedCLIPSeg loss terms: {terms}")
        super().on_epoch_end()

    def train_step(self, batch: dict) -> dict:
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        tokens, mask = self.tokens_for(batch["keys"])
        drop = torch.rand(tokens.shape[0], device=self.device) < self.report_dropout

        self.optimizer.zero_grad(set_to_none=True)
        with autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            out = self.network(data, tokens=tokens, mask=mask, drop=drop, return_aux=True)
            seg = self.loss(out.seg, target)
            con = soft_contrastive_loss(out.img_emb.float(), out.txt_emb.float(), self.tau,
                                        target_emb=out.report_emb.float())
            loss = seg + self.lambda_contrastive * con

        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        return {"loss": loss.detach().cpu().numpy(), "seg": float(seg.detach()), "contrastive": float(con.detach())}
