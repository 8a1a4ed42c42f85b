"""One error base class (TextSegError) and one way our commands show it: ``ERROR: <message>`` and exit code 2
(:func:`run_cli`), or for nnU-Net's own ``nnUNetv2_train`` the hook our trainer modules install."""
from __future__ import annotations

import ast
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nnunetv2_textseg.errors import TextSegError, run_cli

REPO = Path(__file__).resolve().parents[1]


def _error_classes() -> list[tuple[str, str]]:
    """(module, class) of every ``class ...Error`` in the package and the benchmarks (read from the source)."""
    found = []
    for path in sorted([*(REPO / "nnunetv2_textseg").rglob("*.py"), *(REPO / "benchmarks").glob("*.py")]):
        module = ".".join(path.relative_to(REPO).with_suffix("").parts)
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                found.append((module, node.name))
    return found


def test_error_classes_are_found():
    names = {name for _, name in _error_classes()}
    assert {"TextTrainingError", "ReportError", "CacheError", "EncoderError", "DatasetConfigError"} <= names


@pytest.mark.parametrize("module, name", _error_classes())
def test_every_error_class_is_a_textseg_error(module, name):
    if module.startswith("benchmarks."):  # scripts, not a package: load from the file
        spec = importlib.util.spec_from_file_location(f"_errors_check_{module}", REPO / f"{module.replace('.', '/')}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    else:
        mod = importlib.import_module(module)
    cls = getattr(mod, name)
    assert issubclass(cls, TextSegError), f"{module}.{name} does not subclass nnunetv2_textseg.errors.TextSegError"


def test_error_classes_keep_their_standard_bases():
    """Code that caught ``ValueError`` / ``RuntimeError`` / ``KeyError`` before still catches them."""
    from nnunetv2_textseg.paths import DatasetConfigError
    from nnunetv2_textseg.reports import MissingReportError, ReportError
    assert issubclass(ReportError, ValueError) and issubclass(MissingReportError, KeyError)
    assert issubclass(DatasetConfigError, RuntimeError)


def test_run_cli_prints_one_line_and_returns_2(capsys, monkeypatch):
    monkeypatch.delenv("NNUNET_TEXTSEG_DEBUG", raising=False)

    def fails(argv):
        raise TextSegError(f"no table at {argv[0]}; pass -reports FILE")
    assert run_cli(fails, ["x.csv"]) == 2
    assert capsys.readouterr().err == "ERROR: no table at x.csv; pass -reports FILE\n"
    assert run_cli(lambda argv: None) == 0 and run_cli(lambda argv: 3) == 3
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda argv: 1 / 0)
    with pytest.raises(FileNotFoundError):  # only errors named as the command's user errors are caught
        run_cli(lambda argv: open("/nonexistent/x"))
    assert run_cli(lambda argv: open("/nonexistent/x"), None, (FileNotFoundError,)) == 2
    monkeypatch.setenv("NNUNET_TEXTSEG_DEBUG", "1")
    with pytest.raises(TextSegError):
        run_cli(fails, ["x.csv"])


def _uncaught(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "NNUNET_TEXTSEG_DEBUG"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**environ, **env})


HOOKED = ("from nnunetv2_textseg.errors import TextSegError, install_clean_error_hook\n"
          "install_clean_error_hook(); install_clean_error_hook()\n")


def test_hook_prints_textseg_errors_as_one_line():
    r = _uncaught(HOOKED + "raise TextSegError('reportsTr.csv has no row for case_001; add it')")
    assert r.returncode == 1 and r.stderr == "ERROR: reportsTr.csv has no row for case_001; add it\n", r.stderr


def test_hook_keeps_tracebacks_of_bugs_and_in_debug_mode():
    r = _uncaught(HOOKED + "1 / 0")
    assert r.returncode == 1 and "Traceback" in r.stderr and "ZeroDivisionError" in r.stderr
    r = _uncaught(HOOKED + "raise TextSegError('x')", NNUNET_TEXTSEG_DEBUG="1")
    assert r.returncode == 1 and "Traceback" in r.stderr


def test_library_import_installs_no_hook():
    r = _uncaught("import nnunetv2_textseg.errors, nnunetv2_textseg.paths\n"
                  "from nnunetv2_textseg.paths import DatasetConfigError\nraise DatasetConfigError('x')")
    assert "Traceback" in r.stderr and not r.stderr.startswith("ERROR:")


def test_convert_hint_names_the_command_line():
    from nnunetv2_textseg.errors import _convert_hint
    argv = ["nnUNetv2_train", "987", "2d", "0", "-tr", "nnUNetTrainerBiCLIP", "-pretrained_weights", "plain.pth"]
    assert _convert_hint(argv) == ("nnUNetv2_textseg_convert_pretrained -i plain.pth -d 987 -tr nnUNetTrainerBiCLIP "
                                   "-p nnUNetPlans -o converted.pth")
