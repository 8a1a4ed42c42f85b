"""Smoke test of benchmarks/text_vs_vision.py: the real nnU-Net commands on a tiny demo dataset, then a
re-run that must resume (no training, no new evaluations)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "text_vs_vision.py"
TRAINERS = ("nnUNetTrainer_debug", "nnUNetTrainerBiCLIP_debug")
CONDITIONS = ("clean", "motion")


def _run(out: Path) -> tuple[subprocess.CompletedProcess, float]:
    t = time.time()
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out)],
                       capture_output=True, text=True, timeout=1500, cwd=str(REPO))
    seconds = time.time() - t
    assert r.returncode == 0, f"benchmark failed ({r.returncode}):\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r, seconds


@pytest.mark.integration
def test_text_vs_vision_smoke_and_resume(tmp_path):
    out = tmp_path / "text_vs_vision"
    first, first_s = _run(out)

    data = json.loads((out / "results.json").read_text())
    assert data["settings"]["preset"] == "smoke"
    assert data["machine"]["cpu_count"] and data["machine"]["torch"]
    assert data["fraction_folds"]["1"]["fold"] == 0  # 100 % -> fold 0
    for trainer in TRAINERS:
        for condition in CONDITIONS:
            hits = [e for e in data["entries"] if e["label"] == trainer and e["condition"] == condition]
            assert len(hits) == 1, (trainer, condition, data["entries"])
            e = hits[0]
            assert 0.0 <= e["dice"] <= 1.0 and 0.0 <= e["iou"] <= 1.0
            assert e["fraction"] == 1.0 and e["fold"] == 0 and e["n_cases"] == 4
            assert e["predicted_with"] == ("nnUNetv2_textseg_predict" if "BiCLIP" in trainer else "nnUNetv2_predict")
    steps = {s["step"]: s for s in data["runs"][-1]["steps"]}
    assert all(steps[f"train_990_{t}_fold0"]["status"] == "ran" for t in TRAINERS)

    # one splits_final.json entry per fraction, validating on nnU-Net's default fold-0 cases
    pre = next((out / "work" / "nnUNet_preprocessed").glob("Dataset990_*"))
    splits = json.loads((pre / "splits_final.json").read_text())
    assert len(splits) == 1 and len(splits[0]["train"]) == 6 and len(splits[0]["val"]) == 2
    # degraded test folder carries the reports for the text trainer
    assert (out / "work" / "degraded" / pre.name / "motion" / "reports.csv").is_file()

    md = (out / "results.md").read_text()
    assert all(t in md for t in TRAINERS) and "Δ Dice" in md
    assert str(data["commit"] or "unknown") in md  # the header names the commit
    assert "| fraction | condition | trainer |" in first.stdout  # the table is printed at the end
    png = out / "results.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # re-run: everything is resumed from results.json and the checkpoints
    second, second_s = _run(out)
    again = json.loads((out / "results.json").read_text())
    last = again["runs"][-1]
    assert last["trained"] == []
    assert not [s for s in last["steps"] if s["status"] == "ran"], last["steps"]
    assert all(f"skip train_990_{t}_fold0" in second.stdout for t in TRAINERS)
    assert sorted((e["label"], e["condition"], e["dice"]) for e in again["entries"]) == \
        sorted((e["label"], e["condition"], e["dice"]) for e in data["entries"])
    assert second_s < max(60.0, first_s / 3), (first_s, second_s)

    # your own report-variant tables (any importable layout): predicted per kind, tabulated in that order
    raw = next((out / "work" / "nnUNet_raw").glob("Dataset990_*"))
    reports = pd.read_csv(raw / "reportsTs.csv")
    original = tmp_path / "original.csv"
    reports.to_csv(original, index=False)
    lvit = pd.DataFrame({"Image": reports["case_id"] + ".png", "Description": "Normal chest radiograph.",
                         "Ground Truth": reports["case_id"] + ".png"})
    lvit.to_excel(tmp_path / "Test_text_normal.xlsx", index=False)
    r = subprocess.run([sys.executable, str(SCRIPT), "--preset", "smoke", "--out", str(out), "--variant_reports",
                        f"original={original}", f"says_normal={tmp_path / 'Test_text_normal.xlsx'}"],
                       capture_output=True, text=True, timeout=1500, cwd=str(REPO))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    data = json.loads((out / "results.json").read_text())
    variants = {e["variant"]: e for e in data["report_variant_entries"] if e["trainer"] == TRAINERS[1]}
    assert set(variants) == {"original", "says_normal"}
    assert all(0 <= e["dice"] <= 1 and e["mean_entropy"] >= 0 and e["n_cases"] == 4 for e in variants.values())
    md = (out / "results.md").read_text()
    assert "--variant_reports" in md and md.index("| original |") < md.index("| says_normal |")


def _runner_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("text_vs_vision", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variant_reports_are_checked_before_anything_runs(tmp_path):
    tvv = _runner_module()
    table = tmp_path / "t.csv"
    table.write_text("case_id,report\na,Left lung.\nb,Right lung.\n")
    assert list(tvv.parse_variant_reports([f"contradictory={table}", f"original={table}"])) == \
        ["original", "contradictory"]  # original first: the others are compared with it
    for bad, message in [([f"contradictory={table}"], "original=FILE"), ([f"a b={table}"], "KIND=FILE"),
                         ([f"original={tmp_path / 'nope.csv'}"], "no file"),
                         ([f"original={table}", f"original={table}"], "twice")]:
        with pytest.raises(tvv.BenchmarkError, match=message):
            tvv.parse_variant_reports(bad)
    raw = tmp_path / "Dataset001_X"
    (raw / "imagesTs").mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"file_ending": ".png"}))
    for case in ("a", "b", "c"):
        (raw / "imagesTs" / f"{case}_0000.png").write_bytes(b"")
    runner = object.__new__(tvv.Runner)
    with pytest.raises(tvv.BenchmarkError, match=r"no report for 1 of the 3 test case\(s\).*\['c'\]"):
        runner.user_variant_tables(raw, {"original": table})


def test_low_label_aggregates_seeds_with_spread_and_paired_deltas():
    """benchmarks/low_label.py: mean ± std over seeds per (trainer, fraction, condition), Δ paired by seed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import low_label

    cfg = low_label.parse_args(["--preset", "smoke", "--trainers", "nnUNetTrainer_debug", "nnUNetTrainerBiCLIP_debug"])
    entry = lambda label, dice: {"label": label, "fraction": 0.05, "condition": "clean", "dice": dice,  # noqa: E731
                                 "n_train": 20}
    per_seed = {0: {"commit": "abc", "entries": [entry("nnUNetTrainer_debug", 0.5), entry("nnUNetTrainerBiCLIP_debug", 0.6)]},
                1: {"commit": "abc", "entries": [entry("nnUNetTrainer_debug", 0.7), entry("nnUNetTrainerBiCLIP_debug", 0.7)]}}
    diag = [{"seed": s, "trainer": "nnUNetTrainerBiCLIP_debug", "fraction": 0.05, "dice_real": d, "dice_shuffled": 0.4,
             "dice_contradictory": 0.45, "dice_null": 0.42, "auc_real": 0.9, "auc_shuffled": 0.8,
             "auc_contradictory": 0.7, "text_sensitivity": 0.3} for s, d in ((0, 0.6), (1, 0.7))]
    result = low_label.aggregate(cfg, per_seed, diag)
    assert result["baseline"] == "nnUNetTrainer_debug"
    row = next(r for r in result["rows"] if r["trainer"] == "nnUNetTrainerBiCLIP_debug")
    assert row["dice"] == [0.6, 0.7] and abs(row["dice_mean"] - 0.65) < 1e-9
    assert abs(row["dice_std"] - 0.0707107) < 1e-6  # sample std (ddof=1)
    assert [round(d, 6) for d in row["delta_vs_baseline"]] == [0.1, 0.0]  # paired by seed
    md = low_label.markdown(result)
    assert "0.6500 ± 0.0707" in md and "0.0500 ± 0.0707" in md and "AUC real" in md


