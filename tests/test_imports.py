"""Every module of the package imports on its own — first, in an interpreter where none of our modules is loaded
yet, which is what an import cycle needs to show — and importing it has no side effect: ``sys.excepthook`` stays
Python's own. Only the trainer modules nnU-Net imports for ``nnUNetv2_train -tr`` install our one-line error hook
(they exist only as that command's entry point).

A fresh interpreter per module would import torch and nnU-Net ~30 times (~10 s each on a busy 2-core machine), so
one driver interpreter loads those third-party libraries once and forks a child per module: each child starts with
none of ``nnunetv2_textseg`` imported, so our modules import in exactly the order a fresh interpreter would use.
"""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import nnunetv2_textseg

REPO = Path(__file__).resolve().parents[1]
MODULES = sorted(m.name for m in pkgutil.walk_packages(nnunetv2_textseg.__path__, "nnunetv2_textseg."))
# (module, folder to put first on sys.path): nnU-Net's -tr entry points, packaged and in the checkout's trainers/
ENTRY_POINTS = [("nnunetv2_textseg.nnunet_trainers.textseg_trainers", None),
                ("textseg_trainers", str(REPO / "trainers"))]
# Third-party modules our modules import at module level (a missing one only costs time: the child imports it).
PRELOAD = ["numpy", "scipy", "pandas", "SimpleITK", "tqdm", "matplotlib", "matplotlib.pyplot", "skimage", "torch",
           "torch.nn.functional", "torch._dynamo", "transformers", "nnunetv2.configuration",
           "nnunetv2.training.nnUNetTrainer.nnUNetTrainer", "nnunetv2.inference.predict_from_raw_data",
           "nnunetv2.utilities.plans_handling.plans_handler", "batchgeneratorsv2.transforms.utils.compose"]

DRIVER = r'''
import importlib, json, os, sys, traceback
out, preload, specs = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
for name in preload:
    try:
        importlib.import_module(name)
    except Exception:  # the child that needs it reports the error
        pass
ours = sorted(m for m in sys.modules if m.split(".")[0] == "nnunetv2_textseg")
assert not ours, f"a third-party module imported ours: {ours}"
assert sys.excepthook is sys.__excepthook__, "a third-party module replaced sys.excepthook"


def child(name, path):
    if path:
        sys.path.insert(0, path)
    try:
        importlib.import_module(name)
    except BaseException:
        return {"ok": False, "error": traceback.format_exc()}
    hook = sys.excepthook
    return {"ok": True, "hook": "python" if hook is sys.__excepthook__ else
            "textseg" if getattr(hook, "_textseg", False) else repr(hook)}


def run(name, path):
    with open(os.path.join(out, name + ".json"), "w") as f:
        json.dump(child(name, path), f)


if not hasattr(os, "fork"):  # Windows: the test passes one module per interpreter
    for name, path in specs:
        run(name, path)
    sys.exit(0)
jobs, running, todo = max(2, os.cpu_count() or 2), set(), list(specs)
while todo or running:
    while todo and len(running) < jobs:
        name, path = todo.pop(0)
        pid = os.fork()
        if pid == 0:
            try:
                run(name, path)
            finally:
                os._exit(0)
        running.add(pid)
    pid, _ = os.wait()
    running.discard(pid)
'''


@pytest.fixture(scope="module")
def import_results(tmp_path_factory) -> dict[str, dict]:
    specs = [(m, None) for m in MODULES if m not in dict(ENTRY_POINTS)] + ENTRY_POINTS
    out = tmp_path_factory.mktemp("imports")
    batches = [specs] if hasattr(os, "fork") else [[spec] for spec in specs]
    for batch in batches:
        r = subprocess.run([sys.executable, "-c", DRIVER, str(out), json.dumps(PRELOAD if len(batches) == 1 else []),
                            json.dumps(batch)], capture_output=True, text=True, timeout=600, cwd=out)
        assert r.returncode == 0, r.stderr[-3000:]
    return {name: json.loads((out / f"{name}.json").read_text()) if (out / f"{name}.json").is_file()
            else {"ok": False, "error": "the child crashed"} for name, _ in specs}


def test_the_package_has_modules_to_check():
    assert "nnunetv2_textseg.errors" in MODULES and "nnunetv2_textseg.training.text_trainer" in MODULES


@pytest.mark.parametrize("module", [m for m in MODULES if m not in dict(ENTRY_POINTS)])
def test_module_imports_first_and_alone_without_side_effects(import_results, module):
    result = import_results[module]
    assert result["ok"], f"import {module} in a fresh interpreter failed:\n{result['error']}"
    assert result["hook"] == "python", f"import {module} replaced sys.excepthook ({result['hook']})"


@pytest.mark.parametrize("module", [m for m, _ in ENTRY_POINTS])
def test_nnunet_entry_points_install_the_error_hook(import_results, module):
    result = import_results[module]
    assert result["ok"], f"import {module} in a fresh interpreter failed:\n{result['error']}"
    assert result["hook"] == "textseg", result["hook"]


def test_importing_the_package_loads_no_torch():
    """``import nnunetv2_textseg`` (and its errors module, which every module and command imports) stays light."""
    code = ("import sys, nnunetv2_textseg, nnunetv2_textseg.errors; "
            "heavy = sorted(m for m in ('torch', 'nnunetv2', 'transformers', 'pandas') if m in sys.modules); "
            "assert not heavy, heavy; assert sys.excepthook is sys.__excepthook__")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
