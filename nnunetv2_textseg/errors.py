"""The package's one error base class and how our commands show it.

Every error a user can fix (a missing report, a foreign cache, an unset nnU-Net folder, ...) is a
:class:`TextSegError`; its message names what is wrong, where, and the fix. Commands print such an error
as one line, ``ERROR: <message>``, and exit with code 2 instead of a traceback; any other exception is a bug
and keeps its traceback. ``NNUNET_TEXTSEG_DEBUG=1`` shows the traceback of a :class:`TextSegError` too.

Nothing here runs on import: our console scripts go through :func:`run_cli`, and the trainer modules that
nnU-Net imports for ``nnUNetv2_train -tr`` (nnU-Net's script, not ours) call :func:`install_clean_error_hook`.

This module imports nothing heavy (no torch, no nnU-Net) at module level, so every other module can import it.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Sequence

DEBUG_ENV = "NNUNET_TEXTSEG_DEBUG"
EXIT_USER_ERROR = 2


class TextSegError(Exception):
    """An input or usage problem, not a bug: the message names what is wrong, where (file, case, option), and
    the fix. Commands print it as one ``ERROR:`` line and exit with code 2."""


def _debug() -> bool:
    return bool(os.environ.get(DEBUG_ENV))


def run_cli(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None,
            user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """Run one command's ``main(argv)`` and return its exit code: ``main``'s own int, else 0.

    A :class:`TextSegError` (or one of ``user_errors``) is printed as ``ERROR: <message>`` on stderr and gives
    exit code 2; with ``$NNUNET_TEXTSEG_DEBUG`` set it is re-raised (full traceback). Every other exception
    propagates unchanged. A console script is ``sys.exit(run_cli(main))``."""
    try:
        rc = main(argv)
    except (TextSegError,) + tuple(user_errors) as e:
        if _debug():
            raise
        print(f"ERROR: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    return rc if isinstance(rc, int) else 0


def install_clean_error_hook() -> None:
    """Make ``sys.excepthook`` print an uncaught :class:`TextSegError` as one ``ERROR:`` line (and a plain
    nnU-Net checkpoint passed as ``-pretrained_weights`` to one of our trainers as the conversion command).

    For ``nnUNetv2_train``: it is nnU-Net's script, so our input errors would otherwise end in a long traceback
    through nnU-Net. Called by the trainer modules nnU-Net imports for ``-tr`` (never on import of the library);
    every other exception keeps the previous hook. Calling it again does nothing."""
    previous = sys.excepthook
    if getattr(previous, "_textseg", False):
        return

    def hook(exc_type, exc, tb):
        if _debug():
            previous(exc_type, exc, tb)
        elif issubclass(exc_type, TextSegError):
            print(f"ERROR: {exc}", file=sys.stderr)
        elif (issubclass(exc_type, AssertionError) and _raised_in(tb, "load_pretrained_weights")
              and _plain_weights_for_text_trainer(sys.argv)):
            print(f"ERROR: -pretrained_weights does not fit this text trainer's network ({exc}).\n"
                  f"A plain nnU-Net model has no text modules (and our U-Nets take more input channels). "
                  f"Convert its checkpoint first, then pass the converted file:\n  {_convert_hint(sys.argv)}",
                  file=sys.stderr)
        else:
            previous(exc_type, exc, tb)

    hook._textseg = True
    sys.excepthook = hook


def _raised_in(tb, function: str) -> bool:
    while tb is not None:
        if tb.tb_frame.f_code.co_name == function:
            return True
        tb = tb.tb_next
    return False


def _argv_option(argv: list[str], name: str, default: str | None = None) -> str | None:
    return argv[argv.index(name) + 1] if name in argv[:-1] else default


def _plain_weights_for_text_trainer(argv: list[str]) -> bool:
    """nnUNetv2_train -tr <one of our trainers> -pretrained_weights <a checkpoint without our unet.* names>."""
    trainer, path = _argv_option(argv, "-tr"), _argv_option(argv, "-pretrained_weights")
    if not trainer or not path:
        return False
    try:
        # imported here, when the hook runs: they import torch and nnU-Net, which this module must not, and they
        # import this module (a module-level import would be a cycle)
        from nnunetv2_textseg.pretrained import _strip_wrappers, load_checkpoint_safely
        from nnunetv2_textseg.training.variants import text_trainer_class
        text_trainer_class(trainer)
        weights = load_checkpoint_safely(path)["network_weights"]
    except Exception:  # not ours, or not a readable checkpoint: nnU-Net's own message stands
        return False
    return not any(_strip_wrappers(k).startswith("unet.") for k in weights)


def _convert_hint(argv: list[str]) -> str:
    """The conversion command for this nnUNetv2_train command line (placeholders where it lacks a value)."""
    positional = [a for i, a in enumerate(argv[1:], 1) if not a.startswith("-") and not argv[i - 1].startswith("-")]
    dataset = positional[0] if positional else "DATASET"
    return (f"nnUNetv2_textseg_convert_pretrained -i {_argv_option(argv, '-pretrained_weights', 'PLAIN.pth')} "
            f"-d {dataset} -tr {_argv_option(argv, '-tr', 'TRAINER')} -p {_argv_option(argv, '-p', 'nnUNetPlans')} "
            f"-o converted.pth")