def test_low_label_repeats_pair_the_means_of_each_seeds_trainings(tmp_path, monkeypatch, capsys):
    """--repeats 2: every seed's text_vs_vision.py run is made twice (the second into OUT/seed_S_run2, same data
    arguments); a seed's Dice per model is the mean of its trainings, Δ pairs those means, and the rows give the
    pooled std between trainings."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import low_label

    base, text = "nnUNetTrainer_debug", "nnUNetTrainerBiCLIP_debug"
    cfg = low_label.parse_args(["--preset", "smoke", "--trainers", base, text, "--out", str(tmp_path),
                                "--repeats", "2", "--seeds", "0", "1", "--no-diagnose"])
    dice = {(0, 0): (0.50, 0.60), (0, 1): (0.60, 0.62), (1, 0): (0.70, 0.70), (1, 1): (0.70, 0.74)}  # (seed, run)
    calls = []

    def fake_run(cmd, env, log=None, **kw):
        out = Path(cmd[cmd.index("--out") + 1])
        seed, run = int(cmd[cmd.index("--seed") + 1]), 1 if out.name.endswith("_run2") else 0
        calls.append(out.name)
        out.mkdir(parents=True, exist_ok=True)
        entries = [{"label": label, "fraction": 1.0, "condition": "clean", "dice": d, "n_train": 20}
                   for label, d in zip((base, text), dice[(seed, run)])]
        (out / "results.json").write_text(json.dumps({"commit": "abc", "entries": entries}))
    monkeypatch.setattr(low_label, "run_command", fake_run)
    monkeypatch.setattr(low_label, "plot", lambda *a, **k: None)
    assert low_label.main(["--preset", "smoke", "--trainers", base, text, "--out", str(tmp_path), "--repeats", "2",
                           "--seeds", "0", "1", "--no-diagnose"]) == 0
    assert calls == ["seed_0", "seed_0_run2", "seed_1", "seed_1_run2"]
    rows = {r["trainer"]: r for r in json.loads((tmp_path / "low_label.json").read_text())["rows"]}
    assert rows[base]["dice"] == pytest.approx([0.55, 0.70]) and rows[text]["dice"] == pytest.approx([0.61, 0.72])
    assert rows[text]["delta_vs_baseline"] == pytest.approx([0.06, 0.02])
    assert rows[base]["dice_runs"] == [[0.5, 0.6], [0.7, 0.7]]
    assert rows[base]["run_std"] == pytest.approx(np.sqrt((0.005 + 0.0) / 2))  # pooled over seeds, ddof 1
    assert "trained 2 times per seed" in (tmp_path / "low_label.md").read_text()
    for bad, message in ((["--repeats", "0"], "--repeats must be 1 or more"),
                         (["--control_fraction", "abc"], "--control_fraction")):
        with pytest.raises(SystemExit):  # argparse's one-line error, before any training starts
            low_label.parse_args(["--preset", "smoke", *bad])
        assert message in capsys.readouterr().err
    one = low_label.aggregate(cfg, {0: {"commit": "abc", "entries": [
        {"label": base, "fraction": 1.0, "condition": "clean", "dice": 0.5, "n_train": 20}]}}, [])
    assert one["rows"][0]["run_std"] is None  # one training per seed: no spread to report


def test_low_label_control_rows_and_lesion_region_auc(tmp_path, monkeypatch):
    """benchmarks/low_label.py --control: text_vs_vision.py gets --control, its "(control reports)" entries become
    rows with their paired Δ to the baseline at 100 %; the diagnosis table gains the missing-location Dice and the
    AUC within the lesion region, null (MedCLIPSeg: no pseudo-image) shown as –."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import low_label

    base, text, mcs = "nnUNetTrainer_debug", "nnUNetTrainerBiCLIP_debug", "nnUNetTrainerMedCLIPSeg_debug"
    control = text + " (control reports)"
    cfg = low_label.parse_args(["--preset", "smoke", "--trainers", base, text, mcs, "--fractions", "10", "100",
                                "--out", str(tmp_path), "--control"])
    assert cfg.control and not low_label.parse_args(["--preset", "smoke"]).control  # off by default

    # the seed run: what low_label passes to text_vs_vision.py (the runner's control rows: label + suffix, 100 %)
    calls = []

    def fake_run(cmd, env, log=None, **kw):
        calls.append(list(cmd))
        (tmp_path / "seed_0").mkdir(parents=True, exist_ok=True)
        (tmp_path / "seed_0" / "results.json").write_text(json.dumps({"entries": []}))
    monkeypatch.setattr(low_label, "run_command", fake_run)
    low_label.run_seed(cfg, 0)
    assert "--control" in calls[0] and "--no-control" not in calls[0]
    assert calls[0][calls[0].index("--control_fraction") + 1] == "100"  # the control trains on 100 % by default
    cfg_off = low_label.parse_args(["--preset", "smoke", "--out", str(tmp_path)])
    low_label.run_seed(cfg_off, 0)
    assert "--no-control" in calls[1] and "--control" not in calls[1]
    cfg_few = low_label.parse_args(["--preset", "smoke", "--out", str(tmp_path), "--control", "--fractions", "5",
                                    "--control_fraction", "5"])
    low_label.run_seed(cfg_few, 0)  # a few-labels control: the fraction reaches text_vs_vision.py
    assert calls[2][calls[2].index("--control_fraction") + 1] == "5"
    assert low_label._fraction_text("0.05") == low_label._fraction_text("5%") == "5%"

    def entry(label, fraction, dice):
        return {"label": label, "fraction": fraction, "condition": "clean", "dice": dice, "n_train": 40}
    per_seed = {s: {"commit": "abc", "entries": [entry(base, 0.1, 0.4 + d), entry(text, 0.1, 0.5 + d),
                                                 entry(base, 1.0, 0.6 + d), entry(text, 1.0, 0.7 + d),
                                                 entry(control, 1.0, 0.55 + d)]}
                for s, d in ((0, 0.0), (1, 0.1))}
    diag = [low_label.diagnosis_row(s, text, 0.1, {
                "dice": {"real": 0.5, "shuffled": 0.4, "contradictory": 0.45, "missing_location": 0.47, "null": 0.3},
                "pseudo_image_auc": {v: 0.9 for v in ("real", "shuffled", "contradictory", "missing_location",
                                                       "null")},
                "pseudo_image_auc_lesion_region": {"real": 0.7 + s / 10, "shuffled": 0.6, "contradictory": 0.55,
                                                   "missing_location": 0.65, "null": 0.5},
                "lesion_region_fraction": 0.3, "text_sensitivity": 0.2, "reliance": 0.2,
                "side": {"pseudo_image": {"real": {"cases": 5, "named_side_brighter": 0.8 + s / 10, "median_ratio": 2},
                                          "contradictory": {"cases": 5, "named_side_brighter": 0.2,
                                                            "median_ratio": 0.5}},
                         "prediction": {"real": None, "contradictory": None}}}) for s in (0, 1)]
    diag += [low_label.diagnosis_row(s, mcs, 0.1, {  # MedCLIPSeg: both AUCs null
                "dice": {"real": 0.5, "shuffled": 0.5, "contradictory": 0.5, "missing_location": 0.5, "null": 0.5},
                "pseudo_image_auc": None, "pseudo_image_auc_lesion_region": None,
                "text_sensitivity": 0.01, "reliance": 0.0}) for s in (0, 1)]
    assert diag[0]["region_auc_real"] == 0.7 and diag[0]["dice_missing_location"] == 0.47
    assert diag[1]["side_pseudo_real"] == 0.9 and diag[0]["side_pseudo_contradictory"] == 0.2
    assert not any(k.startswith("side_pred") for k in diag[0])  # no one-sided case: no column, not a 0
    assert not any(k.startswith(("auc_", "region_auc_")) for k in diag[2])

    result = low_label.aggregate(cfg, per_seed, diag)
    rows = {(r["trainer"], r["fraction"]): r for r in result["rows"]}
    assert result["baseline"] == base and (control, 1.0) in rows
    assert [round(d, 6) for d in rows[(control, 1.0)]["delta_vs_baseline"]] == [-0.05, -0.05]  # paired by seed
    assert [round(d, 6) for d in rows[(text, 0.1)]["delta_vs_baseline"]] == [0.1, 0.1]
    assert rows[(base, 1.0)]["delta_vs_baseline"] == []

    md = low_label.markdown(result)
    assert f"| 100% | clean | {control} | 40 | 0.6000 ± 0.0707 | -0.0500 ± 0.0000 |" in md
    assert "(control reports)\": the text trainer trained" in md
    header = next(line for line in md.splitlines() if line.startswith("| fraction | trainer | Dice real"))
    assert "missing location" in header and "AUC in lesion region real | shuffled | null" in header
    text_line = next(line for line in md.splitlines() if line.startswith(f"| 10% | {text} |"))
    mcs_line = next(line for line in md.splitlines() if line.startswith(f"| 10% | {mcs} |"))
    assert text_line.count("|") == header.count("|") == mcs_line.count("|")
    # diagnoses without the generic-report variant show –, not 0
    assert "0.4700 ± 0.0000 | – | – | – | 0.3000" in text_line and "0.7500 ± 0.0707 | 0.6000 ± 0.0000 | 0.5000" in text_line
    assert "| 0.8500 ± 0.0707 | 0.2000 ± 0.0000 |" in text_line and "side real | side contradictory" in header
    # MedCLIPSeg: generic, rephrased and rephrased as given –, AUC real/shuffled/contradictory, the three
    # lesion-region AUCs, the two side columns
    assert mcs_line.count("–") == 11


