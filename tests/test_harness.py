"""nnunetv2_textseg.harness, without nnU-Net: the experiment environment, the logged command runner and its
failure message, and reading nnUNetv2_evaluate_folder's summary. Fast: only tiny Python subprocesses."""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunetv2_textseg import harness
from nnunetv2_textseg.errors import TextSegError

PY = sys.executable


def test_env_points_nnunet_at_the_work_folder_and_our_trainers(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_raw", "/users/own/raw")  # a user's folders must not leak into an experiment
    monkeypatch.setenv("nnUNet_extTrainer", "/users/own/trainers")
    monkeypatch.setenv("nnUNet_n_proc_DA", "3")  # ... but their worker count wins over our default
    monkeypatch.delenv("nnUNet_def_n_proc", raising=False)
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    env = harness.nnunet_env(tmp_path / "work", n_proc_da=1, def_n_proc=2)
    assert env["OMP_WAIT_POLICY"] == "PASSIVE"  # no spinning threads fighting other processes for the cores
    assert harness.nnunet_env(tmp_path / "work", base={"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"
    for var in harness.FOLDER_VARS:
        assert env[var] == str((tmp_path / "work" / var).resolve()) and Path(env[var]).is_dir()
    folder = Path(env["nnUNet_extTrainer"])
    assert folder == harness.trainers_folder() and (folder / "textseg_trainers.py").is_file()
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(PY).parent)  # this environment's commands first
    assert env["nnUNet_n_proc_DA"] == "3" and env["nnUNet_def_n_proc"] == "2"
    assert os.environ["nnUNet_raw"] == "/users/own/raw"  # a copy: the calling process is unchanged

    short = harness.nnunet_env(tmp_path / "t", names=harness.SHORT_FOLDERS, raw=tmp_path / "copy")
    assert Path(short["nnUNet_preprocessed"]).name == "pre" and Path(short["nnUNet_results"]).name == "res"
    assert short["nnUNet_raw"] == str((tmp_path / "copy").resolve())
    assert "nnUNet_def_n_proc" not in short  # no default asked for, none set


def test_env_with_the_users_folders_names_the_unset_ones(monkeypatch):
    for var in harness.FOLDER_VARS:
        monkeypatch.setenv(var, f"/data/{var}")
    assert harness.nnunet_env(None)["nnUNet_results"] == "/data/nnUNet_results"
    monkeypatch.delenv("nnUNet_preprocessed")
    with pytest.raises(harness.ExperimentError, match=r"nnUNet_preprocessed is not set") as err:
        harness.nnunet_env(None)
    assert isinstance(err.value, TextSegError)  # commands show it as one ERROR: line


def test_trainer_search_path_keeps_the_users_folders(monkeypatch):
    ours = str(harness.trainers_folder())
    assert harness.trainer_search_path(None) == ours
    assert harness.trainer_search_path(f"/a{os.pathsep}{ours}") == f"/a{os.pathsep}{ours}"  # not twice


def test_env_command_exports_the_same_environment(tmp_path, monkeypatch):
    from nnunetv2_textseg.cli import env_exports
    for var in (*harness.FOLDER_VARS, "nnUNet_extTrainer"):
        monkeypatch.delenv(var, raising=False)
    lines = env_exports(tmp_path)
    assert f"export nnUNet_results={tmp_path.resolve() / 'nnUNet_results'}" in lines
    assert f"export nnUNet_extTrainer={harness.trainers_folder()}" in lines


def test_run_command_logs_output_and_times_it(tmp_path, capsys):
    log = tmp_path / "logs" / "step.log"
    done = harness.run_command([PY, "-c", "import sys; print('to stdout'); print('to stderr', file=sys.stderr)"],
                               os.environ, log)
    assert done.returncode == 0 and done.seconds > 0 and done.log == log
    assert {"to stdout", "to stderr"} <= set(log.read_text().splitlines())
    shown = capsys.readouterr().out
    assert shown.startswith("$ ") and "print(" in shown and f"(log: {log})" in shown  # echoed, then its duration

    captured = harness.run_command([PY, "-c", "import sys; print('o'); print('e', file=sys.stderr)"], os.environ,
                                   capture=True, echo=False)
    assert (captured.stdout, captured.stderr) == ("o\n", "e\n")
    assert capsys.readouterr().out == ""


def test_a_failing_command_names_itself_its_exit_code_and_its_log(tmp_path):
    log = tmp_path / "train.log"
    script = "import sys; [print(f'line {i}') for i in range(100)]; sys.exit(3)"
    with pytest.raises(harness.CommandError) as err:
        harness.run_command([PY, "-c", script], os.environ, log, echo=False, tail_lines=5)
    e = err.value
    assert isinstance(e, TextSegError) and e.returncode == 3 and e.log == log
    message = str(e)
    assert "exit code 3" in message and shlex.join([PY, "-c", script]) in message  # the command, ready to paste
    assert str(log) in message and "line 99" in message and "line 94" not in message  # the last 5 lines only

    not_checked = harness.run_command([PY, "-c", "raise SystemExit(4)"], os.environ, capture=True, check=False,
                                      echo=False)
    assert not_checked.returncode == 4

    with pytest.raises(harness.CommandError, match=r"(?s)exit code 1.*last lines of its error output.*boom"):
        harness.run_command([PY, "-c", "raise RuntimeError('boom')"], os.environ, capture=True, echo=False)
    with pytest.raises(harness.CommandError, match=r"timed out after 0\.5 s") as err:
        harness.run_command([PY, "-c", "import time; time.sleep(30)"], os.environ, capture=True, echo=False,
                            timeout=0.5)
    assert err.value.returncode is None


@pytest.mark.skipif(os.name != "posix", reason="process groups are POSIX")
def test_stopping_the_caller_stops_the_command_and_what_it_started(tmp_path):
    """A benchmark runner stopped with SIGTERM (kill, a CI timeout) must not leave its nnUNetv2_train running."""
    pids = tmp_path / "pids"
    # the command starts a worker of its own (as nnUNetv2_train starts its augmentation workers) and waits
    command = (f"import os, subprocess, sys, time; w = subprocess.Popen([sys.executable, '-c', 'import time; "
               f"time.sleep(60)']); open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{w.pid}}'); time.sleep(60)")
    caller = (f"import os, sys; sys.path.insert(0, {str(Path(harness.__file__).parents[1])!r}); "
              f"from nnunetv2_textseg import harness; harness.run_command([sys.executable, '-c', {command!r}], "
              f"os.environ, capture=True, echo=False)")
    proc = subprocess.Popen([PY, "-c", caller])
    deadline = time.time() + 30
    while not (pids.is_file() and len(pids.read_text().split()) == 2) and time.time() < deadline:
        time.sleep(0.1)
    started = [int(p) for p in pids.read_text().split()]
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143  # SystemExit(128 + SIGTERM) after stopping the command

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return Path(f"/proc/{pid}/stat").is_file() and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"

    deadline = time.time() + 15
    while any(alive(p) for p in started) and time.time() < deadline:
        time.sleep(0.1)
    assert not any(alive(p) for p in started)


def test_a_command_leaves_the_sigterm_handler_as_it_was():
    before = signal.getsignal(signal.SIGTERM)
    harness.run_command([PY, "-c", "pass"], os.environ, capture=True, echo=False)
    with pytest.raises(harness.CommandError):
        harness.run_command([PY, "-c", "import time; time.sleep(30)"], os.environ, capture=True, echo=False,
                            timeout=0.5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_evaluate_command_and_summary(tmp_path):
    pred = tmp_path / "pred"
    pred.mkdir()
    cmd = harness.evaluate_command(tmp_path / "labelsTs", pred, num_processes=2)
    assert cmd == ["nnUNetv2_evaluate_folder", str(tmp_path / "labelsTs"), str(pred), "-djfile",
                   str(pred / "dataset.json"), "-pfile", str(pred / "plans.json"), "-np", "2"]
    assert "-np" not in harness.evaluate_command(tmp_path, pred)

    with pytest.raises(harness.ExperimentError, match="run the evaluation first"):
        harness.read_summary(pred)
    # what nnUNetv2_evaluate_folder writes (NaN where a case has no foreground in either mask)
    (pred / "summary.json").write_text(
        '{"foreground_mean": {"Dice": 0.75, "IoU": 0.6}, "mean": {"1": {"Dice": 0.75}},\n'
        ' "metric_per_case": [{"prediction_file": "a.png", "metrics": {"1": {"Dice": NaN}}},\n'
        '                     {"prediction_file": "b.png", "metrics": {"1": {"Dice": 0.75}}}]}')
    summary = harness.read_summary(pred)
    assert summary.path == harness.read_summary(pred / "summary.json").path == pred / "summary.json"
    assert (summary.dice, summary.iou, len(summary.cases)) == (0.75, 0.6, 2)
    assert summary.foreground_mean == {"Dice": 0.75, "IoU": 0.6}

    (pred / "summary.json").write_text(json.dumps({"mean": {}}))
    with pytest.raises(harness.ExperimentError, match="no 'foreground_mean'"):
        harness.read_summary(pred)


def test_prediction_command_follows_the_trainer_name():
    assert harness.prediction_command("nnUNetTrainerBiCLIP_100epochs") == "nnUNetv2_textseg_predict"
    assert harness.prediction_command("nnUNetTrainerMedCLIPSeg_debug") == "nnUNetv2_textseg_predict"
    assert harness.prediction_command("nnUNetTrainer_demo") == "nnUNetv2_predict"
