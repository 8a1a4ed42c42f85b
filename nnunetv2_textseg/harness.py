"""Running nnU-Net experiments in a work folder: the environment nnU-Net's commands need, one logged command at a
time, and the score ``nnUNetv2_evaluate_folder`` leaves behind.

The demo (``nnUNetv2_textseg_demo``), the benchmarks and the integration tests all drive the real nnU-Net commands
(``nnUNetv2_plan_and_preprocess``, ``nnUNetv2_train``, ``nnUNetv2_predict`` / ``nnUNetv2_textseg_predict``,
``nnUNetv2_evaluate_folder``) as subprocesses. They share this module so that what an experiment needs (its own
nnU-Net folders, our trainers on nnU-Net's ``-tr`` search path, offline text encoders, a worker count that suits the
machine) and how a failed command is reported are decided once.

Nothing here imports torch or nnU-Net, and importing it changes nothing (no environment, no folders).
"""
from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from nnunetv2_textseg.errors import TextSegError

__all__ = ["FOLDER_VARS", "STANDARD_FOLDERS", "SHORT_FOLDERS", "ExperimentError", "CommandError", "CommandRun",
           "EvaluationSummary", "trainers_folder", "trainer_search_path", "nnunet_folders", "nnunet_env",
           "is_text_trainer", "prediction_command", "run_command", "evaluate_command", "read_summary",
           "evaluate_folder"]

FOLDER_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
# Sub-folder of the work folder for each of nnU-Net's folder variables. The standard layout names them like the
# variables (the demo, the benchmarks, nnUNetv2_textseg_env); the short one is what the tests and
# benchmarks/train_step.py (and gpu_check.sh, which reads its folders) have always used.
STANDARD_FOLDERS: Mapping[str, str] = {var: var for var in FOLDER_VARS}
SHORT_FOLDERS: Mapping[str, str] = {"nnUNet_raw": "raw", "nnUNet_preprocessed": "pre", "nnUNet_results": "res"}
TRAINER_PATH_VAR = "nnUNet_extTrainer"
SUMMARY_FILE = "summary.json"  # what nnUNetv2_evaluate_folder writes into the prediction folder


class ExperimentError(TextSegError):
    """An experiment cannot run as asked (nnU-Net's folders not set, no evaluation summary, ...)."""


class CommandError(ExperimentError):
    """A command of the experiment failed: the message names the command, its exit code and where its output is
    (the log's last lines, or the captured output's)."""

    def __init__(self, message: str, cmd: Sequence[str], returncode: int | None, seconds: float,
                 log: Path | None = None):
        super().__init__(message)
        self.cmd = list(cmd)
        self.returncode = returncode  # None: killed at its timeout
        self.seconds = seconds
        self.log = log


@dataclass(frozen=True)
class CommandRun:
    """One finished command: its exit code, wall seconds, and its output (the log file, or captured text)."""

    cmd: list[str]
    returncode: int
    seconds: float
    log: Path | None = None
    stdout: str | None = None
    stderr: str | None = None


@dataclass(frozen=True)
class EvaluationSummary:
    """``summary.json`` of ``nnUNetv2_evaluate_folder``: the foreground mean over all cases (what the benchmarks
    tabulate) and the per-case metrics."""

    path: Path
    foreground_mean: dict[str, float]
    cases: list[dict] = field(default_factory=list)

    @property
    def dice(self) -> float:
        return float(self.foreground_mean["Dice"])

    @property
    def iou(self) -> float:
        return float(self.foreground_mean["IoU"])


# ---------------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------------
def trainers_folder() -> Path:
    """The folder to put in ``nnUNet_extTrainer``: ``nnunetv2_textseg/nnunet_trainers`` inside the installed
    package, so a wheel install and an editable one (or a checkout on ``sys.path``) find our trainers alike."""
    from nnunetv2_textseg.nnunet_trainers import FOLDER  # a Path constant; imports nothing else
    return FOLDER


def trainer_search_path(current: str | None) -> str:
    """``nnUNet_extTrainer`` for a user's shell: the folders it already names (their own trainers stay found)
    plus ours, once."""
    folders = [p for p in (current or "").split(os.pathsep) if p]
    if str(trainers_folder()) not in folders:
        folders.append(str(trainers_folder()))
    return os.pathsep.join(folders)


def nnunet_folders(root: str | os.PathLike, names: Mapping[str, str] = STANDARD_FOLDERS,
                   create: bool = True) -> dict[str, Path]:
    """``{nnUNet_raw: root/<name>, nnUNet_preprocessed: ..., nnUNet_results: ...}`` (absolute), created unless
    ``create`` is false: nnU-Net's commands expect these folders to exist."""
    root = Path(root).resolve()
    folders = {var: root / names[var] for var in FOLDER_VARS}
    if create:
        for folder in folders.values():
            folder.mkdir(parents=True, exist_ok=True)
    return folders