def test_low_label_diagnoses_text_models_with_the_rephrased_reports(tmp_path, monkeypatch):
    """low_label's diagnosis passes its place-free phrasings to nnUNetv2_textseg_diagnose (none with an empty
    --phrasings), diagnoses text models only, and the 'rephrased' Dice reaches the table."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import low_label

    base, text = "nnUNetTrainer_debug", "nnUNetTrainerBiCLIP_debug"
    cfg = low_label.parse_args(["--preset", "smoke", "--trainers", base, text, "--out", str(tmp_path)])
    assert cfg.phrasings == list(low_label.UNSEEN_PHRASINGS)
    data = {"dataset": {"id": 990, "raw": str(tmp_path / "raw")}, "fraction_folds": {"0.1": {"fold": 0,
                                                                                          "fraction": 0.1}}}
    calls = []

    def fake_run(cmd, env, log=None, **kw):
        calls.append(list(cmd))
        target = Path(cmd[cmd.index("-o") + 1])
        target.mkdir(parents=True, exist_ok=True)
        rephrased = {"rephrased": 0.35, "rephrased_as_given": 0.25} if "--phrasings" in cmd else {}
        (target / "diagnosis.json").write_text(json.dumps({
            "dice": {"real": 0.5, "shuffled": 0.4, **rephrased, "null": 0.3}, "pseudo_image_auc": None,
            "pseudo_image_auc_lesion_region": None, "text_sensitivity": 0.1, "reliance": 0.2}))
    monkeypatch.setattr(low_label, "run_command", fake_run)
    rows = low_label.diagnose_seed(cfg, 0, data)
    assert len(calls) == 1 and calls[0][calls[0].index("-tr") + 1] == text  # the plain model is not diagnosed
    cmd = calls[0]
    assert cmd[cmd.index("--phrasings") + 1: cmd.index("--negative_phrasing")] == list(low_label.UNSEEN_PHRASINGS)
    assert cmd[cmd.index("--negative_phrasing") + 1] == low_label.UNSEEN_NEGATIVE_PHRASING
    assert rows[0]["dice_rephrased"] == 0.35
    md = low_label.markdown(low_label.aggregate(cfg, {0: {"commit": "abc", "entries": []}}, rows))
    line = next(x for x in md.splitlines() if x.startswith(f"| 10% | {text} |"))
    assert "| – | 0.3500 ± 0.0000 | 0.2500 ± 0.0000 | 0.3000 ± 0.0000 |" in line  # generic –, rephrased (2), null

    cfg_none = low_label.parse_args(["--preset", "smoke", "--trainers", text, "--phrasings",
                                     "--out", str(tmp_path / "none")])
    low_label.diagnose_seed(cfg_none, 0, data)
    assert cfg_none.phrasings == [] and "--phrasings" not in calls[1]


def test_text_pathway_probe_names_what_is_missing(tmp_path):
    """The probe on a dataset without a report cache, splits or reports: one message naming the file and the fix."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("text_pathway_probe", REPO / "benchmarks" / "text_pathway_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    pre, raw = tmp_path / "pre" / "Dataset990_X", tmp_path / "raw" / "Dataset990_X"
    (pre / "text_embeddings").mkdir(parents=True)
    raw.mkdir(parents=True)
    with pytest.raises(probe.ProbeInputError, match="no training-report cache .* nnUNetv2_textseg_encode"):
        probe.check_inputs(pre, raw)
    (pre / "text_embeddings" / "enc__Tr.npz").write_bytes(b"")
    with pytest.raises(probe.ProbeInputError, match="splits_final.json is missing; run nnUNetv2_train once"):
        probe.check_inputs(pre, raw)
    (pre / "splits_final.json").write_text("[]")
    with pytest.raises(probe.ProbeInputError, match="reportsTr.csv is missing; attach reports"):
        probe.check_inputs(pre, raw)


