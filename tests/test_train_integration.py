"""nnUNetTrainerBiCLIP trained by the real, unmodified nnUNetv2_train (session fixture in conftest)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import BIN, DATASET_ID, TRAINER, nnunet_env, run

pytestmark = pytest.mark.integration  # checks and resumes the session's model, trained by the real nnUNetv2_train


def test_training_writes_nnunet_outputs(trained_model):
    fold = trained_model.fold0
    assert (fold / "checkpoint_final.pth").is_file()
    assert (fold / "progress.png").is_file() and (fold / "progress_text.png").is_file()
    summary = json.loads((fold / "validation" / "summary.json").read_text())
    assert "foreground_mean" in summary
    plans = json.loads((trained_model.model_folder / "plans.json").read_text())
    assert plans["textseg"]["text_in_dim"] == 384
    assert plans["textseg"]["encoder"]["name_or_path"] == "all-MiniLM-L6-v2"


def test_log_has_every_loss_term(trained_model):
    log = next(trained_model.fold0.glob("training_log_*.txt")).read_text()
    line = [l for l in log.splitlines() if "BiCLIP loss terms" in l][-1]
    for term in ("seg", "gen", "cycle", "iac"):
        assert f"{term} " in line
    stats = [l for l in log.splitlines() if "BiCLIP statistics" in l][-1]
    for k in ("pseudo_mean", "pseudo_std", "pseudo_near_zero", "wnorm_image", "wnorm_pseudo", "wnorm_position"):
        assert f"{k} " in stats
    ckpt = torch.load(trained_model.fold0 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logged = ckpt["logging"]
    for term in ("seg", "gen", "cycle", "iac"):
        values = logged[f"train_{term}_loss"]
        assert len(values) == 2 and all(v == v and v >= 0 for v in values)  # every epoch, finite
    for k in ("pseudo_std", "wnorm_pseudo"):
        assert len(logged[f"train_{k}"]) == 2 and all(v == v for v in logged[f"train_{k}"])
    assert ckpt["trainer_name"] == TRAINER
    # the position channels keep the patient frame: nnU-Net's test-time mirroring stays on
    assert tuple(ckpt["inference_allowed_mirroring_axes"]) == (0, 1)
    # the text modules' AdamW state is checkpointed beside nnU-Net's SGD (resumed by --c)
    assert set(ckpt["optimizer_state"]) == {"main", "text"}
    plans = json.loads((trained_model.model_folder / "plans.json").read_text())["textseg"]
    assert plans["position_channels"] == 3 and plans["spatial_augmentation"] == "nnunet"
    assert (trained_model.fold0 / "progress_text.png").is_file()


def test_checkpoint_holds_every_biclip_module(trained_model):
    weights = torch.load(trained_model.fold0 / "checkpoint_final.pth", map_location="cpu",
                         weights_only=False)["network_weights"]
    for prefix in ("unet.", "text_pool.", "null_text", "image_encoder.", "fusion.", "generator.",
                   "image_to_text.", "iac_head."):
        assert any(k.startswith(prefix) for k in weights), prefix


def test_resume_with_c_restores_every_module(trained_model, tmp_path, monkeypatch):
    """--c continues from checkpoint_best.pth; the trainer's load_checkpoint restores all modules."""
    from nnunetv2.run.run_training import get_trainer_from_args

    fold = trained_model.fold0
    work = tmp_path / "res"
    shutil.copytree(trained_model.root / "res", work)
    env = dict(trained_model.env, nnUNet_results=str(work))
    wfold = next(work.glob(f"Dataset{DATASET_ID}_*")) / f"{TRAINER}__nnUNetPlans__2d" / "fold_0"
    (wfold / "checkpoint_final.pth").unlink()
    r = run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu", "--c"], env)
    assert (wfold / "checkpoint_final.pth").is_file()

    for k, v in env.items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    trainer = get_trainer_from_args(str(DATASET_ID), "2d", 0, TRAINER, device=torch.device("cpu"))
    trainer.load_checkpoint(str(wfold / "checkpoint_final.pth"))
    saved = torch.load(wfold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["network_weights"]
    state = trainer.network.state_dict()
    assert set(saved) == set(state)
    for k in ("fusion.mlp.0.weight", "generator.decoder.1.weight", "null_text", "iac_head.net.0.weight",
              "text_pool.queries", "image_to_text.head.weight"):
        assert torch.equal(state[k].cpu(), saved[k]), k


def test_missing_report_fails_with_clear_message(trained_model, tmp_path):
    raw_root = tmp_path / "raw"
    shutil.copytree(trained_model.raw, raw_root / trained_model.raw.name)
    table = raw_root / trained_model.raw.name / "reportsTr.csv"
    df = pd.read_csv(table, dtype=str, keep_default_na=False)
    dropped = df["case_id"].iloc[0]
    df.iloc[1:].to_csv(table, index=False)
    env = nnunet_env(trained_model.root, raw=raw_root)
    env["nnUNet_results"] = str(tmp_path / "res")
    r = run([str(BIN / "nnUNetv2_train"), str(DATASET_ID), "2d", "0", "-tr", TRAINER, "-device", "cpu"], env,
            check=False)
    assert r.returncode != 0
    assert dropped in r.stderr and "reportsTr.csv" in r.stderr
    assert "Traceback" not in r.stderr  # one clear message, not a stack trace through nnU-Net


def test_paper_batch_of_16_is_global_under_ddp(trained_model, monkeypatch):
    """_paper: batch 16 on one process; under DDP nnU-Net splits those 16 over the ranks (2 ranks: 8 + 8)."""
    from nnunetv2.run.run_training import get_trainer_from_args
    from nnunetv2.training.nnUNetTrainer import nnUNetTrainer as trainer_module

    for k, v in trained_model.env.items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    single = get_trainer_from_args(str(DATASET_ID), "2d", 0, "nnUNetTrainerBiCLIP_paper", device=torch.device("cpu"))
    single._set_batch_size_and_oversample()
    assert single.batch_size == 16
    monkeypatch.setattr(trainer_module.dist, "get_world_size", lambda: 2)
    sizes = []
    for rank in (0, 1):
        monkeypatch.setattr(trainer_module.dist, "get_rank", lambda rank=rank: rank)
        t = get_trainer_from_args(str(DATASET_ID), "2d", 0, "nnUNetTrainerBiCLIP_paper", device=torch.device("cpu"))
        t.is_ddp = True
        t._set_batch_size_and_oversample()
        sizes.append(t.batch_size)
    assert sizes == [8, 8]


def _trainer_with_loaders(trained_model, trainer_name: str, monkeypatch):
    """The trained model's dataset, fold 0, as nnUNetv2_train builds the trainer: initialised, with its loaders."""
    from nnunetv2.run.run_training import get_trainer_from_args

    for k, v in trained_model.env.items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    trainer = get_trainer_from_args(str(DATASET_ID), "2d", 0, trainer_name, device=torch.device("cpu"))
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    return trainer


def _finish_loaders(trainer) -> None:
    for dl in (trainer.dataloader_train, trainer.dataloader_val):
        if hasattr(dl, "_finish"):
            dl._finish()


@pytest.mark.parametrize("trainer_name", ["nnUNetTrainerBiCLIP", "nnUNetTrainerMedCLIPSeg"])
def test_train_step_reads_no_device_value_before_its_end(trained_model, trainer_name, monkeypatch):
    """Each text trainer's step on real loader batches — rewritten reports, report dropout, BiCLIP's cross-fitting
    routes, forward, losses, backward, the filled gradients — reads no tensor value on the host (on a GPU each read
    waits for every queued kernel); its logged terms come back as floats with the loss, read once at the end."""
    from test_modules import _HostReads

    trainer = _trainer_with_loaders(trained_model, trainer_name, monkeypatch)
    try:
        trainer.network.train()
        batch = next(trainer.dataloader_train)
        reads = _HostReads()
        with reads:
            data, target, tokens, mask, drop = trainer.batch_inputs(batch)
            loss, terms = trainer.compute_step(data, target, tokens, mask, drop, keys=list(batch["keys"]))
            loss.backward()
            trainer.complete_gradients()
        assert reads.reads == []
        assert all(torch.is_tensor(v) and v.numel() == 1 for v in terms.values())
        out = trainer.train_step(next(trainer.dataloader_train))
        assert set(terms) <= set(out) and all(isinstance(out[k], float) for k in terms)
    finally:
        _finish_loaders(trainer)


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split(".")[:2]) < (2, 4),
                    reason="fused AdamW runs on the CPU from torch 2.4")
