"""Ablations and schedules of nnUNetTrainerBiCLIP, nnU-Net style: one small subclass per change.

Class names are permanent: nnU-Net stores them in checkpoints and names result folders after them.
"""
from __future__ import annotations

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP
from nnunetv2_textseg.training.medclipseg import nnUNetTrainerMedCLIPSeg
from nnunetv2_textseg.training.text_trainer import nnUNetTrainerText, safe_rotation_and_patch_size


# ---- the earlier design and the steps from it to the default --------------------------------------
class nnUNetTrainerBiCLIP_endToEnd(nnUNetTrainerBiCLIP):
    """The default up to commit bfc641f (2026-12-03): one report pathway trained end to end with the U-Net (the
    segmentation loss reaches the text modules), one attention-pooled map per report, no warm-up and no rewritten
    reports. Kept to compare and to train more folds of models made with it. Measured (3 benchmark seeds): it read
    its report weakly and not in every seed (contradictory reports cost −0.076 ± 0.10 Dice, shuffled −0.031)."""
    seg_gradient_to_text = True
    cycle_normalized = False
    cross_fit = 1
    token_maps = False
    token_window = 1
    pathway_warmup_steps = 0
    mirrored_patient = 0.0
    location_free_reports = 0.0
    text_adapters = False


class nnUNetTrainerBiCLIP_mapOnly(nnUNetTrainerBiCLIP):
    """The default up to commit fc1398c: the report reaches the U-Net only through the map (pseudo-image channel),
    without MedCLIPSeg's adapters. Kept to compare and to train more folds of models made with it; the variants
    measured against it (_longWarmup, _mapPrior, _wholeCase, _anatomyGate, _deepMap) build on it. Measured (README,
    "MedCLIPSeg's adapters in BiCLIP"): wrong reports cost it a third to a sixth of what they cost the default, and
    its Dice was below the default's at 10 % of the labels and on the development seeds."""
    text_adapters = False


# ---- ablations of the default -------------------------------------------------------------------
class nnUNetTrainerBiCLIP_noIAC(nnUNetTrainerBiCLIP):
    """No augmentation-consistency branch: one view, no IAC head (isolates IAC)."""
    lambda_iac = 0.0


class nnUNetTrainerBiCLIP_noCycle(nnUNetTrainerBiCLIP):
    """No image-to-text head and cycle loss (isolates the cycle constraint)."""
    lambda_cycle = 0.0


class nnUNetTrainerBiCLIP_unidirectional(nnUNetTrainerBiCLIP):
    """No BMF: t' = t, no Δt refinement from the global image embedding (isolates BMF; the default's adapters still
    let the report's tokens attend to image features — without them, on _mapOnly, the LViT-style baseline)."""
    bidirectional = False


class nnUNetTrainerBiCLIP_noText(nnUNetTrainerBiCLIP):
    """Same network and losses, but always the null report: what the report itself contributes."""
    ignore_text = True


class nnUNetTrainerBiCLIP_noBMF(nnUNetTrainerBiCLIP_endToEnd):
    """No pseudo-image losses: the pseudo-image is shaped by segmentation alone (no generation/cycle)."""
    lambda_gen = 0.0
    lambda_cycle = 0.0


class nnUNetTrainerBiCLIP_efunet(nnUNetTrainerBiCLIP_endToEnd):
    """The papers' literal pseudo-image: EF-UNet's L1 to image × lesion (λ 0.1), an unbounded (linear)
    pseudo-image fed as is, and the mean-pooled report embedding. Kept for comparison: on our data its
    pseudo-image learns to be nearly empty (see lesion_generation_loss for why)."""
    generation = "masked_image"
    lambda_gen = 0.1
    text_pooling = "mean"
    pseudo_activation = "linear"


