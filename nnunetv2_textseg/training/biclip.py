"""nnUNetTrainerBiCLIP: BiCLIP (BMF pseudo-image channel, cycle and generation losses, IAC) on
nnU-Net's planned U-Net, trained by unmodified ``nnUNetv2_train``.

What the U-Net sees: [image, pseudo-image, patient-frame position]. The pseudo-image is the report,
decoded (after BMF) into a whole-image map of where the report puts the lesion and read at each pixel's
patient-frame position (:mod:`nnunetv2_textseg.patient_frame`). By default (``text_adapters``) the report's tokens
also meet the last two encoder stages through MedCLIPSeg's adapters and scale and shift the logits per class.

Loss: nnU-Net's Dice+CE (deep supervision) + λgen·L_gen + λcycle·‖t − t̂‖² + λIAC·(1 − cos(p_weak, p_strong)).
Default ``generation = "lesion"``: L_gen = BCE + soft Dice of the sigmoid pseudo-image against the lesion
mask, in the sample's frame (the pseudo-image is read onto the sample, so target and pseudo-image share
it); λgen = 1 because this term is what teaches the text modules where the report points.
``generation = "masked_image"`` is EF-UNet's literal choice (L1 to image × lesion, λ 0.1, a linear
pseudo-image, mean-pooled text): the ``_efunet`` variant keeps it reachable. Why the default differs is
explained in :func:`~nnunetv2_textseg.losses.lesion_generation_loss`.
"""
from __future__ import annotations

import time
import zlib

import numpy as np
import torch
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch import nn

from nnunetv2_textseg.architectures.biclip import BiCLIPNetwork
from nnunetv2_textseg.augmentation import split_into_two_views
from nnunetv2_textseg.losses import blur_mask, consistency_loss, cycle_loss, generation_loss, lesion_generation_loss
from nnunetv2_textseg.patient_frame import POSITION_CHANNELS
from nnunetv2_textseg.training.distributed import average_gradients_across_ranks
from nnunetv2_textseg.training.text_trainer import (NETWORK_VERSION, OptimizerPair, TextTrainingError,
                                                     nnUNetTrainerText)

AUX_LOSSES = ("seg", "gen", "cycle", "iac")
# per epoch: the pseudo-image's mean and spatial std over the image, the share of near-zero pixels (a
# collapse shows as std -> 0 / near-zero share -> 1), and the U-Net's first-convolution weight norm per
# input group (an ignored pseudo-image channel shows as its norm falling behind the image's)
AUX_STATS = ("pseudo_mean", "pseudo_std", "pseudo_near_zero", "wnorm_image", "wnorm_pseudo", "wnorm_position")


