"""Fine-tuning a text trainer from a plain nnU-Net model: nnUNetv2_textseg_convert_pretrained, then the real
nnUNetv2_train -pretrained_weights; a plain checkpoint passed directly gets a clear error."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import BIN, DATASET_ID, run

PLAIN = "nnUNetTrainer_debug"

pytestmark = pytest.mark.integration  # trains plain and text models with the real nnUNetv2_train


@pytest.fixture(scope="module")
def plain_model(trained_model, tmp_path_factory):
    """A plain nnU-Net model of the session dataset, in its own results folder (the session's stays untouched)."""
    env = dict(trained_model.env, nnUNet_results=str(tmp_path_factory.mktemp("plain_results")))
    run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", PLAIN, "-device", "cpu"], env)
    ckpt = next(Path(env["nnUNet_results"]).glob(
        f"Dataset{DATASET_ID}_*/{PLAIN}__nnUNetPlans__2d/fold_0/checkpoint_final.pth"))
    return ckpt, env


def _convert(trained_model, plain_ckpt, out, trainer, *extra, check=True):
    return run([str(BIN / "nnUNetv2_textseg_convert_pretrained"), "-i", str(plain_ckpt), "-o", str(out),
                "-d", str(DATASET_ID), "-tr", trainer, *extra], trained_model.env, check=check)


@pytest.mark.parametrize("trainer", ["nnUNetTrainerBiCLIP_debug", "nnUNetTrainerMedCLIPSeg_debug"])
def test_converted_network_starts_as_the_plain_unet(trained_model, plain_model, tmp_path, trainer, monkeypatch):
    """The converted weights load into the text network, and its U-Net computes what the plain model computes
    (BiCLIP: whatever the pseudo-image channel holds, its weights start at zero)."""
    from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunetv2_textseg.pretrained import text_trainer_class

    plain_ckpt, _ = plain_model
    out = tmp_path / "converted.pth"
    _convert(trained_model, plain_ckpt, out, trainer)
    converted = torch.load(out, map_location="cpu", weights_only=False)
    plain = torch.load(plain_ckpt, map_location="cpu", weights_only=False)
    plans = PlansManager(plain["init_args"]["plans"])
    config = plans.get_configuration("2d")
    dataset_json = plain["init_args"]["dataset_json"]
    heads = plans.get_label_manager(dataset_json).num_segmentation_heads
    plain_net = get_network_from_plans(config.network_arch_class_name, config.network_arch_init_kwargs,
                                       config.network_arch_init_kwargs_req_import, 1, heads, deep_supervision=False)
    plain_net.load_state_dict(plain["network_weights"])
    cls = text_trainer_class(trainer)  # the network the trainer records (BiCLIP: its report pathways, token maps)
    plans.plans["textseg"] = {"text_in_dim": 384, "position_channels": 3, "network_version": 2,
                              **cls.network_plans_entry()}
    net = cls.build_network_architecture(plans, config, 1, heads, False)
    net.load_state_dict(converted["network_weights"])  # every key present, every shape right
    plain_net.eval(), net.eval()
    x = torch.randn(2, 1, *config.patch_size)
    with torch.no_grad():
        if "BiCLIP" in trainer:
            first = converted["network_weights"]["unet.encoder.stages.0.0.convs.0.conv.weight"]
            # pseudo-image and position channels: zero weight
            assert first.shape[1] == 1 + 1 + 3 and first[:, 1:].abs().max() == 0
            got = net.unet(torch.cat([x, torch.randn(2, 4, *config.patch_size)], 1))
        else:
            first = converted["network_weights"]["unet.encoder.stages.0.0.convs.0.conv.weight"]
            assert first.shape[1] == 1 + 3 and first[:, 1:].abs().max() == 0  # position channels: zero weight
            got = net.unet(torch.cat([x, torch.randn(2, 3, *config.patch_size)], 1))
        torch.testing.assert_close(got, plain_net(x))


def test_fine_tuning_from_a_plain_model_with_nnunetv2_train(trained_model, plain_model, tmp_path):
    plain_ckpt, env = plain_model
    out = tmp_path / "biclip_from_plain.pth"
    r = _convert(trained_model, plain_ckpt, out, "nnUNetTrainerBiCLIP_debug")
    assert "-pretrained_weights" in r.stdout
    env = dict(env, nnUNet_results=str(tmp_path / "res"))
    r = run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", "nnUNetTrainerBiCLIP_debug",
             "-device", "cpu", "-pretrained_weights", str(out)], env)
    fold = next((tmp_path / "res").glob(f"Dataset{DATASET_ID}_*/nnUNetTrainerBiCLIP_debug__nnUNetPlans__2d/fold_0"))
    assert (fold / "checkpoint_final.pth").is_file()
    assert json.loads((fold / "validation" / "summary.json").read_text())["foreground_mean"]