def test_runner_deletes_only_what_its_own_results_json_wrote(tmp_path):
    """A dataset or model folder in the work folder that this run's results.json did not create (another run's, the
    user's, reached through a link) is refused with the path and the fix, and left in place; the leftovers of the
    benchmark's own interrupted run are still cleaned up."""
    import argparse
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks.runner import BenchmarkError
    from benchmarks.runner.run import Runner
    from benchmarks.runner.state import State
    out = tmp_path / "out"
    cfg = argparse.Namespace(out=out, dataset=None, device="cpu", num_processes=1, n_proc_da=None, n_train=8,
                             n_test=4, size=32, seed=0)
    out.mkdir()
    runner = Runner(cfg, State(out / "results.json"))
    foreign = runner.raw_root / "Dataset990_TextSegDemo"
    (foreign / "imagesTr").mkdir(parents=True)
    with pytest.raises(BenchmarkError, match=r"Dataset990_TextSegDemo exists but .*results.json did not create it.*"
                                             r"another --out"):
        runner.prepare_demo(990, control=False)
    assert (foreign / "imagesTr").is_dir()

    model = runner.res_root / "Dataset990_TextSegDemo" / "nnUNetTrainer_demo__nnUNetPlans__2d" / "fold_0"
    model.mkdir(parents=True)
    (model / "checkpoint_final.pth").write_bytes(b"yours")
    split = {"fold": 0, "fraction": 0.05, "split_sha256": "x"}
    with pytest.raises(BenchmarkError, match="exists but was not trained by this benchmark"):
        runner.train(990, "nnUNetTrainer_demo", split)
    assert (model / "checkpoint_final.pth").read_bytes() == b"yours"

    # its own interrupted generation (recorded as started): the leftovers are removed before it starts again
    runner.state.data["started_steps"] = {"make_demo_990": True}
    runner.run = lambda step, cmd: (_ for _ in ()).throw(RuntimeError(f"would run {cmd[0]}"))
    with pytest.raises(RuntimeError, match="would run nnUNetv2_textseg_make_demo"):
        runner.prepare_demo(990, control=False)
    assert not foreign.exists()


