"""Sharing a trained text model: nnU-Net's own zip export, plus the per-fold files a text model adds.

``nnUNetv2_export_model_to_zip`` packs checkpoints, plans, dataset.json and validation summaries, but not
``fold_X/report_reference.npz`` — the training reports' embeddings behind the unfamiliar-report guard
(:mod:`nnunetv2_textseg.report_familiarity`). A model installed from such a zip predicts every report as given,
whatever its wording. :func:`export_text_model` runs nnU-Net's export (its layout, so
``nnUNetv2_install_pretrained_model_from_zip`` installs the result unchanged) and adds each exported fold's
reference, after checking that it loads.
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from nnunetv2_textseg.errors import TextSegError
from nnunetv2_textseg.paths import dataset_name, results_folder
from nnunetv2_textseg.report_familiarity import REFERENCE_FILE, load_reference_for_model

CONFIGURATIONS = ("2d", "3d_lowres", "3d_fullres", "3d_cascade_fullres")  # nnU-Net's, in its export's order


class ModelExportError(TextSegError, RuntimeError):
    """The model to export is missing, incomplete, or the output file exists; the message says which and how."""


@dataclass
class ExportedModel:
    """What went into the zip besides nnU-Net's own files."""
    zip_file: Path
    folds: list[Path]  # the exported fold folders
    added: list[Path] = field(default_factory=list)  # per-fold text files added
    lacking: list[Path] = field(default_factory=list)  # exported folds without a report reference


def _fold_folder(model_folder: Path, fold: str) -> Path:
    return model_folder / ("fold_all" if str(fold) == "all" else f"fold_{fold}")


def _trained_folds(model_folder: Path, checkpoints: Sequence[str]) -> list[str]:
    """Folds of ``model_folder`` holding every checkpoint: numbered ones in numeric order; ``all`` only if there is
    no numbered fold. (nnU-Net's ``nnUNetPredictor.auto_detect_available_folds`` checks one checkpoint, prints, and
    never returns ``all``.)"""
    trained = [p.name[len("fold_"):] for p in model_folder.glob("fold_*")
               if p.is_dir() and all((p / chk).is_file() for chk in checkpoints)]
    numbered = sorted((f for f in trained if f.isdigit()), key=int)
    return numbered or [f for f in trained if f == "all"]


def _model_folders(dataset: str, trainer: str, plans: str, configurations: Sequence[str] | None,
                   checkpoints: Sequence[str], strict: bool) -> list[tuple[str, Path]]:
    """(configuration, trained model folder) to export: those given (checked), else every configuration with a
    fold that holds the checkpoints."""
    from nnunetv2.utilities.file_path_utilities import get_output_folder
    wanted = list(configurations) if configurations else list(CONFIGURATIONS)
    found = [(c, Path(get_output_folder(dataset, trainer, plans, c))) for c in wanted]
    missing = [folder for c, folder in found if not folder.is_dir()]
    if configurations and strict and missing:
        raise ModelExportError(f"No trained model at {missing[0]}: check -d, -tr, -p and -c (or pass --not_strict to "
                               f"skip the configurations that were not trained).")
    present = [(c, folder) for c, folder in found if folder.is_dir()]
    if not configurations:  # still training, or never finished: not what the user means to share
        present = [(c, folder) for c, folder in present if _trained_folds(folder, checkpoints)]
    if not present:
        raise ModelExportError(f"No model of {dataset} trained with -tr {trainer} -p {plans} "
                               f"(configurations {', '.join(wanted)}, checkpoints {', '.join(checkpoints)}) under "
                               f"{results_folder()}; check -d, -tr, -p, -c, -chk and nnUNet_results.")
    return present


def _folds(model_folder: Path, folds: Sequence[str] | None, checkpoints: Sequence[str], strict: bool) -> list[str]:
    """The folds of ``model_folder`` to export: those given (checked), else every fold with all the checkpoints."""
    trained = _trained_folds(model_folder, checkpoints)
    if not folds:
        if not trained:
            raise ModelExportError(f"{model_folder} has no fold with {', '.join(checkpoints)}: train it first, or "
                                   f"name the checkpoints with -chk.")
        return trained
    chosen = []
    for fold in map(str, folds):
        lacking = [chk for chk in checkpoints if not (_fold_folder(model_folder, fold) / chk).is_file()]
        if not lacking:
            chosen.append(fold)
        elif strict:
            raise ModelExportError(f"{_fold_folder(model_folder, fold) / lacking[0]} does not exist: pass -f with "
                                   f"the folds that were trained (found: {', '.join(trained) or 'none'}) and -chk "
                                   f"with their checkpoints.")
    if not chosen:
        raise ModelExportError(f"None of the folds {', '.join(map(str, folds))} of {model_folder} has "
                               f"{', '.join(checkpoints)}.")
    return chosen


