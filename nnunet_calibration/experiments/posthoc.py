"""The report's numpy parts over probability maps: voxel samples for the post-hoc fits and the
softmax-threshold sweep (DSC++ paper, Fig. 4).

Post-hoc scaling itself (temperature and vector scaling: fitting, cross-fitting, applying; the
probability floor) is :mod:`nnunet_calibration.posthoc.scaling`, whose docstring is the reference.

Softmax-threshold sweep
-----------------------
The foreground probability is ``1 - p_background`` (softmax) or the largest region probability
(regions); the reference foreground is ``label != 0`` (regions: label in any region). For each
threshold T (0.05, 0.10, ..., 0.95) the prediction is ``p_fg >= T``. Per case: precision
``tp / (tp + fp)`` (undefined when nothing is predicted: left out of the mean), recall
``tp / (tp + fn)`` (undefined without reference foreground: left out), DSC ``2tp / (2tp + fp + fn)``
(1 when both are empty). Reported: mean and standard deviation over cases.
"""
from __future__ import annotations

import numpy as np

from nnunet_calibration.posthoc.scaling import region_targets

THRESHOLDS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))


def sample_voxels(probs: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
                  regions=None, ignore_label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` voxels (or all, if fewer) uniformly without replacement, leaving out nnU-Net's
    ignore label: (probabilities (n, C), targets: class indices, or (n, R) region memberships)."""
    c = probs.shape[0]
    flat_p = probs.reshape(c, -1)
    flat_y = labels.reshape(-1)
    valid = np.flatnonzero(flat_y != ignore_label) if ignore_label is not None else np.arange(flat_y.size)
    idx = valid if len(valid) <= n else rng.choice(valid, size=n, replace=False)
    p = flat_p[:, idx].T
    y = flat_y[idx]
    if regions is not None:
        y = region_targets(y, regions)
    return p, y


# -- threshold sweep ----------------------------------------------------------------------------
def foreground_probability(probs: np.ndarray, regions=None) -> np.ndarray:
    if regions is not None:
        return probs.max(axis=0)
    return 1.0 - probs[0]


def foreground_reference(labels: np.ndarray, regions=None) -> np.ndarray:
    if regions is not None:
        return np.isin(labels, sorted({l for r in regions for l in r}))
    return labels != 0


def threshold_counts(p_fg: np.ndarray, ref: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """(len(thresholds), 3) array of tp, fp, fn for prediction ``p_fg >= T``."""
    p = p_fg.reshape(-1)
    r = ref.reshape(-1).astype(bool)
    # sort once: counts of p >= T inside and outside the reference
    pin = np.sort(p[r])
    pout = np.sort(p[~r])
    th = np.asarray(thresholds, dtype=p.dtype)
    tp = len(pin) - np.searchsorted(pin, th, side="left")
    fp = len(pout) - np.searchsorted(pout, th, side="left")
    fn = len(pin) - tp
    return np.stack([tp, fp, fn], axis=1).astype(np.int64)


def scores_from_counts(counts: np.ndarray) -> dict:
    """precision, recall, DSC arrays from (..., 3) tp/fp/fn counts (conventions: module docstring)."""
    tp, fp, fn = (counts[..., i].astype(np.float64) for i in range(3))
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), np.nan)
        recall = np.where(tp + fn > 0, tp / (tp + fn), np.nan)
        dsc = np.where(2 * tp + fp + fn > 0, 2 * tp / (2 * tp + fp + fn), 1.0)
    return {"precision": precision, "recall": recall, "DSC": dsc}


def summarise_sweep(per_case_counts: list[np.ndarray], thresholds=THRESHOLDS) -> list[dict]:
    """Mean and std over cases of precision, recall and DSC for each threshold."""
    arr = np.stack(per_case_counts)  # (cases, T, 3)
    s = scores_from_counts(arr)
    rows = []
    for i, t in enumerate(thresholds):
        row = {"threshold": float(t), "n_cases": int(arr.shape[0])}
        for k in ("precision", "recall", "DSC"):
            v = s[k][:, i]
            v = v[~np.isnan(v)]
            row[k] = float(v.mean()) if len(v) else float("nan")
            row[k + "_std"] = float(v.std()) if len(v) else float("nan")
        rows.append(row)
    return rows
