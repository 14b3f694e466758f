"""Calibration metrics of the SDC, ACE and DSC++ papers on one case or pooled over a data set.

Inputs (all functions)
----------------------
``probs``: floating array ``(C, *spatial)`` exactly as nnU-Net writes it (2D or 3D, any spatial
rank): either softmax probabilities *including* the background channel 0 (``regions=False``, the
default; channel ``c`` belongs to label ``c``), or, for region-based datasets, sigmoid probabilities
of the regions *without* a background channel (``regions=True``, meaning the same as in
:mod:`nnunet_calibration.losses`: the channels are independent sigmoid regions; the regions' label
tuples of dataset.json are then passed in channel order as ``region_labels``, e.g.
``[(1, 2, 3), (2, 3), (3,)]`` for BraTS whole tumour, tumour core, enhancing tumour).
``labels``: integer array ``(*spatial)``, the reference label map (label values, not regions).

Region semantics: with ``regions=True``, channel ``r`` is the binary task "voxel is in region r"
(``label in regions[r]``) with predicted probability ``p_r``; it is treated exactly like a two-class
softmax ``(1 - p_r, p_r)``. ``ece``, ``cece`` and the marginal errors are computed per region and
averaged over regions; ``pece`` uses the largest region probability ``max_r p_r`` as foreground
probability; ``nll`` and ``brier`` average the binary per-region values over regions.

Binning: see :mod:`nnunet_calibration.metrics._binning` (equal-width bins ``(e_{k-1}, e_k]``,
0 into the first bin and 1 into the last, empty bins skipped; pECE: 0 into no bin). ``ece`` and
``cece`` also take ``binning="adaptive"``: equal-mass bins, see :mod:`._adaptive` (how the edges are
formed, ties, more bins than values) and its exact mergeable statistics :class:`~._adaptive.ValueStats`.

Undefined values are returned as NaN (e.g. ECE of a case without foreground voxels).

Structure (torchmetrics style)
------------------------------
Every binned metric ``X`` is split into ``_X_arg_validation`` (types, shapes, and with
``validate_args`` the values), ``_X_update(probs, labels, ...) -> BinStats`` (per-bin sufficient
statistics, see :class:`~nnunet_calibration.metrics._binning.BinStats`), merging by addition, and
``_X_compute(stats)``. The public function is update + compute on one case. The
:class:`~.accumulator.CalibrationAccumulator` does all updates in one pass over the voxels, can be
pickled, merged and computed, and so gives exact dataset-wide ("pooled") values.

Modules: input checks in :mod:`._checks`, chunking and the per-chunk cache in :mod:`._chunk`, the
per-chunk kernels in :mod:`._kernels`, binning and statistics in :mod:`._binning`, the accumulator in
:mod:`.accumulator`; this module holds the public functions and their update/compute steps.

Memory and speed: the voxels are processed in chunks of ``CHUNK_VOXELS`` voxels; the bin of every
value is found in a vectorised way and the per-bin counts and sums are accumulated with
``np.bincount`` (sums in float64). No full-size copy of ``probs`` is made. Segmentation outputs are
mostly background, so per channel only the voxels above the first bin edge are binned one by one;
the first bin is the totals minus those. Within a chunk the accumulator computes each shared
quantity once (a channel's voxels above the smaller of the CECE threshold and the first ACE edge,
its float64 sums and reference counts; the 10 CECE bins folded from the 20 ACE bins when their edges
nest exactly), so all metrics cost little more than the most expensive one. Sharing changes the
order of some float64 additions, nothing else (tests against naive per-bin loops, rel. 1e-9).
"""
from __future__ import annotations

from typing import Dict, Union

import numpy as np

from ._adaptive import ValueStats, check_binning
from ._binning import BinStats, SumStats, bin_edges
from ._checks import (SOFTMAX_SUM_TOLERANCE, Regions, _check_types_and_shapes, _validate, normalize_regions,
                      resolve_region_labels, validate_inputs, validate_labels, validate_probabilities)
from ._chunk import _work_dtype
from ._kernels import (_brier_kernel, _cece_kernel, _cece_values, _class_channels, _ece_kernel, _ece_tasks,
                       _ece_values, _marginal_kernel, _nanmean_or_nan, _nll_kernel, _pece_kernel, _run, _run_adaptive,
                       _weighted_ece_per_task)

