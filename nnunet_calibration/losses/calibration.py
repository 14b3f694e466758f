"""Calibration losses (pure torch, 2D/3D, plain labels or regions, ignore label).

Every class takes ONE resolution: ``forward(net_output, target)`` with nnU-Net's conventions (see
:mod:`nnunet_calibration.losses._common`); nnU-Net's ``DeepSupervisionWrapper`` handles the lists.
The spatially aware margin losses (SVLS, MbLS, NACL and their morphological variants) are in
:mod:`.margin`. Notation below: ``z`` logits, ``p = softmax(z)``, ``y`` one-hot reference, ``C`` channels
(classes; 2 per region under binary decomposition for regions), ``CE`` = mean cross-entropy over
valid voxels (torch semantics). "mean over voxels and classes of t_c" = mean over valid voxels of
``(1/C) sum_c t_c``. Defaults are the SDC paper's Table 1 (constructor defaults).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import CalibrationLoss, Prepared, _onehot, as_float, ce_per_voxel, masked_mean
from .dice import soft_dice_from_probs
from .margin import MbLSLoss, NACLLoss, SVLSLoss
from .morphology import MORPH_OPS, _check_size, box_kernel, local_target
from .sdf import reference_sdf


class CrossEntropy(CalibrationLoss):
    """Plain cross-entropy, ``mean over valid voxels of -log p_y`` (regions: binary CE with logits,
    mean over valid voxels and regions). ``WithDice(CrossEntropy())`` is nnU-Net's default loss."""


    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        return masked_mean(ce_per_voxel(prep.logits, prep.labels), prep.valid)


