"""Two more estimates from the statistics of ECE and CECE: the signed class-wise calibration error
and the debiased L2 calibration error (Kumar et al. 2019).

Both are computed from the same mergeable sufficient statistics as :func:`.calibration.ece` /
:func:`.calibration.cece` (:class:`~._binning.BinStats`, or :class:`~._adaptive.ValueStats` for
equal-mass bins), so their pooled (dataset-wide) values are exact and a bootstrap over cases
(:mod:`.bootstrap`) needs nothing else.
"""
from __future__ import annotations

from typing import Union

import numpy as np

from ._adaptive import ValueStats
from ._binning import BinStats
from ._checks import Regions, resolve_region_labels
from ._kernels import _nanmean_or_nan
from .calibration import _binned, _cece_arg_validation, _cece_update, _ece_arg_validation, _ece_update

__all__ = ["signed_calibration_error", "debiased_l2_ece"]

Stats = Union[BinStats, ValueStats]


# --------------------------------------------------------------------------------------------------
# signed class-wise calibration error
# --------------------------------------------------------------------------------------------------
def _signed_compute(stats: Stats) -> np.ndarray:
    """Per task ``(sum of values - number of positives) / number of values``; NaN where there are none."""
    b = _binned(stats)
    n = b.bin_count.sum(-1).astype(np.float64)
    diff = (b.confidence_sum - b.outcome_sum).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, diff / np.maximum(n, 1), np.nan)


def signed_calibration_error(probs, labels, threshold: float = 1e-3, regions: bool = False,
                             region_labels: Regions = None, validate_args: bool = True) -> np.ndarray:
    """Signed calibration error of every foreground class: mean confidence minus observed frequency.

    Per class c, over the same voxels as :func:`.calibration.cece` (softmax channels 1..C-1 or every
    region; the voxels with ``p_c > threshold``), with ``n_b`` values, mean probability ``conf_b`` and
    frequency of ``[label == c]`` (regions: ``[label in region]``) ``acc_b`` in bin b:

        ``SCE_c = sum_b (n_b / N_c) (conf_b - acc_b) = mean(p_c) - mean([label == c])``

    The bin-weighted sum telescopes: it is the same for every binning (uniform or adaptive, any
    number of bins), so no bins are asked for. Positive = over-confident (the class is predicted
    with more probability than it occurs), negative = under-confident; its absolute value is a lower
    bound of the class's ECE term. Returns a float64 array with one value per class (channel order),
    NaN for a class that kept no voxel. ``threshold=0`` uses every voxel with ``p_c > 0``.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _cece_arg_validation(probs, labels, 1, threshold, regions, validate_args)
    return _signed_compute(_cece_update(probs, labels, 1, threshold, regions))


# --------------------------------------------------------------------------------------------------
# debiased L2 calibration error
# --------------------------------------------------------------------------------------------------
def _debiased_per_task(stats: Stats) -> np.ndarray:
    """Kumar et al.'s debiased estimate of the squared L2 calibration error of every task (NaN if empty)."""
    b = _binned(stats)
    n = b.bin_count.astype(np.float64)
    total = n.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        conf = b.confidence_sum / n
        acc = b.outcome_sum / n
        term = (conf - acc) ** 2 - acc * (1 - acc) / (n - 1)
        term = np.where(n >= 2, term, 0.0)  # a bin of fewer than 2 values adds 0
        return np.where(total > 0, (n * term).sum(-1) / np.maximum(total, 1), np.nan)


def _debiased_compute(stats: Stats, squared: bool = False) -> float:
    per = _debiased_per_task(stats)
    if squared:
        return _nanmean_or_nan(per)
    return _nanmean_or_nan(np.sqrt(np.maximum(per, 0.0)))


def debiased_l2_ece(probs, labels, n_bins: int = 15, binning: str = "uniform", squared: bool = False,
                    regions: bool = False, region_labels: Regions = None, validate_args: bool = True) -> float:
    """Debiased estimate of the L2 (root-mean-square) calibration error on ECE's voxels.

    Kumar, Liang, Ma: *Verified Uncertainty Calibration*, NeurIPS 2019, Section 5: the plug-in
    ``sum_b (n_b/N) (conf_b - acc_b)^2`` over-estimates the squared calibration error because
    ``acc_b`` is a mean of ``n_b`` Bernoulli outcomes; subtracting the variance estimate of each bin
    removes that bias to first order:

        ``CE^2 = sum_b (n_b / N) [ (conf_b - acc_b)^2 - acc_b (1 - acc_b) / (n_b - 1) ]``

    Voxels, confidence and correctness are those of :func:`.calibration.ece` (softmax: foreground
    voxels, top-label; regions: per region, mean over the regions with voxels); ``binning``
    ``"uniform"`` or ``"adaptive"`` (equal-mass, as Kumar et al. recommend). A bin with fewer than two
    values adds 0 (as in the authors' reference code; torch-uncertainty keeps its plug-in term, so the
    two agree when every non-empty bin has at least two values). ``squared=True`` returns the estimate
    of CE^2 itself, which can be negative for a well-calibrated model and is the quantity to average
    or bootstrap; ``squared=False`` returns ``sqrt(max(CE^2, 0))`` (per region, then averaged). This
    estimates the L2 error, not the L1 ECE of :func:`.calibration.ece` (with the same bins the plug-in
    values satisfy ``ECE <= L2``, Jensen's inequality). NaN without voxels.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _ece_arg_validation(probs, labels, n_bins, regions, validate_args, binning)
    return _debiased_compute(_ece_update(probs, labels, n_bins, regions, binning), squared)
