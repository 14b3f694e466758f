"""Post-hoc calibration and thresholding on nnU-Net probability maps (numpy/scipy only).

Temperature scaling
-------------------
The fitting and scaling live in :mod:`nnunet_calibration.posthoc.scaling` (this module delegates;
its docstring is the reference). In short: nnU-Net saves probabilities, not logits. For a softmax
output ``p = softmax(z)`` we have
``log p = z - logsumexp(z)``, and since softmax ignores a per-voxel constant,
``softmax(log p / T) == softmax(z / T)`` exactly: scaling the log-probabilities is temperature
scaling of nnU-Net's (ensemble-averaged, resampled) logits. For sigmoid region outputs each channel
is scaled on its own: ``p_T = sigmoid(logit(p) / T)``. Probabilities are clipped to
``[eps, 1]`` (softmax) or ``[eps, 1 - eps]`` (sigmoid), ``eps = 1e-7``, before the logarithm, so
saturated float32 values (exactly 0 or 1) stay finite.

A temperature is fitted by minimising the mean negative log-likelihood of the reference over
voxels (softmax: ``-log p_T[y]``; regions: mean binary cross entropy over regions) with
``scipy.optimize.minimize_scalar(method="bounded")`` over ``T in [0.05, 20]``, on voxels drawn
uniformly at random (fixed seed, :func:`sample_voxels`; nnU-Net's ignore label left out). Which
voxels: the report cross-fits (fold k's temperature is fitted on the other folds' validation
voxels, see :mod:`nnunet_calibration.experiments.report.tables`). Temperature scaling never changes
the argmax (softmax) or the 0.5 decision (sigmoid), so DSC and HD95 are unchanged.

Softmax-threshold sweep (DSC++ paper, Fig. 4)
----------------------------------------------
The foreground probability is ``1 - p_background`` (softmax) or the largest region probability
(regions); the reference foreground is ``label != 0`` (regions: label in any region). For each
threshold T (0.05, 0.10, ..., 0.95) the prediction is ``p_fg >= T``. Per case: precision
``tp / (tp + fp)`` (undefined when nothing is predicted: left out of the mean), recall
``tp / (tp + fn)`` (undefined without reference foreground: left out), DSC ``2tp / (2tp + fp + fn)``
(1 when both are empty). Reported: mean and standard deviation over cases.

Vector scaling (one temperature per channel)
--------------------------------------------
``p_T = softmax_c(log p_c / T_c)`` (softmax) or ``sigmoid(logit(p_r) / T_r)`` (regions), fitted by
the same NLL. Softmax: all ``T_c`` jointly with ``scipy.optimize.minimize(method="L-BFGS-B")`` over
``log T_c`` (bounds ``T_BOUNDS``, start: the single fitted temperature); regions: each region's
temperature on its own (the regions' binary NLLs are independent). With one channel it is
temperature scaling. Unlike a single temperature, different ``T_c`` can change the argmax, so DSC and
HD95 may change. (Scaling log-probabilities per class equals per-class scaling of the logits only up
to the per-voxel constant ``logsumexp(z)``, which no longer cancels; this is the cheap form on saved
probabilities.)

Reliability diagrams and pooled ECE use the metrics' accumulator
(:class:`nnunet_calibration.metrics.CalibrationAccumulator`), not a binning of their own.
"""
from __future__ import annotations

import numpy as np

from nnunet_calibration.posthoc import scaling
from nnunet_calibration.posthoc.scaling import PROB_FLOOR as EPS, T_BOUNDS  # noqa: F401 (re-exported)

THRESHOLDS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))


# -- temperature scaling (delegates to nnunet_calibration.posthoc.scaling) --------------------------
def scale_probabilities(probs: np.ndarray, temperature, sigmoid: bool = False) -> np.ndarray:
    """Apply temperature(s) to probabilities ``probs`` (C, ...): :func:`scaling.apply_scaling`.

    ``temperature``: a number (temperature scaling) or one value per channel, shape ``(C,)``
    (vector scaling).
    """
    return scaling.apply_scaling(probs, temperature, sigmoid)


def fit_temperature(probs: np.ndarray, targets: np.ndarray, sigmoid: bool = False,
                    bounds: tuple = T_BOUNDS) -> float:
    """Fit one temperature by minimising the NLL (:func:`scaling.fit_temperature`).

    ``probs``: (N, C) voxel probabilities. ``targets``: (N,) class indices (softmax) or (N, C)
    binary region memberships (sigmoid). ``bounds`` must be :data:`T_BOUNDS` (kept for callers).
    """
    if tuple(bounds) != tuple(T_BOUNDS):
        raise ValueError(f"temperature bounds are fixed at {T_BOUNDS}, got {bounds}")
    if len(probs) == 0:
        raise ValueError("no voxels to fit the temperature on")
    return scaling.fit_temperature(scaling.log_probabilities(probs, sigmoid), targets, sigmoid)


def fit_vector_temperatures(probs: np.ndarray, targets: np.ndarray, sigmoid: bool = False,
                            bounds: tuple = T_BOUNDS) -> np.ndarray:
    """One temperature per channel by minimising the NLL (:func:`scaling.fit_vector_scaling`).

    ``probs``: (N, C); ``targets``: (N,) class indices (softmax) or (N, C) region memberships.
    Returns ``(C,)`` float64 temperatures. ``bounds`` must be :data:`T_BOUNDS` (kept for callers).
    """
    if tuple(bounds) != tuple(T_BOUNDS):
        raise ValueError(f"temperature bounds are fixed at {T_BOUNDS}, got {bounds}")
    if len(probs) == 0:
        raise ValueError("no voxels to fit the temperatures on")
    return np.asarray(scaling.fit_vector_scaling(scaling.log_probabilities(probs, sigmoid), targets, sigmoid),
                      dtype=np.float64)


def region_targets(labels: np.ndarray, regions: list[tuple[int, ...]]) -> np.ndarray:
    """(R, ...) binary memberships of each region."""
    return np.stack([np.isin(labels, r) for r in regions]).astype(np.uint8)


def sample_voxels(probs: np.ndarray, labels: np.ndarray, n: int, rng: np.random.Generator,
                  regions=None, ignore_label: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw ``n`` voxels (or all, if fewer): (probabilities (n, C), targets)."""
    c = probs.shape[0]
    flat_p = probs.reshape(c, -1)
    flat_y = labels.reshape(-1)
    valid = np.flatnonzero(flat_y != ignore_label) if ignore_label is not None else np.arange(flat_y.size)
    idx = valid if len(valid) <= n else rng.choice(valid, size=n, replace=False)
    p = flat_p[:, idx].T
    y = flat_y[idx]
    if regions is not None:
        y = region_targets(y, regions).T
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