class nnUNetTrainerBiCLIP_textGen(nnUNetTrainerBiCLIP_endToEnd):
    """The generation loss trains the report's own map G(t) instead of the BMF-refined G(t') the U-Net sees,
    so the image embedding cannot stand in for the report in that loss. Measured worse than the default
    (one seed of the few-labels benchmark: the U-Net's pseudo-image, trained by segmentation alone, drifted
    to pixel AUC 0.56); kept to compare."""
    generation_source = "text"


class nnUNetTrainerBiCLIP_noSegGrad(nnUNetTrainerBiCLIP_endToEnd):
    """The pseudo-image is trained by the generation and a layer-normalised cycle loss only; the segmentation
    loss's gradient stops at it. Measured on development data: the text modules then learn where reports put
    lesions and the model reads its report (shuffled / missing-location reports cost 0.10-0.12 Dice), but the
    U-Net leans on maps that are sharper for training reports than for new ones and loses Dice on test data."""
    seg_gradient_to_text = False
    cycle_normalized = True


class nnUNetTrainerBiCLIP_crossFit(nnUNetTrainerBiCLIP_noSegGrad):
    """Two report pathways, cross-fitted: each training case is fitted by one while the U-Net reads the other's
    map of it, so the U-Net learns how far a map of a report its generator has not fitted can be trusted (as at
    test time); prediction reads the pathways' mean. Segmentation gradient stopped, layer-normalised cycle."""
    cross_fit = 2


class nnUNetTrainerBiCLIP_crossFitTokens(nnUNetTrainerBiCLIP_crossFit):
    """Four cross-fitted report pathways (each fits three quarters of the cases, so the U-Net trains on maps as
    good as a new report's, drawn by a generator that has seen 3/4 of the labels rather than half), each with
    per-token zone maps (one map per phrase, united), and mirrored-patient samples (twice the word-to-place
    examples). Why: trained alone on 20 cases (text_pathway_probe.py), token maps and mirrored reports each placed
    lesions better on held-out cases; cross-fitting keeps the U-Net from trusting training reports' maps more
    than new ones deserve."""
    cross_fit = 4
    token_maps = True
    mirrored_patient = 0.5


class nnUNetTrainerBiCLIP_pathwayWarmup(nnUNetTrainerBiCLIP_crossFitTokens):
    """_crossFitTokens whose report pathways first train alone (750 loader batches, the U-Net untouched), so the
    U-Net reads an informative map from its first step instead of fitting its few images before the map means
    anything. Why: plain nnU-Net given the true zone map from the start gains +0.11 Dice on clean images, while the
    jointly trained pathways, as good on held-out reports by the end of training, gained ~0 there."""
    pathway_warmup_steps = 750


class nnUNetTrainerBiCLIP_phraseMaps(nnUNetTrainerBiCLIP_pathwayWarmup):
    """_pathwayWarmup whose per-token maps each read a window of 3 tokens, so side and level of one phrase ("lower
    left lung") draw one map. Why: with one token per map, the union let "lower" light both lower zones and the side
    was lost — trained alone on 20 cases, maps for one-sided reports were no brighter on the named side than on the
    other (59-68 % of cases right); windows of 3 tokens: 99-100 %, and after 1500 steps the other side is empty."""
    token_window = 3


class nnUNetTrainerBiCLIP_locationFree(nnUNetTrainerBiCLIP_phraseMaps):
    """_phraseMaps that also trains a quarter of the samples with their report's location words removed. Why: every
    training report names places, so _phraseMaps read a report naming none ("Pulmonary infection, two infected
    areas.") as "nowhere" and missed lesions it finds with no report at all (Dice 0.23-0.27 vs 0.59-0.62).
    The default nnUNetTrainerBiCLIP from commit 9437560 until it also trained with the bare finding (kept: models
    and benchmark rows carry this name)."""
    location_free_reports = 0.25
    finding_only_share = 0.0


class nnUNetTrainerBiCLIP_mirroredPatient(nnUNetTrainerBiCLIP_endToEnd):
    """Half the samples are shown as their mirror-image patient (patient-frame column negated, report with left and
    right swapped): twice the word-to-place examples from the same labelled cases. Why: trained alone on 20 cases,
    the report pathway placed lesions better on held-out cases with these pairs added (text_pathway_probe.py)."""
    mirrored_patient = 0.5


