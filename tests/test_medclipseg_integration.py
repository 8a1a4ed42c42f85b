"""nnUNetTrainerMedCLIPSeg trained by the real nnUNetv2_train, then Monte-Carlo prediction with uncertainty."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET_ID, run

TRAINER = "nnUNetTrainerMedCLIPSeg_debug"


@pytest.fixture(scope="module")
def medclipseg_model(trained_model):
    """Same preprocessed dataset (and text cache) as the BiCLIP session model."""
    r = run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"],
            trained_model.env)
    folder = trained_model.model_folder.parent / f"{TRAINER}__nnUNetPlans__2d"
    return folder, r.stdout + r.stderr


def test_training_logs_contrastive_term_and_validates(medclipseg_model):
    folder, _ = medclipseg_model
    fold = folder / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "MedCLIPSeg loss terms" in log and "contrastive" in log
    weights = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    assert any(k.startswith("adapters.") for k in weights) and "null_tokens" in weights


def test_mc_prediction_writes_uncertainty_maps(trained_model, medclipseg_model, tmp_path):
    out = tmp_path / "pred"
    run([str(BIN / "nnUNetv2_textseg_predict"), "-i", str(trained_model.raw / "imagesTs"), "-o", str(out),
         "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
         "--mc_samples", "4", "--save_uncertainty", "--save_probabilities"], trained_model.env)
    images = sorted((trained_model.raw / "imagesTs").glob("*_0000.png"))
    for img in images:
        case = img.name[:-len("_0000.png")]
        size = sitk.ReadImage(str(img)).GetSize()
        assert (out / f"{case}.png").is_file()
        for name in ("entropy", "mutual_information", "variance"):
            f = out / "uncertainty" / f"{case}_{name}.nii.gz"
            m = sitk.GetArrayFromImage(sitk.ReadImage(str(f)))
            assert sitk.ReadImage(str(f)).GetSize() == size
            assert m.min() >= 0 and m.std() > 0, name  # non-negative and not constant
            assert (out / "uncertainty" / f"{case}_{name}.png").is_file()
    r = run([str(BIN / "nnUNetv2_textseg_calibration"), "-ref", str(trained_model.raw / "labelsTs"), "-pred", str(out)],
            trained_model.env)
    cal = json.loads((out / "calibration.json").read_text())
    assert 0 <= cal["ece"] <= 1 and 0 <= cal["error_retrieval_auc"] <= 1 and cal["n_cases"] == len(images)
