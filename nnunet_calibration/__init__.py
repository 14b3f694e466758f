"""nnunet-calibration: calibration losses, trainers, metrics and experiments for nnU-Net v2.

Layout (dependencies flow one way, top to bottom):

- ``nnunet_calibration.metrics``: numpy/scipy calibration and segmentation metrics.
- ``nnunet_calibration.losses``: pure-torch calibration losses.
- ``nnunet_calibration.trainers``: nnU-Net v2 trainers wrapping the losses.
- ``nnunet_calibration.evaluation``: ``calib-evaluate`` on nnU-Net prediction folders.
- ``nnunet_calibration.experiments``: ``calib-experiment`` (local / SLURM), reports, demo.
"""

__version__ = "0.1.0"
