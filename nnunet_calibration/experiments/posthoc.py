"""Post-hoc calibration and thresholding on nnU-Net probability maps (numpy/scipy only).

Temperature scaling
-------------------
nnU-Net saves probabilities, not logits. For a softmax output ``p = softmax(z)`` we have
``log p = z - logsumexp(z)``, and since softmax ignores a per-voxel constant,
``softmax(log p / T) == softmax(z / T)`` exactly: scaling the log-probabilities is temperature
scaling of nnU-Net's (ensemble-averaged, resampled) logits. For sigmoid region outputs each channel
is scaled on its own: ``p_T = sigmoid(logit(p) / T)``. Probabilities are clipped to
``[eps, 1 - eps]`` (``eps = 1e-7``) before the logarithm, so saturated float32 values (exactly 0 or
1) stay finite.

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
from scipy.optimize import minimize, minimize_scalar

EPS = 1e-7
T_BOUNDS = (0.05, 20.0)
THRESHOLDS = tuple(np.round(np.arange(0.05, 0.951, 0.05), 2))


# -- temperature scaling ------------------------------------------------------------------------
def scale_probabilities(probs: np.ndarray, temperature, sigmoid: bool = False) -> np.ndarray:
    """Apply temperature ``T`` to probabilities ``probs`` (C, ...). See the module docstring.

    ``temperature``: a number (temperature scaling) or one value per channel, shape ``(C,)``
    (vector scaling).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    t = np.asarray(temperature, dtype=np.float64)
    if t.ndim == 1:
        if t.shape[0] != p.shape[0]:
            raise ValueError(f"{t.shape[0]} temperatures for {p.shape[0]} channels")
        t = t.reshape((-1,) + (1,) * (p.ndim - 1))
    temperature = t
    if sigmoid:
        z = (np.log(p) - np.log1p(-p)) / temperature
        return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)
    z = np.log(p) / temperature
    z -= z.max(axis=0, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=0, keepdims=True)).astype(np.float32)


def _nll_softmax(logp: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean NLL of labels y (N,) under softmax(logp / t), logp (N, C)."""
    z = logp / t
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(y)), y]))


def _nll_sigmoid(logit: np.ndarray, y: np.ndarray, t: float) -> float:
    """Mean binary cross entropy of targets y (N, R) under sigmoid(logit / t)."""
    z = logit / t
    # -[y log s(z) + (1-y) log(1-s(z))] = softplus(z) - y z
    return float(np.mean(np.logaddexp(0, z) - y * z))


def fit_temperature(probs: np.ndarray, targets: np.ndarray, sigmoid: bool = False,
                    bounds: tuple = T_BOUNDS) -> float:
    """Fit one temperature by minimising the NLL.

    ``probs``: (N, C) voxel probabilities. ``targets``: (N,) class indices (softmax) or (N, C)
    binary region memberships (sigmoid).
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    if len(p) == 0:
        raise ValueError("no voxels to fit the temperature on")
    if sigmoid:
        x = np.log(p) - np.log1p(-p)
        y = np.asarray(targets, dtype=np.float64)
        f = lambda t: _nll_sigmoid(x, y, t)  # noqa: E731
    else:
        x = np.log(p)
        y = np.asarray(targets, dtype=np.int64)
        f = lambda t: _nll_softmax(x, y, t)  # noqa: E731
    res = minimize_scalar(f, bounds=bounds, method="bounded", options={"xatol": 1e-4})
    return float(res.x)


def fit_vector_temperatures(probs: np.ndarray, targets: np.ndarray, sigmoid: bool = False,
                            bounds: tuple = T_BOUNDS) -> np.ndarray:
    """One temperature per channel by minimising the NLL (see "Vector scaling" in the module docstring).

    ``probs``: (N, C); ``targets``: (N,) class indices (softmax) or (N, C) region memberships.
    Returns ``(C,)`` float64 temperatures.
    """
    p = np.clip(np.asarray(probs, dtype=np.float64), EPS, 1 - EPS)
    if len(p) == 0:
        raise ValueError("no voxels to fit the temperatures on")
    c = p.shape[1]
    if sigmoid:
        y = np.asarray(targets)
        return np.array([fit_temperature(p[:, [r]], y[:, [r]], sigmoid=True, bounds=bounds) for r in range(c)])
    t0 = fit_temperature(p, targets, sigmoid=False, bounds=bounds)
    if c == 1:
        return np.array([t0])
    x = np.log(p)
    y = np.asarray(targets, dtype=np.int64)

    def f(u):
        return _nll_softmax(x, y, np.exp(u)[None, :])

    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    res = minimize(f, np.full(c, np.log(t0)), method="L-BFGS-B", bounds=[(lo, hi)] * c)
    return np.exp(res.x)


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