def test_text_modules_step_with_fused_adamw(trained_model, monkeypatch):
    """The text modules' AdamW is fused where torch has the kernel (CUDA, the CPU): one kernel for hundreds of
    small parameters, no per-parameter host work; the fused step moves the parameters as the per-parameter one does
    (the trainer's real optimiser is stepped both ways); a checkpoint saved unfused (before this, or on a device
    without the kernel) resumes fused, and one saved fused resumes unfused where there is no fused kernel."""
    from nnunetv2_textseg.training import text_trainer

    assert text_trainer.fused_adamw_on(torch.device("cpu")) and text_trainer.fused_adamw_on(torch.device("cuda"))
    assert not text_trainer.fused_adamw_on(torch.device("meta"))
    trainer = _trainer_with_loaders(trained_model, "nnUNetTrainerBiCLIP", monkeypatch)
    _finish_loaders(trainer)
    assert trainer.optimizer.text.defaults["fused"] is True
    params = trainer.optimizer.text.param_groups[0]["params"]
    start = [p.detach().clone() for p in params]
    torch.manual_seed(0)
    grads = [torch.randn_like(p) for p in params]

    def one_step() -> list[torch.Tensor]:
        trainer.optimizer.zero_grad()
        for p, p0, g in zip(params, start, grads):
            p.data.copy_(p0)
            p.grad = g.clone()
        trainer.optimizer.text.step()
        return [p.detach().clone() for p in params]

    fused = one_step()
    saved_fused = trainer.optimizer.state_dict()
    with_kernel = text_trainer.fused_adamw_on
    monkeypatch.setattr(text_trainer, "fused_adamw_on", lambda device: False)  # a device without the kernel
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    assert not trainer.optimizer.text.defaults["fused"]
    params = trainer.optimizer.text.param_groups[0]["params"]
    default = one_step()
    assert max((a - b).abs().max().item() for a, b in zip(default, fused)) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(start, fused)) > 1e-4  # it did step

    saved_default = trainer.optimizer.state_dict()
    trainer.optimizer.load_state_dict(saved_fused)  # nnU-Net's --c, without the kernel, from a checkpoint saved fused
    assert not trainer.optimizer.text.param_groups[0]["fused"]
    monkeypatch.setattr(text_trainer, "fused_adamw_on", with_kernel)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.optimizer.load_state_dict(saved_default)  # from a checkpoint saved with the per-parameter AdamW
    assert trainer.optimizer.text.param_groups[0]["fused"] is True
    params = trainer.optimizer.text.param_groups[0]["params"]
    one_step()  # the loaded state (step counters on the parameters' device) steps


