"""Case-level confidence scores: how sure the model is of one case's segmentation, without a reference.

Inputs: ``probs`` as in :mod:`.calibration` (softmax ``(C, *spatial)`` with background, or sigmoid
regions with ``regions=True`` and ``region_labels``), and ``pred``, the predicted label map
``(*spatial)`` that nnU-Net writes (label values; for regions the label map it builds from the
regions). Predicted foreground ``F = {pred != 0}``. Each score states its direction; a score where
"higher = less confident" has to be negated before it is used as a confidence in
:mod:`.risk_coverage` (where a higher score is accepted first).
"""
from __future__ import annotations

from itertools import combinations
from typing import Optional, Sequence

import numpy as np
from scipy.special import entr

from ._binning import CHUNK_VOXELS, sum64
from ._checks import (Regions, _check_types_and_shapes, in_region, normalize_regions, resolve_region_labels,
                      validate_labels)
from ._chunk import _chunks, _work_dtype
from .boundary import boundary_band

__all__ = ["foreground_entropy", "boundary_entropy", "expected_dice", "uncertain_fraction", "mean_pairwise_dice"]


def _inputs(probs, pred, regions, region_labels, validate_args):
    regions = resolve_region_labels(regions, region_labels)
    probs, pred, regions = _check_types_and_shapes(probs, pred, regions)
    if validate_args:
        validate_labels(pred, range(probs.shape[0]) if regions is None
                        else sorted({0, *[i for r in regions for i in r]}))
    return probs, pred, regions


def _mean_normalized_entropy(probs: np.ndarray, idx: np.ndarray, regions) -> float:
    """Mean over the flat voxel indices ``idx`` of the normalised entropy (see :func:`foreground_entropy`)."""
    if idx.size == 0:
        return float("nan")
    flat = probs.reshape(probs.shape[0], -1)
    total = 0.0
    for s in range(0, idx.size, CHUNK_VOXELS):
        p = flat.take(idx[s:s + CHUNK_VOXELS], axis=1).astype(_work_dtype(probs), copy=False)
        if regions is None:
            total += sum64(entr(p)) / np.log(p.shape[0])
        else:
            total += (sum64(entr(p)) + sum64(entr(1 - p))) / (np.log(2.0) * p.shape[0])
    return total / idx.size


def foreground_entropy(probs, pred, regions: bool = False, region_labels: Regions = None,
                       validate_args: bool = True) -> float:
    """Mean normalised entropy over the predicted foreground. **Higher = less confident.**

    Per voxel, softmax: ``H = -sum_c p_c ln p_c / ln C`` (``0 ln 0 = 0``), in [0, 1] (1: uniform over
    the C channels); regions: the mean over the R regions of the binary entropy
    ``-(p ln p + (1-p) ln(1-p)) / ln 2``. Score: the mean of H over ``F = {pred != 0}``; NaN if F is
    empty.
    """
    probs, pred, regions = _inputs(probs, pred, regions, region_labels, validate_args)
    return _mean_normalized_entropy(probs, np.flatnonzero(pred.reshape(-1) != 0), regions)


def boundary_entropy(probs, pred, spacing=None, k_mm: Optional[float] = None, regions: bool = False,
                     region_labels: Regions = None, validate_args: bool = True) -> float:
    """Mean normalised entropy (as :func:`foreground_entropy`) over the boundary band of the
    prediction. **Higher = less confident.**

    Band: :func:`.boundary.boundary_band` of ``pred`` (voxels within ``k_mm`` mm of an interface
    between two predicted labels, both sides; default ``k_mm = 2 * max(spacing)``). NaN if the
    prediction has no boundary (no foreground, or one label everywhere).
    """
    probs, pred, regions = _inputs(probs, pred, regions, region_labels, validate_args)
    band = boundary_band(pred, spacing, k_mm)
    return _mean_normalized_entropy(probs, np.flatnonzero(band.reshape(-1)), regions)