__all__ = [
    "ece", "cece", "pece", "marginal_calibration_errors", "nll", "brier",
    "validate_inputs", "validate_probabilities", "validate_labels", "normalize_regions", "resolve_region_labels",
    "SOFTMAX_SUM_TOLERANCE",
]


# --------------------------------------------------------------------------------------------------
# ECE
# --------------------------------------------------------------------------------------------------
def _ece_arg_validation(probs, labels, n_bins, regions, validate_args, binning="uniform"):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    check_binning(binning)
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _ece_update(probs, labels, n_bins: int = 15, regions: Regions = None, binning: str = "uniform"
                ) -> Union[BinStats, ValueStats]:
    """``binning="uniform"``: per-bin :class:`BinStats`; ``"adaptive"``: :class:`ValueStats` (exact
    and mergeable, binned equal-mass when computed)."""
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    n_tasks = _ece_tasks(probs.shape[0], regions)
    if check_binning(binning) == "adaptive":
        return _run_adaptive(probs, labels, regions, _ece_values, n_tasks, n_bins)
    stats = BinStats.zeros(n_tasks, n_bins)
    _run(probs, labels, regions, _ece_kernel, stats, bin_edges(n_bins, _work_dtype(probs)))
    return stats


def _binned(stats: Union[BinStats, ValueStats]) -> BinStats:
    return stats.equal_mass() if isinstance(stats, ValueStats) else stats


def _ece_compute(stats: Union[BinStats, ValueStats]) -> float:
    return _nanmean_or_nan(_weighted_ece_per_task(_binned(stats)))


def ece(probs, labels, n_bins: int = 15, regions: bool = False, region_labels: Regions = None,
        validate_args: bool = True, binning: str = "uniform") -> float:
    """Foreground ECE, Eq. 6 of the SDC paper (appendix A.1), as the NACL code computes it.

    Softmax: only voxels whose *reference* label is foreground (``label != 0``) are used;
    confidence = largest class probability (background included), accuracy =
    ``argmax_c p_c == label`` (ties: the lowest channel, as ``np.argmax``);
    ``ECE = sum_b |B_b|/N |mean conf_b - mean acc_b|`` with N = number of foreground voxels,
    empty bins skipped. Bins: ``binning="uniform"`` (default): equal-width ``(e_{k-1}, e_k]`` bins
    (:mod:`._binning`); ``"adaptive"``: ``n_bins`` equal-mass bins of the confidences (the adaptive
    calibration error of Nixon et al. 2019; edges and ties as in :mod:`._adaptive`).
    Regions: per region r the voxels inside region r, confidence ``max(p_r, 1 - p_r)``, accuracy
    ``p_r > 0.5`` (nnU-Net's region threshold); mean over regions that have voxels (adaptive: equal-
    mass bins per region).
    Returns NaN if there are no foreground voxels.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _ece_arg_validation(probs, labels, n_bins, regions, validate_args, binning)
    return _ece_compute(_ece_update(probs, labels, n_bins, regions, binning))


# --------------------------------------------------------------------------------------------------
# CECE
# --------------------------------------------------------------------------------------------------
def _cece_arg_validation(probs, labels, n_bins, threshold, regions, validate_args, binning="uniform"):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    check_binning(binning)
    if not (0 <= float(threshold) < 1):
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _cece_update(probs, labels, n_bins: int = 10, threshold: float = 1e-3, regions: Regions = None,
                 binning: str = "uniform") -> Union[BinStats, ValueStats]:
    """Per-bin :class:`BinStats` (uniform) or :class:`ValueStats` (adaptive), as :func:`_ece_update`."""
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    n_tasks = len(_class_channels(probs.shape[0], regions, False))
    if check_binning(binning) == "adaptive":
        return _run_adaptive(probs, labels, regions, _cece_values, n_tasks, n_bins, threshold)
    stats = BinStats.zeros(n_tasks, n_bins)
    _run(probs, labels, regions, _cece_kernel, stats, bin_edges(n_bins, _work_dtype(probs)), threshold)
    return stats


def _cece_compute(stats: Union[BinStats, ValueStats]) -> float:
    return _nanmean_or_nan(_weighted_ece_per_task(_binned(stats)))


def cece(probs, labels, n_bins: int = 10, threshold: float = 1e-3, regions: bool = False,
         region_labels: Regions = None, validate_args: bool = True, binning: str = "uniform") -> float:
    """Class-wise ECE (SDC paper Eq. 7, threshold as in Kull et al.).

    For every *foreground* class c (softmax channels 1..C-1, or every region): keep the voxels with
    ``p_c > threshold`` (strictly greater); binary ECE of ``p_c`` against ``[label == c]`` (regions:
    ``[label in region]``) over the kept voxels, count-weighted over the non-empty bins (denominator:
    number of kept voxels of that class). CECE = mean over the classes that kept at least one voxel
    (NaN if none did). Whether a class is present in the reference does not matter.
    Bins: ``binning="uniform"`` (default) equal-width bins; ``"adaptive"``: ``n_bins`` equal-mass bins
    of each class's kept values ``p_c`` (edges and ties as in :mod:`._adaptive`).
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _cece_arg_validation(probs, labels, n_bins, threshold, regions, validate_args, binning)
    return _cece_compute(_cece_update(probs, labels, n_bins, threshold, regions, binning))


