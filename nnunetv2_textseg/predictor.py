"""Report-aware prediction on top of nnU-Net's own predictor.

``nnUNetTextPredictor`` keeps everything of ``nnUNetPredictor`` (preprocessing workers, sliding
window, Gaussian weighting, fold ensembling, resampling back, export) and adds the report: all
reports are encoded once, in batches, with the encoder recorded with the model; before a case is
predicted its embedding is set on the network, so every sliding-window tile (and every fold) sees
the report of its own case. The pseudo-image depends on the tile (BMF mixes in the tile's global
image embedding), so it is computed per tile by design.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import torch
from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from torch._dynamo import OptimizedModule

from nnunetv2_textseg.cache import CacheError
from nnunetv2_textseg.encoders import EncoderSpec, TextEncoder, identity_diff, spec_from_record
from nnunetv2_textseg.errors import TextSegError
from nnunetv2_textseg.report_familiarity import (REFERENCE_FILE, ReportReference, familiarity,
                                                 load_reference_for_model, nearest_cosine)
from nnunetv2_textseg.uncertainty import UncertaintyAccumulator
from nnunetv2_textseg.reports import ReportTable, pair_listing, unicode_twins
from nnunetv2_textseg.training.text_trainer import PLANS_KEY


_NULL_REPORT = object()  # set as the current text: predict with the learned null report on purpose


class TextPredictionError(TextSegError, RuntimeError):
    """Prediction cannot run as asked; the message names the cases/files and the fix."""


class nnUNetTextPredictor(nnUNetPredictor):
    """nnUNetPredictor for text trainers. Use :meth:`set_reports` before ``predict_from_files``, or
    :meth:`predict_single_npy_array_with_report` for one in-memory case."""

    def __init__(self, *args, allow_missing_reports: bool = False, encoder_override: EncoderSpec | None = None,
                 save_uncertainty: bool = False, save_pseudo_images: bool = False, mc_samples: int = 0,
                 mc_batch_size: int = 8, keep_unfamiliar_reports: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        if mc_batch_size < 1:
            raise ValueError(f"mc_batch_size must be >= 1, got {mc_batch_size}")
        self.mc_samples = mc_samples  # > 1: Monte-Carlo samples of a stochastic (MedCLIPSeg) network
        self.mc_batch_size = mc_batch_size  # samples per network call (one sliding-window pass each batch)
        self._mc_rows = 1  # samples the current sliding-window pass computes per tile
        self.allow_missing_reports = allow_missing_reports
        # reports worded unlike every training report are predicted with the null report unless kept
        self.keep_unfamiliar_reports = keep_unfamiliar_reports
        self.report_references: list[ReportReference] = []  # one per fold that has one
        self.unfamiliar_reports: dict[str, float] = {}  # case -> cosine to its nearest training report
        self.encoder_override = encoder_override
        self.save_uncertainty = save_uncertainty
        self.save_pseudo_images = save_pseudo_images
        self.text_config: dict | None = None
        self.encoder: TextEncoder | None = None
        self.embeddings: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # pooled, tokens, mask
        self._current_case: str | None = None
        self._current_text: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._case_of_output: dict[str, str] = {}  # output file name -> case id, when they differ
        self.last_uncertainty: UncertaintyAccumulator | None = None  # members (folds x samples) of the last case

    # ---- model -------------------------------------------------------------------------------
    def initialize_from_trained_model_folder(self, model_training_output_dir: str, use_folds, checkpoint_name:
                                             str = "checkpoint_final.pth"):
        plans_file = Path(model_training_output_dir) / "plans.json"
        if plans_file.exists():
            import json
            if PLANS_KEY not in json.loads(plans_file.read_text()):
                raise TextPredictionError(
                    f"The model in {model_training_output_dir} was not trained by a text trainer (its plans.json "
                    f"has no '{PLANS_KEY}' entry), so reports cannot be used. Predict it with nnUNetv2_predict.")
        # nnU-Net finds the model's trainer class by name in nnUNet_extTrainer's folders; a text model's trainer is
        # ours, so our folder is added (the user's folders stay, first) instead of failing deep in nnU-Net when the
        # shell was not set up with nnUNetv2_textseg_env
        from nnunetv2_textseg.harness import TRAINER_PATH_VAR, trainer_search_path
        os.environ[TRAINER_PATH_VAR] = trainer_search_path(os.environ.get(TRAINER_PATH_VAR))
        super().initialize_from_trained_model_folder(model_training_output_dir, use_folds, checkpoint_name)
        self.text_config = self.plans_manager.plans[PLANS_KEY]
        if use_folds is None:  # as nnU-Net resolves them (its own detection has printed what it found)
            use_folds = [p.name[len("fold_"):] for p in sorted(Path(model_training_output_dir).glob("fold_*"))
                         if p.name != "fold_all" and (p / checkpoint_name).is_file()]
        elif isinstance(use_folds, str):
            use_folds = [use_folds]
        self.report_references = self.load_report_references(
            [Path(model_training_output_dir) / f"fold_{f}" for f in use_folds])

    def load_report_references(self, fold_folders: Iterable[Path]) -> list[ReportReference]:
        """The training-report references of these folds, checked against the model's encoder. Models trained
        before references were kept have none: then every report is read as given (said once)."""
        refs, lacking = [], []
        for folder in fold_folders:
            if not (folder / REFERENCE_FILE).is_file():
                lacking.append(folder.name)
            else:
                refs.append(load_reference_for_model(folder / REFERENCE_FILE, self.text_config["encoder_identity"]))
        if lacking:
            print(f"Note: {', '.join(lacking)} of this model keep(s) no {REFERENCE_FILE} (trained by an older "
                  f"version, or not copied with the model); "
                  + ("reports worded unlike its training reports cannot be recognised and are read as given."
                     if not refs else "the other folds' training reports decide which reports are unfamiliar."))
        return refs

    def manual_initialization(self, network, plans_manager, configuration_manager, parameters, dataset_json,
                              trainer_name, inference_allowed_mirroring_axes):
        """No model folder, so no training-report reference: every report is read as given (set
        ``report_references`` to check them)."""
        super().manual_initialization(network, plans_manager, configuration_manager, parameters, dataset_json,
                                      trainer_name, inference_allowed_mirroring_axes)
        self.text_config = plans_manager.plans.get(PLANS_KEY)
        self.report_references, self.unfamiliar_reports = [], {}

    def _net(self) -> torch.nn.Module:
        return self.network._orig_mod if isinstance(self.network, OptimizedModule) else self.network

    def load_encoder(self) -> TextEncoder:
        """The encoder the model was trained with (loaded once); a different one is refused."""
        if self.encoder is None:
            recorded = self.text_config["encoder"]
            # the model's own record never switches remote code on; the caller must (encoder_override)
            # (a record without "precision", of an older version, is float32: spec_from_record keeps it so)
            spec = self.encoder_override or spec_from_record(recorded, trust_remote_code=False)
            self.encoder = TextEncoder(spec, device="cpu")
            want, got = self.text_config["encoder_identity"], self.encoder.identity()
            diff = identity_diff(want, got)  # weights, tokenizer, config, pooling...; not the folder's path
            if diff:
                raise CacheError(f"The model was trained with text encoder {recorded['name_or_path']!r}, but "
                                 f"{spec.name_or_path!r} differs (trained vs given: {diff}). Predict with the "
                                 f"encoder the model was trained with (omit -encoder, or point it to a copy of "
                                 f"that model).")
        return self.encoder

    # ---- reports -----------------------------------------------------------------------------
    def set_reports(self, reports: ReportTable | Mapping[str, str], batch_size: int = 64) -> None:
        """Encode all reports now, in batches, so prediction only looks them up."""
        reports = dict(reports.reports if isinstance(reports, ReportTable) else reports)
        if not reports:
            self.embeddings, self.unfamiliar_reports = {}, {}
            return
        enc = self.load_encoder().encode(list(reports.values()), batch_size=batch_size, progress=self.allow_tqdm)
        self.embeddings = {c: _one(enc, i) for i, c in enumerate(reports)}
        self.unfamiliar_reports = self.find_unfamiliar({c: e[0].numpy() for c, e in self.embeddings.items()})

    def find_unfamiliar(self, pooled: Mapping[str, np.ndarray]) -> dict[str, float]:
        """{key: similarity} of the reports less similar to every training report than the model's threshold;
        warns which, and how they are predicted."""
        margins = familiarity(self.report_references, pooled)
        flagged = sorted(k for k, m in margins.items() if m < 0)
        cosine = nearest_cosine(self.report_references, {k: pooled[k] for k in flagged})
        unfamiliar = {k: cosine[k] for k in flagged}
        thresholds = sorted({round(r.threshold, 2) for r in self.report_references})
        threshold = " / ".join(f"{t:.2f}" for t in thresholds) + (" (per fold)" if len(thresholds) > 1 else "")
        if unfamiliar:
            how = ("read as given (--keep_unfamiliar_reports)" if self.keep_unfamiliar_reports else
                   "predicted with the learned null report instead (--keep_unfamiliar_reports reads them)")
            listing = ", ".join(f"{k} ({v:.2f})" for k, v in list(unfamiliar.items())[:10])
            warnings.warn(f"{len(unfamiliar)} report(s) are worded unlike every report this model was trained with "
                          f"(cosine to the nearest below {threshold}): {listing}"
                          f"{' ...' if len(unfamiliar) > 10 else ''}. A model reads only the wording it learned; "
                          f"these are {how}.")
        return unfamiliar

    def check_cases(self, case_ids: Iterable[str], source: str = "the input folder") -> list[str]:
        """Cases without a report: an error, or (with allow_missing_reports) a warning and the null report."""
        missing = sorted(c for c in case_ids if c not in self.embeddings)
        if missing and not self.allow_missing_reports:
            twins = unicode_twins(self.embeddings, missing)
            hint = (f" Some differ from a table id only in Unicode normalisation (NFC vs NFD, e.g. file names from "
                    f"macOS): {pair_listing(twins, 'image')}; write the table's ids as the image files spell them."
                    if twins else "")
            raise TextPredictionError(
                f"{len(missing)} case(s) in {source} have no report: {missing[:10]}"
                f"{' ...' if len(missing) > 10 else ''}. Add them to the report table, or pass "
                f"--allow_missing_reports to predict them with the learned null report.{hint}")
        if missing:
            warnings.warn(f"{len(missing)} case(s) have no report and are predicted with the learned null report: "
                          f"{missing[:10]}")
        return missing

    def _text_of(self, case: str | None):
        if self._current_text is _NULL_REPORT:
            return None
        if self._current_text is not None:
            return self._current_text
        case = self._case_of_output.get(case, case)
        text = self.embeddings.get(case) if case is not None else None
        if text is not None and case in self.unfamiliar_reports and not self.keep_unfamiliar_reports:
            return None
        if text is None and not self.allow_missing_reports:
            raise TextPredictionError(
                f"No report for case {case!r} (reports known for {len(self.embeddings)} case(s)). Call set_reports "
                f"with every case's report, or allow_missing_reports=True to use the learned null report.")
        return text

    def set_network_text(self, case: str | None) -> None:
        """Give the network this case's report in the form it takes (pooled, or tokens + mask); None: null."""
        net, text = self._net(), self._text_of(case)
        if text is None:
            net.set_text(None)
        elif net.text_input == "tokens":  # moved to the device once per case, not per tile
            net.set_text(text[1][None].float().to(self.device), text[2][None].to(self.device))
        else:
            net.set_text(text[0].to(self.device))

    # ---- prediction --------------------------------------------------------------------------
    def predict_from_data_iterator(self, data_iterator, save_probabilities: bool = False,
                                   num_processes_segmentation_export: int = 3):
        def with_case_ids(it):
            # nnU-Net's loop predicts each item right after taking it, so the case id set here is the
            # one whose logits are computed next.
            for item in it:
                self._current_case = os.path.basename(item["ofile"]) if item.get("ofile") else None
                yield item
                if item.get("ofile") and (self.save_uncertainty or self.save_pseudo_images):
                    self._save_extras(item)
        try:
            return super().predict_from_data_iterator(with_case_ids(data_iterator), save_probabilities,
                                                      num_processes_segmentation_export)
        finally:
            self._current_case = None

    def predict_from_files(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                           save_probabilities: bool = False, overwrite: bool = True,
                           num_processes_preprocessing: int = default_num_processes,
                           num_processes_segmentation_export: int = default_num_processes,
                           folder_with_segs_from_prev_stage: str = None, num_parts: int = 1, part_id: int = 0):
        """nnU-Net's predict_from_files (same signature: nnU-Net records its arguments by introspection).
        When inputs are file lists with custom output names, the case id is taken from each input's
        first-channel file name, not from the output name."""
        self._case_of_output = {}
        if isinstance(list_of_lists_or_source_folder, list) and isinstance(
                output_folder_or_list_of_truncated_output_files, list):
            self._case_of_output = {os.path.basename(o): self._case_from_input(li[0]) for li, o in
                                    zip(list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files)}
        try:
            return super().predict_from_files(list_of_lists_or_source_folder,
                                              output_folder_or_list_of_truncated_output_files, save_probabilities,
                                              overwrite, num_processes_preprocessing, num_processes_segmentation_export,
                                              folder_with_segs_from_prev_stage, num_parts, part_id)
        finally:
            self._case_of_output = {}

    def _case_from_input(self, first_channel_file: str) -> str:
        name = os.path.basename(first_channel_file)
        suffix = "_0000" + self.dataset_json["file_ending"]
        return name[:-len(suffix)] if name.endswith(suffix) else name

    def predict_from_files_sequential(self, list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
                                      save_probabilities: bool = False, overwrite: bool = True,
                                      folder_with_segs_from_prev_stage: str = None):
        """nnU-Net's sequential loop (``-npp 0 -nps 0``) does not say which case it is predicting, so run it one
        case at a time with that case's report set; uncertainty maps and pseudo-images are saved after each case as
        on the multiprocess path."""
        lists, outs, _ = self._manage_input_and_output_lists(
            list_of_lists_or_source_folder, output_folder_or_list_of_truncated_output_files,
            folder_with_segs_from_prev_stage, overwrite, 0, 1, save_probabilities)
        results = []
        for li, of in zip(lists, outs if outs is not None else [None] * len(lists)):
            # the case id comes from the input's first channel file (CASE_0000<ending>)
            self._current_case = self._case_from_input(li[0])
            try:
                r = super().predict_from_files_sequential([li], [of] if of else None, save_probabilities, True,
                                                          folder_with_segs_from_prev_stage)
                if of and (self.save_uncertainty or self.save_pseudo_images):
                    # nnU-Net's loop keeps the case's properties to itself: preprocess its files again for them
                    _, _, properties = self.configuration_manager.preprocessor_class(verbose=False).run_case(
                        li, None, self.plans_manager, self.configuration_manager, self.dataset_json)
                    self._save_extras({"data_properties": properties, "ofile": of})
            finally:
                self._current_case = None
            results.extend(r or [])
        return results

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's fold ensemble (mean of logits), with the case's report set on the network; keeps each
        fold's softmax for the uncertainty maps."""
        net = self._net()
        self.set_network_text(self._current_case)
        self._last_data = data
        data = self.with_position(data)
        # Monte-Carlo: the samples are computed as a batch per tile (mc_batch_size at a time), so N samples
        # cost ceil(N / mc_batch_size) sliding-window passes instead of N.
        if self.mc_samples > 1 and not net.can_sample:
            raise TextPredictionError(f"--mc_samples needs a stochastic model (nnUNetTrainerMedCLIPSeg); "
                                      f"{self.trainer_name} is deterministic (all samples would be equal): drop "
                                      f"--mc_samples.")
        samples = self.mc_samples if self.mc_samples > 1 else 1
        try:
            members = UncertaintyAccumulator(class_dim=0) if self.save_uncertainty else None
            prediction, n = None, 0
            for params in self.list_of_parameters:
                net.load_state_dict(params)
                if samples > 1:
                    net.set_sampling(True)
                done = 0
                while done < samples:
                    k = min(self.mc_batch_size, samples - done)
                    for logits in self.predict_sliding_window_samples(data, k):
                        if members is not None:
                            members.add(torch.softmax(logits.float(), 0))
                        prediction = logits if prediction is None else prediction + logits
                        n += 1
                    done += k
            prediction /= n
            self.last_uncertainty = members
            return prediction
        finally:
            net.set_text(None)
            if net.can_sample:
                net.set_sampling(False)

    def with_position(self, data: torch.Tensor) -> torch.Tensor:
        """The preprocessed case (C, *spatial) with the patient-frame position channels appended, for models
        trained with them (recorded in the plans): every sliding-window tile and mirrored pass then carries
        where it lies in the patient's image, as training samples did."""
        from nnunetv2_textseg.patient_frame import with_position_channels
        if not (self.text_config or {}).get("position_channels"):
            return data
        return with_position_channels(data if isinstance(data, torch.Tensor) else torch.from_numpy(np.asarray(data)))

    @torch.inference_mode()
    def predict_sliding_window_samples(self, data: torch.Tensor, k: int) -> torch.Tensor:
        """k predictions of ``data`` (C, *spatial) in ONE sliding-window pass: every tile is repeated k times
        and run as one batch; nnU-Net's window then accumulates the k outputs side by side on the class
        axis (its label manager is told there are k times as many heads). Returns (k, K, *spatial) on the
        CPU. Only useful when the network samples (``can_sample``); k = 1 is nnU-Net's pass."""
        if k == 1:
            return self.predict_sliding_window_return_logits(data).to("cpu")[None]
        labels, self._mc_rows = self.label_manager, k
        self.label_manager = _SampleStackedLabels(labels, k)
        try:
            logits = self.predict_sliding_window_return_logits(data).to("cpu")
        finally:
            self.label_manager, self._mc_rows = labels, 1
        return logits.view(k, labels.num_segmentation_heads, *logits.shape[1:])

    def _internal_maybe_mirror_and_predict(self, x: torch.Tensor) -> torch.Tensor:
        """nnU-Net's tile prediction (with its mirroring); in a sampling pass the tile (1, C, *patch) is
        repeated k times and the k outputs are returned as (1, k*K, *patch)."""
        if self._mc_rows == 1:
            return super()._internal_maybe_mirror_and_predict(x)
        out = super()._internal_maybe_mirror_and_predict(x.repeat(self._mc_rows, *([1] * (x.ndim - 1))))
        return out.reshape(1, -1, *out.shape[2:])

    def predict_single_npy_array_with_report(self, input_image: np.ndarray, image_properties: dict,
                                             report: str | None, output_file_truncated: str | None = None,
                                             save_or_return_probabilities: bool = False):
        """In-memory prediction of one case with its report text (None: the null report, if allowed)."""
        if report is None:
            if not self.allow_missing_reports:
                raise TextPredictionError("No report given; pass a report or allow_missing_reports=True.")
            self._current_text = _NULL_REPORT
        else:
            if not str(report).strip():
                raise TextPredictionError("The report is empty; pass the case's report text.")
            self._current_text = _one(self.load_encoder().encode([report]), 0)
            if self.find_unfamiliar({"report": self._current_text[0].numpy()}) and not self.keep_unfamiliar_reports:
                self._current_text = _NULL_REPORT
        try:
            return self.predict_single_npy_array(input_image, image_properties, None, output_file_truncated,
                                                 save_or_return_probabilities)
        finally:
            self._current_text = None

    # ---- extra outputs -----------------------------------------------------------------------
    def _save_extras(self, item: dict) -> None:
        from nnunetv2_textseg.visualize import save_case_maps
        data, props, ofile = self._last_data, item["data_properties"], item["ofile"]
        maps = {}
        if self.save_uncertainty and self.last_uncertainty is not None:
            u = self.last_uncertainty.result()
            maps["entropy"] = u["entropy"]
            maps["variance"] = u["variance"].sum(0)  # summed over classes: one map
            if self.last_uncertainty.n > 1:  # epistemic part: entropy of the mean minus the mean entropy
                maps["mutual_information"] = u["mutual_information"]
        if self.save_pseudo_images:
            net = self._net()
            if net.has_pseudo_image:  # BiCLIP only
                self.set_network_text(self._current_case)
                try:
                    with torch.inference_mode():
                        # preprocessed 2D data are (C, Z=1, Y, X); the network works on slices (Z, C, Y, X)
                        x = self.with_position(data).to(self.device).float().transpose(0, 1)
                        maps["pseudo"] = net.current_pseudo_image(x)[:, 0].cpu()
                finally:
                    net.set_text(None)
        save_case_maps(maps, data[0], props, ofile, self.plans_manager, self.configuration_manager)


class _SampleStackedLabels:
    """nnU-Net's label manager, claiming k times its segmentation heads: the sliding window then allocates
    room for k samples side by side. Everything else is the wrapped manager's."""

    def __init__(self, labels, k: int):
        self._labels = labels
        self.num_segmentation_heads = labels.num_segmentation_heads * k

    def __getattr__(self, name: str):
        return getattr(self._labels, name)


def _one(enc, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Row i of a TextEncoding as tensors, padding tokens dropped (wherever the tokenizer put them)."""
    keep = enc.mask[i] if enc.mask[i].any() else np.arange(enc.mask.shape[1]) < 1
    return (torch.from_numpy(enc.pooled[i]), torch.from_numpy(enc.tokens[i][keep].astype(np.float32)),
            torch.from_numpy(enc.mask[i][keep]))


def default_reports_file(input_folder: str | Path) -> Path | None:
    """``reports.csv`` inside the input folder, else ``reportsTs.csv`` next to it (nnU-Net's imagesTs)."""
    input_folder = Path(input_folder)
    for candidate in (input_folder / "reports.csv", input_folder.parent / "reportsTs.csv"):
        if candidate.is_file():
            return candidate
    return None
