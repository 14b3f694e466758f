"""Pure-torch calibration losses for nnU-Net v2 (no nnU-Net import; 2D and 3D; CPU and CUDA).

Contract with :mod:`nnunet_calibration.trainers`:

* every loss is an ``nn.Module`` whose ``forward(net_output, target)`` takes ONE resolution
  (wrap with nnU-Net's ``DeepSupervisionWrapper`` for the deep-supervision lists);
* plain labels: logits ``(B, C, *sp)`` and a label map ``(B, 1, *sp)``; ``ignore_label`` voxels are
  masked out of every term (see :mod:`._common`);
* regions (``regions=True``): logits ``(B, R, *sp)``, binary region maps ``(B, R, *sp)`` plus, when
  ``ignore_label`` is not None, nnU-Net's extra last ignore channel;
* :func:`build_loss` / :data:`LOSSES` construct losses by name; ``<name>_dc`` adds nnU-Net's Dice
  (:class:`WithDice`);
* :class:`SDCLoss` takes the auxiliary SDF head output: ``forward(net_output, target, sdf_pred)``;
  :func:`reference_sdf` computes its target; :meth:`SDCLoss.sdf_term` is the SDF term alone (the
  trainers add it once with weight ``lambda_sdf``, outside deep supervision);
* ``spacing`` (every loss): the configuration's voxel spacing; 3D patches of an anisotropic spacing
  (nnU-Net's rule) get in-plane 3x3x1 windows, and SDC's reference SDF is in millimetres.
"""
from .calibration import (ACELoss, CrossEntropy, DSCPlusPlusLoss, ECPLoss, FCLLoss, FocalLoss,
                          LabelSmoothingLoss, MbLSLoss, NACLLoss, SDCLoss, SVLSLoss,
                          hard_binned_l1_ace)
from ._common import CalibrationLoss
from .dice import SoftDice, WithDice
from .morphology import ANISO_THRESHOLD, MORPH_OPS, dilate, erode, morph, svls_kernel, window_axes
from .registry import DICE_VARIANT_BASES, LOSSES, MORPH_VARIANTS, available_losses, build_loss
from .sdf import euclidean_distance_transform, reference_sdf, squared_edt_to_seeds

__all__ = [
    "CalibrationLoss", "CrossEntropy", "FocalLoss", "ECPLoss", "LabelSmoothingLoss", "SVLSLoss",
    "MbLSLoss", "NACLLoss", "FCLLoss", "SDCLoss", "DSCPlusPlusLoss", "ACELoss", "SoftDice",
    "WithDice", "hard_binned_l1_ace", "LOSSES", "MORPH_VARIANTS", "MORPH_OPS",
    "DICE_VARIANT_BASES", "available_losses", "build_loss", "reference_sdf",
    "euclidean_distance_transform", "squared_edt_to_seeds", "dilate", "erode", "morph",
    "svls_kernel", "window_axes", "ANISO_THRESHOLD",
]
