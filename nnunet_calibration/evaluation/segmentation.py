"""A case's segmentation as nnU-Net makes it from the probabilities, and its DSC and HD95 per class /
region (or of the foreground union, ``convention="sdc-code"``), with the conventions of
:mod:`nnunet_calibration.metrics.segmentation`."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

from nnunet_calibration.metrics import dice, hd95, image_diagonal

from .labels import mask_keys

#: the one "class" of ``convention="sdc-code"``: the foreground union
SDC_CODE_CLASS = "foreground"


def probabilities_to_segmentation(probs: np.ndarray, lm, sum_tolerance: Optional[float] = None) -> np.ndarray:
    """Same result as nnU-Net's ``LabelManager.convert_probabilities_to_segmentation`` (argmax with
    the first channel winning ties, or ``seg[p_i > 0.5] = regions_class_order[i]`` in channel
    order), but without the full-size copy that ``np.argmax(axis=0)`` makes: one channel at a time,
    peak extra memory one float32 channel plus the uint8/uint16 map.

    ``sum_tolerance`` (softmax only): if given, the caller guarantees that every voxel's channel
    probabilities sum to at most ``1 + sum_tolerance`` (what
    :func:`~nnunet_calibration.metrics.validate_probabilities` checks). A voxel whose background
    probability exceeds ``0.5 + sum_tolerance`` is then background (every other channel is below
    ``0.5``), so the argmax is computed only for the remaining voxels (usually a few percent):
    same result, several times faster. ``None``: every voxel is compared.
    """
    dtype = np.uint8 if max(lm.all_labels) < 255 else np.uint16
    seg = np.zeros(probs.shape[1:], dtype)
    if lm.has_regions:
        for i, c in enumerate(lm.regions_class_order):
            seg[probs[i] > 0.5] = c
        return seg
    if sum_tolerance is None:
        _argmax_into(probs, seg)
        return seg
    flat_p = probs.reshape(probs.shape[0], -1)
    cand = np.flatnonzero(flat_p[0] <= 0.5 + float(sum_tolerance))
    sub_seg = np.zeros(cand.size, dtype)
    _argmax_into(flat_p.take(cand, axis=1), sub_seg)
    seg.reshape(-1)[cand] = sub_seg
    return seg


def _argmax_into(probs: np.ndarray, seg: np.ndarray) -> None:
    """``seg[...] = argmax`` over channels (first channel wins ties; ``seg`` starts at 0), one channel
    at a time: extra memory one channel of ``probs``."""
    best = probs[0].copy()
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        seg[better] = c
        np.maximum(best, probs[c], out=best)


def _box_around(union: np.ndarray) -> tuple:
    """Slices of the bounding box of ``union`` plus a 1-voxel margin (a 1-voxel box if it is empty)."""
    if not union.any():
        return tuple(slice(0, 1) for _ in union.shape)  # nothing anywhere: every mask is empty
    other = [tuple(i for i in range(union.ndim) if i != ax) for ax in range(union.ndim)]
    sl = []
    for ax in range(union.ndim):
        nz = np.flatnonzero(union.any(axis=other[ax]) if other[ax] else union)
        sl.append(slice(max(int(nz[0]) - 1, 0), min(int(nz[-1]) + 2, union.shape[ax])))
    return tuple(sl)


def segmentation_metrics(seg: np.ndarray, ref: np.ndarray, lm, class_names: List[str], spacing,
                         convention: str = "default") -> Tuple[Dict[str, float], Dict[str, float], List[str]]:
    """DSC and HD95 per class / region (``convention="default"``) or of the foreground union
    (``"sdc-code"``: DSC ``(2|P&R| + 1e-6) / (|P| + |R| + 1e-6)``, HD95 in voxels with all-neighbour
    surfaces, as the SDC authors' code), conventions of :mod:`nnunet_calibration.metrics.segmentation`.

    Ignore label (``lm.ignore_label``): predicted voxels where the reference is the ignore label are
    removed from the predicted masks (nnU-Net's DSC convention), for DSC and HD95 alike.
    Speed: everything after one pass over the volume is done on the bounding box of the foreground
    of ``seg`` and ``ref`` plus a 1-voxel margin, which contains every class mask and its surface,
    so the values are those of the full volume; the worst-case HD95 uses the full image diagonal.
    Returns ``(dsc, hd95, flags)``.
    """
    sdc = convention == "sdc-code"
    ign = lm.ignore_label
    ref_fg = ref != 0 if ign is None else (ref != 0) & (ref != ign)
    sl = _box_around(ref_fg | (seg != 0))
    seg_c, ref_c, fg_c = seg[sl], ref[sl], ref_fg[sl]
    valid = None if ign is None else ref_c != ign
    if sdc:
        pairs = [(SDC_CODE_CLASS, seg_c != 0, fg_c)]
    else:
        pairs = [(name, region_or_label_to_mask(seg_c, key), region_or_label_to_mask(ref_c, key))
                 for name, key in zip(class_names, mask_keys(lm))]
    sp = None if sdc else spacing
    dsc, hd, flags = {}, {}, []
    for name, pm, rm in pairs:
        if valid is not None:
            pm &= valid  # nnU-Net: predictions on ignored voxels do not count
        n_p, n_r = int(np.count_nonzero(pm)), int(np.count_nonzero(rm))
        inter = int(np.count_nonzero(pm & rm))
        if sdc:
            dsc[name] = (2 * inter + 1e-6) / (n_p + n_r + 1e-6)
        else:
            dsc[name] = dice(pm, rm)
        if n_p and n_r:
            hd[name] = hd95(pm, rm, sp, connectivity=pm.ndim if sdc else 1)
        elif not n_p and not n_r:
            hd[name] = 0.0
        else:
            hd[name] = image_diagonal(seg.shape, sp)
            which = "prediction" if not n_p else "reference"
            flags.append(f"{name}: empty {which}, HD95 set to the image diagonal ({hd[name]:.4g} "
                         f"{'voxels' if sdc else 'mm'})")
    return dsc, hd, flags