# --------------------------------------------------------------------------------------------------
# pECE
# --------------------------------------------------------------------------------------------------
def _pece_arg_validation(probs, labels, n_bins, fp_weight, regions, validate_args):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    if not np.isfinite(fp_weight):
        raise ValueError(f"fp_weight must be finite, got {fp_weight}")
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _pece_update(probs, labels, n_bins: int = 10, regions: Regions = None) -> BinStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = BinStats.zeros(1, n_bins)
    _run(probs, labels, regions, _pece_kernel, stats, bin_edges(n_bins, _work_dtype(probs)))
    return stats


def _pece_compute(stats: BinStats, fp_weight: float = 2.0) -> float:
    total = int(stats.total[0])
    if total == 0:
        return float("nan")
    n = stats.bin_count[0].astype(np.float64)
    ne = n > 0
    mean_p = stats.confidence_sum[0][ne] / n[ne]
    mean_a = stats.outcome_sum[0][ne] / n[ne]
    fp_n = stats.count[0, :, 0][ne]
    fp_mean = np.where(fp_n > 0, stats.conf_sum[0, :, 0][ne] / np.maximum(fp_n, 1), 0.0)
    return float((n[ne] / total * np.abs(mean_p - mean_a + fp_weight * fp_mean)).sum())


def pece(probs, labels, n_bins: int = 10, fp_weight: float = 2.0, regions: bool = False,
         region_labels: Regions = None, validate_args: bool = True) -> float:
    """Pixel-wise ECE with false-positive offset, Algorithm 1 of the SDC paper, exactly.

    ``p`` = foreground probability, ``1 - p_background`` (computed in the dtype of ``probs``) for
    softmax, the largest region probability ``max_r p_r`` for regions; ``y = [label != 0]``.
    Bins are ``(lo, hi]`` *literally*: a voxel with ``p = 0`` is in no bin, but ``total`` counts every
    voxel. Per non-empty bin: ``offset = fp_weight * mean p of the bin's y = 0 voxels`` (0 if none)
    and the bin adds ``n_b / total * |(mean p_b - mean y_b) + offset|``.

    Note: pECE is **not** zero for a perfectly calibrated model: the offset is non-negative and is
    added inside the absolute value, so any bin holding negatives with ``p > 0`` contributes even
    when ``mean p_b == mean y_b`` (e.g. all voxels at p = 0.5 with half of them foreground give
    ``|0 + 2 * 0.5| = 1``). It is zero only if the predicted foreground probability is 0 on every
    background voxel and matches the foreground frequency in every bin.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _pece_arg_validation(probs, labels, n_bins, fp_weight, regions, validate_args)
    return _pece_compute(_pece_update(probs, labels, n_bins, regions), fp_weight)


# --------------------------------------------------------------------------------------------------
# marginal L1 ACE / ECE / MCE
# --------------------------------------------------------------------------------------------------
def _marginal_arg_validation(probs, labels, n_bins, regions, validate_args):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _marginal_update(probs, labels, n_bins: int = 20, include_background: bool = False,
                     regions: Regions = None) -> BinStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = BinStats.zeros(len(_class_channels(probs.shape[0], regions, include_background)), n_bins)
    _run(probs, labels, regions, _marginal_kernel, stats, bin_edges(n_bins, _work_dtype(probs)),
         include_background)
    return stats


def _marginal_per_class(stats: BinStats) -> Dict[str, np.ndarray]:
    """Per class: ACE (mean |gap| over non-empty bins), ECE (count-weighted), MCE (max); NaN if empty."""
    n = stats.bin_count.astype(np.float64)
    ne = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(stats.confidence_sum - stats.outcome_sum) / n
    gap_ne = np.where(ne, gap, 0.0)
    n_ne = ne.sum(-1)
    n_tot = n.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ace = np.where(n_ne > 0, gap_ne.sum(-1) / np.maximum(n_ne, 1), np.nan)
        ece_ = np.where(n_tot > 0, (gap_ne * n).sum(-1) / np.maximum(n_tot, 1), np.nan)
        mce = np.where(n_ne > 0, np.where(ne, gap, -np.inf).max(-1), np.nan)
    return {"mL1-ACE": ace, "mL1-ECE": ece_, "mL1-MCE": mce}


def _marginal_compute(stats: BinStats) -> Dict[str, float]:
    return {k: _nanmean_or_nan(v) for k, v in _marginal_per_class(stats).items()}


def marginal_calibration_errors(probs, labels, n_bins: int = 20, include_background: bool = False,
                                regions: bool = False, region_labels: Regions = None,
                                validate_args: bool = True) -> Dict[str, float]:
    """Marginal L1 calibration errors of the ACE paper (Eqs. 1, 3, 4): mL1-ACE, mL1-ECE, mL1-MCE.

    Per class c (softmax channels 1..C-1, or 0..C-1 with ``include_background``; every region for
    region inputs, where ``include_background`` has no effect): ``p_c`` of *all* voxels against
    ``o = [label == c]`` (regions: ``[label in region]``) in ``n_bins`` equal-width bins. With
    ``gap_b = |mean o_b - mean p_b|`` over the non-empty bins: ACE_c = unweighted mean of gap_b,
    ECE_c = ``sum_b n_b/N gap_b`` (N = all voxels), MCE_c = ``max_b gap_b``. Each is then averaged
    over the classes. A class absent from the reference still counts (its observed frequency is 0
    in every bin, so its gaps are its mean probabilities).
    Returns ``{"mL1-ACE": .., "mL1-ECE": .., "mL1-MCE": ..}``.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _marginal_arg_validation(probs, labels, n_bins, regions, validate_args)
    return _marginal_compute(_marginal_update(probs, labels, n_bins, include_background, regions))


