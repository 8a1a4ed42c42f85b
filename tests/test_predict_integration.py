"""nnUNetv2_textseg_predict and the Python predictor on the session's trained BiCLIP model."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
import torch

from conftest import BIN, DATASET_ID, TRAINER, run

pytestmark = pytest.mark.integration  # predicts with the session's model, trained by the real nnUNetv2_train


def predict_cmd(tm, out: Path, *extra: str, inp: Path | None = None) -> list[str]:
    return [str(BIN / "nnUNetv2_textseg_predict"), "-i", str(inp or tm.raw / "imagesTs"), "-o", str(out),
            "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1",
            *extra]


@pytest.fixture(scope="module")
def cli_prediction(trained_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("pred")
    r = run(predict_cmd(trained_model, out, "--save_probabilities", "--save_uncertainty", "--save_pseudo_images"),
            trained_model.env)
    return out, r


def _env(tm):
    return {k: v for k, v in tm.env.items() if k.startswith("nnUNet")}


@pytest.fixture()
def nnunet_environ(trained_model, monkeypatch):
    for k, v in _env(trained_model).items():
        monkeypatch.setenv(k, v)


def make_predictor(tm, **kw):
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    p = nnUNetTextPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=True,
                            perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False, **kw)
    p.initialize_from_trained_model_folder(str(tm.model_folder), (0,), "checkpoint_final.pth")
    return p


def test_predictor_finds_our_trainer_without_the_env_setup(trained_model, nnunet_environ, monkeypatch, tmp_path):
    """A shell without nnUNetv2_textseg_env (nnUNet_extTrainer unset) still loads a text model — nnU-Net looks the
    trainer class up by name — and a user's own trainer folder stays in the search path, first."""
    from nnunetv2_textseg.harness import trainers_folder
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    p = make_predictor(trained_model)
    assert p.trainer_name.startswith("nnUNetTrainerBiCLIP") and p.text_config
    assert os.environ["nnUNet_extTrainer"] == str(trainers_folder())
    monkeypatch.setenv("nnUNet_extTrainer", str(tmp_path))
    make_predictor(trained_model)
    assert os.environ["nnUNet_extTrainer"].split(os.pathsep) == [str(tmp_path), str(trainers_folder())]


def test_outputs_have_nnunet_names_geometry_and_labels(trained_model, cli_prediction):
    out, _ = cli_prediction
    listed = json.loads((out / "unfamiliar_reports.json").read_text())  # the test reports: the training wording
    assert listed["checked"] is True and listed["cosine_to_nearest_training_report"] == {}
    images = sorted((trained_model.raw / "imagesTs").glob("*_0000.png"))
    for img in images:
        case = img.name[:-len("_0000.png")]
        seg = out / f"{case}.png"
        assert seg.is_file()
        a, b = sitk.ReadImage(str(img)), sitk.ReadImage(str(seg))
        assert a.GetSize() == b.GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(b))) <= {0, 1}
        assert (out / f"{case}.npz").is_file() and (out / f"{case}.pkl").is_file()  # --save_probabilities
        for name, sub in (("entropy", "uncertainty"), ("variance", "uncertainty"), ("pseudo", "pseudo_images")):
            m = sitk.ReadImage(str(out / sub / f"{case}_{name}.nii.gz"))
            assert m.GetSize() == a.GetSize()
            assert (out / sub / f"{case}_{name}.png").is_file()
        ent = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "uncertainty" / f"{case}_entropy.nii.gz")))
        assert ent.min() >= 0 and ent.max() <= np.log(2) + 1e-5 and ent.std() > 0