@pytest.mark.parametrize("variant", ["nnUNetTrainerBiCLIP_noIAC", "nnUNetTrainerBiCLIP_unidirectional",
                                     "nnUNetTrainerBiCLIP_noText", "nnUNetTrainerBiCLIP_noCycle",
                                     "nnUNetTrainerBiCLIP_paper", "nnUNetTrainerBiCLIP_efunet",
                                     "nnUNetTrainerBiCLIP_safeAug", "nnUNetTrainerBiCLIP_noPosition",
                                     "nnUNetTrainerBiCLIP_noSegGrad", "nnUNetTrainerBiCLIP_crossFit",
                                     "nnUNetTrainerBiCLIP_mirroredPatient", "nnUNetTrainerBiCLIP_crossFitTokens",
                                     "nnUNetTrainerBiCLIP_pathwayWarmup", "nnUNetTrainerBiCLIP_phraseMaps",
                                     "nnUNetTrainerBiCLIP_locationFree", "nnUNetTrainerBiCLIP_endToEnd",
                                     "nnUNetTrainerBiCLIP_mapPrior", "nnUNetTrainerBiCLIP_wholeCase",
                                     "nnUNetTrainerBiCLIP_anatomyGate", "nnUNetTrainerMedCLIPSeg", "nnUNetTrainerMedCLIPSeg_locationFree",
                                     "nnUNetTrainerMedCLIPSeg_reportsAsWritten"])
