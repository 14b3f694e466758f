"""Calibrated, uncertainty-aware inference (``calib-predict``): nnU-Net's own predictor with the
model's ``calibration.json`` applied to the logits, uncertainty maps per case and per-fold
probabilities. :mod:`.maps` (numpy only): the uncertainty formulas; :mod:`.predict`: the predictor
and the per-case export (imports torch and nnU-Net); :mod:`.cli`: the console script.

Dependencies: on top of :mod:`nnunet_calibration.posthoc` (reads ``calibration.json`` only through
its public functions); nothing below imports this package."""