class nnUNetTrainerMedCLIPSeg_mirroredPatient(nnUNetTrainerMedCLIPSeg):
    """Half the samples are shown as their mirror-image patient (patient-frame column negated, report with left and
    right swapped): twice the word-to-place examples from the same labelled cases. Measured at 17eb0d8 (5 %,
    development seeds): +0.001 / −0.005 Dice vs the default on clean / low-dose images."""
    mirrored_patient = 0.5


class nnUNetTrainerMedCLIPSeg_reportsAsWritten(nnUNetTrainerMedCLIPSeg):
    """Every sample reads its report as written (the default up to commit 1b6a8b2, and the method as published).
    Kept to compare and to train more folds of models made with it. Measured at 10 % of the labels (3 benchmark
    seeds): a report naming no place cost it 0.51 Dice and the generic "Pulmonary infection." 0.53, against 0.07 for
    no report at all — it read them as "nowhere"."""
    location_free_reports = 0.0


class nnUNetTrainerMedCLIPSeg_locationFree(nnUNetTrainerMedCLIPSeg):
    """A quarter of the samples read their report with its location words removed (commit a0c7364), not yet the bare
    finding. Kept: models and benchmark rows carry this name; the default now does the same and more."""
    location_free_reports = 0.25
    finding_only_share = 0.0


class nnUNetTrainerMedCLIPSeg_threeAdapters(nnUNetTrainerMedCLIPSeg):
    """Adapters after the last three encoder stages instead of two: the report also meets the features at the
    next finer scale (16² tokens for a 64² patch), where a lung zone spans a few tokens rather than one or two.
    Measured at d01b89b (5 %, development seeds, README "MedCLIPSeg: three changes tried"): −0.003 / −0.009 Dice vs
    the default on clean / low-dose images; kept as a variant."""
    adapter_stages = (-3, -2, -1)


class nnUNetTrainerMedCLIPSeg_adapterPosition(nnUNetTrainerMedCLIPSeg):
    """The adapters' image tokens also get their patient-frame position (Fourier features added to their
    down-projection): the cross-attention can bind "upper left" to where a token lies instead of relying on what
    the encoder carried over from the input's position channels. Measured at 17eb0d8 (5 %, development seeds): +0.010
    / +0.002 Dice vs the default on clean / low-dose images (±0.03), short of the +0.01 on both set beforehand; kept
    as a variant."""
    adapter_position = True


# ---- tried on the map-only default (_mapOnly) and not kept: "the default" in these docstrings is that design ----
class nnUNetTrainerBiCLIP_longWarmup(nnUNetTrainerBiCLIP_mapOnly):
    """The map-only default with 3000 warm-up steps instead of 750. Why: four cross-fitted pathways share the warm-up,
    each sample fitting one of them, so each pathway sees about a quarter of its batches (~190 of 750) — the pathway
    trained alone needed 750-1500 batches to bind side to level (text_pathway_probe.py), and the trained models'
    maps named the lesion's side in only 15-18 of 24 one-sided cases. Measured (README, "A longer warm-up"): a
    better map (region AUC 0.849 vs 0.829 on three development seeds) that the U-Net leans on less, and no Dice
    gain — kept as a variant, not the default."""
    pathway_warmup_steps = 3000


class nnUNetTrainerBiCLIP_mapPrior(nnUNetTrainerBiCLIP_mapOnly):
    """The map also enters the output as a prior: its log-odds, weighted per class (learned, starting at 1), are
    added to the U-Net's logits. Why: the default's U-Net may learn to ignore its map channel, and with images
    larger than the patch it did (no report cost 0.001 Dice). Measured at bff7bbd: no Dice gain over the default on
    64² or on larger images, and the U-Net did not lean on the map more (README, "Tried and not kept: the map as a
    prior"); kept as a variant."""
    map_prior = True
    aux_stats = nnUNetTrainerBiCLIP.aux_stats + ("prior_weight",)