def test_plain_checkpoint_passed_directly_gets_the_conversion_command(trained_model, plain_model, tmp_path):
    plain_ckpt, env = plain_model
    env = dict(env, nnUNet_results=str(tmp_path / "res"))
    r = run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", "nnUNetTrainerBiCLIP_debug",
             "-device", "cpu", "-pretrained_weights", str(plain_ckpt)], env, check=False)
    assert r.returncode != 0
    assert "nnUNetv2_textseg_convert_pretrained" in r.stderr and str(plain_ckpt) in r.stderr
    assert f"-d {DATASET_ID}" in r.stderr and "Traceback" not in r.stderr


def test_conversion_refuses_text_checkpoints_other_trainers_and_overwriting(trained_model, plain_model, tmp_path):
    plain_ckpt, _ = plain_model
    r = _convert(trained_model, trained_model.fold0 / "checkpoint_final.pth", tmp_path / "x.pth",
                 "nnUNetTrainerBiCLIP_debug", check=False)
    assert r.returncode == 2 and "written by a text trainer" in r.stderr and "Traceback" not in r.stderr
    r = _convert(trained_model, plain_ckpt, tmp_path / "x.pth", "nnUNetTrainer_debug", check=False)
    assert r.returncode == 2 and "not a text trainer" in r.stderr
    r = _convert(trained_model, tmp_path / "missing.pth", tmp_path / "x.pth", "nnUNetTrainerBiCLIP_debug", check=False)
    assert r.returncode == 2 and "No checkpoint" in r.stderr
    mine = tmp_path / "mine.pth"
    mine.write_bytes(b"user data")
    r = _convert(trained_model, plain_ckpt, mine, "nnUNetTrainerBiCLIP_debug", check=False)
    assert r.returncode == 2 and "--overwrite" in r.stderr and mine.read_bytes() == b"user data"
    _convert(trained_model, plain_ckpt, mine, "nnUNetTrainerBiCLIP_debug", "--overwrite")
    assert "network_weights" in torch.load(mine, map_location="cpu", weights_only=False)


def test_conversion_strips_wrapper_prefixes_and_refuses_other_input_channels(trained_model, plain_model, tmp_path):
    plain_ckpt, _ = plain_model
    ckpt = torch.load(plain_ckpt, map_location="cpu", weights_only=False)
    weights = ckpt["network_weights"]
    ckpt["network_weights"] = {"module._orig_mod." + k: v for k, v in weights.items()}  # DDP + torch.compile names
    wrapped = tmp_path / "wrapped.pth"
    torch.save(ckpt, wrapped)
    _convert(trained_model, wrapped, tmp_path / "a.pth", "nnUNetTrainerBiCLIP_debug")
    a = torch.load(tmp_path / "a.pth", map_location="cpu", weights_only=False)["network_weights"]
    key = "decoder.stages.0.convs.0.conv.weight"
    torch.testing.assert_close(a["unet." + key], weights[key])
    # a plain model of a 2-channel dataset must not be padded into this 1-channel one
    first = [k for k, v in weights.items() if v.ndim == 4 and v.shape[1] == 1]
    ckpt["network_weights"] = {k: (torch.cat([v, v], 1) if k in first else v) for k, v in weights.items()}
    two = tmp_path / "two_channels.pth"
    torch.save(ckpt, two)
    for trainer in ("nnUNetTrainerBiCLIP_debug", "nnUNetTrainerMedCLIPSeg_debug"):
        r = _convert(trained_model, two, tmp_path / f"{trainer}.pth", trainer, check=False)
        assert r.returncode == 2 and "takes 2 input channel(s)" in r.stderr and "has 1" in r.stderr, r.stderr
        assert not (tmp_path / f"{trainer}.pth").exists()


def test_conversion_refuses_unreadable_files_and_other_configurations(trained_model, plain_model, tmp_path):
    plain_ckpt, _ = plain_model
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    r = _convert(trained_model, junk, tmp_path / "a.pth", "nnUNetTrainerBiCLIP_debug", check=False)
    assert r.returncode == 2 and "is not an nnU-Net checkpoint" in r.stderr and "Traceback" not in r.stderr
    ckpt = torch.load(plain_ckpt, map_location="cpu", weights_only=False)
    ckpt["init_args"]["configuration"] = "3d_fullres"
    other = tmp_path / "3d.pth"
    torch.save(ckpt, other)
    r = _convert(trained_model, other, tmp_path / "b.pth", "nnUNetTrainerBiCLIP_debug", check=False)
    assert r.returncode == 2 and "'3d_fullres' model" in r.stderr and "same configuration" in r.stderr
    assert not (tmp_path / "a.pth").exists() and not (tmp_path / "b.pth").exists()