# --------------------------------------------------------------------------------------------------
# NLL and Brier
# --------------------------------------------------------------------------------------------------
def _nll_update(probs, labels, eps: float = 1e-7, regions: Regions = None) -> SumStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = SumStats()
    _run(probs, labels, regions, _nll_kernel, stats, eps)
    return stats


def _nll_compute(stats: SumStats) -> float:
    return stats.mean()


def nll(probs, labels, eps: float = 1e-7, regions: bool = False, region_labels: Regions = None,
        validate_args: bool = True) -> float:
    """Negative log-likelihood (the DSC++ paper's NLL = cross-entropy), mean over voxels.

    Softmax: ``mean_i -log(max(p_{label_i}, eps))`` over all voxels (background included).
    Regions: binary NLL per region, ``-log(max(q, eps))`` with ``q = p_r`` inside and ``1 - p_r``
    outside the region, averaged over voxels and regions. ``eps = 1e-7`` clips zero probabilities
    (a voxel whose reference class got probability 0 costs ``-log(1e-7) = 16.1``). The clipping and
    the logarithm are computed in the dtype of ``probs`` (float32 for nnU-Net output, relative
    error ~1e-7), the sum over voxels in float64.
    """
    probs, labels, regions = _check_types_and_shapes(probs, labels, resolve_region_labels(regions, region_labels))
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if validate_args:
        _validate(probs, labels, regions)
    return _nll_compute(_nll_update(probs, labels, eps, regions))


def _brier_update(probs, labels, regions: Regions = None) -> SumStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = SumStats()
    _run(probs, labels, regions, _brier_kernel, stats)
    return stats


def _brier_compute(stats: SumStats) -> float:
    return stats.mean()


def brier(probs, labels, regions: bool = False, region_labels: Regions = None, validate_args: bool = True) -> float:
    """Brier score of the DSC++ paper (Eq. 11): ``mean_i (1/C) sum_c (p_{c,i} - onehot_{c,i})^2``.

    Softmax: C channels including background, one-hot of the label. Regions: ``(1/R) sum_r
    (p_r - [label in region r])^2`` (equal to the two-class Brier of ``(1 - p_r, p_r)``).
    """
    probs, labels, regions = _check_types_and_shapes(probs, labels, resolve_region_labels(regions, region_labels))
    if validate_args:
        _validate(probs, labels, regions)
    return _brier_compute(_brier_update(probs, labels, regions))