def test_ablation_builds_and_trains_one_step(trained_model, variant, monkeypatch):
    """Each ablation builds its network from the plans and runs a real train_step on real batches (MedCLIPSeg's
    default and variants too: the rewritten reports are the trainer's, not the network's)."""
    trainer = _trainer_with_loaders(trained_model, variant, monkeypatch)
    trainer.network.train()
    out = trainer.train_step(next(trainer.dataloader_train))
    _finish_loaders(trainer)
    assert out["loss"] == out["loss"]
    rotation, _, _, mirror_axes = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    from batchgeneratorsv2.transforms.spatial.mirroring import MirrorTransform
    pipeline = trainer.get_training_transforms(trainer.configuration_manager.patch_size, rotation, None, mirror_axes,
                                               False)
    if variant.endswith("safeAug"):  # safe mode: no mirroring in training or at test time, small rotations only
        assert mirror_axes is None and trainer.inference_allowed_mirroring_axes is None
        assert max(abs(r) for r in rotation) <= np.deg2rad(trainer.max_rotation_deg) + 1e-9
        assert not any(isinstance(t, MirrorTransform) for t in pipeline.transforms)
    else:  # nnU-Net's default 2D augmentation: mirroring and full rotation
        assert tuple(mirror_axes) == (0, 1) and max(abs(r) for r in rotation) > np.pi / 2
        assert any(isinstance(t, MirrorTransform) for t in pipeline.transforms)
    net = trainer.network
    if variant.endswith("noIAC"):
        assert net.iac_head is None and "iac" not in out
    if variant.endswith("unidirectional"):
        assert net.fusion is None and net.image_encoder is None
    if variant.endswith("noCycle"):
        assert net.image_to_text is None and "cycle" not in out
    if variant.endswith("noText"):
        assert net.ignore_text
    if variant.startswith("nnUNetTrainerBiCLIP"):
        prior = net.map_prior
        assert (prior is not None) == variant.endswith("mapPrior")
        assert trainer.plans_manager.plans["textseg"]["map_prior"] == variant.endswith("mapPrior")
        gated = variant.endswith("anatomyGate")
        assert trainer.plans_manager.plans["textseg"]["anatomy_gate"] == gated
        assert all((path.anatomy_gate is not None) == gated for path in net.pathways)
        if prior is not None:  # softmax labels: the background's weight starts at 0, the lesion's at 1 (one step on)
            w = prior.weight.detach().tolist()
            assert abs(w[0]) < 0.01 and abs(w[1] - 1) < 0.01
            assert prior.weight.grad is not None and float(prior.weight.grad.abs().sum()) > 0
    if variant.startswith("nnUNetTrainerBiCLIP"):  # the whole-case term: only where switched on, a real number
        assert ("whole_case" in out) == variant.endswith("wholeCase")
    if variant.endswith("wholeCase"):
        assert 0 < out["whole_case"] < 10 and len(trainer._whole_case_targets[1]) == len(trainer.training_case_ids)
    if variant.endswith("paper"):
        assert isinstance(trainer.optimizer, torch.optim.AdamW) and trainer.batch_size == 16
    if variant.endswith("noPosition"):
        assert not net.position_to_unet and "wnorm_position" in trainer.epoch_statistics()
    if variant.endswith("noSegGrad"):
        assert not net.seg_gradient_to_text and trainer.cycle_normalized and "cycle" in out
    if variant.endswith("crossFit"):  # a fixed, balanced split of the fold's training cases over the 2 pathways
        assert net.cross_fit_twin is not None and not net.seg_gradient_to_text
        # recorded in the plans: prediction rebuilds two pathways; plans without the entry (older models) one
        text_plans = trainer.plans_manager.plans["textseg"]
        assert text_plans["report_pathways"] == 2
        del text_plans["report_pathways"]
        rebuilt = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                     trainer.num_input_channels, trainer.label_manager.num_segmentation_heads)
        assert rebuilt.cross_fit_twin is None
        halves = trainer.cross_fit_folds(trainer.training_case_ids).tolist()
        assert sorted(set(halves)) == [0, 1] and abs(2 * sum(halves) - len(halves)) <= 1
        assert trainer.cross_fit_folds(trainer.training_case_ids).tolist() == halves
        assert trainer.fitting_pathways(torch.tensor(halves)).tolist() == [1 - h for h in halves]
    if variant.endswith("crossFitTokens"):  # 4 pathways with token maps, dealt in turn; recorded in the plans
        assert len(net.pathways) == 4 and all(p.token_maps is not None for p in net.pathways)
        text_plans = trainer.plans_manager.plans["textseg"]
        assert text_plans["report_pathways"] == 4 and text_plans["token_maps"] is True
        folds = trainer.cross_fit_folds(trainer.training_case_ids)
        counts = torch.bincount(folds, minlength=4)
        assert int(counts.max() - counts.min()) <= 1
        fits = torch.stack([trainer.fitting_pathways(folds) for _ in range(50)])
        assert not bool((fits == folds).any()) and set(fits.unique().tolist()) == {0, 1, 2, 3}
        assert "gen" in out and trainer.mirrored_patient > 0
    if variant.endswith("phraseMaps"):  # windowed token maps, recorded in the plans so prediction rebuilds them
        assert all(p.token_maps.window == 3 for p in net.pathways) and trainer.pathway_warmup_steps > 0
        assert trainer.plans_manager.plans["textseg"]["token_window"] == 3
    if variant.endswith("mirroredPatient"):  # every training report also encoded with left and right swapped
        from nnunetv2_textseg.cache import TextEmbeddingCache
        pre = Path(trainer.preprocessed_dataset_folder_base)
        cache = TextEmbeddingCache.load(next((pre / "text_embeddings").glob("*__TrLateralSwap.npz")))
        raw = next(Path(trained_model.env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID:03d}_*"))
        reports = pd.read_csv(raw / "reportsTr.csv", dtype=str)
        sided = [c for c, t in zip(reports["case_id"], reports["report"]) if re.search(r"\b(left|right)\b", t, re.I)]
        assert sided and set(trainer.text_rows) <= set(cache.case_ids)
        assert trainer.mirrored_tokens.shape == trainer.text_tokens.shape
        row = trainer.text_rows[sided[0]]
        assert not torch.equal(trainer.mirrored_tokens[row], trainer.text_tokens[row])
    if variant.endswith("endToEnd"):  # the earlier default: one pathway trained end to end, nothing rewritten
        assert len(net.pathways) == 1 and net.pathways[0].token_maps is None and net.seg_gradient_to_text
        assert trainer.pathway_warmup_steps == 0 and not trainer.mirrored_patient and not trainer.location_free_reports
        text_plans = trainer.plans_manager.plans["textseg"]
        assert (text_plans["report_pathways"], text_plans["token_maps"], text_plans["token_window"]) == (1, False, 1)
    if variant.endswith("reportsAsWritten"):  # nothing rewritten, nothing encoded twice
        assert not trainer.location_free_reports and getattr(trainer, "location_free_tokens", None) is None
    if trainer.location_free_reports > 0:  # every training report also encoded without its location words
        from nnunetv2_textseg.cache import TextEmbeddingCache
        from nnunetv2_textseg.report_parsing import parse_report
        pre = Path(trainer.preprocessed_dataset_folder_base)
        cache = TextEmbeddingCache.load(next((pre / "text_embeddings").glob("*__TrLocationFree.npz")))
        assert set(trainer.text_rows) <= set(cache.case_ids) and trainer.location_free_reports > 0
        assert trainer.location_free_tokens.shape == trainer.text_tokens.shape
        if trainer.mirrored_patient:  # BiCLIP's: all token tables padded to one length
            assert trainer.mirrored_tokens.shape == trainer.text_tokens.shape
        raw = next(Path(trained_model.env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID:03d}_*"))
        reports = pd.read_csv(raw / "reportsTr.csv", dtype=str)
        located = [c for c, t in zip(reports["case_id"], reports["report"])
                   if c in trainer.text_rows and (parse_report(t) is not None and parse_report(t).zones)]
        assert located
        row = trainer.text_rows[located[0]]
        assert not torch.equal(trainer.location_free_tokens[row], trainer.text_tokens[row])
        if variant.endswith("locationFree"):  # the earlier variants: the place-free rewrite only
            assert trainer.finding_only_share == 0 and getattr(trainer, "finding_only_tokens", None) is None
        else:  # the defaults: also the bare finding ("Pulmonary infection."), its own cache
            terse = TextEmbeddingCache.load(next((pre / "text_embeddings").glob("*__TrFindingOnly.npz")))
            assert set(trainer.text_rows) <= set(terse.case_ids) and trainer.finding_only_share > 0
            assert trainer.finding_only_tokens.shape == trainer.text_tokens.shape
            assert not torch.equal(trainer.finding_only_tokens[row], trainer.location_free_tokens[row])
    if variant.endswith("efunet"):
        assert not net.sigmoid and type(net.text_pool).__name__ == "MeanPoolText" and out["gen"] >= 0


def test_pathway_warmup_trains_the_report_pathways_alone(trained_model, monkeypatch):
    """The warm-up trains the report pathways on real loader batches (generation loss falls from its start) and
    leaves the U-Net as it was; it is logged."""
    from nnunetv2.run.run_training import get_trainer_from_args

    for k, v in trained_model.env.items():
        if k.startswith("nnUNet"):
            monkeypatch.setenv(k, v)
    trainer = get_trainer_from_args(str(DATASET_ID), "2d", 0, "nnUNetTrainerBiCLIP_pathwayWarmup",
                                    device=torch.device("cpu"))
    assert trainer.pathway_warmup_steps > 0
    trainer.initialize()
    trainer.dataloader_train, trainer.dataloader_val = trainer.get_dataloaders()
    net = trainer.unwrapped_network()
    unet_before = {k: v.clone() for k, v in net.unet.state_dict().items()}
    pathway_params = [p for p in net.parameters() if all(p is not q for q in net.unet.parameters())]
    pathways_before = [p.detach().clone() for p in pathway_params]
    c = trainer.num_input_channels

    def held_loss(batches) -> float:  # generation loss of each case's fitting pathways on fixed batches, no dropout
        total = 0.0
        with torch.no_grad():
            for data, target, tokens, mask, keys in batches:
                folds = trainer.cross_fit_folds(keys)
                out = net.report_pathways_forward(torch.cat([data[:, :c], data[:, -3:]], 1), tokens=tokens,
                                                  mask=mask, fold=folds, fit=(folds + 1) % len(net.pathways))
                total += float(trainer.compute_loss(out, data[:, :c], target)[1]["gen"])
        return total / len(batches)

    try:
        fixed = []
        for _ in range(4):
            batch = next(trainer.dataloader_train)
            data, target, tokens, mask, _ = trainer.batch_inputs(batch)
            fixed.append((data, target, tokens, mask, list(batch["keys"])))
        before = held_loss(fixed)
        losses = trainer.warm_up_report_pathways(30)
        after = held_loss(fixed)
    finally:
        for dl in (trainer.dataloader_train, trainer.dataloader_val):
            if hasattr(dl, "_finish"):
                dl._finish()
    assert len(losses) == 30 and all(np.isfinite(losses))
    assert after < before - 0.01, (before, after)  # the maps learn from the labels, not only drift
    assert all(torch.equal(unet_before[k], v) for k, v in net.unet.state_dict().items())
    changed = [not torch.equal(a, b) for a, b in zip(pathways_before, pathway_params)]
    assert sum(changed) > len(changed) // 2
    # every pathway fitted something (each sample trains one of the three pathways that do not read it)
    for path in net.pathways:
        assert any(not torch.equal(a, b) for a, b in zip(pathways_before, pathway_params)
                   if any(b is q for q in path.token_maps.parameters()))
    log = Path(trainer.log_file).read_text()  # this trainer's own log (other tests write logs to the same folder)
    assert "warm-up step 30/30" in log