def expected_dice(probs, pred, regions: bool = False, region_labels: Regions = None,
                  validate_args: bool = True) -> float:
    """Dice the model expects of its own prediction (soft Dice of the probabilities against ``pred``).
    **Higher = more confident.**

    Per foreground class c (softmax channels 1..C-1; regions: region r with predicted mask
    ``pred in region r`` and probability ``p_r``), with ``P_c = [pred == c]``:

        ``E_c = 2 sum_i p_{c,i} P_{c,i} / (sum_i p_{c,i} + sum_i P_{c,i})``

    If the reference were drawn voxel by voxel from the model's probabilities, ``2 sum p P`` and
    ``sum p + sum P`` would be the expectations of Dice's numerator and denominator, so ``E_c`` is
    their ratio (a close approximation of the expected Dice for structures of many voxels). Score:
    the mean of ``E_c`` over the classes that are predicted (``sum P_c > 0``); NaN if none is.
    """
    probs, pred, regions = _inputs(probs, pred, regions, region_labels, validate_args)
    tasks = range(1, probs.shape[0]) if regions is None else range(len(regions))
    s_p = np.zeros(probs.shape[0])
    s_pp = np.zeros(probs.shape[0])
    n_pred = np.zeros(probs.shape[0], np.int64)
    for pc, lc in _chunks(probs, pred):
        for t in tasks:
            mask = lc == t if regions is None else in_region(lc, regions[t])
            s_p[t] += sum64(pc[t])
            s_pp[t] += sum64(pc[t][mask])
            n_pred[t] += int(np.count_nonzero(mask))
    scores = [2 * s_pp[t] / (s_p[t] + n_pred[t]) for t in tasks if n_pred[t] > 0]
    return float(np.mean(scores)) if scores else float("nan")


def uncertain_fraction(probs, pred, threshold: float = 0.9, regions: bool = False,
                       region_labels: Regions = None, validate_args: bool = True) -> float:
    """Volume of the uncertain voxels relative to the predicted foreground volume.
    **Higher = less confident.**

    Uncertain voxel: its top-label probability is below ``threshold`` (default 0.9, i.e. more than
    10% of the probability is on other labels): softmax ``max_c p_c < threshold``; regions: some
    region has ``max(p_r, 1 - p_r) < threshold``. Uncertain voxels are counted anywhere in the image
    (the background side of a boundary too). Score: ``|uncertain| / |F|`` (0 for a sure prediction;
    can exceed 1); NaN if F is empty.
    """
    if not 0.5 <= threshold <= 1:
        raise ValueError(f"threshold must be in [0.5, 1], got {threshold}")
    probs, pred, regions = _inputs(probs, pred, regions, region_labels, validate_args)
    thr = _work_dtype(probs).type(threshold)
    n_unc = n_fg = 0
    for pc, lc in _chunks(probs, pred):
        if regions is None:
            sure = pc.max(0) >= thr
        else:
            sure = np.all(np.maximum(pc, 1 - pc) >= thr, axis=0)
        n_unc += sure.size - int(np.count_nonzero(sure))
        n_fg += int(np.count_nonzero(lc))
    return n_unc / n_fg if n_fg else float("nan")


def mean_pairwise_dice(label_maps: Sequence[np.ndarray], region_labels: Regions = None) -> float:
    """Mean Dice between every pair of several predictions of one case (e.g. the folds of a
    cross-validation ensemble). **Higher = more confident** (the predictions agree).

    Per pair (a, b) and per foreground label c (``region_labels``: per region, mask ``label in
    region``) present in a or b: ``Dice = 2 |a_c & b_c| / (|a_c| + |b_c|)``; the pair's score is the
    mean over those labels, 1.0 if neither map has foreground. Score: the mean over the
    ``K (K - 1) / 2`` pairs of the K maps (K >= 2, same shape, non-negative integer labels).
    """
    maps = [np.asarray(m) for m in label_maps]
    if len(maps) < 2:
        raise ValueError(f"need at least 2 label maps, got {len(maps)}")
    if any(m.shape != maps[0].shape for m in maps) or any(not np.issubdtype(m.dtype, np.integer) for m in maps):
        raise ValueError("label maps must be integer arrays of one shape")
    if min(int(m.min()) for m in maps) < 0:
        raise ValueError("label maps must not hold negative labels")
    k = max(int(m.max()) for m in maps) + 1
    regions = normalize_regions(region_labels)
    groups = [[c] for c in range(1, k)] if regions is None else [[c for c in r if c < k] for r in regions]
    scores = []
    for a, b in combinations(maps, 2):
        conf = np.zeros(k * k, np.int64)  # conf[i * k + j]: voxels labelled i in a and j in b
        fa, fb = a.reshape(-1), b.reshape(-1)
        for s in range(0, fa.size, CHUNK_VOXELS):
            code = fa[s:s + CHUNK_VOXELS].astype(np.int64) * k + fb[s:s + CHUNK_VOXELS]
            conf += np.bincount(code, minlength=k * k)
        conf = conf.reshape(k, k)
        dices = []
        for g in groups:
            inter, size_a, size_b = conf[np.ix_(g, g)].sum(), conf[g].sum(), conf[:, g].sum()
            if size_a + size_b:
                dices.append(2.0 * inter / (size_a + size_b))
        scores.append(float(np.mean(dices)) if dices else 1.0)
    return float(np.mean(scores))