def validate_command(model_folder: Path, fold: str) -> str:
    """The nnUNetv2_train command that validates ``fold`` of ``model_folder`` (…/DatasetX/TRAINER__PLANS__CONFIG);
    for a text model it also writes a missing report reference."""
    from nnunetv2.utilities.file_path_utilities import convert_identifier_to_trainer_plans_config
    trainer, plans, configuration = convert_identifier_to_trainer_plans_config(str(model_folder))
    return f"nnUNetv2_train {model_folder.parent.name} {configuration} {fold} -tr {trainer} -p {plans} --val"


def _check_nnunet_files(model_folder: Path, folds: Sequence[str], crossval_predictions: bool) -> None:
    """What nnU-Net's export reads without checking: one clear error instead of its FileNotFoundError mid-zip."""
    needed = [(model_folder / n, None) for n in ("plans.json", "dataset.json", "dataset_fingerprint.json")]
    for fold in folds:
        needed.append((_fold_folder(model_folder, fold) / "progress.png", None))
        needed.append((_fold_folder(model_folder, fold) / "validation" /
                       ("" if crossval_predictions else "summary.json"), fold))
    for path, fold in needed:
        if not path.exists():
            fix = (f"validate the fold first: {validate_command(model_folder, fold)}" if fold is not None else
                   "the model folder is incomplete; copy it whole from where it was trained")
            raise ModelExportError(f"{path} does not exist, and nnU-Net's export needs it: {fix}.")


def export_text_model(dataset: str | int, output_file: str | Path, configurations: Sequence[str] | None = None,
                      trainer: str = "nnUNetTrainerBiCLIP", plans_identifier: str = "nnUNetPlans",
                      folds: Sequence[str | int] | None = None,
                      checkpoints: Sequence[str] = ("checkpoint_final.pth",), strict: bool = True,
                      export_crossval_predictions: bool = False) -> ExportedModel:
    """Write ``output_file`` (a zip nnU-Net installs) with nnU-Net's export and each fold's report reference.

    Configurations and folds default to those trained (with every checkpoint in ``checkpoints``); given ones must
    exist unless ``strict`` is False. An existing ``output_file`` is never replaced. A damaged reference stops the
    export (nothing is left behind); a fold without one (trained before references existed) is exported and listed in
    ``lacking``."""
    from nnunetv2.model_sharing.model_export import export_pretrained_model

    from nnunetv2_textseg.training.text_trainer import PLANS_KEY
    out = Path(output_file)
    if out.exists():
        raise ModelExportError(f"{out} already exists; choose another output file (nothing is overwritten).")
    if not out.parent.is_dir():
        raise ModelExportError(f"The folder of the output file, {out.parent}, does not exist.")
    name = dataset_name(dataset)
    results = results_folder()
    models = _model_folders(name, trainer, plans_identifier, configurations, checkpoints, strict)
    exported = ExportedModel(out, [])
    fold_sets = {c: _folds(folder, [str(f) for f in folds] if folds else None, checkpoints, strict)
                 for c, folder in models}
    # nnU-Net's export takes one fold list for every configuration
    chosen = [f for f in next(iter(fold_sets.values())) if all(f in v for v in fold_sets.values())]
    if not chosen or (strict and any(v != chosen for v in fold_sets.values())):
        raise ModelExportError(f"The configurations have different trained folds ({fold_sets}); export them "
                               f"separately with -c and -f" + ("." if not chosen else
                                                               ", or pass --not_strict to export the common ones."))
    for _, folder in models:
        _check_nnunet_files(folder, chosen, export_crossval_predictions)
        identity = json.loads((folder / "plans.json").read_text()).get(PLANS_KEY, {}).get("encoder_identity")
        if identity is None:
            raise ModelExportError(f"{folder} was not trained by a text trainer (its plans.json has no '{PLANS_KEY}' "
                                   f"entry): share it with nnUNetv2_export_model_to_zip.")
        for fold in chosen:
            exported.folds.append(_fold_folder(folder, fold))
            reference = _fold_folder(folder, fold) / REFERENCE_FILE
            if reference.is_file():
                # damaged, or another encoder's: one clear error before anything is written, not on the receiving end
                load_reference_for_model(reference, identity)
                exported.added.append(reference)
            else:
                exported.lacking.append(_fold_folder(folder, fold))
    try:
        export_pretrained_model(name, str(out), configurations=tuple(c for c, _ in models), trainer=trainer,
                                plans_identifier=plans_identifier, folds=tuple(chosen), strict=True,
                                save_checkpoints=tuple(checkpoints),
                                export_crossval_predictions=export_crossval_predictions)
        with zipfile.ZipFile(out, "a", zipfile.ZIP_DEFLATED) as zipf:
            for path in exported.added:
                zipf.write(path, os.path.relpath(path, results))  # nnU-Net's arcnames: relative to nnUNet_results
    except BaseException:
        out.unlink(missing_ok=True)  # ours, half written
        raise
    return exported