class FocalLoss(CalibrationLoss):
    """Focal loss (Lin et al. 2017): ``mean over voxels of -(1 - p_t)^gamma log p_t``,
    ``p_t`` = probability of the reference class. Default ``gamma = 3``."""


    def __init__(self, gamma: float = 3.0, *, regions: bool = False, ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.gamma = float(gamma)

    def focal_per_voxel(self, prep: Prepared) -> Tensor:
        logp = F.log_softmax(prep.logits, 1)
        logpt = logp.gather(1, prep.labels.unsqueeze(1)).squeeze(1)
        pt = logpt.exp()
        return -((1 - pt).clamp_min(0) ** self.gamma) * logpt

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        return masked_mean(self.focal_per_voxel(prep), prep.valid)


class ECPLoss(CalibrationLoss):
    """Entropy confidence penalty (Pereyra et al. 2017):
    ``CE - lambda * mean over voxels and classes of (-p_c log p_c)``. Default ``lam = 0.1``."""


    def __init__(self, lam: float = 0.1, *, regions: bool = False, ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.lam = float(lam)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        logp = F.log_softmax(prep.logits, 1)
        ce = -logp.gather(1, prep.labels.unsqueeze(1)).squeeze(1)
        ent = -(logp.exp() * logp).mean(1)
        return masked_mean(ce - self.lam * ent, prep.valid)


class LabelSmoothingLoss(CalibrationLoss):
    """Label smoothing (Szegedy et al. 2016): CE against ``(1 - alpha) y + alpha / C``.
    Default ``alpha = 0.1`` (regions: ``C = 2`` per region)."""


    def __init__(self, alpha: float = 0.1, *, regions: bool = False, ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.alpha = float(alpha)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        c = prep.logits.shape[1]
        q = (1 - self.alpha) * _onehot(prep) + self.alpha / c
        logp = F.log_softmax(prep.logits, 1)
        return masked_mean(-(q * logp).sum(1), prep.valid)


class FCLLoss(FocalLoss):
    """Focal calibration loss (Liang et al. 2024):
    ``focal + lambda * mean over voxels of sum_c (p_c - y_c)^2``. Defaults ``gamma = 3``,
    ``lam = 0.1``."""


    def __init__(self, gamma: float = 3.0, lam: float = 0.1, *, regions: bool = False,
                 ignore_label: Optional[int] = None, spacing=None):
        super().__init__(gamma, regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.lam = float(lam)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        brier = ((torch.softmax(prep.logits, 1) - _onehot(prep)) ** 2).sum(1)
        return masked_mean(self.focal_per_voxel(prep) + self.lam * brier, prep.valid)


class SDCLoss(CalibrationLoss):
    """Signed distance calibration loss (Liang et al. 2025, "We Care Each Pixel"), Eq. 1:

    ``CE + alpha * mean over voxels and classes of |p_c - t_c|
    + lambda_sdf * mean over voxels and channels of |sdf_pred_k - s_k|``.

    * ``t = normalise_c(box_3(gradient(y)))``: morphological gradient (3x3(x3) element) of the
      one-hot reference, 3x3(x3) mean filter, divided by the sum over classes. Where no class has a
      boundary in the window the target is all-zero (as in the paper's code): there
      ``sum_c |p_c - 0| = 1`` is constant, so the term acts only near boundaries.
    * ``s = reference_sdf(y_fg)`` (:func:`~.sdf.reference_sdf`, negative inside, positive outside,
      0 on the boundary, in [-1, 1]) of the foreground classes (labels: channels 1..C-1) or the
      regions; ``sdf_pred`` is the auxiliary head's tanh output ``(B, K, *spatial)``, K = C - 1 or R.
      It is compared with the SAME sign convention (the paper's code compares ``2p - 1`` with the
      SDF, opposite signs: not copied).
    * ``sdf_pred=None`` drops the SDF term; :meth:`sdf_term` is that term alone (``lambda_sdf``
      included). nnU-Net's trainers apply ``CE + alpha * local`` to every deep-supervision output
      with nnU-Net's weights and add :meth:`sdf_term` ONCE, on the full-resolution output, so the
      effective SDF weight is exactly ``lambda_sdf`` (Eq. 1), independent of those weights.
    * 3D with ``spacing`` (the configuration's): ``s`` is measured in millimetres (exact
      anisotropic EDT) before the normalisation; for an anisotropic spacing (nnU-Net's rule,
      :func:`~.morphology.window_axes`) the morphology, mean filter and SDF boundary are in-plane
      (3x3x1), as the authors process 3D volumes slice by slice. 2D: voxel units, 3x3.

    Ignore label: excluded from the windows and every mean; for the reference SDF, ignored voxels
    count as outside every class. Defaults ``alpha = 0.1``, ``lambda_sdf = 0.1``; ``morph``
    (default ``"gradient"``) and ``kernel_size`` (mean filter side, default 3) are ablation hooks.
    ``sdf_chunk_bytes`` bounds the EDT's temporary memory (default 8 MB on CPU, 256 MB on CUDA).
    """

    def __init__(self, alpha: float = 0.1, lambda_sdf: float = 0.1, morph: str = "gradient",
                 kernel_size: int = 3, *, regions: bool = False, ignore_label: Optional[int] = None,
                 spacing=None, sdf_chunk_bytes: Optional[int] = None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        if morph not in MORPH_OPS:
            raise ValueError(f"unknown morphological operator {morph!r}; choose one of {MORPH_OPS}")
        self.alpha = float(alpha)
        self.lambda_sdf = float(lambda_sdf)
        self.morph = morph
        self.kernel_size = _check_size(kernel_size)
        self.sdf_chunk_bytes = sdf_chunk_bytes

    def sdf_channels(self, net_output: Tensor) -> int:
        """Number of SDF head channels expected for ``net_output``."""
        return net_output.shape[1] if self.regions else net_output.shape[1] - 1

    def forward(self, net_output: Tensor, target: Tensor, sdf_pred: Optional[Tensor] = None) -> Tensor:
        """``CE + alpha * local`` (+ :meth:`sdf_term` if ``sdf_pred`` is given)."""
        prep = self.prepare(net_output, target)
        y = _onehot(prep)
        with torch.no_grad():
            k = box_kernel(self.kernel_size)
            t = local_target(y, op=self.morph, kernel=k, size=3, valid=prep.valid, fallback="zero",
                             axes=self.window_axes(net_output))
        ce = ce_per_voxel(prep.logits, prep.labels)
        local = (torch.softmax(prep.logits, 1) - t).abs().mean(1)
        loss = masked_mean(ce + self.alpha * local, prep.valid)
        if sdf_pred is None:
            return loss
        return loss + self.sdf_term(net_output, target, sdf_pred)

    def sdf_term(self, net_output: Tensor, target: Tensor, sdf_pred: Tensor) -> Tensor:
        """``lambda_sdf * mean over valid voxels and channels of |sdf_pred - s|`` (weight included).

        The trainers add this once, on the full-resolution output, with weight exactly
        ``lambda_sdf`` (not multiplied by a deep-supervision weight)."""
        b = net_output.shape[0]
        kch = self.sdf_channels(net_output)
        if sdf_pred.shape != (b, kch, *net_output.shape[2:]):
            raise ValueError(f"SDCLoss: sdf_pred must have shape {(b, kch, *net_output.shape[2:])} "
                             f"(one channel per foreground class/region), got {tuple(sdf_pred.shape)}")
        if self.lambda_sdf == 0:
            return torch.zeros((), dtype=as_float(sdf_pred).dtype, device=sdf_pred.device)
        prep = self.prepare(net_output, target)
        y = _onehot(prep)
        sp = y.shape[2:]
        if self.regions:
            fg = y[:, 1].reshape(b, kch, *sp)
            valid = None if prep.valid is None else prep.valid.reshape(b, kch, *sp)[:, 0]
        else:
            fg = y[:, 1:]
            valid = prep.valid
        if valid is not None:
            fg = fg * valid.unsqueeze(1).to(fg.dtype)
        sdf_pred = as_float(sdf_pred)
        s = reference_sdf(fg, self.sdf_chunk_bytes, spacing=self.mm_spacing(net_output),
                          axes=self.window_axes(net_output)).to(sdf_pred.dtype)
        l1 = (sdf_pred - s).abs().mean(1)
        return self.lambda_sdf * masked_mean(l1, valid)


class DSCPlusPlusLoss(CalibrationLoss):
    """DSC++ (Yeung et al. 2023; mlyg/DicePlusPlus), optionally plus CE.

    Per sample ``b`` and class ``c`` over valid voxels: ``tp = sum y p``,
    ``fn = sum (y (1 - p))^gamma``, ``fp = sum ((1 - y) p)^gamma``,
    ``dice = (2 tp + eps) / (2 tp + fn + fp + eps)``; loss ``= mean_{b,c}(1 - dice)``
    (+ ``ce_weight * CE`` if ``ce_weight > 0``).

    * ``eps = 1e-7`` (Keras' epsilon, as in the reference code; no clipping of ``p``).
    * Background: included for plain labels (``include_background=True``, the reference code
      averages over all softmax channels); regions: all R sigmoid channels (there is no background).
    * Empty classes (absent in a sample, ``tp = fn = 0``): ``dice = eps / (fp + eps)``, i.e. they
      contribute ~1 unless nothing is predicted (as in the reference).
    * Default ``gamma = 2``.
    """


    def __init__(self, gamma: float = 2.0, ce_weight: float = 0.0, eps: float = 1e-7,
                 include_background: bool = True, *, regions: bool = False,
                 ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.gamma = float(gamma)
        self.ce_weight = float(ce_weight)
        self.eps = float(eps)
        self.include_background = bool(include_background)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        pv = self.prob_view(net_output, target)
        p, y = pv.probs, pv.onehot
        if not self.regions and not self.include_background:
            p, y = p[:, 1:], y[:, 1:]
        axes = tuple(range(2, p.ndim))
        m = None if pv.valid is None else pv.valid.to(p.dtype)
        tp_v = y * p
        fn_v = (y * (1 - p)) ** self.gamma
        fp_v = ((1 - y) * p) ** self.gamma
        if m is not None:
            tp_v, fn_v, fp_v = tp_v * m, fn_v * m, fp_v * m
        tp, fn, fp = tp_v.sum(axes), fn_v.sum(axes), fp_v.sum(axes)
        dice = (2 * tp + self.eps) / (2 * tp + fn + fp + self.eps)
        loss = (1 - dice).mean()
        if self.ce_weight:
            prep = self.prepare(net_output, target)
            loss = loss + self.ce_weight * masked_mean(ce_per_voxel(prep.logits, prep.labels), prep.valid)
        return loss


def _n_bins(n_bins) -> int:
    """``n_bins`` as an int >= 1 (the metrics' name; ``num_bins`` was renamed to it)."""
    n_bins = int(n_bins)
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    return n_bins


def hard_binned_l1_ace(probs: Tensor, onehot: Tensor, valid: Optional[Tensor], n_bins: int = 20) -> Tensor:
    """Marginal L1 average calibration error (Barfoot et al., MICCAI 2024), differentiable.

    For each sample ``b`` and channel ``c``: the valid voxels are hard-binned by ``p`` into
    ``n_bins`` equal bins, bins ``(m/M, (m+1)/M]`` except the first, ``[0, 1/M]`` (torch
    ``bucketize(right=False)`` on the upper edges, as cai4cai/ACE-DLIRIS); per non-empty bin
    ``|mean(p) - mean(y)|``; mean over non-empty bins; then mean over ``(b, c)`` pairs having at
    least one valid voxel. The bin assignment is constant, so gradients flow through the bin means.
    """
    nb = _n_bins(n_bins)
    b, c = probs.shape[:2]
    p = probs.reshape(b, c, -1)
    y = onehot.reshape(b, c, -1).to(p.dtype)
    if valid is None:
        w = torch.ones_like(p)
    else:
        w = valid.reshape(b, 1, -1).to(p.dtype).expand_as(p)
    with torch.no_grad():
        edges = torch.linspace(0.0, 1.0 + torch.finfo(torch.float32).eps, nb + 1, device=p.device)[1:]
        idx = torch.bucketize(p.detach().float().contiguous(), edges, right=False).clamp_max(nb - 1)
    zeros = torch.zeros(b, c, nb, device=p.device, dtype=p.dtype)
    cnt = zeros.scatter_add(2, idx, w)
    sp = zeros.scatter_add(2, idx, p * w)
    sy = zeros.scatter_add(2, idx, y * w)
    nonempty = cnt > 0
    gap = (sp - sy).abs() / cnt.clamp_min(1)
    gap = torch.where(nonempty, gap, torch.zeros_like(gap))
    n_used = nonempty.sum(-1)
    ace = gap.sum(-1) / n_used.clamp_min(1).to(p.dtype)
    has = n_used > 0
    return torch.where(has, ace, torch.zeros_like(ace)).sum() / has.sum().clamp_min(1).to(p.dtype)


class ACELoss(CalibrationLoss):
    """mL1-ACE auxiliary loss combinations (Barfoot et al., MICCAI 2024):
    ``ce_weight * CE + dice_weight * Dice + ace_weight * mL1-ACE``.

    * mL1-ACE: :func:`hard_binned_l1_ace` on softmax probabilities of ALL classes (background
      included, as the reference ``include_background=True``) or on the region sigmoids;
      ``n_bins = 20``.
    * Dice: nnU-Net's Dice term (:class:`~.dice.SoftDice`: do_bg False/True, smooth 1e-5,
      ``batch_dice`` from the plans, negative sign), so that ``ce + dice`` matches nnU-Net's DiceCE
      baseline; the ACE paper used MONAI's DiceLoss (1 - Dice, background included, per sample).
    * Weights: equal, 1 each by default (the reference uses 1/2 or 1/3 each: the same objective up
      to a global scale).

    Registry: ``ace_ce`` (CE + ACE), ``ace_dice`` (Dice + ACE), ``ace_dice_ce`` (Dice + CE + ACE).
    """


    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 0.0, ace_weight: float = 1.0,
                 n_bins: int = 20, batch_dice: bool = False, ddp: bool = False, *,
                 regions: bool = False, ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.ce_weight = float(ce_weight)
        self.dice_weight = float(dice_weight)
        self.ace_weight = float(ace_weight)
        self.n_bins = _n_bins(n_bins)
        self.batch_dice = bool(batch_dice)
        self.ddp = bool(ddp)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        pv = self.prob_view(net_output, target)
        loss = self.ace_weight * hard_binned_l1_ace(pv.probs, pv.onehot, pv.valid, self.n_bins)
        if self.dice_weight:
            loss = loss + self.dice_weight * soft_dice_from_probs(
                pv, batch_dice=self.batch_dice, do_bg=self.regions, smooth=1e-5, ddp=self.ddp)
        if self.ce_weight:
            prep = self.prepare(net_output, target)
            loss = loss + self.ce_weight * masked_mean(ce_per_voxel(prep.logits, prep.labels), prep.valid)
        return loss


__all__ = ["CrossEntropy", "FocalLoss", "ECPLoss", "LabelSmoothingLoss", "SVLSLoss", "MbLSLoss",
           "NACLLoss", "FCLLoss", "SDCLoss", "DSCPlusPlusLoss", "ACELoss", "hard_binned_l1_ace"]
