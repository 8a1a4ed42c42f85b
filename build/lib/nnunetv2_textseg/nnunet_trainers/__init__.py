"""The folder to name in ``nnUNet_extTrainer`` (``nnUNetv2_textseg_env`` prints it).

nnU-Net (>= 2.8) imports every module in the folders listed there as a top-level module and looks for the
trainer class by name. This folder ships inside the installed package, so a plain ``pip install`` (wheel,
not editable) is enough; its only module, ``textseg_trainers``, re-exports the classes that live in
:mod:`nnunetv2_textseg.training` (a name that cannot shadow this package).
"""
from pathlib import Path

FOLDER = Path(__file__).resolve().parent