def nnunet_env(root: str | os.PathLike | None, *, names: Mapping[str, str] = STANDARD_FOLDERS,
               raw: str | os.PathLike | None = None, n_proc_da: int | None = None, def_n_proc: int | None = None,
               base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for nnU-Net's commands in an experiment whose folders are under ``root``.

    - ``nnUNet_raw`` / ``_preprocessed`` / ``_results``: ``root/<names[var]>`` (created), so an experiment never
      touches a user's own datasets and models; ``raw`` points ``nnUNet_raw`` elsewhere (a modified copy of a
      dataset). ``root=None`` keeps the user's folders instead, which must then be set (:class:`ExperimentError`
      naming the missing ones, not nnU-Net's KeyError deep in a command).
    - ``nnUNet_extTrainer``: our packaged trainer stubs only (:func:`trainers_folder`), so ``-tr`` finds our
      trainers and nothing else a user's shell points to.
    - ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE``: the text encoders are local files; an experiment must not wait
      for, or depend on, the network.
    - ``PATH`` starts with this interpreter's ``bin``: the commands of the environment running the experiment, not
      another installation's.
    - ``n_proc_da`` / ``def_n_proc``: defaults for ``nnUNet_n_proc_DA`` (augmentation workers, 12 by default) and
      ``nnUNet_def_n_proc`` (validation export / evaluation pool, 8 by default); on a small machine those workers
      only compete with the main process for the same cores. A value the user has set wins.
    - ``OMP_WAIT_POLICY=PASSIVE`` (unless set): on CPU nnU-Net gives torch every core, and when another process uses
      them too (augmentation workers, a second experiment) OpenMP's spinning threads make each forward pass 20-35×
      slower (measured on 2 cores with one other training running: a 64² BiCLIP forward 0.06 s with passive waiting,
      1.3-2.1 s without); on idle cores passive waiting measured the same.

    ``base`` is the environment to start from (default: this process's)."""
    env = dict(os.environ if base is None else base)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    if root is not None:
        env.update({var: str(folder) for var, folder in nnunet_folders(root, names).items()})
    else:
        missing = [var for var in FOLDER_VARS if not env.get(var)]
        if missing:
            raise ExperimentError(f"This experiment uses your nnU-Net folders, but {', '.join(missing)} "
                                  f"{'is' if len(missing) == 1 else 'are'} not set "
                                  f"(`eval \"$(nnUNetv2_textseg_env)\"` or `source setup_scripts/env.sh`).")
    if raw is not None:
        env["nnUNet_raw"] = str(Path(raw).resolve())
    env[TRAINER_PATH_VAR] = str(trainers_folder())
    if n_proc_da is not None:
        env.setdefault("nnUNet_n_proc_DA", str(n_proc_da))
    if def_n_proc is not None:
        env.setdefault("nnUNet_def_n_proc", str(def_n_proc))
    return env


# ---------------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------------
def is_text_trainer(trainer: str) -> bool:
    """Whether a trainer (by name, so variants such as ``_100epochs`` or ``_demo`` count) reads reports: its
    models are predicted with ``nnUNetv2_textseg_predict`` and need a report table."""
    return "BiCLIP" in trainer or "MedCLIPSeg" in trainer


def prediction_command(trainer: str) -> str:
    """The command that predicts with a trainer's model: ours for text trainers, nnU-Net's for the others."""
    return "nnUNetv2_textseg_predict" if is_text_trainer(trainer) else "nnUNetv2_predict"


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def run_command(cmd: Sequence[str], env: Mapping[str, str], log: str | os.PathLike | None = None, *,
                capture: bool = False, cwd: str | os.PathLike | None = None, check: bool = True,
                timeout: float | None = None, echo: bool = True, tail_lines: int = 40) -> CommandRun:
    """Run one real command of an experiment.

    Its output goes to ``log`` when given (stdout and stderr interleaved as they happened; one file per step, kept
    for later reading); else, with ``capture``, into the returned :class:`CommandRun`'s ``stdout``/``stderr``; else
    to this process's console. ``echo`` prints the command line before and its duration after, so a long run shows
    where it is. Running past ``timeout`` (it is killed), or with ``check`` a non-zero exit, raises
    :class:`CommandError` naming the command, its exit code and the last ``tail_lines`` lines of its output (and the
    log's path): enough to see why without opening the log."""
    cmd = [str(c) for c in cmd]
    line = shlex.join(cmd)
    if echo:
        print(f"$ {line}", flush=True)
    log = Path(log) if log is not None else None
    start = time.perf_counter()
    returncode: int | None
    stdout = stderr = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "w") as f:
            returncode, _, _ = _run_process(cmd, env, cwd, f, subprocess.STDOUT, timeout, text=False)
    else:
        pipe = subprocess.PIPE if capture else None
        returncode, stdout, stderr = _run_process(cmd, env, cwd, pipe, pipe, timeout, text=capture)
        if returncode is None and capture:
            stdout, stderr = _as_text(stdout), _as_text(stderr)
    seconds = time.perf_counter() - start
    if returncode is None or (check and returncode != 0):
        raise CommandError(_failure_message(line, returncode, seconds, timeout, log, stdout, stderr, tail_lines),
                           cmd, returncode, seconds, log)
    if echo:
        print(f"  done in {seconds:.0f} s" + (f" (log: {log})" if log is not None else ""), flush=True)
    return CommandRun(cmd, returncode, seconds, log, stdout, stderr)


