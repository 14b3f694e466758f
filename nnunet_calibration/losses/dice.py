"""nnU-Net's Dice term, re-implemented in torch, and the ``WithDice`` wrapper.

:class:`SoftDice` reproduces ``nnunetv2.training.loss.dice.MemoryEfficientSoftDiceLoss`` as nnU-Net's
default trainer configures it (``nnUNetTrainer._build_loss``):

* nonlinearity: softmax over channels (plain labels) or sigmoid (regions);
* ``do_bg``: ``False`` for plain labels (channel 0 dropped), ``True`` for regions;
* ``smooth = 1e-5``; ``batch_dice`` from the plans (sums over the batch before the ratio);
* per channel ``dc = (2 I + smooth) / max(S_gt + S_pred + smooth, 1e-8)`` with
  ``I = sum(p * y * mask)``, ``S_pred = sum(p * mask)``, ``S_gt = sum(y * mask)`` over the spatial
  axes (and the batch if ``batch_dice``); the loss is ``-mean(dc)`` (negative, as in nnU-Net, so
  ``CE + Dice`` equals nnU-Net's ``DC_and_CE_loss`` numerically);
* ignore label: ``mask`` is the valid-voxel mask, ignored voxels' labels are set to 0 first;
* ``ddp=True`` and an initialised ``torch.distributed`` group: with ``batch_dice`` the per-rank sums
  are all-gathered with gradient (nnU-Net's ``AllGatherGrad``) before the ratio.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._common import CalibrationLoss, ProbView


def _all_gather_sum(t: Tensor) -> Tensor:
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        return t
    from torch.distributed.nn.functional import all_gather
    return torch.stack(all_gather(t), 0).sum(0)


def soft_dice_from_probs(pv: ProbView, *, batch_dice: bool, do_bg: bool, smooth: float = 1e-5,
                         ddp: bool = False) -> Tensor:
    """nnU-Net's memory-efficient soft Dice (negative mean Dice) on a probability view."""
    x, y, mask = pv.probs, pv.onehot, pv.valid
    axes = tuple(range(2, x.ndim))
    if not do_bg:
        x = x[:, 1:]
        y = y[:, 1:]
    with torch.no_grad():
        y = y.to(torch.float32)
        sum_gt = y.sum(axes) if mask is None else (y * mask).sum(axes)
    if mask is None:
        intersect = (x * y).sum(axes, dtype=torch.float32)
        sum_pred = x.sum(axes, dtype=torch.float32)
    else:
        intersect = (x * y * mask).sum(axes, dtype=torch.float32)
        sum_pred = (x * mask).sum(axes, dtype=torch.float32)
    if batch_dice:
        if ddp:
            intersect = _all_gather_sum(intersect)
            sum_pred = _all_gather_sum(sum_pred)
            sum_gt = _all_gather_sum(sum_gt)
        intersect = intersect.sum(0)
        sum_pred = sum_pred.sum(0)
        sum_gt = sum_gt.sum(0)
    dc = (2 * intersect + smooth) / (sum_gt + sum_pred + float(smooth)).clamp_min(1e-8)
    return -dc.mean()


class SoftDice(CalibrationLoss):
    """nnU-Net's default Dice term alone (see module docstring). Supports regions."""


    def __init__(self, *, regions: bool = False, ignore_label: Optional[int] = None, spacing=None,
                 batch_dice: bool = False, smooth: float = 1e-5, ddp: bool = False,
                 do_bg: Optional[bool] = None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.batch_dice = bool(batch_dice)
        self.smooth = float(smooth)
        self.ddp = bool(ddp)
        self.do_bg = bool(regions) if do_bg is None else bool(do_bg)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        pv = self.prob_view(net_output, target)
        return soft_dice_from_probs(pv, batch_dice=self.batch_dice, do_bg=self.do_bg,
                                    smooth=self.smooth, ddp=self.ddp)


class WithDice(nn.Module):
    """``loss_weight * s * loss(net_output, target, ...) + dice_weight * SoftDice(net_output, target)``.

    ``s`` reproduces nnU-Net's scale of the CE/BCE part exactly: ``s = R`` (the number of regions)
    for regions with an ignore label, ``s = 1`` otherwise. nnU-Net's ``DC_and_BCE_loss`` with
    ``use_ignore_label`` divides the BCE summed over regions and valid voxels by the number of valid
    voxels, whereas without ignore label (and in every loss here) it is the mean over voxels and
    regions; so with ``WithDice(CrossEntropy(...))`` equal to nnU-Net's ``DC_and_CE_loss`` /
    ``DC_and_BCE_loss`` in all four cases (labels/regions, with/without ignore label), every
    ``_DC`` loss weighs its calibration loss against the Dice term as nnU-Net weighs its CE/BCE.

    The Dice term is exactly nnU-Net's default one (:class:`SoftDice`): it inherits ``regions`` and
    ``ignore_label`` from the wrapped loss; ``batch_dice`` comes from the plans
    (``configuration_manager.batch_dice``), ``ddp`` from ``trainer.is_ddp``. Extra positional and
    keyword arguments (e.g. ``sdf_pred`` of :class:`~nnunet_calibration.losses.SDCLoss`) go to the
    wrapped loss only.
    """

    def __init__(self, loss: CalibrationLoss, dice_weight: float = 1.0, *, batch_dice: bool = False,
                 smooth: float = 1e-5, ddp: bool = False, loss_weight: float = 1.0):
        super().__init__()
        if not isinstance(loss, CalibrationLoss):
            raise TypeError(f"WithDice wraps a CalibrationLoss, got {type(loss).__name__}")
        self.loss = loss
        self.dice = SoftDice(regions=loss.regions, ignore_label=loss.ignore_label,
                             batch_dice=batch_dice, smooth=smooth, ddp=ddp)
        self.dice_weight = float(dice_weight)
        self.loss_weight = float(loss_weight)

    @property
    def regions(self) -> bool:
        return self.loss.regions

    @property
    def ignore_label(self):
        return self.loss.ignore_label

    def ce_scale(self, net_output: Tensor) -> float:
        """nnU-Net's scale of the CE/BCE part (see the class docstring)."""
        if self.loss.regions and self.loss.ignore_label is not None:
            return float(net_output.shape[1])
        return 1.0

    def forward(self, net_output: Tensor, target: Tensor, *args, **kwargs) -> Tensor:
        out = (self.loss_weight * self.ce_scale(net_output)) * self.loss(net_output, target, *args, **kwargs)
        if self.dice_weight != 0:
            out = out + self.dice_weight * self.dice(net_output, target)
        return out


__all__ = ["SoftDice", "WithDice", "soft_dice_from_probs"]
