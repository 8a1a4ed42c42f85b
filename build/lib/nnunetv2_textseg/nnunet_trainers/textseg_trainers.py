"""nnunetv2-textseg's trainers for nnU-Net's ``-tr`` search (see ``__init__``): re-exports only. The classes
live in the installed package, so nnU-Net's spawned workers can unpickle them."""
from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP  # noqa: F401
from nnunetv2_textseg.training.medclipseg import nnUNetTrainerMedCLIPSeg  # noqa: F401
from nnunetv2_textseg.training.variants import *  # noqa: F401,F403
