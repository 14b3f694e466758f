"""Temperature and vector scaling of nnU-Net probabilities (numpy/scipy only, no nnU-Net import).

Conventions (every function of this module follows them)
---------------------------------------------------------
Two array layouts, as nnU-Net and a fit each need them:

* **fitting** (:func:`fit_temperature`, :func:`fit_vector_scaling`, :func:`crossfit`, :func:`fit_all`,
  :func:`nll`): voxel-major samples. ``log_probs`` is ``(N, C)`` float, ``N`` voxels by ``C``
  channels, holding ``log p`` (natural logarithm of the probabilities, already floored, as
  :func:`log_probabilities` / :func:`voxel_sample` make them). ``target`` is ``(N,)`` integer class
  indices ``0..C-1`` for softmax outputs, ``(N, C)`` region memberships in ``{0, 1}`` for sigmoid
  region outputs (``regions=True``).
* **applying** (:func:`apply_scaling`, :func:`log_probabilities`, :func:`voxel_sample`): nnU-Net's
  channel-first probability arrays ``(C, ...)`` (the ``probabilities`` array of a ``CASE.npz``).

Softmax (``regions=False``): channel ``c`` is label ``c`` (background included), the rows sum to 1.
Calibrated probabilities are ``softmax_c(log p_c / T_c)`` (temperature scaling: one ``T`` for all
channels; vector scaling: one ``T_c`` per channel). nnU-Net saves ``p = softmax(z)`` of its
(mirror- and fold-averaged) logits ``z``; ``log p = z - logsumexp(z)`` differs from ``z`` by a
per-voxel constant, which softmax ignores, so with one temperature ``softmax(log p / T) ==
softmax(z / T)`` exactly: scaling the log-probabilities *is* temperature scaling of the logits.
With per-channel temperatures that constant no longer cancels; vector scaling here is defined on
the log-probabilities (the only well-defined logits a probability file has).

Sigmoid regions (``regions=True``): every channel is its own binary problem; calibrated
probabilities are ``sigmoid(logit(p_c) / T_c)`` with ``logit(p) = log p - log(1 - p)``, which
equals the logit nnU-Net applied the sigmoid to.

Underflow floor (the smallest one float32 can hold, so the fit is unbiased): ``log p`` is computed
in float64 from the stored values; only an exact zero (an underflowed probability) is replaced by
``PROB_FLOOR = 2**-149 ~ 1.4e-45``, the smallest positive float32 (subnormal), so ``log p >=
-103.28``. Every stored positive float32 value, subnormals included, keeps its own logarithm:
``log p - logsumexp`` is then nnU-Net's logit difference up to float32 rounding of ``p`` (relative
error ~6e-8 for normal values, larger only for subnormals below 1.2e-38, i.e. logit gaps over 87).
A zero stands for a true probability below ~7e-46; taken as the floor its logit distance is
underestimated (>= 103.3 instead of more), which after scaling with ``T`` leaves a residual
probability of at most ``exp(-103.3 / T)`` (T = 4: 6e-12), far below float32 resolution of the
winner. (Until version 1 of ``calibration.json`` the floor was ``1e-7``, which capped every logit
gap at 16.1 and biased the fitted temperature of very confident models low: logits of std 25 with a
true T of 4.0 were fitted as 3.17.) Sigmoid regions also need ``log(1 - p)``: a stored ``1.0`` means
``1 - p`` below half the float gap under 1 of the stored dtype, and is taken as that bound
(:func:`upper_floor`: float32 ``2**-25``, so ``|logit| <= 17.3`` there; float64 ``2**-53``). The fit's
NLL is therefore no longer the evaluator's (``calib-evaluate`` floors at its ``nll_eps``, 1e-7); it
is the NLL of the stored probabilities themselves. The floor never moves a decision (the largest
softmax probability is at least ``1 / C``; a sigmoid probability never crosses 0.5).

Decisions: a single temperature never changes the softmax argmax (``log p / T`` is monotone in
``log p``), and no sigmoid scaling with ``T_c > 0`` changes the ``p > 0.5`` decision (the sign of
the logit is kept). Softmax vector scaling can change the argmax. Up to float32 rounding of the
scaled probabilities: a near tie (or a sigmoid value within float32 resolution of 0.5) may round
to an exact tie; callers that need the decision keep the uncalibrated one (:func:`changes_decision`).

Fitting: the mean negative log-likelihood (softmax: mean over voxels of ``-log q_{y}``; regions:
mean over voxels *and* channels of the binary cross-entropy) is minimised over ``u = log T``
within ``log T_BOUNDS`` (``T`` in ``[0.05, 20]``): ``scipy.optimize.minimize_scalar(method=
"bounded")`` for one temperature, L-BFGS-B with the analytic gradient for vector scaling. A
result on a bound is returned as is (the bounds are wide; a temperature at 20 means the
probabilities carry almost no information).

Voxel sampling: with ``max_voxels`` (an int) and more rows than that, the fit uses
``max_voxels`` rows drawn uniformly without replacement with ``numpy.random.default_rng(seed)``
(the same rows for the same ``N``, ``max_voxels`` and ``seed``); ``None`` uses every row.
:class:`VoxelReservoir` draws the same kind of uniform sample from a stream of cases without
holding them all in memory.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from scipy.special import expit

#: the smallest positive float32 (subnormal, 2**-149): the value an exact zero is taken as (module docstring)
PROB_FLOOR = float(np.finfo(np.float32).smallest_subnormal)
T_BOUNDS = (0.05, 20.0)
METHODS = ("temperature", "vector")
#: rows processed at once by :func:`apply_scaling` (float64 temporaries of this many voxels x C)
_APPLY_CHUNK = 1 << 20


# -- conversions ---------------------------------------------------------------------------------
def upper_floor(dtype) -> float:
    """The smallest ``1 - p`` a stored sigmoid probability of ``dtype`` is taken to have: half the float
    gap below 1 (float16 ``2**-12``, float32 ``2**-25``), for float64 the gap itself (``2**-53``: half of it
    would round to 1 in float64)."""
    dt = np.dtype(dtype)
    if dt.kind != "f" or dt.itemsize >= 8:
        return float(np.finfo(np.float64).epsneg)
    return float(np.finfo(dt).epsneg) / 2


def log_probabilities(probs: np.ndarray, regions: bool, dtype=np.float64) -> np.ndarray:
    """``log p`` in float64 of probabilities (any layout), exact zeros taken as :data:`PROB_FLOOR`;
    regions: ``p`` at most ``1 - upper_floor(probs.dtype)`` (module docstring)."""
    probs = np.asarray(probs)
    hi = 1.0 - upper_floor(probs.dtype) if regions else 1.0
    return np.log(np.clip(probs.astype(dtype), PROB_FLOOR, hi))


def _logit_from_log(log_probs: np.ndarray) -> np.ndarray:
    """``log p - log(1 - p)`` from ``log p`` (numerically stable next to 1; ``log p = 0`` is taken as
    ``p = 1 - 2**-53``, the float64 limit)."""
    lp = np.minimum(log_probs, np.log1p(-upper_floor(np.float64)))
    return lp - np.log(-np.expm1(lp))


def region_targets(labels: np.ndarray, region_labels: Sequence[Sequence[int]]) -> np.ndarray:
    """``(..., R)`` uint8 memberships: channel ``r`` is 1 where the label is one of ``region_labels[r]``."""
    labels = np.asarray(labels)
    return np.stack([np.isin(labels, list(r)) for r in region_labels], axis=-1).astype(np.uint8)


def _checked_voxels(probs, labels, ignore_label):
    """``(probs, C, labels, flat labels, indices of the voxels to use)``; shapes checked, ignore label left out."""
    probs = np.asarray(probs)
    c = probs.shape[0]
    labels = np.asarray(labels)
    if labels.size * c != probs.size:
        raise ValueError(f"reference has {labels.size} voxels, probabilities {probs.size // max(c, 1)} "
                         f"(shapes {labels.shape} and {probs.shape})")
    flat_y = labels.reshape(-1)
    idx = np.flatnonzero(flat_y != ignore_label) if ignore_label is not None else np.arange(flat_y.size)
    return probs, c, labels, flat_y, idx


def voxel_sample(probs: np.ndarray, labels: np.ndarray, region_labels: Sequence[Sequence[int]] | None = None,
                 ignore_label: int | None = None, max_voxels: int | None = None,
                 rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fitting rows of one case: ``(log_probs (N, C) float64, target)``.

    ``probs``: ``(C, ...)`` nnU-Net probabilities; ``labels``: the reference label map with
    ``probs.shape[1:]`` (or the same number of voxels, e.g. a 2D ``(y, x)`` reference for nnU-Net's
    ``(C, 1, y, x)``). ``region_labels``: ``None`` for softmax outputs (target = the label), else one
    tuple of labels per channel (target = membership, :func:`region_targets`). Voxels with
    ``ignore_label`` are left out. ``max_voxels``: keep at most that many, uniformly without
    replacement from ``rng`` (default ``default_rng(0)``).
    """
    probs, c, labels, flat_y, idx = _checked_voxels(probs, labels, ignore_label)
    if max_voxels is not None and len(idx) > max_voxels:
        rng = np.random.default_rng(0) if rng is None else rng
        idx = np.sort(rng.choice(idx, size=int(max_voxels), replace=False))
    lp = log_probabilities(probs.reshape(c, -1)[:, idx].T, region_labels is not None)
    y = flat_y[idx]
    if region_labels is not None:
        if len(region_labels) != c:
            raise ValueError(f"{len(region_labels)} regions for {c} probability channels")
        return lp, region_targets(y, region_labels)
    if y.size and (y.min() < 0 or y.max() >= c):
        raise ValueError(f"reference labels {np.unique(y).tolist()} outside 0..{c - 1}")
    return lp, y.astype(np.int64)


