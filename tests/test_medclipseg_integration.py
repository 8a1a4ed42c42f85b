"""nnUNetTrainerMedCLIPSeg trained by the real nnUNetv2_train, then Monte-Carlo prediction with uncertainty."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET_ID, run

TRAINER = "nnUNetTrainerMedCLIPSeg_debug"

pytestmark = pytest.mark.integration  # trains with the real nnUNetv2_train (the session's model and one MedCLIPSeg model)


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


def _mc_predictor(trained_model, medclipseg_model, monkeypatch, **kw):
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    for k, v in trained_model.env.items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    p = nnUNetTextPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False, **kw)
    p.initialize_from_trained_model_folder(str(medclipseg_model[0]), (0,), "checkpoint_final.pth")
    p.set_reports({"a": "Bilateral pulmonary infection, two infected areas, lower left lung and middle right lung."})
    return p


def test_mc_samples_are_batched_per_tile(trained_model, medclipseg_model, monkeypatch):
    """5 samples with mc_batch_size 4: every tile runs as one batch of 4 and one of 1 (two window passes, not
    five); the samples differ; each pass's samples come back in their own class slots."""
    p = _mc_predictor(trained_model, medclipseg_model, monkeypatch, mc_samples=5, mc_batch_size=4,
                      save_uncertainty=True)
    ps = p.configuration_manager.patch_size
    data = torch.randn(1, 1, ps[0] + 9, ps[1] + 5)  # (C, Z, Y, X): more than one tile per slice
    tiles = len(p._internal_get_sliding_window_slicers(data.shape[1:]))
    assert tiles > 1
    batches = []
    hook = p.network.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    p._current_case = "a"
    try:
        pred = p.predict_logits_from_preprocessed_data(data)
    finally:
        hook.remove()
    mirrors = 1 if p.allowed_mirroring_axes is None else 2 ** len(p.allowed_mirroring_axes)
    assert sorted(set(batches)) == [1, 4] and len(batches) == 2 * tiles * mirrors
    assert pred.shape == (p.label_manager.num_segmentation_heads, *data.shape[1:])
    u = p.last_uncertainty.result()
    assert p.last_uncertainty.n == 5 and u["variance"].max() > 0  # five samples, and they differ
    assert torch.allclose(u["mean"].sum(0), torch.ones(()), atol=1e-3)


def test_batched_samples_of_the_mean_path_equal_nnunets_pass(trained_model, medclipseg_model, monkeypatch):
    """Without sampling every batched sample is the deterministic prediction: the stacking on the class axis
    keeps samples and classes in place, and the label manager is restored afterwards."""
    p = _mc_predictor(trained_model, medclipseg_model, monkeypatch)
    ps = p.configuration_manager.patch_size
    data = torch.randn(1, 1, ps[0] + 9, ps[1] + 5)
    p.set_network_text("a")
    labels = p.label_manager
    stacked = p.predict_sliding_window_samples(data, 3)
    plain = p.predict_sliding_window_return_logits(data).float()
    assert p.label_manager is labels
    assert stacked.shape == (3, *plain.shape)
    for s in stacked:
        assert torch.allclose(s.float(), plain, atol=1e-2)


def test_mc_samples_refused_for_deterministic_attention(trained_model, medclipseg_model, monkeypatch):
    """_noProb (plain attention): every sample would be the same, so --mc_samples is an error, not MI = 0."""
    from nnunetv2_textseg.predictor import TextPredictionError
    p = _mc_predictor(trained_model, medclipseg_model, monkeypatch, mc_samples=3)
    p.network.deterministic = True  # what nnUNetTrainerMedCLIPSeg_noProb builds
    p._current_case = "a"
    with pytest.raises(TextPredictionError, match="deterministic"):
        p.predict_logits_from_preprocessed_data(torch.randn(1, 1, 64, 64))


def test_bad_mc_arguments_are_clear_errors(trained_model, medclipseg_model, tmp_path):
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    for flags in (["--mc_samples", "4", "--mc_batch_size", "0"], ["--mc_samples", "-1"]):
        r = run([str(BIN / "nnUNetv2_textseg_predict"), "-i", str(trained_model.raw / "imagesTs"), "-o",
                 str(tmp_path / "p"), "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu",
                 *flags], trained_model.env, check=False)
        assert r.returncode == 2 and "--mc_batch_size >= 1" in r.stderr and "Traceback" not in r.stderr
    with pytest.raises(ValueError, match="mc_batch_size"):
        nnUNetTextPredictor(mc_batch_size=0)
