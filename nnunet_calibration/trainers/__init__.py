"""nnU-Net v2 trainers of nnunet-calibration (one small class per loss).

Every public name ``nnUNetTrainer*`` here is found by ``nnUNetv2_train -tr NAME`` after
``pip install`` (see :mod:`nnunet_calibration._nnunet_plugin`).
"""
from nnunet_calibration.trainers.base import (  # noqa: F401
    HPARAMS_ENV,
    nnUNetTrainerCalibBase,
    nnUNetTrainerDiceCE,
)

__all__ = ["nnUNetTrainerCalibBase", "nnUNetTrainerDiceCE"]
