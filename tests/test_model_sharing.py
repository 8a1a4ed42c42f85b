"""export_text_model on model folders laid out as nnU-Net writes them (no training): which folds and files go into
the zip, and what is refused before anything is written. The trained-model round trip through nnU-Net's installer
and a guarded prediction is in test_predict_integration.py."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nnunetv2_textseg.model_sharing import ModelExportError, export_text_model
from nnunetv2_textseg.report_familiarity import REFERENCE_FILE, ReportReference, ReportReferenceError
from nnunetv2_textseg.training.text_trainer import PLANS_KEY

DATASET = "Dataset321_Share"
TRAINER = "nnUNetTrainerBiCLIP"
IDENTITY = {"format": 2, "weights_sha": "w", "tokenizer_sha": "t", "config_sha": "c", "pooling": "mean",
            "max_length": 128, "dim": 4, "precision": "bf16"}


@pytest.fixture()
def results(tmp_path, monkeypatch) -> Path:
    """An nnUNet_results folder; nnU-Net's modules read it at import, so their copies are pointed at it too."""
    import nnunetv2.model_sharing.model_export as model_export
    import nnunetv2.utilities.file_path_utilities as file_path_utilities
    res = tmp_path / "results"
    res.mkdir()
    monkeypatch.setenv("nnUNet_results", str(res))
    for module in (model_export, file_path_utilities):
        monkeypatch.setattr(module, "nnUNet_results", str(res))
    return res


def make_model(results: Path, folds=("0",), configuration: str = "2d", identity: dict = IDENTITY,
               reference_identity: dict | None = None) -> Path:
    """A text model's folder as training leaves it: plans with the encoder record, and per fold a checkpoint,
    progress.png, the validation summary and the report reference."""
    folder = results / DATASET / f"{TRAINER}__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps({PLANS_KEY: {"encoder_identity": identity}}))
    for name in ("dataset.json", "dataset_fingerprint.json"):
        (folder / name).write_text("{}")
    rng = np.random.default_rng(0)
    for fold in folds:
        f = folder / f"fold_{fold}"
        (f / "validation").mkdir(parents=True)
        (f / "checkpoint_final.pth").write_bytes(b"weights")
        (f / "progress.png").write_bytes(b"png")
        (f / "validation" / "summary.json").write_text("{}")
        ReportReference.from_training_reports(rng.normal(size=(5, 4)), reference_identity or identity).save(
            f / REFERENCE_FILE)
    return folder


def test_default_folds_are_the_numbered_ones_in_order_each_with_its_reference(results, tmp_path):
    folder = make_model(results, folds=("10", "2", "0", "all"))
    (folder / "fold_3").mkdir()  # started, never finished: no checkpoint
    exported = export_text_model(DATASET, tmp_path / "m.zip", trainer=TRAINER)
    assert [f.name for f in exported.folds] == ["fold_0", "fold_2", "fold_10"] and not exported.lacking
    names = set(zipfile.ZipFile(tmp_path / "m.zip").namelist())
    arc = f"{DATASET}/{TRAINER}__nnUNetPlans__2d"
    assert {f"{arc}/fold_{f}/{REFERENCE_FILE}" for f in ("0", "2", "10")} <= names
    assert not any("fold_all" in n or "fold_3" in n for n in names)


def test_a_failing_nnunet_export_leaves_no_half_written_zip(results, tmp_path, monkeypatch):
    import nnunetv2.model_sharing.model_export as model_export
    make_model(results)

    def half_then_fail(dataset_name_or_id, output_file, **kw):
        Path(output_file).write_bytes(b"PK partial")
        raise OSError("disk full")

    monkeypatch.setattr(model_export, "export_pretrained_model", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        export_text_model(DATASET, tmp_path / "m.zip", trainer=TRAINER)
    assert not (tmp_path / "m.zip").exists()


def test_a_reference_of_another_encoder_is_refused_before_writing(results, tmp_path):
    folder = make_model(results, reference_identity={**IDENTITY, "weights_sha": "other"})
    with pytest.raises(ReportReferenceError, match=f"{folder / 'fold_0' / REFERENCE_FILE}.*another text encoder"):
        export_text_model(DATASET, tmp_path / "m.zip", trainer=TRAINER)
    assert not (tmp_path / "m.zip").exists()


def test_configurations_with_different_folds_and_plain_models(results, tmp_path):
    make_model(results, folds=("0", "1"))
    make_model(results, folds=("0",), configuration="3d_fullres")
    with pytest.raises(ModelExportError, match="different trained folds.*--not_strict"):
        export_text_model(DATASET, tmp_path / "m.zip", trainer=TRAINER)
    exported = export_text_model(DATASET, tmp_path / "m.zip", trainer=TRAINER, strict=False)
    assert sorted(str(f.relative_to(results / DATASET)) for f in exported.folds) == [
        f"{TRAINER}__nnUNetPlans__2d/fold_0", f"{TRAINER}__nnUNetPlans__3d_fullres/fold_0"]
    with pytest.raises(ModelExportError, match="already exists"):
        export_text_model(DATASET, tmp_path / "m.zip", trainer=TRAINER, strict=False)
    plain = make_model(results, configuration="3d_lowres")
    (plain / "plans.json").write_text("{}")
    with pytest.raises(ModelExportError, match="not trained by a text trainer.*nnUNetv2_export_model_to_zip"):
        export_text_model(DATASET, tmp_path / "p.zip", configurations=["3d_lowres"], trainer=TRAINER)
    (plain.parent / f"{TRAINER}__nnUNetPlans__2d" / "fold_1" / "validation" / "summary.json").unlink()
    with pytest.raises(ModelExportError, match=f"summary.json does not exist.*nnUNetv2_train {DATASET} 2d 1 -tr "
                                               f"{TRAINER} -p nnUNetPlans --val"):
        export_text_model(DATASET, tmp_path / "q.zip", configurations=["2d"], trainer=TRAINER)
    assert not (tmp_path / "p.zip").exists() and not (tmp_path / "q.zip").exists()
    with pytest.raises(ModelExportError, match=f"folder of the output file, {tmp_path / 'nowhere'}, does not exist"):
        export_text_model(DATASET, tmp_path / "nowhere" / "m.zip", trainer=TRAINER, strict=False)
