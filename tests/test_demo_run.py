"""The README's main job (nnUNetv2_textseg_demo) end to end on a tiny dataset with the 2-epoch trainers."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BIN, nnunet_env

TEXT = ("nnUNetTrainerMedCLIPSeg_debug", "nnUNetTrainerBiCLIP_debug")
PLAIN = "nnUNetTrainer_debug"


@pytest.mark.integration
def test_demo_trains_predicts_with_reports_and_prints_scores(tmp_path):
    root = tmp_path / "demo"
    env = nnunet_env(tmp_path / "unused")  # the demo sets its own nnU-Net folders under --root
    r = subprocess.run([str(BIN / "nnUNetv2_textseg_demo"), "--root", str(root), "-d", "989", "--n_train", "8",
                        "--n_test", "3", "--trainers", *TEXT, "--baseline", PLAIN, "--mc_samples", "2"],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    scores = json.loads((root / "demo_scores.json").read_text())
    assert set(scores) == {*TEXT, PLAIN} and all(0 <= s["Dice"] <= 1 for s in scores.values())
    assert "Δ Dice" in r.stdout and all(t in r.stdout for t in scores)
    pred = root / "predictions"
    cases = sorted(p.name[:-len("_0000.png")] for p in
                   next((root / "nnUNet_raw").glob("Dataset989_*")).joinpath("imagesTs").glob("*_0000.png"))
    assert len(cases) == 3
    for case in cases:
        assert (pred / TEXT[0] / "uncertainty" / f"{case}_mutual_information.nii.gz").is_file()  # MC samples
        assert (pred / TEXT[1] / "pseudo_images" / f"{case}_pseudo.png").is_file()
        assert (pred / PLAIN / f"{case}.png").is_file()
