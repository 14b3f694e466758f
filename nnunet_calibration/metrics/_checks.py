"""Input checks shared by the calibration metrics: region layouts, types and shapes, values.

The region conventions (``regions`` / ``region_labels``) are described in
:mod:`nnunet_calibration.metrics.calibration`; :data:`SOFTMAX_SUM_TOLERANCE` is the tolerance on
``sum_c p_c == 1`` for softmax inputs.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from ._chunk import _chunks

Regions = Optional[Sequence[Union[int, Sequence[int]]]]

#: Tolerance on ``sum_c p_c == 1`` for softmax inputs.
SOFTMAX_SUM_TOLERANCE = 1e-3


def normalize_regions(regions: Regions) -> Optional[List[Tuple[int, ...]]]:
    """``None`` or a list of int tuples (a plain int ``k`` becomes ``(k,)``)."""
    if regions is None:
        return None
    out = []
    for r in regions:
        if np.isscalar(r):
            out.append((int(r),))
        else:
            out.append(tuple(int(i) for i in r))
    if not out:
        raise ValueError("regions must not be empty")
    return out


def resolve_region_labels(regions: bool, region_labels: Regions) -> Optional[List[Tuple[int, ...]]]:
    """The label tuples of the regions (``regions=True``) or ``None`` (softmax, ``regions=False``).

    ``regions`` means the same as in :mod:`nnunet_calibration.losses`: the channels are independent
    sigmoid regions. The regions' label tuples (needed to build each region's reference from the
    label map) are passed as ``region_labels``; it is required with ``regions=True`` and not allowed
    without it.
    """
    if not isinstance(regions, (bool, np.bool_)):
        raise TypeError(f"regions must be a bool (channels are independent sigmoid regions); pass the label "
                        f"tuples as region_labels=..., got regions={regions!r}")
    if regions:
        if region_labels is None:
            raise ValueError("regions=True needs region_labels (the label tuples of the regions, in channel order)")
        return normalize_regions(region_labels)
    if region_labels is not None:
        raise ValueError("region_labels given but regions=False; pass regions=True for sigmoid region outputs")
    return None


def in_region(labels: np.ndarray, region: Sequence[int]) -> np.ndarray:
    """``labels in region`` as a bool array: the same values as ``np.isin(labels, region)``, by ORs of
    equalities (a region holds a few labels; ``np.isin`` is 20-30x slower on a volume)."""
    region = list(region)
    out = labels == region[0]
    for v in region[1:]:
        out |= labels == v
    return out


def _check_types_and_shapes(probs, labels, regions) -> Tuple[np.ndarray, np.ndarray, Optional[list]]:
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim < 2:
        raise ValueError(f"probs must have shape (C, *spatial), got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be a floating point array, got dtype {probs.dtype}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if probs.shape[1:] != labels.shape:
        raise ValueError(f"probs has spatial shape {probs.shape[1:]} but labels has shape {labels.shape}")
    regions = normalize_regions(regions)
    if regions is None and probs.shape[0] < 2:
        raise ValueError("softmax probs need at least 2 channels (background + one class); "
                         "pass regions=... for sigmoid region outputs")
    if regions is not None and len(regions) != probs.shape[0]:
        raise ValueError(f"{len(regions)} regions given but probs has {probs.shape[0]} channels")
    return probs, labels, regions


def validate_probabilities(probs: np.ndarray, regions: bool = False,
                           softmax_tolerance: float = SOFTMAX_SUM_TOLERANCE) -> None:
    """Raise ``ValueError`` if ``probs`` has NaN, values outside [0, 1], or (softmax, ``regions=False``)
    a voxel whose channel probabilities do not sum to 1 within ``softmax_tolerance``.

    Memory and speed: one pass over the array in chunks of ``CHUNK_VOXELS`` voxels (minimum,
    maximum and channel sums of a chunk while it is in the cache), no full-size temporary.
    """
    probs = np.asarray(probs)
    if probs.size == 0:
        raise ValueError(f"probabilities are empty (shape {probs.shape})")
    lo, hi, worst = np.inf, -np.inf, 0.0
    dummy = np.zeros(probs.shape[1:], np.uint8)
    for pc, _ in _chunks(probs, dummy):
        c_lo, c_hi = pc.min(), pc.max()
        if np.isnan(c_lo) or np.isnan(c_hi):
            raise ValueError("probabilities contain NaN")
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        if not regions:
            total = pc[0] + pc[1] if pc.shape[0] > 1 else pc[0].copy()  # float32 sums: rounding ~1e-7
            for c in range(2, pc.shape[0]):
                total += pc[c]
            worst = max(worst, float(total.max()) - 1.0, 1.0 - float(total.min()))
    if lo < 0 or hi > 1:
        raise ValueError(f"probabilities outside [0, 1] (min {lo:.6g}, max {hi:.6g})")
    if worst > softmax_tolerance:
        raise ValueError(f"softmax probabilities do not sum to 1 over the channels "
                         f"(largest deviation {worst:.3g} > {softmax_tolerance:g})")


def validate_labels(labels: np.ndarray, allowed_labels: Sequence[int]) -> None:
    """Raise ``ValueError`` if ``labels`` holds a value that is not in ``allowed_labels``.

    Speed: the minimum and maximum are found first; only the values between them that are not allowed
    (usually none: labels 0..K with all of them allowed) are searched for, so a valid label map costs two
    passes without any full-size temporary."""
    labels = np.asarray(labels)
    allowed = sorted(int(a) for a in allowed_labels)
    if labels.size == 0:
        return
    lo, hi = labels.min(), labels.max()
    if np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool:
        lo, hi = int(lo), int(hi)
        allowed_set = set(allowed)
        gaps = [v for v in range(lo, hi + 1) if v not in allowed_set] if hi - lo <= 256 else None
        if gaps is not None:
            bad = [v for v in gaps if np.any(labels == v)]
        else:
            bad = sorted(set(int(v) for v in _unique_small_ints(labels)) - allowed_set)
    else:
        bad = sorted(set(np.unique(labels).tolist()) - set(allowed))
    if bad:
        raise ValueError(f"label values {bad} are not among the allowed labels {allowed}")


def validate_inputs(probs: np.ndarray, labels: np.ndarray, regions: bool = False, region_labels: Regions = None,
                    allowed_labels: Optional[Sequence[int]] = None,
                    softmax_tolerance: float = SOFTMAX_SUM_TOLERANCE) -> None:
    """Check shapes, types and values; raise ``ValueError`` saying what is wrong.

    Checks: :func:`validate_probabilities` (no NaN, in [0, 1], softmax sums to 1 within
    ``softmax_tolerance``) and :func:`validate_labels` with ``allowed_labels`` (default:
    ``0..C-1`` for softmax, ``0`` and the labels of the regions for regions).
    """
    probs, labels, regions = _check_types_and_shapes(probs, labels, resolve_region_labels(regions, region_labels))
    _validate(probs, labels, regions, allowed_labels, softmax_tolerance)


def _validate(probs, labels, regions, allowed_labels=None, softmax_tolerance=SOFTMAX_SUM_TOLERANCE) -> None:
    validate_probabilities(probs, regions is not None, softmax_tolerance)
    if allowed_labels is None:
        if regions is None:
            allowed_labels = range(probs.shape[0])
        else:
            allowed_labels = sorted({0, *[i for r in regions for i in r]})
    validate_labels(labels, allowed_labels)


def _unique_small_ints(labels: np.ndarray) -> np.ndarray:
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < 65536:
        return np.flatnonzero(np.bincount(labels.reshape(-1), minlength=hi + 1))
    return np.unique(labels)
