"""Post-hoc calibration of trained nnU-Net models: temperature / vector scaling.

- :mod:`.scaling`: the fitting and scaling library (numpy/scipy only, no nnU-Net import);
- :mod:`.model`: fit on a model folder's cross-validation predictions (``calibration.json``) and
  apply to prediction folders in nnU-Net's own layout;
- :mod:`.export`: nnU-Net's model zip with ``calibration.json``;
- :mod:`.cli`: ``calib-calibrate fit`` / ``apply`` / ``export``.
"""
from .scaling import (PROB_FLOOR, T_BOUNDS, VoxelReservoir, apply_scaling, changes_decision,
                      crossfit, fit_all, fit_temperature, fit_vector_scaling, log_probabilities, nll,
                      region_targets, voxel_sample)

__all__ = ["PROB_FLOOR", "T_BOUNDS", "VoxelReservoir", "apply_scaling", "changes_decision", "crossfit", "fit_all",
           "fit_temperature", "fit_vector_scaling", "log_probabilities", "nll", "region_targets", "voxel_sample"]
