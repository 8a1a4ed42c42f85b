"""Smoke test of benchmarks/text_vs_vision.py: the real nnU-Net commands on a tiny demo dataset, then a
re-run that must resume (no training, no new evaluations)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

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
