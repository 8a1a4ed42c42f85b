"""Images larger than the planned patch: 128² demo images, plans edited to a 64² patch. Training crops and
prediction tiles each carry their own part of the patient frame (real nnU-Net commands, CPU)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, nnunet_env, run

DATASET = 986
TRAINER = "nnUNetTrainerBiCLIP_debug"


@pytest.fixture(scope="module")
def large_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    env = nnunet_env(root)
    run([str(BIN / "nnUNetv2_textseg_make_demo"), "-d", str(DATASET), "--n_train", "8", "--n_test", "2", "--size",
         "128", "--seed", "2", "--raw", str(root / "raw")], env)
    run([str(BIN / "nnUNetv2_plan_and_preprocess"), "-d", str(DATASET), "-c", "2d", "-np", "1"], env)
    plans_file = next((root / "pre").glob(f"Dataset{DATASET}_*")) / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["patch_size"] = [64, 64]  # half the image: crops in training, 9 tiles at test
    plans_file.write_text(json.dumps(plans, indent=2))
    run([str(BIN / "nnUNetv2_train"), str(DATASET), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env)
    raw = next((root / "raw").glob(f"Dataset{DATASET}_*"))
    model = next((root / "res").glob(f"Dataset{DATASET}_*")) / f"{TRAINER}__nnUNetPlans__2d"
    return root, env, raw, model


@pytest.mark.integration
def test_training_and_prediction_with_patches_smaller_than_the_image(large_model, tmp_path, monkeypatch):
    root, env, raw, model = large_model
    assert json.loads((model / "plans.json").read_text())["configurations"]["2d"]["patch_size"] == [64, 64]
    out = tmp_path / "pred"
    run([str(BIN / "nnUNetv2_textseg_predict"), "-i", str(raw / "imagesTs"), "-o", str(out), "-d", str(DATASET),
         "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1", "--save_pseudo_images"], env)
    for img in sorted((raw / "imagesTs").glob("*_0000.png")):
        case = img.name[:-len("_0000.png")]
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{case}.png")))
        assert seg.shape == (128, 128)
        assert (out / "pseudo_images" / f"{case}_pseudo.png").is_file()

    # every sliding-window tile (and mirrored pass) gets the position channels of where it lies in the image
    for k, v in env.items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    p = nnUNetTextPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(model), (0,), "checkpoint_final.pth")
    seen = []
    net = p._net()
    original = net.forward
    net.forward = lambda x, *a, **kw: (seen.append(x[:, -3:].clone()), original(x, *a, **kw))[1]
    data, props = NaturalImage2DIO().read_images([str(sorted((raw / "imagesTs").glob("*_0000.png"))[0])])
    p.predict_single_npy_array_with_report(data, props, "Bilateral pulmonary infection, upper left lung and lower "
                                           "right lung.")
    assert len(seen) == 9  # 3 x 3 tiles of 64² over 128², step 0.5
    starts = sorted({(round(float(t[0, 0, 0, 0]), 4), round(float(t[0, 1, 0, 0]), 4)) for t in seen})
    assert len(starts) == 9  # each tile starts at another place of the patient frame
    first = (2 * (np.arange(3) * 32 + 0.5) / 128 - 1).round(4)  # tile origins 0, 32, 64 px
    assert sorted({s[0] for s in starts}) == pytest.approx(list(first), abs=1e-3)