class nnUNetTrainerBiCLIP(nnUNetTrainerText):
    lambda_gen = 1.0
    lambda_cycle = 0.1
    lambda_iac = 0.1
    # probability of training a sample with the learned null report: the U-Net must also segment from the
    # image alone, because at test time the pseudo-image of an unseen report is less exact than on training
    # reports (a generator that has seen them)
    report_dropout = 0.25
    position_to_unet = True  # the U-Net also gets the position channels (else: only through the pseudo-image)
    frame_resolution = 16  # whole-image pseudo-image side: zone scale (None: the generator's full 112)
    generation_blur = 1 / 16  # Gaussian blur (σ as a fraction of the patch side) of the lesion target
    generation = "lesion"  # or "masked_image" (EF-UNet) / "mask" (L1 to the plain mask)
    # the generation loss trains the BMF-refined pseudo-image G(t') the U-Net sees ("fused", the paper's), or
    # the report's own map G(t) ("text", the _textGen variant): see BiCLIPNetwork. "text" was tried and
    # measured worse: the U-Net's G(t') then has no target of its own and drifted (pseudo-image AUC 0.56).
    generation_source = "fused"
    # The defaults below are the design that reads its report (README, "What a report could add"; the variants in
    # variants.py add one change each, from the earlier end-to-end design, _endToEnd, to this one).
    # the segmentation loss's gradient reaches the text modules through the pseudo-image (the paper's, end to
    # end) or not (the pseudo-image is trained by the generation and cycle losses alone): see BiCLIPNetwork
    seg_gradient_to_text = False
    # cycle loss on layer-normalised t and t̂ (see losses.cycle_loss) rather than the raw ‖t − t̂‖²
    cycle_normalized = True
    # 1 report pathway, or K cross-fitted ones (see BiCLIPNetwork): the U-Net then trains on maps of reports the
    # map's generator has not fitted, as at test time
    cross_fit = 4
    # per-token zone maps united with the generator's map (see BiCLIPNetwork / TokenZoneMaps)
    token_maps = True
    token_window = 3  # tokens each per-token map reads (TokenZoneMaps): side and level of one phrase bind
    # steps of training the report pathways alone (generation and cycle losses, the U-Net untouched) before the
    # U-Net's first epoch, so that it reads an informative map from its first step (see warm_up_report_pathways)
    pathway_warmup_steps = 750
    # also add the pseudo-image's log-odds, with a learned weight per class, to the U-Net's logits (see
    # BiCLIPNetwork / MapLogitPrior): the map is a prior the U-Net corrects rather than an input it may ignore
    map_prior = False
    # each report pathway's map is also gated by the sample's image (see BiCLIPNetwork / AnatomyGate): the report
    # says where, the image where not
    anatomy_gate = False
    # the map is also added to the last two encoder stages' features (see BiCLIPNetwork / DeepMapInjection)
    deep_map = False
    # the report's tokens also attend to the last two encoder stages' features (MedCLIPSeg's adapters) and scale and
    # shift the logits (see BiCLIPNetwork's text_adapters): the map alone is drawn on the average patient's lungs,
    # the adapters' image tokens see this image (README, "MedCLIPSeg's adapters in BiCLIP")
    text_adapters = True
    # weight of the whole-case generation term (0: off): the fitted pathway's whole-image map against the case's
    # whole lesion mask at zone scale, not only against the part of it the sample's crop shows (see
    # whole_case_generation_loss)
    lambda_whole_case = 0.0
    # the whole-case term only where nnU-Net planned a patch smaller than the median image (crops the usual sample):
    # where a crop shows the whole image the sample's generation loss already trains every cell (see initialize)
    whole_case_only_when_cropped = False
    mirrored_patient = 0.5  # see nnUNetTrainerText
    location_free_reports = 0.25  # see nnUNetTrainerText
    text_pooling = "attention"  # or "mean" (the paper's)
    pseudo_activation = "sigmoid"  # or "linear" (the paper's)
    text_dim = 784  # 28 x 28, as EF-UNet's pseudo-image seed
    bidirectional = True  # BMF refinement t' = t + g([t; i])
    ignore_text = False  # _noText: same network, null report always
    uses_token_text = True
    aux_losses = AUX_LOSSES
    aux_stats = AUX_STATS
    method_name = "BiCLIP"

    @classmethod
    def build_network_architecture(cls, plans_manager: PlansManager, configuration_manager: ConfigurationManager,
                                   num_input_channels: int, num_output_channels: int,
                                   enable_deep_supervision: bool = True) -> nn.Module:
        """nnU-Net's planned U-Net with 1 + 3 more input channels (pseudo-image, position), inside a
        BiCLIPNetwork. A classmethod (nnU-Net calls it on the class at training and prediction time) so the
        ablations' switches apply."""
        if len(configuration_manager.patch_size) != 2:
            raise NotImplementedError(f"{cls.__name__} supports nnU-Net's 2d configuration only "
                                      f"(patch size {configuration_manager.patch_size}).")
        text = cls.text_plans(plans_manager)
        if text.get("network_version", 1) < NETWORK_VERSION or text.get("position_channels") != POSITION_CHANNELS:
            raise TextTrainingError(
                "This BiCLIP model was trained with an earlier nnunetv2-textseg (no patient-frame position "
                "channels, mean-pooled text): its network no longer exists. Retrain it with nnUNetv2_train.")
        # how many report pathways the model was trained with is recorded in its plans (models from before
        # cross-fitting record none: one), so a model predicts with its own network whatever the class default
        pathways = int(text.get("report_pathways", 1))
        token_maps = bool(text.get("token_maps", False))
        token_window = int(text.get("token_window", 1))  # models from before the entry: 1
        map_prior = bool(text.get("map_prior", False))
        anatomy_gate = bool(text.get("anatomy_gate", False))
        deep_map = bool(text.get("deep_map", False))
        text_adapters = bool(text.get("text_adapters", False))
        unet = cls.planned_unet(configuration_manager,
                                num_input_channels + 1 + (POSITION_CHANNELS if cls.position_to_unet else 0),
                                num_output_channels, enable_deep_supervision)
        return BiCLIPNetwork(unet, num_input_channels, text["text_in_dim"], cls.text_dim,
                             bidirectional=cls.bidirectional, cycle=cls.lambda_cycle > 0, iac=cls.lambda_iac > 0,
                             ignore_text=cls.ignore_text, text_pooling=cls.text_pooling,
                             pseudo_activation=cls.pseudo_activation, frame_resolution=cls.frame_resolution,
                             position_to_unet=cls.position_to_unet, generation_source=cls.generation_source,
                             seg_gradient_to_text=cls.seg_gradient_to_text, cross_fit=pathways,
                             token_maps=token_maps, token_window=token_window, map_prior=map_prior,
                             anatomy_gate=anatomy_gate, deep_map=deep_map, text_adapters=text_adapters)

    network_plans_defaults = {"report_pathways": 1, "token_maps": False, "token_window": 1, "map_prior": False,
                              "anatomy_gate": False, "deep_map": False, "text_adapters": False}

    @classmethod
    def earlier_design_hint(cls, differ: dict) -> str:
        if differ == {"text_adapters": False}:
            return "nnUNetTrainerBiCLIP_mapOnly (the default up to commit fc1398c)"
        if {"report_pathways", "token_maps", "token_window"} & set(differ):
            return "nnUNetTrainerBiCLIP_endToEnd (the default up to commit bfc641f)"
        return super().earlier_design_hint(differ)

    @classmethod
    def network_plans_entry(cls) -> dict:
        return {"report_pathways": int(cls.cross_fit), "token_maps": bool(cls.token_maps),
                "token_window": int(cls.token_window), "map_prior": bool(cls.map_prior),
                "anatomy_gate": bool(cls.anatomy_gate), "deep_map": bool(cls.deep_map),
                "text_adapters": bool(cls.text_adapters)}

    def initialize(self):
        fresh = not self.was_initialized
        cropped_only = self.lambda_whole_case > 0 and self.whole_case_only_when_cropped
        if fresh and cropped_only and not self.patches_crop_images():
            self.lambda_whole_case = 0.0
            self.aux_losses = tuple(k for k in self.aux_losses if k != "whole_case")
            self.print_to_log_file(f"Whole-case generation term off: the planned patch "
                                   f"{list(self.configuration_manager.patch_size)} covers the median image "
                                   f"{list(self.configuration_manager.median_image_size_in_voxels)}")
        super().initialize()
        prior = self.unwrapped_network().map_prior
        if fresh and prior is not None and not self.label_manager.has_regions:
            # softmax classes: the map raises the lesion classes against the background, whose weight starts at 0
            # (regions are sigmoids, each raised by the map); checkpoints (--c, prediction) overwrite this
            with torch.no_grad():
                prior.weight[0] = 0.0

    def patches_crop_images(self) -> bool:
        """True when the planned patch is smaller than the median image (nnU-Net's plans) along some axis: then the
        samples are crops of their images."""
        patch = self.configuration_manager.patch_size
        median = self.configuration_manager.median_image_size_in_voxels[-len(patch):]
        return any(p < m for p, m in zip(patch, median))

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
        """The L1 reference of the EF-UNet generation modes."""
        lesion = lesion.to(image.dtype)
        if self.generation == "mask":
            return lesion
        return image.mean(1, keepdim=True) * lesion

    def compute_loss(self, out, image: torch.Tensor, target, keys: list[str] | None = None
                     ) -> tuple[torch.Tensor, dict]:
        # None: the report pathways alone (the warm-up), no segmentation
        seg = None if out.seg is None else self.loss(out.seg, target)
        full_res = target[0] if isinstance(target, list) else target
        lesion, valid = self.lesion_mask(full_res)
        # ignored pixels (nnU-Net's ignore label) and padding say nothing about the lesion: no target there
        weight = valid & (out.inside > 0.5)
        if self.generation == "lesion":
            target = blur_mask(lesion.float(), self.generation_blur * max(lesion.shape[2:])) \
                if self.generation_blur else lesion
            gen = lesion_generation_loss(out.generated.float(), target, weight)
        else:
            reference = self.generation_reference(image, lesion).float()
            generated = torch.sigmoid(out.generated.float()) if self.pseudo_activation == "sigmoid" \
                else out.generated.float()
            gen = generation_loss(generated * weight, reference * weight)
        terms = {"gen": gen} if seg is None else {"seg": seg, "gen": gen}
        if out.t_hat is not None:
            # t is detached as the cycle's target: the projection must not collapse t to make h's job easy.
            terms["cycle"] = cycle_loss(out.t.detach().float(), out.t_hat.float(), normalized=self.cycle_normalized)
        if out.p_weak is not None:
            terms["iac"] = consistency_loss(out.p_weak.float(), out.p_strong.float())
        if self.lambda_whole_case > 0:
            if keys is None or out.frame is None:
                raise TextTrainingError(f"{type(self).__name__}'s whole-case generation loss needs the case ids "
                                        f"and the whole-image map")
            terms["whole_case"] = self.whole_case_generation_loss(out.frame, keys)
        weights = {"seg": 1.0, "gen": self.lambda_gen, "cycle": self.lambda_cycle, "iac": self.lambda_iac,
                   "whole_case": self.lambda_whole_case}
        total = sum(weights[k] * v for k, v in terms.items())
        # logged as detached tensors: the train step reads them with its loss in one transfer at its end (a float()
        # here would make the host wait for the forward pass before it can queue the backward)
        logged = {k: v.detach() for k, v in terms.items()}
        with torch.no_grad():  # over the image's pixels (weights, not a boolean index: no device sync)
            w = weight.float()
            n = w.sum()
            p = out.pseudo.float()
            none = torch.full_like(n, float("nan"))  # no pixel of the image in this batch: nothing to log
            logged.update(pseudo_mean=torch.where(n > 0, (p * w).sum() / n.clamp_min(1), none),
                          pseudo_std=torch.where(n > 0, p.flatten(1).std(1).mean(), none),
                          pseudo_near_zero=torch.where(n > 0, ((p.abs() < 0.05).float() * w).sum() / n.clamp_min(1),
                                                       none))
        return total, logged

    def whole_case_targets(self, size: tuple[int, int]) -> tuple[dict[str, int], torch.Tensor, torch.Tensor]:
        """Each training case's whole lesion mask at the whole-image map's scale: (row of each case id, lesion
        share (N, 1, S, S'), labelled share (N, 1, S, S')) per map cell, area-pooled from the preprocessed
        segmentation (pixels of nnU-Net's ignore label are not labelled; its -1 outside the nonzero mask is
        background). Area pooling puts cell j's centre where :func:`sample_patient_frame` reads cell j. Volumes
        trained slice by slice (nnU-Net's 2d configuration of 3D data) pool over their slices: the report
        describes the volume. Computed once per map size."""
        import torch.nn.functional as F
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        cached = getattr(self, "_whole_case_targets", None)
        if cached is not None and cached[0] == size:
            return cached[1:]
        dataset_class = self.dataset_class or infer_dataset_class(self.preprocessed_dataset_folder)
        if getattr(dataset_class, "adds_position_channels", False):  # only the segmentation is needed here
            dataset_class = dataset_class.__mro__[1]
        dataset = dataset_class(self.preprocessed_dataset_folder, self.training_case_ids,
                                folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        ignore = self.label_manager.ignore_label
        lesion, labelled = [], []
        for case in self.training_case_ids:
            seg = torch.from_numpy(np.asarray(dataset.load_case(case)[1][0], dtype=np.int16))  # (Z, Y, X)
            seg = seg.reshape(-1, *seg.shape[-2:]).float()
            known = torch.ones_like(seg) if ignore is None else (seg != ignore).float()
            fg = (seg > 0).float() * known
            lesion.append(F.adaptive_avg_pool2d(fg[:, None], size).mean(0))
            labelled.append(F.adaptive_avg_pool2d(known[:, None], size).mean(0))
        rows = {case: i for i, case in enumerate(self.training_case_ids)}
        lesion_t, labelled_t = torch.stack(lesion).to(self.device), torch.stack(labelled).to(self.device)
        # lesion share among labelled pixels: the target where the cell is labelled, weighted by how much of it is
        lesion_t = lesion_t / labelled_t.clamp_min(1e-6)
        self._whole_case_targets = (size, rows, lesion_t, labelled_t)
        return rows, lesion_t, labelled_t

    def whole_case_generation_loss(self, frame: torch.Tensor, keys) -> torch.Tensor:
        """BCE + soft Dice of the whole-image map (logits (B, 1, S, S')) against each sample's whole case at zone
        scale (:meth:`whole_case_targets`), mirrored for mirrored-patient samples (their report's sides are
        swapped, so the lesion lies in the other half of their patient frame).

        Why: the generation loss on the sample trains only the map cells its crop covers. With images larger than
        the patch a crop shows a quarter of the image or less, mostly around the lesion (nnU-Net's foreground
        oversampling), and a map trained that way did not know the side its report names (brighter on the named side
        in 6 of 9 one-sided cases, and as often with the sides swapped); the whole case tells every cell where the
        lesion is and is not."""
        if self.pseudo_activation != "sigmoid" or self.generation_source != "fused":
            raise TextTrainingError("the whole-case generation loss trains the map the U-Net reads (generation_source "
                                    "'fused') as a sigmoid pseudo-image's logits")
        rows, lesion, labelled = self.whole_case_targets(tuple(frame.shape[-2:]))
        missing = [str(k) for k in keys if str(k) not in rows]
        if missing:
            raise TextTrainingError(f"cases {missing[:5]} are not training cases of this fold: no whole-case target")
        idx = torch.tensor([rows[str(k)] for k in keys]).to(lesion.device, non_blocking=True)
        target, weight = lesion[idx], labelled[idx]
        mirrored = getattr(self, "patient_mirrored", None)  # set by batch_inputs for the batch being trained
        if mirrored is None or len(mirrored) != len(keys):
            raise TextTrainingError("the whole-case generation loss needs the batch's mirrored-patient draw: prepare "
                                    "the batch with batch_inputs right before its loss")
        if any(mirrored.tolist()):  # drawn on the host
            f = mirrored.to(target.device, non_blocking=True)[:, None, None, None]
            target, weight = torch.where(f, target.flip(-1), target), torch.where(f, weight.flip(-1), weight)
        return lesion_generation_loss(frame.float(), target, weight)

    def epoch_statistics(self) -> dict[str, float]:
        """First-convolution weight norm per input group: image channels, pseudo-image, position."""
        first = next(m for m in self.unwrapped_network().unet.modules() if isinstance(m, nn.Conv2d))
        w = first.weight.detach().float()
        norms = w.transpose(0, 1).flatten(1).norm(dim=1)  # (in_channels,)
        c = self.num_input_channels
        stats = {"wnorm_image": float(norms[:c].mean()), "wnorm_pseudo": float(norms[c]),
                 "wnorm_position": float(norms[c + 1:].mean()) if norms.numel() > c + 1 else float("nan")}
        prior = self.unwrapped_network().map_prior
        if prior is not None:  # how far the map's prior is trusted: its weight on the lesion classes (or regions)
            w = prior.weight.detach().float()
            stats["prior_weight"] = float((w if self.label_manager.has_regions else w[1:]).mean())
        return stats

    def cross_fit_folds(self, keys: list[str] | None) -> torch.Tensor | None:
        """Cross-fitting: each case's fold, i.e. the report pathway that never fits it and whose map the U-Net
        reads — the training cases of this fold, sorted by id, dealt in turn (a fixed, balanced split); None with
        one pathway."""
        if self.cross_fit == 1:
            return None
        if keys is None:
            raise TextTrainingError(f"{type(self).__name__} is cross-fitted: its training step needs the case ids")
        k = int(self.cross_fit)
        if not hasattr(self, "_fold_of"):
            self._fold_of = {case: i % k for i, case in enumerate(self.training_case_ids)}
        # a case outside the split (not expected) still gets a fixed fold. Kept on the host, as the fitting draw
        # (torch's CPU generator, also when training on a GPU): the network groups samples by pathway without
        # waiting for the device
        return torch.tensor([self._fold_of.get(str(c), zlib.crc32(str(c).encode()) % k) for c in keys])

    def fitting_pathways(self, folds: torch.Tensor) -> torch.Tensor:
        """For each sample, the pathway its generation and cycle losses train this step: one of the pathways other
        than its fold's, drawn uniformly (with 2 pathways, the other one), so over the steps every pathway but its
        fold's fits every case."""
        k = int(self.cross_fit)
        offset = torch.randint(1, k, folds.shape, device=folds.device) if k > 2 else torch.ones_like(folds)
        return (folds + offset) % k

    def on_train_start(self):
        super().on_train_start()
        if self.pathway_warmup_steps > 0 and self.current_epoch == 0:  # not again when resuming with --c
            self.warm_up_report_pathways(self.pathway_warmup_steps)

    def warm_up_report_pathways(self, steps: int) -> list[float]:
        """Train the report pathways alone for ``steps`` loader batches: generation (and cycle) loss, the text
        optimizer only, full precision; the U-Net is not run. Returns the per-step generation loss.

        Why: trained jointly, the pathways need the whole run to learn where reports put lesions, while the U-Net
        fits its few labelled images in the first epochs from the image alone and then has no reason left to read
        a map that became informative later. Warmed up, the map is as good as it will be from the U-Net's first
        step (the U-Net given the true zone map as a channel from the start gains +0.11 Dice; README). Cross-fitting
        and report dropout apply as in training, so the maps the U-Net reads stay those of pathways that never
        fitted the case."""
        net = self.unwrapped_network()
        text_optimizer = self.optimizer.text if isinstance(self.optimizer, OptimizerPair) else self.optimizer
        params = [p for group in text_optimizer.param_groups for p in group["params"]]
        c = self.num_input_channels
        losses, start = [], time.time()
        self.print_to_log_file(f"Report pathways: {steps} warm-up steps alone before the U-Net's first epoch")
        for step in range(steps):
            batch = next(self.dataloader_train)
            data, target, tokens, mask, drop = self.batch_inputs(batch)
            keys = list(batch["keys"])
            folds = self.cross_fit_folds(keys)
            routing = {} if folds is None else {"fold": folds, "fit": self.fitting_pathways(folds)}
            text_optimizer.zero_grad(set_to_none=True)
            out = net.report_pathways_forward(torch.cat([data[:, :c], data[:, -POSITION_CHANNELS:]], 1),
                                              tokens=tokens, mask=mask, drop=drop, **routing)
            loss, terms = self.compute_loss(out, data[:, :c], target, keys)
            loss.backward()
            if self.is_ddp:  # the U-Net's DDP wrapper is bypassed: average the pathways' gradients by hand
                average_gradients_across_ranks(params)
            torch.nn.utils.clip_grad_norm_(params, 12)
            text_optimizer.step()
            losses.append(terms["gen"])
            if (step + 1) % max(1, steps // 5) == 0 or step + 1 == steps:
                pending = [i for i, v in enumerate(losses) if torch.is_tensor(v)]  # read in one transfer
                for i, v in zip(pending, torch.stack([losses[i] for i in pending]).tolist() if pending else []):
                    losses[i] = v
                recent = float(np.mean(losses[-max(1, steps // 5):]))
                self.print_to_log_file(f"  warm-up step {step + 1}/{steps}: generation loss {recent:.4f} "
                                       f"({time.time() - start:.0f} s)")
        text_optimizer.zero_grad(set_to_none=True)
        return losses

    def complete_gradients(self) -> None:
        """Cross-fitted, each step trains only the pathways its samples were routed through; the others' parameters
        get zero gradients, as under DDP (where they must stay in the graph, see BiCLIPNetwork), so AdamW treats them
        alike in one process and in several: zero gradient, the moments still decay and move them. Filled here, after
        the backward pass, from one zeroed buffer: in the graph it costs a few small kernels per parameter. The buffer
        (millions of values) is kept and zeroed again each step: a fresh one a step costs page faults, ~10 ms on the
        CPU."""
        if self.cross_fit == 1 or self.is_ddp:
            return
        net = self.unwrapped_network()
        missing = [q for name, q in net.named_parameters()
                   if q.requires_grad and q.grad is None and not name.startswith("unet.")]
        if missing:
            size, like = sum(q.numel() for q in missing), missing[0]
            kept = getattr(self, "_zero_gradients", None)
            if kept is None or kept.numel() < size or kept.device != like.device or kept.dtype != like.dtype:
                kept = self._zero_gradients = torch.empty(size, device=like.device, dtype=like.dtype)
            flat = kept[:size].zero_()  # last step's views may have been scaled or added to in place
            for q, g in zip(missing, flat.split([q.numel() for q in missing])):
                q.grad = g.view_as(q)

    def compute_step(self, data, target, tokens, mask, drop, keys=None) -> tuple[torch.Tensor, dict]:
        # channels: [weak view C | strong view C (IAC only) | position 3]
        c = self.num_input_channels
        position = data[:, -POSITION_CHANNELS:]
        weak = data[:, :c]
        strong = data[:, c:2 * c] if data.shape[1] == 2 * c + POSITION_CHANNELS else None
        folds = self.cross_fit_folds(keys)
        routing = {} if folds is None else {"fold": folds, "fit": self.fitting_pathways(folds)}
        out = self.network(torch.cat([weak, position], 1), tokens=tokens, mask=mask, drop=drop,
                           x_strong=strong, return_aux=True, **routing)
        return self.compute_loss(out, weak, target, keys)