def test_sequential_prediction_saves_the_same_maps(trained_model, cli_prediction, tmp_path):
    """-npp 0 -nps 0 (nnU-Net's sequential loop) writes the same uncertainty maps and pseudo-images as the
    multiprocess path, in the same geometry."""
    out, _ = cli_prediction
    cmd = predict_cmd(trained_model, tmp_path / "seq", "--save_uncertainty", "--save_pseudo_images")
    for flag in ("-npp", "-nps"):
        cmd[cmd.index(flag) + 1] = "0"
    run(cmd, trained_model.env)
    cases = sorted(p.name[:-len("_0000.png")] for p in (trained_model.raw / "imagesTs").glob("*_0000.png"))
    for case in cases:
        for name, sub in (("entropy", "uncertainty"), ("variance", "uncertainty"), ("pseudo", "pseudo_images")):
            a, b = (sitk.ReadImage(str(o / sub / f"{case}_{name}.nii.gz")) for o in (out, tmp_path / "seq"))
            assert a.GetSize() == b.GetSize() and a.GetSpacing() == b.GetSpacing()
            np.testing.assert_allclose(sitk.GetArrayFromImage(b), sitk.GetArrayFromImage(a), atol=1e-4)
            assert (tmp_path / "seq" / sub / f"{case}_{name}.png").is_file()


def test_evaluate_folder_runs_on_predictions(trained_model, cli_prediction):
    out, _ = cli_prediction
    run([str(BIN / "nnUNetv2_evaluate_folder"), str(trained_model.raw / "labelsTs"), str(out),
         "-djfile", str(out / "dataset.json"), "-pfile", str(out / "plans.json")], trained_model.env)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["metric_per_case"]) == len(list((trained_model.raw / "imagesTs").glob("*.png")))


def _case(tm):
    from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
    img = sorted((tm.raw / "imagesTs").glob("*_0000.png"))[0]
    data, props = NaturalImage2DIO().read_images([str(img)])
    return data, props


def test_report_changes_the_logits(trained_model, nnunet_environ):
    p = make_predictor(trained_model)
    data, props = _case(trained_model)
    _, prob_a = p.predict_single_npy_array_with_report(data, props, "Unilateral pulmonary infection, one infected "
                                                       "area, upper left lung.", save_or_return_probabilities=True)
    _, prob_b = p.predict_single_npy_array_with_report(data, props, "Bilateral pulmonary infection, three infected "
                                                       "areas, all right lung and lower left lung.",
                                                       save_or_return_probabilities=True)
    _, prob_a2 = p.predict_single_npy_array_with_report(data, props, "Unilateral pulmonary infection, one infected "
                                                        "area, upper left lung.", save_or_return_probabilities=True)
    assert not np.allclose(prob_a, prob_b)
    np.testing.assert_array_equal(prob_a, prob_a2)  # deterministic for identical inputs


def test_unfamiliar_wording_gets_the_null_report_unless_kept(trained_model, nnunet_environ, capsys):
    """Training kept the fold's report embeddings; a report worded unlike all of them is predicted exactly as the
    null report (with a warning naming it), unless keep_unfamiliar_reports; template reports are read."""
    from nnunetv2_textseg.report_familiarity import REFERENCE_FILE, ReportReference
    ref = ReportReference.load(trained_model.fold0 / REFERENCE_FILE)
    splits = Path(trained_model.env["nnUNet_preprocessed"]) / trained_model.model_folder.parent.name / "splits_final.json"
    n_train = len(json.loads(splits.read_text())[0]["train"])
    assert 1 <= len(ref.vectors) <= n_train and 0 < ref.threshold <= 0.70
    data, props = _case(trained_model)
    unseen, template = "Lung opacities are present.", "Unilateral pulmonary infection, one infected area, upper left lung."
    p = make_predictor(trained_model, allow_missing_reports=True)
    _, prob_null = p.predict_single_npy_array_with_report(data, props, None, save_or_return_probabilities=True)
    with pytest.warns(UserWarning, match="worded unlike every report"):
        _, prob_unseen = p.predict_single_npy_array_with_report(data, props, unseen, save_or_return_probabilities=True)
    np.testing.assert_array_equal(prob_unseen, prob_null)
    _, prob_template = p.predict_single_npy_array_with_report(data, props, template, save_or_return_probabilities=True)
    assert not np.allclose(prob_template, prob_null)
    kept = make_predictor(trained_model, keep_unfamiliar_reports=True)
    _, prob_kept = kept.predict_single_npy_array_with_report(data, props, unseen, save_or_return_probabilities=True)
    assert not np.allclose(prob_kept, prob_null)
    kept.set_reports({"a": template, "b": unseen})
    assert list(kept.unfamiliar_reports) == ["b"] and kept._text_of("b") is not None
    p.set_reports({"a": template, "b": unseen})
    assert p._text_of("b") is None and p._text_of("a") is not None
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    auto = nnUNetTextPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    auto.initialize_from_trained_model_folder(str(trained_model.model_folder), None, "checkpoint_final.pth")
    assert len(auto.report_references) == 1  # folds found as nnU-Net finds them


