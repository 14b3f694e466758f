"""nnU-Net v2 trainers of nnunet-calibration (one small class per loss).

Every public name ``nnUNetTrainer*`` here is found by ``nnUNetv2_train -tr NAME`` after
``pip install`` (see :mod:`nnunet_calibration._nnunet_plugin`): the plugin module does
``from nnunet_calibration.trainers import *`` and forwards the renamed names. The list of
trainers (:data:`TRAINER_NAMES`, ``__all__``) is derived from the classes, not kept by hand.

Renamed for one release (importing or ``-tr`` lookup warns with a ``DeprecationWarning``):
``nnUNetTrainerCalibBase`` -> :class:`nnUNetTrainerHparamsBase`, ``nnUNetTrainerCalibLoss`` ->
:class:`nnUNetTrainerCalibLossBase`, ``nnUNetTrainerNACL_mean`` -> :class:`nnUNetTrainerNACL`,
``nnUNetTrainerNACL_mean_DC`` -> :class:`nnUNetTrainerNACL_DC` (see :data:`DEPRECATED_NAMES`).
"""
import warnings

from nnunet_calibration.trainers import base as _base
from nnunet_calibration.trainers import calibration as _calibration
from nnunet_calibration.trainers.base import HPARAMS_ENV, nnUNetTrainerDiceCE, nnUNetTrainerHparamsBase
from nnunet_calibration.trainers.calibration import (CALIBRATION_TRAINERS, RENAMED_TRAINERS,
                                                     nnUNetTrainerACEBase, nnUNetTrainerCalibLossBase)

#: names of every runnable trainer (the DiceCE baseline first), derived from the classes
TRAINER_NAMES = ["nnUNetTrainerDiceCE"] + [cls.__name__ for cls in CALIBRATION_TRAINERS]
globals().update({cls.__name__: cls for cls in CALIBRATION_TRAINERS})

#: renamed names (old -> new name), importable for one release with a DeprecationWarning
DEPRECATED_NAMES = {**{k: v.__name__ for k, v in _base._RENAMED.items()},
                    **{k: v.__name__ for k, v in RENAMED_TRAINERS.items()}}

__all__ = ["HPARAMS_ENV", "nnUNetTrainerHparamsBase", "nnUNetTrainerCalibLossBase", "nnUNetTrainerACEBase",
           "TRAINER_NAMES", "CALIBRATION_TRAINERS", "DEPRECATED_NAMES", *TRAINER_NAMES]


def __getattr__(name: str):
    if name in _base._RENAMED:
        return getattr(_base, name)
    if name in RENAMED_TRAINERS:
        return getattr(_calibration, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


del warnings
