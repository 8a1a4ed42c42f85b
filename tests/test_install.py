"""A plain (non-editable) install works as a plugin: build the wheel, install it into an empty folder, and let
the real nnUNetv2_train find and train our trainer from there — no repository checkout involved."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import DATASET_ID, REPO

PY = sys.executable


@pytest.mark.integration
def test_wheel_install_finds_and_trains_our_trainer(trained_model, tmp_path):
    dist, site, src = tmp_path / "dist", tmp_path / "site", tmp_path / "src"
    # built from a copy: setuptools writes build/ and *.egg-info into the source tree, never into the checkout
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info",
                                                             "__pycache__", "demo_work", "results"))
    # the project's own build backend, from this environment (no download, no build isolation)
    subprocess.run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist), str(src)],
                   check=True, capture_output=True, text=True, timeout=600)
    wheel = next(dist.glob("nnunetv2_textseg-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nnunetv2_textseg/nnunet_trainers/textseg_trainers.py" in names
    subprocess.run([PY, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, text=True, timeout=600)

    # the installed copy (first on the path), not the checkout; its env command names its packaged folder
    env = dict(trained_model.env, PYTHONPATH=str(site), nnUNet_results=str(tmp_path / "res"))
    env.pop("nnUNet_extTrainer")
    probe = subprocess.run([PY, "-c", "import nnunetv2_textseg, sys; from nnunetv2_textseg.cli import trainers_folder; "
                                      "print(nnunetv2_textseg.__file__); print(trainers_folder())"],
                           env=env, cwd=tmp_path, capture_output=True, text=True, check=True)
    module_file, folder = probe.stdout.split()
    assert Path(module_file).is_relative_to(site) and Path(folder).is_relative_to(site)
    env["nnUNet_extTrainer"] = folder
    r = subprocess.run([PY, "-c", "import sys; from nnunetv2.run.run_training import run_training_entry; "
                                  "sys.argv = ['nnUNetv2_train'] + sys.argv[1:]; run_training_entry()",
                        str(DATASET_ID), "2d", "0", "-tr", "nnUNetTrainerBiCLIP_debug", "-device", "cpu"],
                       env=env, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert f"Using trainer 'nnUNetTrainerBiCLIP_debug' from: {folder}" in r.stdout
    fold = next((tmp_path / "res").glob(f"Dataset{DATASET_ID}_*")) / "nnUNetTrainerBiCLIP_debug__nnUNetPlans__2d" / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file()
    assert os.path.getsize(fold / "checkpoint_final.pth") > 0