class nnUNetTrainerBiCLIP_wholeCase(nnUNetTrainerBiCLIP_mapOnly):
    """The report pathway's whole-image map is also trained against the sample's whole case at zone scale, not
    only against the crop it shows (nnUNetTrainerBiCLIP.whole_case_generation_loss). Why: with images larger than
    the patch the default's map did not know the side its report names. Measured at e38c268 (development seeds, 5 %):
    +0.015 Dice over the default on 128² images with a 64² patch (short of the +0.02 decided beforehand), −0.026 on
    64² images (README, "Tried and not kept: the map trained on the whole case"); kept as a variant."""
    lambda_whole_case = 1.0
    aux_losses = nnUNetTrainerBiCLIP.aux_losses + ("whole_case",)


class nnUNetTrainerBiCLIP_wholeCaseCropped(nnUNetTrainerBiCLIP):
    """Today's default plus the whole-case generation term, only where nnU-Net plans a patch smaller than the median
    image (``whole_case_only_when_cropped``; elsewhere it trains exactly as the default). Why: in the large-image
    condition the default's map did not know the side its report names (a crop trains only the map cells it covers),
    while on images the patch covers the term cost Dice (``_wholeCase``, on the map-only design). Measured at 1ef261f
    (128² images, 64² patch, 5 %, benchmark seeds): −0.017 / −0.013 / −0.012 Dice against the default on clean /
    low-dose / motion images (README, "Tried and not kept: the whole case where the patch crops"); kept as a
    variant."""
    lambda_whole_case = 1.0
    whole_case_only_when_cropped = True
    aux_losses = nnUNetTrainerBiCLIP.aux_losses + ("whole_case",)


class nnUNetTrainerBiCLIP_anatomyGate(nnUNetTrainerBiCLIP_mapOnly):
    """Each report pathway's map is gated by the sample's image (BiCLIPNetwork's anatomy_gate): p · σ(gate), the
    gate drawn at 1/4 resolution from the image and position. Why: a map from the text alone is blurred over every
    patient's lungs; with the named zones drawn on the case's own lungs plain nnU-Net gained +0.075 Dice on the
    benchmark's clean images against +0.048 on the average lung (oracle maps). The gate trains with the rest of the
    pathway (generation loss, cross-fitted, warm-up), so the U-Net reads a gated map of a case no gate has fitted.
    Measured at 1c9c93d (5 %, README "The image draws the zone"): maps that follow each case's lungs, region AUC 0.861
    vs the default's 0.837 on the benchmark seeds, but Dice −0.006 / −0.014 vs the default there on clean / low-dose
    images (+0.011 / +0.030 on the development seeds); kept as a variant."""
    anatomy_gate = True


class nnUNetTrainerBiCLIP_deepMap(nnUNetTrainerBiCLIP_mapOnly):
    """The map also enters the last two encoder stages (BiCLIPNetwork's deep_map: pooled to their grid, added
    through a 1×1 convolution started at zero). Why: as an input channel it meets the image only at full resolution;
    the U-Net leaned on it little (no report cost the default 0.01–0.04 Dice), while MedCLIPSeg, whose report enters
    the deepest stages, gains more. Measured at 7a41cdc (5 %, development seeds, README "Tried and not kept: the map
    in the deepest stages too"): −0.003 / −0.001 Dice vs the default's two trainings on clean / low-dose images;
    kept as a variant."""
    deep_map = True


class nnUNetTrainerBiCLIP_textAdapters(nnUNetTrainerBiCLIP):
    """The default since fe37a5d (text_adapters: MedCLIPSeg's cross-modal adapters after the last two encoder stages,
    their fused tokens scaling and shifting the logits). Kept under this name because models and benchmark rows
    measured before the switch carry it; the same network as the default."""
    text_adapters = True