def test_unfamiliar_reports_are_listed_with_the_predictions(trained_model, tmp_path):
    inp = tmp_path / "in"
    shutil.copytree(trained_model.raw / "imagesTs", inp)
    reports = pd.read_csv(trained_model.raw / "reportsTs.csv", dtype=str, keep_default_na=False)
    odd = reports["case_id"].iloc[0]
    reports.loc[0, "report"] = "Signs of infection in the lungs, see prior study."
    reports.to_csv(inp / "reports.csv", index=False)
    r = run(predict_cmd(trained_model, tmp_path / "out", inp=inp), trained_model.env)
    listed = json.loads((tmp_path / "out" / "unfamiliar_reports.json").read_text())
    assert list(listed["cosine_to_nearest_training_report"]) == [odd] and listed["read_as_given"] is False
    assert listed["checked"] is True and len(listed["thresholds_per_fold"]) == 1
    assert odd in r.stderr and "null report" in r.stderr
    # nnU-Net's multiprocess path predicted that case exactly as with no report at all
    reports.iloc[1:].to_csv(inp / "reports.csv", index=False)
    run(predict_cmd(trained_model, tmp_path / "none", "--allow_missing_reports", "--save_probabilities", inp=inp),
        trained_model.env)
    reports.to_csv(inp / "reports.csv", index=False)
    run(predict_cmd(trained_model, tmp_path / "odd_p", "--save_probabilities", inp=inp), trained_model.env)
    probs = {o: np.load(tmp_path / o / f"{odd}.npz")["probabilities"] for o in ("none", "odd_p")}
    np.testing.assert_array_equal(probs["odd_p"], probs["none"])


def test_damaged_reference_is_one_clear_error(trained_model, tmp_path):
    from nnunetv2_textseg.report_familiarity import REFERENCE_FILE
    res = tmp_path / "res"
    target = res / trained_model.model_folder.parent.name / trained_model.model_folder.name
    shutil.copytree(trained_model.model_folder, target, ignore=shutil.ignore_patterns("validation"))
    (target / "fold_0" / REFERENCE_FILE).write_bytes(b"not an npz")
    r = run(predict_cmd(trained_model, tmp_path / "out"), dict(trained_model.env, nnUNet_results=str(res)), check=False)
    assert r.returncode == 2 and str(target / "fold_0" / REFERENCE_FILE) in r.stderr and "Delete it" in r.stderr
    assert "Traceback" not in r.stderr


def test_reference_from_another_encoder_is_refused(trained_model, tmp_path, nnunet_environ):
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    from nnunetv2_textseg.report_familiarity import REFERENCE_FILE, ReportReference, ReportReferenceError
    copy = tmp_path / trained_model.model_folder.name
    shutil.copytree(trained_model.model_folder, copy, ignore=shutil.ignore_patterns("validation"))
    ref = ReportReference.load(copy / "fold_0" / REFERENCE_FILE)
    ref.encoder_identity = dict(ref.encoder_identity, weights_sha="another-model")
    ref.save(copy / "fold_0" / REFERENCE_FILE)
    p = nnUNetTextPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    with pytest.raises(ReportReferenceError, match="another text encoder") as e:
        p.initialize_from_trained_model_folder(str(copy), (0,), "checkpoint_final.pth")
    assert str(copy / "fold_0" / REFERENCE_FILE) in str(e.value) and "delete it or retrain" in str(e.value)


def test_older_models_without_a_reference_read_every_report(trained_model, tmp_path, nnunet_environ, capsys):
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    from nnunetv2_textseg.report_familiarity import REFERENCE_FILE
    old = tmp_path / trained_model.model_folder.name
    shutil.copytree(trained_model.model_folder, old, ignore=shutil.ignore_patterns(REFERENCE_FILE, "validation"))
    p = nnUNetTextPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)
    p.initialize_from_trained_model_folder(str(old), (0,), "checkpoint_final.pth")
    out = capsys.readouterr().out
    assert p.report_references == [] and f"fold_0 of this model keep(s) no {REFERENCE_FILE}" in out
    p.set_reports({"b": "Lung opacities are present."})
    assert p.unfamiliar_reports == {} and p._text_of("b") is not None


