"""Report plumbing shared by all text trainers: which encoder, the embedding table, per-case text for
training batches, per-epoch validation and nnU-Net's final validation, and the spatial-word policy.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.helpers import dummy_context
from nnunetv2.utilities.plans_handling.plans_handler import ConfigurationManager, PlansManager
from torch._dynamo import OptimizedModule

from nnunetv2_textseg.cache import (CacheError, TextEmbeddingCache, build_or_update_cache, cache_folder, cache_path,
                                    load_checked_cache)
from nnunetv2_textseg.encoders import EncoderSpec, spec_from_record, spec_to_dict
from nnunetv2_textseg.errors import TextSegError
from nnunetv2_textseg.report_familiarity import REFERENCE_FILE, ReportReference
from nnunetv2_textseg.reports import ReportError, load_dataset_reports, reports_path

PLANS_KEY = "textseg"  # our entry in the plans.json the trainer writes to its results folder
# 2: patient-frame position channels, BiCLIP with token attention pooling and a probability pseudo-image
NETWORK_VERSION = 2
ENCODER_ENV = "nnUNet_textseg_encoder"
TRUST_ENV = "nnUNet_textseg_trust_remote_code"


class TextTrainingError(TextSegError, RuntimeError):
    """A text trainer cannot start (missing reports, foreign model, ...); the message says the fix."""


def _spec_from_dict(d: dict, trust: bool = False) -> EncoderSpec:
    """An encoder spec from a recorded one (plans.json, a cache). Remote code runs only when THIS run opts in
    (``$nnUNet_textseg_trust_remote_code=1``): a recorded ``trust_remote_code`` is never enough by itself."""
    if d.get("trust_remote_code") and not trust:
        raise TextTrainingError(
            f"The text encoder {d['name_or_path']!r} was recorded with trust_remote_code=True (it runs Python code "
            f"shipped with the model). It is not switched on from a file: if you trust that code, opt in for this "
            f"run with {TRUST_ENV}=1.")
    # a record without a precision (older versions) is float32: spec_from_record keeps it so
    return spec_from_record(d, trust_remote_code=trust and bool(d.get("trust_remote_code")))


def choose_encoder_spec(preprocessed_folder: Path, default: EncoderSpec, recorded: dict | None = None) -> EncoderSpec:
    """Encoder for training.

    1. ``recorded``: the encoder already in this model folder's plans.json (``--c``, ``--val``, other
       folds) — a model never changes encoder; asking for another one via the env var is an error.
    2. ``$nnUNet_textseg_encoder``: pooling/max length/revision come from the one cache of that encoder
       (as ``nnUNetv2_textseg_encode`` wrote it), else the trainer's defaults.
    3. The only cache that exists for the training split. 4. The trainer's default.
    Several candidates and no choice is an error, not a guess."""
    trust = os.environ.get(TRUST_ENV, "0").lower() in ("1", "true", "yes")
    wanted = os.environ.get(ENCODER_ENV)
    if recorded is not None:
        spec = _spec_from_dict(recorded, trust)
        if wanted and wanted != spec.name_or_path:
            raise TextTrainingError(f"This model folder was trained with text encoder {spec.name_or_path!r}, but "
                                    f"{ENCODER_ENV}={wanted!r}. A model keeps its encoder: unset {ENCODER_ENV} or "
                                    f"train into another trainer/plans folder.")
        return spec
    # only the settings are needed to choose; the chosen cache is checked in full (and an outdated one
    # re-encoded) when it is loaded for training
    caches = {c: TextEmbeddingCache.read_spec(c) for c in sorted(cache_folder(preprocessed_folder).glob("*__Tr.npz"))}
    if wanted:
        matching = [c for c, spec in caches.items() if spec.get("name_or_path") == wanted]
        if len(matching) == 1:
            return _spec_from_dict(caches[matching[0]], trust)
        if len(matching) > 1:
            raise TextTrainingError(f"Several caches of {wanted!r} exist ({[str(c) for c in matching]}); "
                                    f"delete the ones you do not want to train with.")
        return EncoderSpec(wanted, default.pooling, default.max_length, trust, precision=default.precision)
    if len(caches) == 1:
        return _spec_from_dict(next(iter(caches.values())), trust)
    if len(caches) > 1:
        raise TextTrainingError(f"Several report embedding caches exist in {cache_folder(preprocessed_folder)} "
                                f"({[c.name for c in caches]}). Choose one with {ENCODER_ENV}=NAME_OR_PATH.")
    return default


class nnUNetTrainerText(nnUNetTrainer):
    """Base for text-guided trainers. Not meant to be trained itself (it adds no text to the network).

    Spatial words ("left", "upper") refer to the patient's whole image. Every case is loaded with three
    patient-frame position channels (:mod:`nnunetv2_textseg.patient_frame`) that nnU-Net's crop, rotation,
    scaling and mirroring move together with the image, so the network always knows where each pixel of
    a sample lies in the patient's image. That keeps "upper left" true under nnU-Net's full default
    augmentation and test-time mirroring, which text trainers therefore keep (with few labels,
    augmentation matters more than anything else we measured).

    ``safe_spatial_augmentation = True`` (the ``_safeAug`` variants) restores the older "safe mode":
    rotation limited to ±``max_rotation_deg``, no mirroring in training or at test time.
    Images are assumed to be stored in a consistent orientation (as radiology exports are).
    """

    text_encoder = EncoderSpec()  # default: offline all-MiniLM-L6-v2, mean pooling
    uses_token_text = False  # True: keep token-level embeddings (cross-attention trainers)
    aux_losses: tuple[str, ...] = ()  # extra per-epoch loss terms: logged, checkpointed, plotted
    aux_stats: tuple[str, ...] = ()  # extra per-epoch statistics (not losses): logged, checkpointed, plotted
    safe_spatial_augmentation = False
    max_rotation_deg = 15.0  # safe mode only
    patient_frame = True  # position channels with every sample and tile (recorded in the plans)
    text_lr = 1e-3  # AdamW for the text modules; nnU-Net's SGD (its lr, momentum, PolyLR) keeps the U-Net
    text_weight_decay = 1e-4
    # probability of training a sample with the learned null report (cases without one, unseen reports)
    report_dropout = 0.0
    # probability of presenting a sample as its mirror-image patient: the patient-frame column channel negated and
    # the report's left/right swapped (a second word-to-place example per labelled case; 0 = off)
    mirrored_patient = 0.0
    # probability of training a sample with its report's side, zone and laterality words removed (the same rewrite
    # as report_variants' missing_location): a report that names no place must leave the network reading the
    # image, not tell it "nowhere" (0 = off)
    location_free_reports = 0.0
    # share of those location-free samples that read the report's bare finding instead ("Pulmonary infection.",
    # report_variants.finding_only): no place and no count either
    finding_only_share = 0.5

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.text_table: torch.Tensor | None = None  # (N, D_in) pooled embeddings, row per case id
        self.text_rows: dict[str, int] = {}
        self.report_reference: ReportReference | None = None

    # ---- text preparation ----------------------------------------------------------------------
    def _text_plans_entry(self, identity: dict, spec: EncoderSpec) -> dict:
        from nnunetv2_textseg.patient_frame import POSITION_CHANNELS
        return {"encoder": spec_to_dict(spec), "encoder_identity": identity, "text_in_dim": int(identity["dim"]),
                "position_channels": POSITION_CHANNELS if self.patient_frame else 0,
                "spatial_augmentation": "safe" if self.safe_spatial_augmentation else "nnunet",
                "network_version": NETWORK_VERSION, **self.network_plans_entry()}

    @classmethod
    def network_plans_entry(cls) -> dict:
        """The plans entries that shape this trainer's network beyond nnU-Net's own (recorded, so prediction and
        checkpoint conversion build the same network); their values for earlier models: network_plans_defaults."""
        return {}

    def prepare_text(self) -> None:
        """Load (or lazily build) the report embeddings of every case this fold uses and record the
        encoder in the plans, so prediction rebuilds the same network and encodes with the same model."""
        pre = Path(self.preprocessed_dataset_folder_base)
        recorded_plans = Path(self.output_folder_base) / "plans.json"
        recorded = None
        if recorded_plans.is_file():
            import json
            recorded = json.loads(recorded_plans.read_text()).get(PLANS_KEY, {}).get("encoder")
        spec = choose_encoder_spec(pre, self.text_encoder, recorded)
        path = cache_path(pre, spec, "Tr")
        raw = Path(os.environ["nnUNet_raw"]) / self.plans_manager.dataset_name if os.environ.get("nnUNet_raw") else None
        reports = None
        if raw is not None and reports_path(raw, "Tr").is_file():
            try:
                reports = load_dataset_reports(raw, "Tr", validate=False).reports
            except ReportError as e:  # a table that exists but is broken is never bypassed via an old cache
                raise TextTrainingError(f"{self.__class__.__name__} needs a valid report per training case. {e}") from e
        if reports is not None:
            try:
                cache = load_checked_cache(path, reports, spec=spec)
            except CacheError:
                cache = self._build_cache_once(reports, path, spec)
        elif path.exists():
            cache = TextEmbeddingCache.load(path)
            self.print_to_log_file(f"No reportsTr.csv in nnUNet_raw for this dataset; using the cache {path} as is")
        else:
            raise TextTrainingError(f"No reports for {self.plans_manager.dataset_name}: neither "
                                    f"$nnUNet_raw/{self.plans_manager.dataset_name}/reportsTr.csv nor a cache {path}. "
                                    f"Attach reports with nnUNetv2_textseg_attach_reports -d "
                                    f"{self.plans_manager.dataset_name} -i YOUR_TABLE.csv")
        if recorded is not None:
            want = json.loads(recorded_plans.read_text())[PLANS_KEY]["encoder_identity"]
            try:
                cache.check_identity(want)
            except CacheError as e:
                raise TextTrainingError(f"The reports were encoded by another model than this model folder's "
                                        f"encoder. {e}") from e
        tr_keys, val_keys = self.do_split()
        self.training_case_ids = sorted(str(k) for k in tr_keys)
        available = set(reports) if reports is not None else set(cache.case_ids)
        missing = sorted(k for k in list(tr_keys) + list(val_keys) if k not in available)
        if missing:
            raise TextTrainingError(
                f"{len(missing)} training case(s) have no report: {missing[:10]}{' ...' if len(missing) > 10 else ''}. "
                f"Add a row per case to $nnUNet_raw/{self.plans_manager.dataset_name}/reportsTr.csv "
                f"(nnUNetv2_textseg_attach_reports) and start again.")
        self.text_rows = {c: i for i, c in enumerate(cache.case_ids)}
        # the training reports' embeddings, kept beside the checkpoint: prediction recognises wording never seen
        # (one row per distinct report text: the same text encoded in two batches may differ in the last bits)
        distinct = {}
        for c in self.training_case_ids:
            distinct.setdefault(cache.text_sha[self.text_rows[c]], self.text_rows[c])
        self.report_reference = ReportReference.from_training_reports(cache.pooled[sorted(distinct.values())],
                                                                      cache.identity)
        self.text_table = torch.from_numpy(np.ascontiguousarray(cache.pooled)).to(self.device)
        if self.uses_token_text:  # token-level embeddings stay in (float16) host memory; rows move per batch
            self.text_tokens = torch.from_numpy(np.ascontiguousarray(cache.tokens))
            self.text_token_mask = torch.from_numpy(np.ascontiguousarray(cache.mask))
        if self.mirrored_patient > 0:
            self._prepare_mirrored_reports(cache, reports, pre, spec)
        if self.location_free_reports > 0:
            self._prepare_location_free_reports(cache, reports, pre, spec)
        entry = self._text_plans_entry(cache.identity, spec)
        if recorded_plans.is_file():
            self._check_same_network(json.loads(recorded_plans.read_text()).get(PLANS_KEY) or {}, entry)
        self.plans_manager.plans[PLANS_KEY] = entry

    # plans entries that shape the network, each with the value that models from before the entry existed had
    network_plans_defaults: dict = {}

    def _check_same_network(self, recorded: dict, entry: dict) -> None:
        """A model folder keeps its network: continuing (``--c``), validating or adding a fold with a trainer class
        whose network differs from the recorded one (e.g. after its defaults changed) is one clear error, not a
        state-dict mismatch deep in nnU-Net's checkpoint loading or folds of two designs in one model."""
        if not recorded:
            return
        differ = {k: recorded.get(k, d) for k, d in self.network_plans_defaults.items()
                  if recorded.get(k, d) != entry[k]}
        if differ:
            raise TextTrainingError(
                f"{self.output_folder_base} holds a model whose network differs from what {type(self).__name__} builds "
                f"now ({'; '.join(f'{k}: {v!r} there, {entry[k]!r} now' for k, v in differ.items())}), e.g. one "
                f"trained before this trainer's defaults changed. A model keeps its network: predict with it as it is "
                f"(its plans rebuild it), train the earlier design with {self.earlier_design_hint(differ)}, or move "
                f"this folder away to train anew.")

    @classmethod
    def earlier_design_hint(cls, differ: dict) -> str:
        """The trainer that builds a recorded network differing from this class's in ``differ`` (key: recorded
        value)."""
        return "the trainer variant that matches it"

    def _prepare_mirrored_reports(self, cache: TextEmbeddingCache, reports: dict | None, pre: Path,
                                  spec: EncoderSpec) -> None:
        """Token embeddings of every training report with left and right swapped, row for row with the report
        cache (their own derived cache file next to it, ``..._TrLateralSwap``), for mirrored-patient samples."""
        from nnunetv2_textseg.report_parsing import swap_laterality
        if not self.patient_frame:
            raise TextTrainingError(f"{type(self).__name__}: mirrored-patient samples need the patient-frame "
                                    f"position channels.")
        self.mirrored_tokens, self.mirrored_token_mask = self._rewritten_report_tokens(
            cache, reports, pre, spec, "TrLateralSwap", swap_laterality, "swaps left and right in")

    def _prepare_location_free_reports(self, cache: TextEmbeddingCache, reports: dict | None, pre: Path,
                                       spec: EncoderSpec) -> None:
        """Token embeddings of every training report without its location words (``..._TrLocationFree``), and of
        its first statement alone, without place and count (``..._TrFindingOnly``)."""
        from nnunetv2_textseg.report_variants import finding_only, make_variant
        rng = np.random.default_rng(0)  # the missing_location rewrite draws nothing; make_variant wants one
        self.location_free_tokens, self.location_free_token_mask = self._rewritten_report_tokens(
            cache, reports, pre, spec, "TrLocationFree", lambda text: make_variant(text, "missing_location", rng),
            "removes the location words from")
        if self.finding_only_share > 0:
            self.finding_only_tokens, self.finding_only_token_mask = self._rewritten_report_tokens(
                cache, reports, pre, spec, "TrFindingOnly", finding_only, "keeps only the finding of")

    def _rewritten_report_tokens(self, cache: TextEmbeddingCache, reports: dict | None, pre: Path, spec: EncoderSpec,
                                 suffix: str, rewrite, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (N, L, D) float16 and mask (N, L) of every training report rewritten by ``rewrite``
        (text -> text), row for row with the report cache; encoded into their own derived cache file next to it
        (``..._<suffix>``). Every token table of the trainer is padded to one length, so rows of any of them can
        share a batch."""
        if not self.uses_token_text:
            raise TextTrainingError(f"{type(self).__name__}: rewritten reports need token-level report embeddings.")
        if reports is None:
            raise TextTrainingError(f"{type(self).__name__} {what} the report texts, which are not available: put "
                                    f"reportsTr.csv into $nnUNet_raw/{self.plans_manager.dataset_name}.")
        rewritten = {c: rewrite(reports[c]) for c in cache.case_ids if c in reports}
        path = cache_path(pre, spec, suffix)
        try:
            derived = load_checked_cache(path, rewritten, identity=cache.identity, spec=spec)
        except CacheError:
            derived = self._build_cache_once(rewritten, path, spec)
            derived.check_identity(cache.identity)
        length = max(self.text_tokens.shape[1], derived.tokens.shape[1])
        tokens = np.zeros((len(cache.case_ids), length, cache.tokens.shape[2]), np.float16)
        mask = np.zeros((len(cache.case_ids), length), bool)
        for i, c in enumerate(cache.case_ids):
            if c in derived:  # a case without a table row (cache used as is) keeps its own report
                r = int(derived.rows([c])[0])
                tokens[i, :derived.tokens.shape[1]], mask[i, :derived.mask.shape[1]] = derived.tokens[r], derived.mask[r]
            else:
                tokens[i, :cache.tokens.shape[1]], mask[i, :cache.mask.shape[1]] = cache.tokens[i], cache.mask[i]
        for name in ("text", "mirrored", "location_free", "finding_only"):  # the tables so far, padded to one length
            if getattr(self, f"{name}_tokens", None) is not None:
                pad = length - getattr(self, f"{name}_tokens").shape[1]
                if pad:
                    setattr(self, f"{name}_tokens", torch.nn.functional.pad(getattr(self, f"{name}_tokens"),
                                                                             (0, 0, 0, pad)))
                    setattr(self, f"{name}_token_mask", torch.nn.functional.pad(
                        getattr(self, f"{name}_token_mask"), (0, pad)))
        return torch.from_numpy(tokens), torch.from_numpy(mask)

    def _build_cache_once(self, reports: dict, path: Path, spec: EncoderSpec) -> TextEmbeddingCache:
        """Encode missing/changed reports; under DDP rank 0 encodes and the other ranks wait and load."""
        import torch.distributed as dist
        if self.local_rank == 0:
            self.print_to_log_file(f"Encoding reports with {spec.name_or_path} into {path} (new or changed reports)")
            cache, n = build_or_update_cache(reports, path, spec=spec, progress=True)
            self.print_to_log_file(f"Encoded {n} reports")
        if self.is_ddp:
            dist.barrier()
        return cache if self.local_rank == 0 else load_checked_cache(path, reports, spec=spec)

    def initialize(self):
        if not self.was_initialized:
            if len(self.configuration_manager.patch_size) != 2:
                raise TextTrainingError(f"{self.__class__.__name__} supports nnU-Net's 2d configuration only, not "
                                        f"{self.configuration_name!r}: train with `nnUNetv2_train DATASET 2d FOLD`.")
            self.prepare_text()
            super().initialize()
            if self.patient_frame:
                from nnunetv2_textseg.patient_frame import patient_frame_dataset
                self.dataset_class = patient_frame_dataset(self.dataset_class)
            return
        super().initialize()

    def get_training_transforms(self, *args, **kwargs):
        """nnU-Net's pipeline (an instance method here; nnU-Net calls it through ``self``), with the
        position channels moved past its intensity transforms and warped only by its spatial ones."""
        pipeline = super().get_training_transforms(*args, **kwargs)
        if not self.patient_frame:
            return pipeline
        from nnunetv2_textseg.patient_frame import protect_position_channels
        return protect_position_channels(pipeline)

    def configure_optimizers(self):
        """nnU-Net's SGD + PolyLR for the planned U-Net; AdamW for the text modules.

        Why: the text modules (attention pooling, MLPs, generator) are small transformer/MLP-like parts that
        SGD with nnU-Net's momentum 0.99 moves slowly, while the U-Net fits the few labelled images long
        before they learn anything. Both optimisers step together (:class:`OptimizerPair`, saved in nnU-Net's
        checkpoint as one state)."""
        from nnunetv2.training.lr_scheduler.polylr import PolyLRScheduler
        net = self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network
        unet_ids = {id(p) for p in net.unet.parameters()}
        text_params = [p for p in net.parameters() if id(p) not in unet_ids]
        sgd = torch.optim.SGD(net.unet.parameters(), self.initial_lr, weight_decay=self.weight_decay,
                              momentum=0.99, nesterov=True)
        # fused where torch has the kernel (CUDA, and the CPU from torch 2.4): one kernel for all the text
        # parameters instead of a dozen per parameter or multi-tensor ones, and no per-parameter host work for the
        # step counters (hundreds of small parameters, four report pathways: ~18 M parameters, half the step's
        # optimiser time on the CPU)
        text = torch.optim.AdamW(text_params, lr=self.text_lr, weight_decay=self.text_weight_decay,
                                 fused=True if fused_adamw_on(self.device) else None)
        return OptimizerPair(sgd, text), PolyLRScheduler(sgd, self.initial_lr, self.num_epochs)

    def on_train_epoch_start(self):
        super().on_train_epoch_start()
        if isinstance(self.optimizer, OptimizerPair):  # the text modules decay like nnU-Net's PolyLR
            factor = (1 - self.current_epoch / self.num_epochs) ** 0.9
            for g in self.optimizer.text.param_groups:
                g["lr"] = self.text_lr * factor

    def text_for(self, keys) -> torch.Tensor:
        """Pooled report embeddings (B, D_in) for a batch's case ids, in batch order."""
        return self.text_table[[self.text_rows[str(k)] for k in keys]]

    def tokens_for(self, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings (B, L, D_in) float32 and mask (B, L) bool for a batch's case ids."""
        rows = [self.text_rows[str(k)] for k in keys]
        # non_blocking: a blocking host-to-device copy waits for the device's queue
        return (self.text_tokens[rows].to(self.device, torch.float32, non_blocking=True),
                self.text_token_mask[rows].to(self.device, non_blocking=True))

    def mirror_patients(self, data: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor, keys
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mirrored-patient augmentation: each sample, with probability ``mirrored_patient``, becomes the mirror
        image of its patient — every pixel's patient-frame column is negated (what was the patient's left is now
        their right) and the report gets left and right swapped. Image and mask stay as they are: only where they
        lie in the patient changes, so the report's side words must be read again to put the lesion there."""
        from nnunetv2_textseg.patient_frame import POSITION_CHANNELS
        flip = torch.rand(data.shape[0]) < self.mirrored_patient  # drawn on the host: no device sync per step
        # which samples are mirrored patients, for targets kept in the patient frame (BiCLIP's whole-case map)
        self.patient_mirrored = flip
        if not any(flip.tolist()):  # host-side reads (tolist): nothing waits for the device
            return data, tokens, mask
        column = data.shape[1] - POSITION_CHANNELS + 1  # position channels are (row, column, inside)
        f = flip.to(data.device, non_blocking=True)
        c = data[:, column]
        data = data.clone()
        data[:, column] = torch.where(f[:, None, None], -c, c)  # not a boolean index: that reads f on the host
        tokens, mask = self._rows_from(self.mirrored_tokens, self.mirrored_token_mask, keys, f, tokens, mask)
        return data, tokens, mask

    def strip_locations(self, tokens: torch.Tensor, mask: torch.Tensor, keys) -> tuple[torch.Tensor, torch.Tensor]:
        """Location-free reports: each sample, with probability ``location_free_reports``, reads its report without
        side, zone and laterality words. Its targets stay, so the report pathway learns where lesions of a report
        that names no place lie (anywhere they occur), and the U-Net that such a report does not mean "nowhere".
        Without it, every training report names places, and one that names none reads like a normal study.
        A share of them (``finding_only_share``) read the report's bare finding instead ("Pulmonary infection."):
        the place-free rewrite keeps the count ("two infected areas"), and a terser report was still read as
        "nowhere" (MedCLIPSeg trained with the place-free rewrite alone, 2 of 3 benchmark seeds)."""
        draw = torch.rand(2, tokens.shape[0])  # drawn on the host: no device sync
        pick = draw[0] < self.location_free_reports
        terse = pick & (draw[1] < self.finding_only_share)
        if any((pick & ~terse).tolist()):
            tokens, mask = self._rows_from(self.location_free_tokens, self.location_free_token_mask, keys,
                                           (pick & ~terse).to(tokens.device, non_blocking=True), tokens, mask)
        if any(terse.tolist()):
            tokens, mask = self._rows_from(self.finding_only_tokens, self.finding_only_token_mask, keys,
                                           terse.to(tokens.device, non_blocking=True), tokens, mask)
        return tokens, mask

    def _rows_from(self, table: torch.Tensor, table_mask: torch.Tensor, keys, pick: torch.Tensor,
                   tokens: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens / mask with the samples where ``pick`` (B,) is True replaced by their rows of another token table."""
        rows = [self.text_rows[str(k)] for k in keys]
        tokens = torch.where(pick[:, None, None], table[rows].to(tokens.device, tokens.dtype, non_blocking=True),
                             tokens)
        mask = torch.where(pick[:, None], table_mask[rows].to(mask.device, non_blocking=True), mask)
        return tokens, mask

    def set_network_text(self, keys) -> None:
        """Give the network the reports of ``keys`` for its next plain forward passes."""
        if self.uses_token_text:
            self.unwrapped_network().set_text(*self.tokens_for(keys))
        else:
            self.unwrapped_network().set_text(self.text_for(keys))

    def unwrapped_network(self) -> torch.nn.Module:
        mod = self.network.module if self.is_ddp else self.network
        return mod._orig_mod if isinstance(mod, OptimizedModule) else mod

    @staticmethod
    def planned_unet(configuration_manager: ConfigurationManager, num_input_channels: int, num_output_channels: int,
                     enable_deep_supervision: bool) -> torch.nn.Module:
        """The U-Net nnU-Net planned for this configuration, with the given number of input channels."""
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        return get_network_from_plans(configuration_manager.network_arch_class_name,
                                      configuration_manager.network_arch_init_kwargs,
                                      configuration_manager.network_arch_init_kwargs_req_import,
                                      num_input_channels, num_output_channels, allow_init=True,
                                      deep_supervision=enable_deep_supervision)

    @staticmethod
    def text_plans(plans_manager: PlansManager) -> dict:
        entry = plans_manager.plans.get(PLANS_KEY)
        if entry is None:
            raise TextTrainingError(
                "These plans carry no text-encoder entry: the model folder was not written by a text trainer, "
                "or the network is being built before the reports were prepared.")
        return entry

    # ---- extra loss terms: logged per epoch (kept on --c by nnU-Net's logger checkpoint), plotted ----
    def _logged_keys(self) -> list[str]:
        return [f"train_{k}_loss" for k in self.aux_losses] + [f"train_{k}" for k in self.aux_stats]

    def save_report_reference(self, only_if_missing: bool = False) -> None:
        """fold_X/report_reference.npz: what prediction compares each report's wording with (rank 0 writes)."""
        path = Path(self.output_folder) / REFERENCE_FILE
        if self.local_rank == 0 and self.report_reference is not None and not (only_if_missing and path.is_file()):
            path.parent.mkdir(parents=True, exist_ok=True)
            self.report_reference.save(path)

    def on_train_start(self):
        super().on_train_start()
        self.save_report_reference()
        for k in self._logged_keys():
            self.logger.local_logger.my_fantastic_logging.setdefault(k, [])

    def epoch_statistics(self) -> dict[str, float]:
        """Statistics of the network itself, logged once per epoch (e.g. first-convolution weight norms)."""
        return {}

    def on_train_epoch_end(self, train_outputs: list[dict]):
        super().on_train_epoch_end(train_outputs)
        from_network = self.epoch_statistics()
        for k, key in zip(list(self.aux_losses) + list(self.aux_stats), self._logged_keys()):
            values = [o[k] for o in train_outputs if k in o] or [np.nan]
            # a statistic is NaN on a step with nothing to log (skipped); a loss that is NaN or inf must show
            value = from_network[k] if k in from_network else \
                (_nanmean(values) if k in self.aux_stats else float(np.mean(values)))
            if self.is_ddp:
                import torch.distributed as dist
                gathered = [None] * dist.get_world_size()
                dist.all_gather_object(gathered, value)
                value = float(np.nanmean(gathered))
            self.logger.log(key, value, self.current_epoch)

    def on_epoch_end(self):
        if self.local_rank == 0 and (self.aux_losses or self.aux_stats):
            terms = ", ".join(f"{k} {self.logger.get_value(f'train_{k}_loss', step=-1):.4f}" for k in self.aux_losses)
            self.print_to_log_file(f"{self.method_name} loss terms: {terms}")
            if self.aux_stats:
                stats = ", ".join(f"{k} {self.logger.get_value(f'train_{k}', step=-1):.4f}" for k in self.aux_stats)
                self.print_to_log_file(f"{self.method_name} statistics: {stats}")
            self.plot_text_losses()
        super().on_epoch_end()

    method_name = "text"

    def plot_text_losses(self) -> None:
        """progress_text.png beside nnU-Net's progress.png: every loss term per epoch."""
        import matplotlib
        matplotlib.use("agg")
        import matplotlib.pyplot as plt
        logged = self.logger.local_logger.my_fantastic_logging
        fig, axes = plt.subplots(1, 2 if self.aux_stats else 1, figsize=(16 if self.aux_stats else 9, 5), squeeze=False)
        ax = axes[0, 0]
        for k in self.aux_losses:
            ys = logged.get(f"train_{k}_loss", [])
            ax.plot(range(len(ys)), ys, label=k)
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.legend()
        ax.set_title(f"{self.__class__.__name__}: loss terms")
        if self.aux_stats:  # a collapsing pseudo-image or an input channel the U-Net ignores shows here
            ax = axes[0, 1]
            for k in self.aux_stats:
                ys = logged.get(f"train_{k}", [])
                ax.plot(range(len(ys)), ys, label=k)
            ax.set_xlabel("epoch")
            ax.legend(fontsize=8)
            ax.set_title("pseudo-image and first-convolution statistics")
        fig.tight_layout()
        fig.savefig(f"{self.output_folder}/progress_text.png")
        plt.close(fig)

    # ---- training step ---------------------------------------------------------------------------
    def train_step(self, batch: dict) -> dict:
        """nnU-Net's train step for every text trainer: device moves, the batch's reports (rows drawn for report
        dropout), CUDA autocast and nnU-Net's optimizer step. The method's forward pass and loss come from
        :meth:`compute_step`; its terms are logged per epoch (``aux_losses``/``aux_stats``)."""
        data, target, tokens, mask, drop = self.batch_inputs(batch)
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else dummy_context():
            loss, terms = self.compute_step(data, target, tokens, mask, drop, keys=list(batch["keys"]))
        self.optimizer_step(loss)
        # the loss and every logged term leave the device together, at the end of the step (nnU-Net reads its loss
        # there too): one host-device sync per step
        names = [k for k, v in terms.items() if torch.is_tensor(v)]
        values = torch.stack([loss.detach().float().reshape(())] +
                             [terms[k].detach().float().reshape(()) for k in names]).cpu()
        terms.update(zip(names, values[1:].tolist()))
        return {"loss": values[0].numpy(), **terms}

    def batch_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor], torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
        """A loader batch on the device with its reports: (data, target, tokens, mask, drop) — mirrored patients and
        location-free reports applied, and ``drop`` (B,) drawn for report dropout."""
        data = batch["data"].to(self.device, non_blocking=True)
        target = batch["target"]
        target = [t.to(self.device, non_blocking=True) for t in target] if isinstance(target, list) \
            else target.to(self.device, non_blocking=True)
        tokens, mask = self.tokens_for(batch["keys"])
        self.patient_mirrored = torch.zeros(len(batch["keys"]), dtype=torch.bool)
        if self.mirrored_patient > 0:
            data, tokens, mask = self.mirror_patients(data, tokens, mask, batch["keys"])
        if self.location_free_reports > 0:  # after mirroring: a report without place words has no side to swap
            tokens, mask = self.strip_locations(tokens, mask, batch["keys"])
        drop = torch.rand(tokens.shape[0], device=self.device) < self.report_dropout
        return data, target, tokens, mask, drop

    def compute_step(self, data: torch.Tensor, target: torch.Tensor | list[torch.Tensor], tokens: torch.Tensor,
                     mask: torch.Tensor, drop: torch.Tensor, keys: list[str] | None = None
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """One method's forward pass and loss: data (B, C', H, W) as the loader gives it, the reports' tokens
        (B, L, D_in) and mask (B, L), drop (B,) True where the null report is used, keys: the samples' case
        ids. Returns the total loss and the logged terms (scalar tensors, read once at the end of the step, or
        floats)."""
        raise NotImplementedError(f"{type(self).__name__} must implement compute_step")

    def optimizer_step(self, loss: torch.Tensor) -> None:
        """nnU-Net's backward/clip/step, with its grad scaler under CUDA AMP."""
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.complete_gradients()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            self.complete_gradients()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()

    def complete_gradients(self) -> None:
        """Called after the backward pass, before clipping: a method may fill in gradients here (BiCLIP's
        cross-fitted pathways). Nothing by default."""

    # ---- spatial words -------------------------------------------------------------------------
    def configure_rotation_dummyDA_mirroring_and_inital_patch_size(self):
        rotation, dummy_2d, initial_patch_size, mirror_axes = \
            super().configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        if not self.safe_spatial_augmentation:  # nnU-Net's defaults: the position channels keep the frame
            return rotation, dummy_2d, initial_patch_size, mirror_axes
        rotation, initial_patch_size = safe_rotation_and_patch_size(self.configuration_manager.patch_size,
                                                                    self.max_rotation_deg, dummy_2d)
        self.inference_allowed_mirroring_axes = None
        return rotation, dummy_2d, initial_patch_size, None

    # ---- validation with reports ---------------------------------------------------------------
    def validation_step(self, batch: dict) -> dict:
        self.set_network_text(batch["keys"])
        try:
            return super().validation_step(batch)
        finally:
            self.unwrapped_network().set_text(None)

    def perform_actual_validation(self, save_probabilities: bool = False):
        """nnU-Net's own final validation, with each case's report set on the network when the case is
        loaded (its loop calls ``dataset.load_case(k)`` right before predicting case k)."""
        original = self.dataset_class
        net = self.unwrapped_network()
        set_text = self.set_network_text

        class _ReportSettingDataset(original):
            def load_case(self, identifier):
                set_text([identifier])
                return super().load_case(identifier)

        self.dataset_class = _ReportSettingDataset
        self.save_report_reference(only_if_missing=True)  # `nnUNetv2_train --val` on a model trained before it
        try:
            super().perform_actual_validation(save_probabilities)
        finally:
            self.dataset_class = original
            net.set_text(None)


def safe_rotation_and_patch_size(patch_size, max_rotation_deg: float, dummy_2d: bool) -> tuple[tuple, np.ndarray]:
    """Safe mode's rotation range (±max_rotation_deg) and the initial patch size nnU-Net needs for it."""
    from nnunetv2.training.data_augmentation.compute_initial_patch_size import get_patch_size
    r = np.deg2rad(max_rotation_deg)
    rotation = (-r, r)
    initial_patch_size = get_patch_size(patch_size[-len(patch_size):], rotation, rotation, rotation, (0.85, 1.25))
    if dummy_2d:
        initial_patch_size[0] = patch_size[0]
    return rotation, initial_patch_size


def _nanmean(values: list[float]) -> float:
    """Mean of the values that are not NaN; NaN if there are none."""
    known = [v for v in values if not np.isnan(v)]
    return float(np.mean(known)) if known else float("nan")


def fused_adamw_on(device: torch.device) -> bool:
    """Whether torch's fused AdamW kernel runs on ``device``: CUDA, and the CPU from torch 2.4."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)


class OptimizerPair:
    """Two optimisers stepped as one: nnU-Net's SGD (``main``, driven by its PolyLR scheduler and logged as
    its lr) and AdamW for the text modules. Looks like an optimiser to nnU-Net's loop, grad scaler and
    checkpoint (``param_groups`` lists the main groups first)."""

    def __init__(self, main: torch.optim.Optimizer, text: torch.optim.Optimizer):
        self.main, self.text = main, text
        self.state: dict = {}  # GradScaler looks for it; each optimiser keeps its own

    @property
    def param_groups(self) -> list[dict]:
        return self.main.param_groups + self.text.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.main.zero_grad(set_to_none=set_to_none)
        self.text.zero_grad(set_to_none=set_to_none)

    def step(self, closure=None) -> None:
        self.main.step()
        self.text.step()

    def state_dict(self) -> dict:
        return {"main": self.main.state_dict(), "text": self.text.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.main.load_state_dict(state["main"])
        # torch takes every hyperparameter from the saved groups: keep this run's choice of fused AdamW, so a checkpoint
        # saved before it, or on another device, neither turns it off nor forces it where it cannot run
        fused = self.text.defaults.get("fused")
        text = {**state["text"], "param_groups": [{**g, "fused": fused} for g in state["text"]["param_groups"]]}
        self.text.load_state_dict(text)
