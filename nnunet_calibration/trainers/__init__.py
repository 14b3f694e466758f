"""nnU-Net v2 trainers of nnunet-calibration (one small class per loss).

Every public name ``nnUNetTrainer*`` here is found by ``nnUNetv2_train -tr NAME`` after
``pip install`` (see :mod:`nnunet_calibration._nnunet_plugin`): the plugin module does
``from nnunet_calibration.trainers import *``, so every trainer must be listed in ``__all__``.
"""
from nnunet_calibration.trainers.base import (  # noqa: F401
    HPARAMS_ENV,
    nnUNetTrainerCalibBase,
    nnUNetTrainerDiceCE,
)
from nnunet_calibration.trainers.calibration import (  # noqa: F401
    CALIBRATION_TRAINERS,
    nnUNetTrainerCalibLoss,
    nnUNetTrainerFocal,
    nnUNetTrainerECP,
    nnUNetTrainerLS,
    nnUNetTrainerSVLS,
    nnUNetTrainerMbLS,
    nnUNetTrainerNACL,
    nnUNetTrainerNACL_mean,
    nnUNetTrainerFCL,
    nnUNetTrainerSDC,
    nnUNetTrainerDSCPlusPlus,
    nnUNetTrainerDSCPlusPlusCE,
    nnUNetTrainerCE_ACE,
    nnUNetTrainerDice_ACE,
    nnUNetTrainerDiceCE_ACE,
    nnUNetTrainerNACL_MorphErosion,
    nnUNetTrainerNACL_MorphDilation,
    nnUNetTrainerNACL_MorphOpening,
    nnUNetTrainerNACL_MorphClosing,
    nnUNetTrainerNACL_MorphGradient,
    nnUNetTrainerNACL_MorphInternalBoundary,
    nnUNetTrainerNACL_MorphExternalBoundary,
    nnUNetTrainerSVLS_MorphErosion,
    nnUNetTrainerSVLS_MorphDilation,
    nnUNetTrainerSVLS_MorphOpening,
    nnUNetTrainerSVLS_MorphClosing,
    nnUNetTrainerSVLS_MorphGradient,
    nnUNetTrainerSVLS_MorphInternalBoundary,
    nnUNetTrainerSVLS_MorphExternalBoundary,
    nnUNetTrainerFocal_DC,
    nnUNetTrainerECP_DC,
    nnUNetTrainerLS_DC,
    nnUNetTrainerSVLS_DC,
    nnUNetTrainerMbLS_DC,
    nnUNetTrainerNACL_DC,
    nnUNetTrainerNACL_mean_DC,
    nnUNetTrainerFCL_DC,
    nnUNetTrainerSDC_DC,
)

#: names of every runnable trainer (the DiceCE baseline first)
TRAINER_NAMES = ["nnUNetTrainerDiceCE"] + [cls.__name__ for cls in CALIBRATION_TRAINERS]

__all__ = ["nnUNetTrainerCalibBase", "nnUNetTrainerCalibLoss", *TRAINER_NAMES]
