"""Loss registry: construct any loss by name (used by :mod:`nnunet_calibration.trainers`).

``build_loss(name, *, regions=False, ignore_label=None, batch_dice=False, ddp=False, spacing=None,
**hparams)``

The registry key is each loss's one name: :func:`build_loss` stores it in the loss's ``name``
(``<key>_dc`` on the :class:`~.dice.WithDice` wrapper, ``<key>`` on the loss inside).

* ``name``: a key of :data:`LOSSES`, or ``<key>_dc`` for every key in :data:`DICE_VARIANT_BASES`
  (the loss plus nnU-Net's default Dice term via :class:`~.dice.WithDice`).
* ``batch_dice`` / ``ddp``: only used by losses containing nnU-Net's Dice term (``*_dc``,
  ``ace_dice``, ``ace_dice_ce``, ``dice``); pass ``configuration_manager.batch_dice`` and
  ``trainer.is_ddp``.
* ``spacing``: voxel spacing of the configuration (3D: in-plane windows when anisotropic by
  nnU-Net's rule, SDF in millimetres; 2D patches ignore it).
* ``hparams``: constructor arguments of the loss class (defaults: the SDC paper's Table 1);
  ``dice_weight`` is accepted for ``*_dc`` names (default 1.0).
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, Optional

from torch import nn

from .calibration import (ACELoss, CrossEntropy, DSCPlusPlusLoss, ECPLoss, FCLLoss, FocalLoss,
                          LabelSmoothingLoss, MbLSLoss, NACLLoss, SDCLoss, SVLSLoss)
from .dice import SoftDice, WithDice

#: morphological operators of the SDC paper's Table 6 (``none`` excluded)
MORPH_VARIANTS = ("erosion", "dilation", "opening", "closing", "gradient",
                  "internal_boundary", "external_boundary")

LOSSES: Dict[str, Callable[..., nn.Module]] = {
    "ce": CrossEntropy,
    "dice": SoftDice,
    "focal": FocalLoss,
    "ecp": ECPLoss,
    "ls": LabelSmoothingLoss,
    "svls": SVLSLoss,
    "mbls": MbLSLoss,
    "nacl": NACLLoss,                                   # kernel "mean" (NACL's code default)
    "nacl_min": partial(NACLLoss, kernel="min"),        # the SDC paper's Table 1 footnote
    "fcl": FCLLoss,
    "sdc": SDCLoss,
    "dscpp": DSCPlusPlusLoss,                           # DSC++ alone
    "dscpp_ce": partial(DSCPlusPlusLoss, ce_weight=1.0),
    "ace_ce": partial(ACELoss, ce_weight=1.0, dice_weight=0.0),
    "ace_dice": partial(ACELoss, ce_weight=0.0, dice_weight=1.0),
    "ace_dice_ce": partial(ACELoss, ce_weight=1.0, dice_weight=1.0),
}
for _op in MORPH_VARIANTS:
    LOSSES[f"nacl_{_op}"] = partial(NACLLoss, morph=_op)
    LOSSES[f"svls_{_op}"] = partial(SVLSLoss, morph=_op)

#: names that also exist as ``<name>_dc`` (loss + nnU-Net's Dice term)
DICE_VARIANT_BASES = tuple(n for n in LOSSES if n not in
                           ("dice", "dscpp", "dscpp_ce", "ace_ce", "ace_dice", "ace_dice_ce"))

_NEEDS_DICE_ARGS = ("dice", "ace_dice", "ace_dice_ce")


def available_losses() -> list:
    """All names accepted by :func:`build_loss`."""
    return sorted(list(LOSSES) + [f"{n}_dc" for n in DICE_VARIANT_BASES])


def build_loss(name: str, *, regions: bool = False, ignore_label: Optional[int] = None,
               batch_dice: bool = False, ddp: bool = False, spacing=None, **hparams) -> nn.Module:
    """Construct the loss ``name`` (see module docstring). Raises ``ValueError`` for unknown names,
    unknown hyperparameters, or losses that do not support ``regions=True``."""
    dice_weight = None
    base = name
    if name not in LOSSES and name.endswith("_dc") and name[:-3] in DICE_VARIANT_BASES:
        base = name[:-3]
        dice_weight = float(hparams.pop("dice_weight", 1.0))
    if base not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; available: {', '.join(available_losses())}")
    kwargs = dict(hparams)
    if base in _NEEDS_DICE_ARGS:
        kwargs.setdefault("batch_dice", batch_dice)
        kwargs.setdefault("ddp", ddp)
    try:
        loss = LOSSES[base](regions=regions, ignore_label=ignore_label, spacing=spacing, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad hyperparameters for loss {name!r}: {hparams} ({e})") from e
    loss.name = base
    if dice_weight is not None:
        loss = WithDice(loss, dice_weight, batch_dice=batch_dice, ddp=ddp)
        loss.name = name
    return loss


__all__ = ["LOSSES", "MORPH_VARIANTS", "DICE_VARIANT_BASES", "available_losses", "build_loss"]
