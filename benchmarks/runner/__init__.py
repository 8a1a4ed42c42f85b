"""The experiment runner behind ``benchmarks/text_vs_vision.py`` (and, through it, ``low_label.py`` and
``calibration.py``), one concern per module:

- :mod:`.presets`: what a run trains and tests (presets, trainer kinds, conditions, label fractions, constants);
- :mod:`.state`: ``results.json``, the run's bookkeeping that makes a re-run resume;
- :mod:`.run`: :class:`~.run.Runner`, the steps as real nnU-Net commands (through
  :mod:`nnunetv2_textseg.harness`), each skipped when ``results.json`` says it is done;
- :mod:`.tables`: ``results.md`` and ``results.png`` from ``results.json``.
"""
from nnunetv2_textseg.errors import TextSegError


class BenchmarkError(TextSegError, RuntimeError):
    """The run cannot continue as asked; the message says why and what to do."""