def test_demo_plans_edit_sets_batch_and_a_patch_smaller_than_the_image(tmp_path):
    """The large-image condition: the generated dataset's plans get the asked patch (a multiple of the U-Net's total
    stride, else one message naming the plans file and the fix); text_vs_vision.py refuses it for a user's dataset or
    above the image size."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from benchmarks import text_vs_vision
    from benchmarks.runner import BenchmarkError
    from benchmarks.runner.run import edit_demo_plans
    arch = {"arch_kwargs": {"strides": [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2], [2, 2]]}}
    plans = {"configurations": {"2d": {"batch_size": 25, "patch_size": [128, 128], "architecture": arch}}}
    edited = edit_demo_plans(json.loads(json.dumps(plans)), 2, 64, tmp_path / "nnUNetPlans.json")
    assert edited["configurations"]["2d"]["patch_size"] == [64, 64]
    assert edited["configurations"]["2d"]["batch_size"] == 2
    unchanged = edit_demo_plans(json.loads(json.dumps(plans)), None, None, tmp_path / "nnUNetPlans.json")
    assert unchanged == plans
    with pytest.raises(BenchmarkError, match=r"--patch_size 48 is not a multiple of 32.*nnUNetPlans.json"):
        edit_demo_plans(json.loads(json.dumps(plans)), None, 48, tmp_path / "nnUNetPlans.json")

    cfg = text_vs_vision.parse_args(["--preset", "smoke", "--size", "128", "--patch_size", "64"])
    assert cfg.patch_size == 64
    for bad in (["--patch_size", "128", "--size", "64"], ["--patch_size", "32", "--dataset", "5"]):
        with pytest.raises(SystemExit):
            text_vs_vision.parse_args(["--preset", "smoke", *bad])


def test_text_pathway_probe_trains_token_maps_and_scores_the_true_zones(tmp_path):
    """The probe's real training loop with per-token zone maps and mirrored reports off (synthetic token embeddings
    whose first token says the side of a half-image lesion) learns the side: held-out AUC above the shuffled
    reports'. On a generated demo dataset the true named zones hold every lesion, so their AUC is high."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("text_pathway_probe", REPO / "benchmarks" / "text_pathway_probe.py")
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    torch.manual_seed(0)
    torch.set_num_threads(1)

    def cases(n):
        side = torch.arange(n) % 2
        tokens = torch.randn(n, 4, 16) * 0.1
        tokens[:, 0, 0] = side * 2.0 - 1  # the "side word"
        masks = torch.zeros(n, 1, 32, 32)
        for i in range(n):
            masks[i, 0, 8:24, (4 if side[i] == 0 else 20):(12 if side[i] == 0 else 28)] = 1
        return tokens, torch.ones(n, 4, dtype=torch.bool), masks

    data = {"train": cases(8), "heldout": cases(6)}
    r = probe.run(data, {"token_maps": 1, "steps": 150, "drop": 0.0})
    assert r["heldout_real"]["auc"] > r["heldout_shuffled"]["auc"] + 0.1
    assert r["heldout_side"]["cases"] == 6 and r["heldout_side"]["named_side_brighter"] == 1.0
    windowed = probe.run(data, {"token_maps": 1, "window": 3, "steps": 150, "drop": 0.0})
    assert windowed["heldout_side"]["named_side_brighter"] == 1.0 and windowed["heldout_side"]["median_ratio"] > 1.5
    # labelled cases of one side only cannot teach the other side; report-only cases with (here exact) predicted masks
    # can, and are used only by runs with pseudo=1
    left_only = tuple(v[[0, 2]] for v in cases(4))
    few = {"train": left_only, "heldout": cases(6), "pseudo": cases(8)}
    labelled_only = probe.run(few, {"token_maps": 1, "steps": 150, "drop": 0.0})
    with_report_only = probe.run(few, {"token_maps": 1, "steps": 150, "drop": 0.0, "pseudo": 1})
    region = labelled_only["heldout_real"]["auc_region"], with_report_only["heldout_real"]["auc_region"]
    assert region[1] > max(0.95, region[0] + 0.1), region
    assert with_report_only["heldout_side"]["named_side_brighter"] == 1.0
    with pytest.raises(probe.ProbeInputError, match="pseudo=1 needs --pseudo_labels"):
        probe.run({**few, "pseudo": None}, {"steps": 1, "pseudo": 1})

    from nnunetv2_textseg.demo_data import generate_demo_dataset
    raw = generate_demo_dataset(tmp_path, n_train=6, n_test=1, image_size=32, seed=5, real_reports_dir=tmp_path / "none")
    from PIL import Image
    ids = [f"demo_{i:04d}" for i in range(1, 7)]
    masks = torch.from_numpy(np.stack([np.asarray(Image.open(raw / "labelsTr" / f"{c}.png")) > 0 for c in ids])
                             .astype(np.float32))[:, None]
    ref = probe.zone_reference(raw, {"heldout_ids": ids, "heldout": (None, None, masks)})
    assert set(ref) == {"true zones", "true zones, blurred", "true zones on the average lung, blurred"}
    assert all(r["heldout_real"]["auc"] > 0.8 for r in ref.values())
    other = probe.zone_reference(raw, {"heldout_ids": ids, "heldout": (None, None, masks.flip(-1).flip(-2))})
    assert other == {}  # lesions outside the re-drawn zones: not this generator's cases, no reference