def test_missing_report_is_an_error_that_names_the_case(trained_model, tmp_path):
    inp = tmp_path / "in"
    shutil.copytree(trained_model.raw / "imagesTs", inp)
    reports = pd.read_csv(trained_model.raw / "reportsTs.csv", dtype=str, keep_default_na=False)
    missing = reports["case_id"].iloc[0]
    reports.iloc[1:].to_csv(inp / "reports.csv", index=False)
    r = run(predict_cmd(trained_model, tmp_path / "out", inp=inp), trained_model.env, check=False)
    assert r.returncode == 2 and missing in r.stderr and "--allow_missing_reports" in r.stderr
    assert "Traceback" not in r.stderr
    assert not list((tmp_path / "out").glob("*.png")) if (tmp_path / "out").exists() else True

    r = run(predict_cmd(trained_model, tmp_path / "out2", "--allow_missing_reports", inp=inp), trained_model.env)
    assert (tmp_path / "out2" / f"{missing}.png").is_file()
    assert "null report" in r.stderr + r.stdout


def test_non_text_model_is_refused(trained_model, tmp_path):
    """A model folder from a trainer without text (plans lack our entry) gets a clear error."""
    res = tmp_path / "res"
    ds = trained_model.model_folder.parent.name
    target = res / ds / "nnUNetTrainer__nnUNetPlans__2d"
    shutil.copytree(trained_model.model_folder, target)
    plans = json.loads((target / "plans.json").read_text())
    plans.pop("textseg")
    (target / "plans.json").write_text(json.dumps(plans))
    env = dict(trained_model.env, nnUNet_results=str(res))
    cmd = predict_cmd(trained_model, tmp_path / "out")
    cmd[cmd.index("-tr") + 1] = "nnUNetTrainer"
    r = run(cmd, env, check=False)
    assert r.returncode == 2 and "not trained by a text trainer" in r.stderr and "nnUNetv2_predict" in r.stderr


def test_encoder_mismatch_is_refused(trained_model, tmp_path, tiny_bert):
    r = run(predict_cmd(trained_model, tmp_path / "out", "-encoder", str(tiny_bert)), trained_model.env, check=False)
    assert r.returncode == 2 and "trained with text encoder" in r.stderr


