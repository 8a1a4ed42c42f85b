"""nnunetv2-textseg's trainers for nnU-Net's ``-tr`` search (see ``__init__``): re-exports, plus
the one-line error hook for ``nnUNetv2_train``. The classes live in the installed package, so nnU-Net's spawned
workers can unpickle them."""
from nnunetv2_textseg.errors import install_clean_error_hook
from nnunetv2_textseg.training.biclip import nnUNetTrainerBiCLIP  # noqa: F401
from nnunetv2_textseg.training.medclipseg import nnUNetTrainerMedCLIPSeg  # noqa: F401
from nnunetv2_textseg.training.variants import *  # noqa: F401,F403

# This module exists only as nnUNetv2_train's entry point into our trainers (nnU-Net imports it for -tr), so it
# sets up what a command of ours would: our input errors end as one 'ERROR:' line, not a traceback.
install_clean_error_hook()
