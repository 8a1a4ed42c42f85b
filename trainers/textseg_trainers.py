"""Makes nnunetv2-textseg's trainers visible to nnU-Net's `-tr` search from a checkout (the installed package
ships the same stub in nnunetv2_textseg/nnunet_trainers/, which `nnUNetv2_textseg_env` prints).

nnU-Net (>= 2.8) imports every module in the folders named by $nnUNet_extTrainer and looks for the
class by name. The classes live in the installed package (so spawned workers can unpickle them);
this module only re-exports them (and installs the one-line error hook for nnUNetv2_train).
"""
from nnunetv2_textseg.errors import install_clean_error_hook
from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP  # noqa: F401
from nnunetv2_textseg.training.medclipseg import nnUNetTrainerMedCLIPSeg  # noqa: F401
from nnunetv2_textseg.training.variants import *  # noqa: F401,F403

# This module exists only as nnUNetv2_train's entry point into our trainers (nnU-Net imports it for -tr), so it
# sets up what a command of ours would: our input errors end as one 'ERROR:' line, not a traceback.
install_clean_error_hook()
