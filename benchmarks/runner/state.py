"""results.json: what a benchmark run has done, written after every step, so that a re-run skips what is done
(and an interrupted run loses at most the step it was in), plus the provenance that makes a table citable (commit,
machine, settings)."""
from __future__ import annotations

import datetime
import hashlib
import json
import os
import platform
import subprocess
from pathlib import Path

from nnunetv2_textseg.atomic import atomic_write_text

from benchmarks.runner.presets import REPO

__all__ = ["State", "write_json_atomic", "sha256_json", "git_commit", "machine_info"]


def write_json_atomic(path: Path, data) -> None:
    """The package's one atomic write (stale temp files of killed runs are cleaned up there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str))


def sha256_json(data) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def git_commit() -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() or None if r.returncode == 0 else None


def machine_info(device: str) -> dict:
    info = {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "device": device}
    try:
        import torch
        info["torch"] = torch.__version__
        if device.startswith("cuda") and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        info["torch"] = None
    try:
        from importlib.metadata import version
        info["nnunetv2"] = version("nnunetv2")
    except Exception:  # noqa: BLE001 - informative only
        pass
    return info


class State:
    """results.json: settings, machine, fraction->fold mapping, trained folds, entries, timings."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.is_file() else {}
        self.data.setdefault("entries", [])
        self.data.setdefault("trained", {})
        self.data.setdefault("done_steps", {})
        self.data.setdefault("runs", [])
        self.data.setdefault("report_variant_entries", [])
        self.run: dict = {}

    def save(self) -> None:
        write_json_atomic(self.path, self.data)

    def start_run(self, argv: list[str]) -> None:
        self.run = {"started": datetime.datetime.now().isoformat(timespec="seconds"), "argv": argv, "steps": []}
        self.data["runs"].append(self.run)

    def finish_run(self, seconds: float) -> None:
        self.run["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
        self.run["seconds"] = round(seconds, 1)
        self.run["trained"] = [s["step"] for s in self.run["steps"]
                               if s["step"].startswith("train_") and s["status"] == "ran"]
        self.save()

    def step(self, name: str, status: str, seconds: float = 0.0, **extra) -> None:
        self.run["steps"].append({"step": name, "status": status, "seconds": round(seconds, 2), **extra})
        if status == "ran":  # seconds of each step's latest execution, across resumed runs
            self.data.setdefault("timings", {})[name] = round(seconds, 2)
        self.save()

    # entries -----------------------------------------------------------------------------------
    def entry(self, label: str, fraction: float, condition: str) -> dict | None:
        for e in self.data["entries"]:
            if e["label"] == label and e["fraction"] == fraction and e["condition"] == condition:
                return e
        return None

    def put_entry(self, new: dict) -> None:
        self.data["entries"] = [e for e in self.data["entries"]
                                if not (e["label"] == new["label"] and e["fraction"] == new["fraction"]
                                        and e["condition"] == new["condition"])] + [new]
        self.save()

    def drop_entries(self, dataset_id: int, trainer: str, fold: int) -> None:
        for key in ("entries", "report_variant_entries"):
            self.data[key] = [e for e in self.data.get(key, [])
                              if not (e["dataset_id"] == dataset_id and e["trainer"] == trainer and e["fold"] == fold)]
        self.save()

    # report-variant entries -----------------------------------------------------------------------
    def variant_entry(self, trainer: str, kind: str) -> dict | None:
        return next((e for e in self.data["report_variant_entries"] if e["trainer"] == trainer and e["variant"] == kind),
                    None)

    def put_variant_entry(self, new: dict) -> None:
        self.data["report_variant_entries"] = [e for e in self.data["report_variant_entries"]
                                               if not (e["trainer"] == new["trainer"]
                                                       and e["variant"] == new["variant"])] + [new]
        self.save()
