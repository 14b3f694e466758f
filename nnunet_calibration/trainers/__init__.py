"""nnU-Net v2 trainers of nnunet-calibration (one small class per loss).

Every public name ``nnUNetTrainer*`` here is found by ``nnUNetv2_train -tr NAME`` after
``pip install`` (see :mod:`nnunet_calibration._nnunet_plugin`): the plugin module does
``from nnunet_calibration.trainers import *``. The list of trainers (:data:`TRAINER_NAMES`,
``__all__``) is derived from the classes, not kept by hand.

Renamed before the first release (:data:`RENAMED`): the old names are not trainers any more; using
one is an error that names the new one (``calib-experiment check`` says so too).
"""
from nnunet_calibration.trainers.base import nnUNetTrainerDiceCE, nnUNetTrainerHparamsBase
from nnunet_calibration.trainers.calibration import (CALIBRATION_TRAINERS, nnUNetTrainerACEBase,
                                                     nnUNetTrainerCalibLossBase)

#: names of every runnable trainer (the DiceCE baseline first), derived from the classes
TRAINER_NAMES = ["nnUNetTrainerDiceCE"] + [cls.__name__ for cls in CALIBRATION_TRAINERS]
globals().update({cls.__name__: cls for cls in CALIBRATION_TRAINERS})

#: old name -> new name (renamed before the first release; the old names are errors)
RENAMED = {
    "nnUNetTrainerCalibBase": "nnUNetTrainerHparamsBase",
    "nnUNetTrainerCalibLoss": "nnUNetTrainerCalibLossBase",
    "nnUNetTrainerNACL_mean": "nnUNetTrainerNACL",
    "nnUNetTrainerNACL_mean_DC": "nnUNetTrainerNACL_DC",
}

__all__ = ["nnUNetTrainerHparamsBase", "nnUNetTrainerCalibLossBase", "nnUNetTrainerACEBase",
           "TRAINER_NAMES", "CALIBRATION_TRAINERS", "RENAMED", *TRAINER_NAMES]


def __getattr__(name: str):
    if name in RENAMED:
        raise AttributeError(f"{name} was renamed to {RENAMED[name]} (nnunet_calibration.trainers.{RENAMED[name]})")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