def _run_process(cmd: list[str], env: Mapping[str, str], cwd, stdout, stderr, timeout: float | None,
                 text: bool) -> tuple[int | None, str | None, str | None]:
    """(exit code, or None when it ran past ``timeout``; stdout; stderr) of ``cmd``, run in its own process group.

    Whatever stops the wait — the timeout, Ctrl-C, an exception, SIGTERM to this process (raised as ``SystemExit``
    while the command runs, when this is the main thread and SIGTERM has its default action) — also stops the command
    and every process it started (nnU-Net's augmentation and export workers). A command left running by its caller
    would keep training on the cores of whatever runs next."""
    posix = os.name == "posix"
    proc = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=stdout, stderr=stderr, text=text,
                            start_new_session=posix)
    restore = _sigterm_as_exit()
    try:
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err
    except subprocess.TimeoutExpired:
        _stop_group(proc, posix)
        out, err = proc.communicate()
        return None, out, err
    except BaseException:
        _stop_group(proc, posix)
        raise
    finally:
        restore()


def _stop_group(proc: subprocess.Popen, posix: bool, grace: float = 10.0) -> None:
    """SIGTERM to the command's process group (SIGKILL after ``grace`` seconds), or kill the command alone."""
    if not posix:
        proc.kill()
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                os.killpg(proc.pid, signal.SIGKILL)  # the command is gone; its workers may not be
            return
        except subprocess.TimeoutExpired:
            continue
        except (ProcessLookupError, PermissionError):
            return


def _sigterm_as_exit():
    """While a command runs, SIGTERM to this process raises SystemExit(143) (so the command is stopped too) instead of
    ending the process on the spot; returns the function that puts the previous handler back."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None

    def exit_on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, exit_on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _as_text(output: str | bytes | None) -> str:
    return output.decode(errors="replace") if isinstance(output, bytes) else (output or "")


def _failure_message(line: str, returncode: int | None, seconds: float, timeout: float | None, log: Path | None,
                     stdout: str | None, stderr: str | None, tail_lines: int) -> str:
    what = (f"timed out after {timeout:g} s" if returncode is None
            else f"failed (exit code {returncode}) after {seconds:.0f} s")
    message = f"Command {what}: {line}"
    if log is not None:
        tail = _tail(log.read_text(errors="replace"), tail_lines) if log.is_file() else ""
        return f"{message}\n--- last lines of {log} ---\n{tail}\n--- (full log: {log})"
    if stdout is None and stderr is None:
        return f"{message}\n(its output is above)"
    return (f"{message}\n--- last lines of its output ---\n{_tail(stdout or '', tail_lines)}\n"
            f"--- last lines of its error output ---\n{_tail(stderr or '', tail_lines)}")


# ---------------------------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------------------------
def evaluate_command(reference: str | os.PathLike, predictions: str | os.PathLike,
                     num_processes: int | None = None) -> list[str]:
    """``nnUNetv2_evaluate_folder`` on a prediction folder, with the dataset.json and plans.json nnU-Net's
    predict commands copy there (so the labels and file format are those the model was trained with)."""
    predictions = Path(predictions)
    cmd = ["nnUNetv2_evaluate_folder", str(reference), str(predictions), "-djfile", str(predictions / "dataset.json"),
           "-pfile", str(predictions / "plans.json")]
    return cmd + (["-np", str(num_processes)] if num_processes is not None else [])


def read_summary(path: str | os.PathLike) -> EvaluationSummary:
    """The ``summary.json`` that ``nnUNetv2_evaluate_folder`` wrote (``path``: that file or its prediction
    folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / SUMMARY_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ExperimentError(f"No {path}: nnUNetv2_evaluate_folder writes it into the prediction folder; run the "
                              f"evaluation first.") from None
    except json.JSONDecodeError as err:  # NaN (no foreground anywhere) is valid for Python's json, this is not
        raise ExperimentError(f"{path} is not a readable summary ({err}); evaluate the folder again.") from None
    if not isinstance(data, dict) or not isinstance(data.get("foreground_mean"), dict):
        raise ExperimentError(f"{path} has no 'foreground_mean': not a summary of nnUNetv2_evaluate_folder.")
    return EvaluationSummary(path, data["foreground_mean"], list(data.get("metric_per_case", [])))


def evaluate_folder(reference: str | os.PathLike, predictions: str | os.PathLike, env: Mapping[str, str],
                    log: str | os.PathLike | None = None, *, num_processes: int | None = None,
                    echo: bool = True) -> EvaluationSummary:
    """Evaluate a prediction folder against the reference labels and return its summary."""
    run_command(evaluate_command(reference, predictions, num_processes), env, log, echo=echo)
    return read_summary(predictions)
