"""The text-conditioned networks around nnU-Net's planned U-Net; :mod:`.base` declares what the trainers and
the predictor rely on."""