class VoxelReservoir:
    """Uniform random sample of at most ``max_voxels`` rows from a stream of ``(log_probs, target)``.

    Every added row gets an independent uniform key from ``default_rng(seed)``; the rows with the
    ``max_voxels`` smallest keys are kept, which is a uniform sample without replacement of all rows
    added so far, in memory ``O(max_voxels + rows of one add)``. ``group`` (e.g. the fold) is kept
    per row so a caller can split the sample again (:meth:`by_group`).
    """

    def __init__(self, max_voxels: int | None, seed: int = 0):
        if max_voxels is not None and max_voxels < 1:
            raise ValueError(f"max_voxels must be >= 1 or None, got {max_voxels}")
        self.max_voxels = max_voxels
        self.rng = np.random.default_rng(seed)
        self.seen = 0
        self._parts: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []

    def add(self, log_probs: np.ndarray, target: np.ndarray, group: int = 0) -> None:
        n = len(log_probs)
        self.seen += n
        keys = self.rng.random(n)
        self._parts.append((keys, np.asarray(log_probs), np.asarray(target), np.full(n, group, np.int64)))
        self._compact()

    def add_case(self, probs: np.ndarray, labels: np.ndarray, region_labels: Sequence[Sequence[int]] | None = None,
                 ignore_label: int | None = None, group: int = 0) -> None:
        """Add every voxel of one case (``probs`` ``(C, ...)``, ``labels``: see :func:`voxel_sample`).

        Same sample as ``add(*voxel_sample(probs, labels, ...), group)``, but only the voxels that can
        still be kept are turned into float64 log-probabilities (bounded memory on large cases).
        """
        probs, c, labels, flat_y, idx = _checked_voxels(probs, labels, ignore_label)
        self.seen += len(idx)
        keys = self.rng.random(len(idx))
        if self.max_voxels is not None and len(idx) > self.max_voxels:
            keep = np.sort(np.argpartition(keys, self.max_voxels - 1)[:self.max_voxels])
            idx, keys = idx[keep], keys[keep]
        lp, y = voxel_sample(probs.reshape(c, -1)[:, idx], flat_y[idx], region_labels)
        self._parts.append((keys, lp, y, np.full(len(idx), group, np.int64)))
        self._compact()

    def _compact(self) -> None:
        if self.max_voxels is not None and sum(len(p[0]) for p in self._parts) > 2 * self.max_voxels:
            self._parts = [self._merge()]

    def _merge(self):
        keys, lp, y, g = (np.concatenate([p[i] for p in self._parts]) for i in range(4))
        if self.max_voxels is not None and len(keys) > self.max_voxels:
            keep = np.argpartition(keys, self.max_voxels - 1)[:self.max_voxels]
            keep.sort()
            keys, lp, y, g = keys[keep], lp[keep], y[keep], g[keep]
        return keys, lp, y, g

    def result(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(log_probs, target, group)`` of the kept rows (in the order they were added)."""
        if not self._parts:
            raise ValueError("no voxels were added")
        self._parts = [self._merge()]
        return self._parts[0][1], self._parts[0][2], self._parts[0][3]

    def by_group(self) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """``{group: (log_probs, target)}`` of the kept rows."""
        lp, y, g = self.result()
        return {int(k): (lp[g == k], y[g == k]) for k in np.unique(g)}


# -- objective -----------------------------------------------------------------------------------
def _check(log_probs, target, regions: bool) -> tuple[np.ndarray, np.ndarray]:
    lp = np.asarray(log_probs, dtype=np.float64)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be (N, C), got shape {lp.shape}")
    if len(lp) == 0:
        raise ValueError("no voxels to fit on")
    if not np.all(np.isfinite(lp)):
        raise ValueError("log_probs holds non-finite values (use log_probabilities() to floor zeros)")
    y = np.asarray(target)
    if regions:
        if y.shape != lp.shape:
            raise ValueError(f"region target must have the shape of log_probs {lp.shape}, got {y.shape}")
        return _logit_from_log(lp), y.astype(np.float64)
    if y.shape != (len(lp),):
        raise ValueError(f"softmax target must be ({len(lp)},) labels, got shape {y.shape}")
    if y.min() < 0 or y.max() >= lp.shape[1]:
        raise ValueError(f"labels outside 0..{lp.shape[1] - 1}")
    return lp, y.astype(np.int64)


def _subsample(n: int, max_voxels: int | None, seed: int) -> np.ndarray | slice:
    if max_voxels is None or n <= max_voxels:
        return slice(None)
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_voxels), replace=False))


def _nll_and_grad(x: np.ndarray, y: np.ndarray, inv_t: np.ndarray, regions: bool) -> tuple[float, np.ndarray]:
    """Mean NLL and its gradient w.r.t. ``inv_t`` (C,) for scores ``x`` (log p or logit) scaled by ``inv_t``."""
    z = x * inv_t
    if regions:
        nll = np.logaddexp(0.0, z) - y * z  # BCE = softplus(z) - y z
        grad = ((expit(z) - y) * x).mean(axis=0) / x.shape[1]
        return float(nll.mean()), grad
    zmax = z.max(axis=1, keepdims=True)
    e = np.exp(z - zmax)
    se = e.sum(axis=1, keepdims=True)
    rows = np.arange(len(y))
    nll = (zmax[:, 0] + np.log(se[:, 0]) - z[rows, y]).mean()
    q = e / se
    onehot_x = np.zeros_like(x)
    onehot_x[rows, y] = x[rows, y]
    grad = (q * x - onehot_x).mean(axis=0)
    return float(nll), grad


def nll(log_probs: np.ndarray, target: np.ndarray, regions: bool, params=1.0) -> float:
    """Mean NLL of ``target`` after scaling with ``params`` (a temperature or one per channel).

    Softmax: mean over rows of ``-log softmax(log_probs / T)[y]``; regions: mean over rows and
    channels of the binary cross-entropy of ``sigmoid(logit / T)``. ``params=1.0``: the NLL before
    calibration (of the floored probabilities).
    """
    x, y = _check(log_probs, target, regions)
    inv_t = 1.0 / np.broadcast_to(np.asarray(params, dtype=np.float64), (x.shape[1],))
    return _nll_and_grad(x, y, inv_t, regions)[0]


# -- fitting -------------------------------------------------------------------------------------
def _fit_scalar(x: np.ndarray, y: np.ndarray, regions: bool) -> float:
    ones = np.ones(x.shape[1])

    def f(u):
        return _nll_and_grad(x, y, ones * np.exp(-u), regions)[0]

    lo, hi = np.log(T_BOUNDS)
    res = minimize_scalar(f, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5})
    return float(np.exp(res.x))


def fit_temperature(log_probs: np.ndarray, target: np.ndarray, regions: bool, max_voxels: int | None = None,
                    seed: int = 0) -> float:
    """One temperature ``T`` minimising the mean NLL (module docstring: layout, floor, bounds, sampling)."""
    x, y = _check(log_probs, target, regions)
    sel = _subsample(len(x), max_voxels, seed)
    return _fit_scalar(x[sel], y[sel], regions)


def fit_vector_scaling(log_probs: np.ndarray, target: np.ndarray, regions: bool, max_voxels: int | None = None,
                       seed: int = 0) -> np.ndarray:
    """One temperature per channel, ``(C,)`` float64, minimising the mean NLL jointly.

    Softmax: the ``C`` temperatures of ``softmax_c(log p_c / T_c)`` are fitted together (they
    interact through the normalisation). Regions: each channel's BCE is independent, so this equals
    fitting one temperature per channel. L-BFGS-B on ``log T_c``, started from the single best
    temperature, so the result is never worse (in NLL on the fitted rows) than
    :func:`fit_temperature`. A class that never occurs in ``target`` pushes its temperature to a bound.
    """
    x, y = _check(log_probs, target, regions)
    sel = _subsample(len(x), max_voxels, seed)
    x, y = x[sel], y[sel]
    c = x.shape[1]
    t0 = _fit_scalar(x, y, regions)
    lo, hi = np.log(T_BOUNDS)

    def f(u):
        inv_t = np.exp(-u)
        val, g = _nll_and_grad(x, y, inv_t, regions)
        return val, g * (-inv_t)  # d inv_t / du = -inv_t

    res = minimize(f, np.full(c, np.log(t0)), jac=True, method="L-BFGS-B", bounds=[(lo, hi)] * c,
                   options={"ftol": 1e-12, "gtol": 1e-9, "maxiter": 500})
    return np.exp(res.x)


def fit(log_probs: np.ndarray, target: np.ndarray, regions: bool, method: str = "temperature",
        max_voxels: int | None = None, seed: int = 0):
    """:func:`fit_temperature` (``float``) or :func:`fit_vector_scaling` (``ndarray``) by ``method``."""
    if method == "temperature":
        return fit_temperature(log_probs, target, regions, max_voxels, seed)
    if method == "vector":
        return fit_vector_scaling(log_probs, target, regions, max_voxels, seed)
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")


def crossfit(per_fold: Mapping[int, tuple[np.ndarray, np.ndarray]], regions: bool, method: str = "temperature",
             max_voxels: int | None = None, seed: int = 0) -> tuple[dict, bool]:
    """Cross-fitted parameters: for fold ``k``, fitted (:func:`fit`) on the rows of all *other* folds.

    ``per_fold``: ``{fold: (log_probs (N_k, C), target)}`` (e.g. :meth:`VoxelReservoir.by_group`).
    The other folds' rows are concatenated in increasing fold order (every row weighs the same, so
    a fold with more voxels weighs more). Returns ``({fold: params}, True)``: a temperature (float)
    or ``ndarray (C,)`` (vector) per fold. With a single fold there are no other folds: it is fitted
    on itself and ``False`` says so (the caller must report it as in-sample).
    """
    folds = sorted(per_fold)
    if not folds:
        return {}, False
    if len(folds) == 1:
        lp, y = per_fold[folds[0]]
        return {folds[0]: fit(np.asarray(lp), np.asarray(y), regions, method, max_voxels, seed)}, False
    out = {}
    for k in folds:
        others = [f for f in folds if f != k]
        lp = np.concatenate([np.asarray(per_fold[f][0]) for f in others])
        y = np.concatenate([np.asarray(per_fold[f][1]) for f in others])
        out[k] = fit(lp, y, regions, method, max_voxels, seed)
    return out, True


def fit_all(per_fold: Mapping[int, tuple[np.ndarray, np.ndarray]], regions: bool, method: str = "temperature",
            max_voxels: int | None = None, seed: int = 0):
    """Parameters fitted on the rows of every fold together (in-sample)."""
    folds = sorted(per_fold)
    return fit(np.concatenate([np.asarray(per_fold[f][0]) for f in folds]),
               np.concatenate([np.asarray(per_fold[f][1]) for f in folds]), regions, method, max_voxels, seed)


# -- applying ------------------------------------------------------------------------------------
def apply_scaling(probs: np.ndarray, params, regions: bool) -> np.ndarray:
    """Calibrated probabilities, float32, same shape as ``probs`` ``(C, ...)`` (channel first).

    ``params``: one temperature (float) or ``C`` temperatures. Softmax: ``softmax_c(log p_c / T_c)``
    over axis 0; regions: ``sigmoid(logit(p_c) / T_c)``; exact zeros / ones taken as the floors of
    the module docstring (``PROB_FLOOR``, :func:`upper_floor` of ``probs.dtype``).
    Computed in float64 in chunks of voxels (bounded extra memory).
    """
    probs = np.asarray(probs)
    c = probs.shape[0]
    t = np.asarray(params, dtype=np.float64).reshape(-1)
    if t.size == 1:
        t = np.full(c, t[0])
    if t.size != c:
        raise ValueError(f"{t.size} temperatures for {c} probability channels")
    if not np.all(np.isfinite(t) & (t > 0)):
        raise ValueError(f"temperatures must be finite and > 0, got {t.tolist()}")
    inv_t = (1.0 / t)[:, None]
    flat = probs.reshape(c, -1)
    out = np.empty(flat.shape, dtype=np.float32)
    for s in range(0, flat.shape[1], _APPLY_CHUNK):
        lp = log_probabilities(flat[:, s:s + _APPLY_CHUNK], regions)  # the dtype of probs decides the floor
        if regions:
            z = _logit_from_log(lp) * inv_t
            out[:, s:s + _APPLY_CHUNK] = expit(z)
        else:
            z = lp * inv_t
            z -= z.max(axis=0, keepdims=True)
            e = np.exp(z)
            out[:, s:s + _APPLY_CHUNK] = e / e.sum(axis=0, keepdims=True)
    return out.reshape(probs.shape)


def changes_decision(params, regions: bool) -> bool:
    """Whether scaling with ``params`` can change nnU-Net's segmentation (module docstring, Decisions).

    False for one temperature (softmax) and for any positive temperatures on sigmoid regions; True
    for softmax with per-channel temperatures that are not all equal.
    """
    t = np.asarray(params, dtype=np.float64).reshape(-1)
    if regions or t.size == 1:
        return False
    return not np.all(t == t[0])