class nnUNetTrainerBiCLIP_noPosition(nnUNetTrainerBiCLIP):
    """The U-Net gets [image, pseudo-image] only: the patient frame reaches it through the pseudo-image."""
    position_to_unet = False


class nnUNetTrainerBiCLIP_safeAug(nnUNetTrainerBiCLIP):
    """Safe-mode spatial augmentation: ±15° rotation, no mirroring in training or at test time."""
    safe_spatial_augmentation = True


class nnUNetTrainerMedCLIPSeg_safeAug(nnUNetTrainerMedCLIPSeg):
    """Safe-mode spatial augmentation: ±15° rotation, no mirroring in training or at test time."""
    safe_spatial_augmentation = True


class nnUNetTrainer_safeAug(nnUNetTrainer):
    """Plain nnU-Net with the text trainers' safe-mode spatial augmentation (the control for what that
    augmentation alone costs)."""
    max_rotation_deg = 15.0

    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        rotation, initial_patch_size = safe_rotation_and_patch_size(self.configuration_manager.patch_size,
                                                                    self.max_rotation_deg, dummy_2d)
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None


class nnUNetTrainerBiCLIP_paper(nnUNetTrainerBiCLIP):
    """The paper's schedule: AdamW, lr 1e-4, cosine annealing with warm restarts, batch 16, 150 epochs."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.initial_lr = 1e-4
        self.num_epochs = 150

    def _set_batch_size_and_oversample(self):
        # 16 is the global batch: set it where nnU-Net reads it (this trainer's own resolved configuration),
        # so that under DDP its own logic splits the batch (and the foreground oversampling) over the ranks.
        self.configuration_manager.configuration["batch_size"] = 16
        super()._set_batch_size_and_oversample()

    def configure_optimizers(self):
        optimizer = torch.optim.AdamW(self.network.parameters(), lr=self.initial_lr, weight_decay=self.weight_decay)
        # nnU-Net calls scheduler.step(epoch) once per epoch; restart every 50 epochs (3 cycles in 150).
        scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=50)
        return optimizer, scheduler


class nnUNetTrainerMedCLIPSeg_noProb(nnUNetTrainerMedCLIPSeg):
    """Deterministic attention (keys/values without variance): isolates the probabilistic part."""
    deterministic = True


class nnUNetTrainerMedCLIPSeg_noContrastive(nnUNetTrainerMedCLIPSeg):
    """No soft patch-text contrastive loss: isolates it."""
    lambda_contrastive = 0.0


class nnUNetTrainerMedCLIPSeg_noText(nnUNetTrainerMedCLIPSeg):
    """Same network, always the null report: what the report contributes."""
    ignore_text = True


# ---- training lengths (nnU-Net's `_Nepochs` naming); short ones for the demo and tests ------------
def _with_length(base: type, name: str, epochs: int, iterations: int | None = None, val_iterations: int | None = None,
                 doc: str = "", warmup_steps: int | None = None) -> type:
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        base.__init__(self, plans, configuration, fold, dataset_json, device)
        self.num_epochs = epochs
        if iterations is not None:
            self.num_iterations_per_epoch = iterations
        if val_iterations is not None:
            self.num_val_iterations_per_epoch = val_iterations
        if warmup_steps is not None and getattr(self, "pathway_warmup_steps", 0) > 0:
            self.pathway_warmup_steps = min(self.pathway_warmup_steps, warmup_steps)
    return type(name, (base,), {"__init__": __init__, "__doc__": doc or f"{base.__name__} for {epochs} epochs.",
                                "__module__": __name__})


_LENGTHS = {"_1epoch": (1, None, None), "_5epochs": (5, None, None), "_10epochs": (10, None, None),
            "_20epochs": (20, None, None), "_50epochs": (50, None, None), "_100epochs": (100, None, None),
            # CPU-sized: the README demo (a few minutes on 2 cores) and the test suite (seconds).
            "_demo": (30, 25, 5), "_debug": (2, 4, 2)}
_WARMUP_STEPS = {"_debug": 4}  # the tests' trainings run the report-pathway warm-up, briefly
_BASES = [nnUNetTrainerBiCLIP, nnUNetTrainerBiCLIP_endToEnd, nnUNetTrainerBiCLIP_mapOnly, nnUNetTrainerBiCLIP_noIAC,
          nnUNetTrainerBiCLIP_noCycle, nnUNetTrainerBiCLIP_unidirectional, nnUNetTrainerBiCLIP_noText,
          nnUNetTrainerBiCLIP_noBMF, nnUNetTrainerBiCLIP_efunet, nnUNetTrainerBiCLIP_textGen,
          nnUNetTrainerBiCLIP_noSegGrad, nnUNetTrainerBiCLIP_crossFit, nnUNetTrainerBiCLIP_safeAug,
          nnUNetTrainerBiCLIP_noPosition, nnUNetTrainerBiCLIP_mirroredPatient, nnUNetTrainerBiCLIP_crossFitTokens,
          nnUNetTrainerBiCLIP_pathwayWarmup, nnUNetTrainerBiCLIP_phraseMaps, nnUNetTrainerBiCLIP_locationFree,
          nnUNetTrainerBiCLIP_longWarmup, nnUNetTrainerBiCLIP_mapPrior, nnUNetTrainerBiCLIP_wholeCase,
          nnUNetTrainerBiCLIP_anatomyGate, nnUNetTrainerBiCLIP_deepMap, nnUNetTrainerBiCLIP_textAdapters,
          nnUNetTrainerBiCLIP_wholeCaseCropped,
          nnUNetTrainerMedCLIPSeg, nnUNetTrainerMedCLIPSeg_noProb, nnUNetTrainerMedCLIPSeg_noContrastive,
          nnUNetTrainerMedCLIPSeg_noText, nnUNetTrainerMedCLIPSeg_safeAug, nnUNetTrainerMedCLIPSeg_mirroredPatient,
          nnUNetTrainerMedCLIPSeg_locationFree, nnUNetTrainerMedCLIPSeg_reportsAsWritten,
          nnUNetTrainerMedCLIPSeg_threeAdapters, nnUNetTrainerMedCLIPSeg_adapterPosition]
for _base in _BASES:
    for _suffix, (_e, _it, _vit) in _LENGTHS.items():
        _cls = _with_length(_base, _base.__name__ + _suffix, _e, _it, _vit, warmup_steps=_WARMUP_STEPS.get(_suffix))
        globals()[_cls.__name__] = _cls
# Plain nnU-Net with the same short lengths, so demo and benchmark compare like with like
# (nnU-Net's own nnUNetTrainer_Nepochs classes keep 250 iterations per epoch).
for _plain in (nnUNetTrainer, nnUNetTrainer_safeAug):
    for _suffix in ("_demo", "_debug"):
        _e, _it, _vit = _LENGTHS[_suffix]
        _cls = _with_length(_plain, _plain.__name__ + _suffix, _e, _it, _vit)
        globals()[_cls.__name__] = _cls
del _base, _plain, _suffix, _e, _it, _vit, _cls

__all__ = ["nnUNetTrainerBiCLIP", "nnUNetTrainerMedCLIPSeg"] + [
    n for n, v in list(globals().items()) if isinstance(v, type) and n.startswith("nnUNetTrainer") and n != "nnUNetTrainer"]


def text_trainer_class(name: str) -> type[nnUNetTrainerText]:
    """One of our text trainers (BiCLIP/MedCLIPSeg and every variant above) by class name; KeyError if none."""
    found, todo = {}, [nnUNetTrainerText]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo.extend(cls.__subclasses__())
    if name not in found or found[name] is nnUNetTrainerText:
        known = sorted(n for n in found if n != "nnUNetTrainerText")
        raise KeyError(f"{name!r} is not a text trainer of nnunetv2-textseg. Pick one of: {', '.join(known[:12])}, ...")
    return found[name]