def test_two_folds_are_ensembled(trained_model, nnunet_environ, tmp_path):
    """-f 0 1: the logits are the mean of each fold's logits (nnU-Net's ensembling, with reports)."""
    fold1 = trained_model.model_folder / "fold_1"
    if not fold1.exists():
        shutil.copytree(trained_model.fold0, fold1)
        ckpt = torch.load(fold1 / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        g = torch.Generator().manual_seed(0)
        for k, v in ckpt["network_weights"].items():
            if v.is_floating_point():
                v.add_(0.05 * torch.randn(v.shape, generator=g))
        torch.save(ckpt, fold1 / "checkpoint_final.pth")
    from nnunetv2_textseg.predictor import nnUNetTextPredictor
    report = "Bilateral pulmonary infection, two infected areas, middle left lung and lower right lung."
    data, props = _case(trained_model)

    def logits(folds):
        p = nnUNetTextPredictor(perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False,
                                save_uncertainty=True)
        p.initialize_from_trained_model_folder(str(trained_model.model_folder), folds, "checkpoint_final.pth")
        from nnunetv2_textseg.predictor import _one
        p._current_text = _one(p.load_encoder().encode([report]), 0)
        from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
        d, _, _ = DefaultPreprocessor().run_case_npy(data, None, props, p.plans_manager, p.configuration_manager,
                                                     p.dataset_json)
        return p.predict_logits_from_preprocessed_data(torch.from_numpy(d)), p

    l0, _ = logits((0,))
    l1, _ = logits((1,))
    l01, p = logits((0, 1))
    torch.testing.assert_close(l01, (l0 + l1) / 2, rtol=1e-4, atol=1e-4)
    assert p.last_uncertainty.n == 2  # both members count in the variance map
    cmd = predict_cmd(trained_model, tmp_path / "out", "--save_uncertainty")
    i = cmd.index("-f")
    cmd[i + 1:i + 2] = ["0", "1"]
    run(cmd, trained_model.env)
    var = sitk.GetArrayFromImage(sitk.ReadImage(str(next((tmp_path / "out" / "uncertainty").glob("*_variance.nii.gz")))))
    assert var.max() > 0  # two different members disagree somewhere
    shutil.rmtree(fold1)


def test_plain_nnunet_predict_uses_null_report_with_warning(trained_model, tmp_path):
    r = run([str(BIN / "nnUNetv2_predict"), "-i", str(trained_model.raw / "imagesTs"), "-o", str(tmp_path / "out"),
             "-d", str(DATASET_ID), "-c", "2d", "-f", "0", "-tr", TRAINER, "-device", "cpu", "-npp", "1", "-nps", "1"],
            trained_model.env)
    assert "null report" in r.stderr + r.stdout and "nnUNetv2_textseg_predict" in r.stderr + r.stdout
    assert len(list((tmp_path / "out").glob("*.png"))) == len(list((trained_model.raw / "imagesTs").glob("*.png")))


def test_mirrored_passes_carry_mirrored_positions_and_the_report(trained_model, nnunet_environ):
    """Text models keep nnU-Net's test-time mirroring: every mirrored pass of a tile carries the mirrored
    patient-frame position channels (so "left" stays the patient's left) and the case's report."""
    p = make_predictor(trained_model)  # use_mirroring=True, as nnUNetv2_predict's default
    assert tuple(p.allowed_mirroring_axes) == (0, 1)
    calls = []
    net = p._net()
    original = net.forward

    def spy(x, *args, **kwargs):
        calls.append((x.clone(), net._tokens))
        return original(x, *args, **kwargs)

    net.forward = spy
    data, props = _case(trained_model)
    p.predict_single_npy_array_with_report(data, props, "Unilateral pulmonary infection, one infected area, "
                                           "lower right lung.")
    assert len(calls) == 4  # one 64x64 tile: as is, and mirrored along y, x and both
    assert all(tokens is not None for _, tokens in calls)  # with the report set
    c = data.shape[0]
    first = calls[0][0][:, c:]
    assert first.shape[1] == 3 and torch.all(first[:, 2] == 1)  # y, x, inside
    flipped = {tuple(ax) for ax in ([2], [3], [2, 3])}
    seen = set()
    for x, _ in calls[1:]:
        for ax in flipped:
            if torch.equal(x[:, c:], torch.flip(first, ax)) and torch.equal(x[:, :c], torch.flip(calls[0][0][:, :c], ax)):
                seen.add(ax)
    assert seen == flipped

@pytest.mark.parametrize("extra, message", [(["--mc_samples", "4"], "needs a stochastic model"),
                                            (["-device", "cuda"], "no CUDA GPU"),
                                            (["OUT_IS_A_FILE"], "is an existing file")])
def test_cli_refuses_early_with_one_line(trained_model, tmp_path, extra, message):
    """Bad requests end before nnU-Net's workers start: one line, no traceback, nothing written."""
    if extra == ["-device", "cuda"] and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    out = tmp_path / "out"
    if extra == ["OUT_IS_A_FILE"]:
        out.write_text("mine")
        extra = []
    r = run(predict_cmd(trained_model, out, *extra), trained_model.env, check=False)
    assert r.returncode != 0 and message in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr
    assert not out.is_dir() or not any(out.iterdir())
    if out.is_file():
        assert out.read_text() == "mine"


def test_diagnose_reports_every_variant_and_refuses_bad_input(trained_model, tmp_path, monkeypatch, capsys):
    """nnUNetv2_textseg_diagnose on the session's BiCLIP model: every report variant measured, a figure written;
    a model folder that does not exist, images without reports and a missing reference give one clear line."""
    from nnunetv2_textseg.diagnose import main
    for k, v in _env(trained_model).items():
        monkeypatch.setenv(k, v)
    images, labels = trained_model.raw / "imagesTs", trained_model.raw / "labelsTs"
    out = tmp_path / "diag"
    # the user's own variants: one replacing a rule-made variant (our csv layout), one added (an xlsx in the
    # LViT/MedCLIPSeg layout, image file names for case ids)
    test_reports = pd.read_csv(trained_model.raw / "reportsTs.csv", dtype=str, keep_default_na=False)
    generic = tmp_path / "generic.csv"
    test_reports.assign(report="Findings consistent with pneumonia.").to_csv(generic, index=False)
    over = tmp_path / "Test_text_overdescriptive.xlsx"
    pd.DataFrame({"Image": test_reports["case_id"] + ".png",
                  "Description": test_reports["report"] + " Heart size is normal."}).to_excel(over, index=False)
    assert main(["-d", str(DATASET_ID), "-tr", TRAINER, "-i", str(images), "-ref", str(labels), "-o", str(out),
                 "--max_cases", "2", "--n_figure", "1", "--phrasings", "Lung opacities are present.",
                 "--negative_phrasing", "No acute findings.", "--variant_table", f"underdescriptive={generic}",
                 "--variant_table", f"overdescriptive={over}"]) == 0
    result = json.loads((out / "diagnosis.json").read_text())
    assert list(result["dice"]) == list(result["pseudo_image_auc"]) == [
        "real", "shuffled", "contradictory", "missing_location", "underdescriptive", "rephrased", "rephrased_as_given",
        "overdescriptive", "null"]
    assert "| rephrased |" in capsys.readouterr().out  # the printed table has its row
    assert result["variant_tables"] == {"underdescriptive": str(generic), "overdescriptive": str(over)}
    assert result["unchanged_reports"]["overdescriptive"] == result["unchanged_reports"]["contradictory"] == 0
    # the demo's chest reports: every one in the rules' wording, every contradictory one reaches the model
    assert result["reports_in_rule_wording"] == 2 and result["text_sensitivity_cases"] == 2
    # the rephrased reports are worded unlike training: given the null report, as prediction would
    assert result["unfamiliar_reports"]["rephrased"] == 2 and result["unfamiliar_reports"]["real"] == 0
    assert result["dice"]["rephrased"] == result["dice"]["null"]
    assert "rephrased_as_given" not in result["unfamiliar_reports"]  # read as given: nothing replaced
    # the side: pseudo-image and prediction, real and contradictory report (None where no case is one-sided)
    assert set(result["side"]) == {"pseudo_image", "prediction"}
    for scores in result["side"].values():
        assert set(scores) == {"real", "contradictory"}
        assert all(s is None or (0 <= s["named_side_brighter"] <= 1 and s["cases"] >= 1) for s in scores.values())
    assert set(result["pseudo_image_auc_lesion_region"] or {}) <= set(result["dice"])
    assert result["cases"] == 2 and set(result["first_conv_weight_norm"]) == {"image", "pseudo_image", "position"}
    assert (out / "diagnosis.png").is_file()
    capsys.readouterr()

    bare = tmp_path / "bare"
    shutil.copytree(images, bare)  # no reports.csv inside, no reportsTs.csv beside it
    short = tmp_path / "short.csv"  # a variant table without the first test case
    test_reports.iloc[1:].to_csv(short, index=False)
    cases = [(["-tr", "nnUNetTrainer_debug", "-i", str(images), "-ref", str(labels)], "No trained model"),
             (["-tr", TRAINER, "-i", str(bare), "-ref", str(labels)], "No report table"),
             (["-tr", TRAINER, "-i", str(images), "-ref", str(tmp_path)], "have no reference"),
             (["-tr", TRAINER, "-i", str(images), "-ref", str(labels), "--negative_phrasing", "No acute findings."],
              "give the positive ones with --phrasings"),
             (["-tr", TRAINER, "-i", str(images), "-ref", str(labels), "--variant_table", str(over)],
              "expected NAME=TABLE"),
             (["-tr", TRAINER, "-i", str(images), "-ref", str(labels), "--variant_table", f"terse={short}"],
              "have no report in it")]
    for args, message in cases:
        assert main(["-d", str(DATASET_ID), "-o", str(tmp_path / "o"), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ERROR: ") and message in err and "Traceback" not in err, err


def test_exported_model_keeps_its_report_reference(trained_model, tmp_path):
    """nnUNetv2_textseg_export_model_to_zip → nnU-Net's installer → prediction in a fresh nnUNet_results still
    guards against unfamiliar wording (nnU-Net's own export would drop the reference)."""
    import zipfile
    from nnunetv2_textseg.report_familiarity import REFERENCE_FILE
    export = str(BIN / "nnUNetv2_textseg_export_model_to_zip")
    zip_file = tmp_path / "model.zip"
    r = run([export, "-d", str(DATASET_ID), "-o", str(zip_file), "-tr", TRAINER], trained_model.env)
    assert ": 1 fold(s), 1 report reference(s)." in r.stdout
    model_arc = f"{trained_model.model_folder.parent.name}/{trained_model.model_folder.name}"
    names = zipfile.ZipFile(zip_file).namelist()
    assert {f"{model_arc}/fold_0/{REFERENCE_FILE}", f"{model_arc}/fold_0/checkpoint_final.pth",
            f"{model_arc}/plans.json"} <= set(names)
    # never overwrites; a fold or trainer that was not trained is one clear error and writes nothing
    before = zip_file.read_bytes()
    for args, says in (([], "already exists"), (["-f", "3"], "fold_3"), (["-tr", "nnUNetTrainerNope"], "No model")):
        target = zip_file if not args else tmp_path / "other.zip"
        cmd = [export, "-d", str(DATASET_ID), "-o", str(target), "-tr", TRAINER, *args]
        bad = run(cmd, trained_model.env, check=False)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr, bad.stderr
        assert not (tmp_path / "other.zip").exists()
    assert zip_file.read_bytes() == before
    # installed elsewhere by nnU-Net's own command, the model still flags a wording unlike its training reports
    env = dict(trained_model.env, nnUNet_results=str(tmp_path / "installed"))
    run([str(BIN / "nnUNetv2_install_pretrained_model_from_zip"), str(zip_file)], env)
    inp = tmp_path / "in"
    shutil.copytree(trained_model.raw / "imagesTs", inp)
    reports = pd.read_csv(trained_model.raw / "reportsTs.csv", dtype=str, keep_default_na=False)
    reports.loc[0, "report"] = "Signs of infection in the lungs, see prior study."
    reports.to_csv(inp / "reports.csv", index=False)
    run(predict_cmd(trained_model, tmp_path / "out", inp=inp), env)
    listed = json.loads((tmp_path / "out" / "unfamiliar_reports.json").read_text())
    assert listed["checked"] is True and list(listed["cosine_to_nearest_training_report"]) == [reports["case_id"][0]]


def test_export_names_folds_without_a_reference(trained_model, tmp_path):
    import zipfile
    from nnunetv2_textseg.report_familiarity import REFERENCE_FILE
    res = tmp_path / "res"
    target = res / trained_model.model_folder.parent.name / trained_model.model_folder.name
    shutil.copytree(trained_model.model_folder, target, ignore=shutil.ignore_patterns("*.npz", "*.nii.gz", "*.png"))
    shutil.copy(trained_model.fold0 / "progress.png", target / "fold_0")
    r = run([str(BIN / "nnUNetv2_textseg_export_model_to_zip"), "-d", str(DATASET_ID), "-o", str(tmp_path / "m.zip"),
             "-tr", TRAINER, "-c", "2d", "-f", "0"], dict(trained_model.env, nnUNet_results=str(res)))
    assert ": 1 fold(s), 0 report reference(s)." in r.stdout and str(target / "fold_0") in r.stderr
    assert f"nnUNetv2_train {target.parent.name} 2d 0 -tr {TRAINER} -p nnUNetPlans --val" in r.stderr
    assert not any(n.endswith(REFERENCE_FILE) for n in zipfile.ZipFile(tmp_path / "m.zip").namelist())
    # nnU-Net's export needs the fold's validation summary: its absence is named with the fix, and nothing is written
    (target / "fold_0" / "validation" / "summary.json").unlink()
    bad = run([str(BIN / "nnUNetv2_textseg_export_model_to_zip"), "-d", str(DATASET_ID), "-o", str(tmp_path / "n.zip"),
               "-tr", TRAINER], dict(trained_model.env, nnUNet_results=str(res)), check=False)
    assert bad.returncode == 2 and "summary.json" in bad.stderr and "--val" in bad.stderr, bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "n.zip").exists()