def test_train_step_benchmark_refuses_a_batch_below_one(tmp_path, capsys):
    """benchmarks/train_step.py --batch_size 0: argparse's one-line error before any data is made."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_step

    with pytest.raises(SystemExit):
        train_step.main(["--batch_size", "0", "--root", str(tmp_path / "work")])
    assert "--batch_size must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()


def test_train_step_benchmark_takes_each_repeats_ratio_to_plain_of_the_same_repeat(tmp_path, capsys):
    """--repeats: a CPU that is 20 % slower in the second repeat moves the times, not the paired ratios; the row
    gives the median time and the median and range of the per-repeat ratios; --repeats 0 is refused up front."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import train_step

    def row(name, sec):
        return {"trainer": name, "s_per_iter": sec, "peak_mem_mib": 1.0}

    runs = [[row("plain", 0.40), row("text", 0.60)], [row("plain", 0.48), row("text", 0.84)],
            [row("plain", 0.44), row("text", 0.66)]]
    plain, text = train_step.combine_repeats(runs)
    assert plain["time_ratio_runs"] == [1.0, 1.0, 1.0] and plain["s_per_iter"] == pytest.approx(0.44)
    assert text["time_ratio_runs"] == pytest.approx([1.5, 1.75, 1.5])
    assert text["time_ratio"] == pytest.approx(1.5) and text["s_per_iter"] == pytest.approx(0.66)
    assert text["trainer"] == "text" and text["s_per_iter_runs"] == [0.60, 0.84, 0.66]

    with pytest.raises(SystemExit):
        train_step.main(["--repeats", "0", "--root", str(tmp_path / "work")])
    assert "--repeats must be 1 or more" in capsys.readouterr().err
    assert not (tmp_path / "work").exists()
