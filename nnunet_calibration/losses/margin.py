"""The spatially aware label-smoothing / margin losses: SVLS, MbLS, NACL and the morphological variants
of SVLS and NACL (SDC paper Eq. 2, Table 6). Conventions and notation as in :mod:`.calibration`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ._common import CalibrationLoss, Prepared, _onehot, ce_per_voxel, masked_mean, onehot_from_labels
from .morphology import (MORPH_OPS, _check_size, _maxpool, box_kernel, local_target, morph, normalize_over_classes,
                         svls_sep_kernel)


_MORPH_FORM_DOC = """
    Morphological variants (SDC paper section 3.2, Eq. 2, Table 6; ``morph`` not ``"none"``), by
    default (``margin_on="probs"``) as the authors' code (EagleAdelaide/SDC-Loss, ``sam.py`` /
    ``losses.py``) computes them::

        CE(z, y) + alpha * mean over voxels and classes of |p_c - y~_m,c|

    with ``y~_m = normalise_c(filter(M(y)))``: the operator ``M`` (3x3(x3) element) on each class's
    binary mask, the neighbourhood filter, then division by the sum over classes; where no class
    survives in the window the target is all-zero (the code's ``clamp_min`` division), so there
    ``sum_c |p_c - 0| = 1`` is constant. Where code and paper differ, the code is followed:

    * the CE term uses the ORIGINAL mask ``y`` (code: ``cross_entropy(logits, labels)``); Eq. 2
      writes ``L_CE(z, y_m)``. The paper's Table 3 (DSC 0.85-0.86 for every operator, the gradient
      included) is only possible with CE on ``y``: a network trained to predict the gradient band
      would not segment. ``ce_target="transformed"`` gives the literal Eq. 2 for ablations: the
      soft-label CE against ``y_m = normalise_c(M(y))`` (each class's mask after the operator,
      divided by its sum over classes; a voxel where no class survives adds 0);
    * the margin term is the mean absolute difference (code: ``abs().mean()``, an L1 norm divided by
      the number of voxels and classes); Eq. 2 writes a norm without saying which.

    Window borders: replicate padding here (OpenCV's ``blur`` reflects), which differs only on the
    outermost voxels of the patch.
"""


def _check_ce_target(ce_target: str, op: str, margin_on: str) -> str:
    if ce_target not in ("y", "transformed"):
        raise ValueError(f"ce_target must be 'y' (the authors' code) or 'transformed' (Eq. 2 literally), got "
                         f"{ce_target!r}")
    if ce_target == "transformed" and (op == "none" or margin_on != "probs"):
        raise ValueError("ce_target='transformed' is the literal Eq. 2 of a morphological variant "
                         "(morph not 'none', margin_on='probs')")
    return ce_target


def _morph_ce(prep: Prepared, ce_target: str, op: str, size: int, axes) -> Tensor:
    """Per-voxel CE of a morphological variant: on ``y`` (the authors' code), or for
    ``ce_target="transformed"`` the soft-label CE against ``normalise_c(M(y))`` (Eq. 2 literally)."""
    if ce_target == "y":
        return ce_per_voxel(prep.logits, prep.labels)
    with torch.no_grad():
        y_m = normalize_over_classes(morph(_onehot(prep), op, size, prep.valid, axes))
    return -(y_m * F.log_softmax(prep.logits, 1)).sum(1)


class SVLSLoss(CalibrationLoss):
    """Spatially varying label smoothing (Islam & Glocker, IPMI 2021): CE against soft targets
    ``q = K * y`` with the SVLS kernel ``K`` (:func:`~.morphology.svls_kernel`: 3x3(x3) Gaussian of
    ``sigma``, centre weight replaced by the sum of the neighbours, normalised), replicate padding
    (mobarakol/SVLS). Default ``sigma = 2.0``. Ignore label: ignored voxels are excluded from the
    smoothing windows (normalised convolution, see :func:`~.morphology.filter_normalized`) and from
    the mean. Anisotropic 3D spacing (``spacing``, nnU-Net's rule): the 2D kernel in-plane (3x3x1).
    """ + _MORPH_FORM_DOC + """
    Here the filter is the SVLS kernel (the authors' code uses OpenCV's 3x3 Gaussian with sigma 1
    for "Margin SVLS"; ``sigma`` is kept as SVLS's hyperparameter), ``alpha = 0.1``.
    ``margin_on="soft_target"`` selects the earlier form instead: SVLS's soft-label CE against
    ``q = normalise_c(K * M(y))``, falling back to the one-hot ``y`` where no class survives
    (``alpha`` unused).
    """

    def __init__(self, sigma: float = 2.0, morph: str = "none", morph_size: int = 3, alpha: float = 0.1,
                 margin_on: Optional[str] = None, ce_target: str = "y", *, regions: bool = False,
                 ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        if morph not in MORPH_OPS:
            raise ValueError(f"unknown morphological operator {morph!r}; choose one of {MORPH_OPS}")
        if margin_on is None:
            margin_on = "soft_target" if morph == "none" else "probs"
        if margin_on not in ("probs", "soft_target"):
            raise ValueError(f"SVLS margin_on must be 'probs' (Eq. 2) or 'soft_target', got {margin_on!r}")
        self.sigma = float(sigma)
        svls_sep_kernel(self.sigma)  # validates sigma
        self.ce_target = _check_ce_target(ce_target, morph, margin_on)
        self.morph = morph
        self.morph_size = _check_size(morph_size)
        self.alpha = float(alpha)
        self.margin_on = margin_on

    def soft_target(self, prep: Prepared, axes=None) -> Tensor:
        with torch.no_grad():
            y = _onehot(prep)
            nd = y.ndim - 2 if axes is None else len(axes)
            k = svls_sep_kernel(self.sigma, 3, nd)
            return local_target(y, op=self.morph, kernel=k, size=self.morph_size, valid=prep.valid,
                                fallback="zero" if self.margin_on == "probs" else "onehot", axes=axes)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        q = self.soft_target(prep, self.window_axes(net_output))
        if self.margin_on == "probs":
            ce = _morph_ce(prep, self.ce_target, self.morph, self.morph_size, self.window_axes(net_output))
            margin = (torch.softmax(prep.logits, 1) - q).abs().mean(1)
            return masked_mean(ce + self.alpha * margin, prep.valid)
        logp = F.log_softmax(prep.logits, 1)
        return masked_mean(-(q * logp).sum(1), prep.valid)


class MbLSLoss(CalibrationLoss):
    """Margin-based label smoothing (Liu et al., CVPR 2022):
    ``CE + alpha * mean over voxels and classes of relu((max_j z_j - z_c) - m)`` (penalises logit
    distances LARGER than the margin). Defaults ``margin = 10``, ``alpha = 0.1``.
    Regions: logits ``(0, z)`` per region, i.e. the penalty is ``relu(|z| - m) / 2``."""


    def __init__(self, margin: float = 10.0, alpha: float = 0.1, *, regions: bool = False,
                 ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        self.margin = float(margin)
        self.alpha = float(alpha)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        z = prep.logits
        ce = ce_per_voxel(z, prep.labels)
        diff = z.amax(1, keepdim=True) - z
        pen = F.relu(diff - self.margin).mean(1)
        return masked_mean(ce + self.alpha * pen, prep.valid)


class NACLLoss(CalibrationLoss):
    """Neighbour-aware calibration loss (Murugesan et al., MICCAI 2023; Bala93/MarginLoss):
    ``CE + alpha * mean over voxels and classes of |t_c - z_c|`` (L1 between a local target and the
    LOGITS, as NACL's code). Defaults ``alpha = 0.1``, ``kernel_size = 3``, ``kernel = "mean"``
    (NACL's code default and its README's example; the SDC paper's Table 1 footnote used "min").

    Local target from the labels in each voxel's ``k x k (x k)`` window:

    * ``"mean"``: label proportions in the window (box filter of the one-hot reference);
    * ``"min"``: one-hot of the smallest label index in the window.

    Window handling: replicate padding (edge voxels are repeated, so the image border adds no
    foreign label; the reference code pads with zeros, which counts label 0 at the image border --
    not done here; for "min" replicate padding equals restricting the window to the image). Ignore label:
    ignored voxels are excluded from the windows ("mean": proportions among valid voxels; "min":
    ignored voxels never are the minimum) and from the mean. Anisotropic 3D spacing: in-plane
    ``k x k x 1`` windows. ``margin_on="probs"`` puts the plain NACL term on ``softmax(z)`` instead.
    """ + _MORPH_FORM_DOC + """
    Here the filter is NACL's mean (box) filter (``kernel="mean"`` only), ``alpha = 0.1``.
    ``margin_on="logits"`` selects the earlier form instead: NACL's logit term against
    ``normalise_c(box(M(y)))``, falling back to the one-hot ``y`` where no class survives.
    """

    def __init__(self, alpha: float = 0.1, kernel_size: int = 3, kernel: str = "mean",
                 morph: str = "none", morph_size: int = 3, margin_on: Optional[str] = None, ce_target: str = "y", *,
                 regions: bool = False, ignore_label: Optional[int] = None, spacing=None):
        super().__init__(regions=regions, ignore_label=ignore_label, spacing=spacing)
        if kernel not in ("mean", "min"):
            raise ValueError(f"NACL kernel must be 'mean' or 'min', got {kernel!r}")
        if morph not in MORPH_OPS:
            raise ValueError(f"unknown morphological operator {morph!r}; choose one of {MORPH_OPS}")
        if morph != "none" and kernel != "mean":
            raise ValueError("morphological NACL variants use the 'mean' kernel (got kernel='min')")
        if margin_on is None:
            margin_on = "logits" if morph == "none" else "probs"
        if margin_on not in ("probs", "logits"):
            raise ValueError(f"NACL margin_on must be 'probs' or 'logits', got {margin_on!r}")
        self.ce_target = _check_ce_target(ce_target, morph, margin_on)
        self.alpha = float(alpha)
        self.kernel_size = _check_size(kernel_size)
        self.kernel = kernel
        self.morph = morph
        self.morph_size = _check_size(morph_size)
        self.margin_on = margin_on

    def local_target(self, prep: Prepared, axes=None) -> Tensor:
        with torch.no_grad():
            c = prep.logits.shape[1]
            if self.kernel == "min":
                lab = prep.labels.to(prep.logits.dtype)
                if prep.valid is not None:
                    lab = torch.where(prep.valid, lab, torch.full_like(lab, float(c)))
                mn = (-_maxpool(-lab.unsqueeze(1), self.kernel_size, axes)).squeeze(1).long().clamp_max(c)
                return onehot_from_labels(mn, c + 1, dtype=prep.logits.dtype)[:, :c]
            y = _onehot(prep)
            k = box_kernel(self.kernel_size)
            fallback = "zero" if (self.morph != "none" and self.margin_on == "probs") else "onehot"
            return local_target(y, op=self.morph, kernel=k, size=self.morph_size, valid=prep.valid,
                                fallback=fallback, axes=axes)

    def forward(self, net_output: Tensor, target: Tensor) -> Tensor:
        prep = self.prepare(net_output, target)
        axes = self.window_axes(net_output)
        t = self.local_target(prep, axes)
        ce = _morph_ce(prep, self.ce_target, self.morph, self.morph_size, axes)
        pred = torch.softmax(prep.logits, 1) if self.margin_on == "probs" else prep.logits
        pen = (t - pred).abs().mean(1)
        return masked_mean(ce + self.alpha * pen, prep.valid)


__all__ = ["SVLSLoss", "MbLSLoss", "NACLLoss"]
