"""Bootstrap confidence intervals of pooled (dataset-wide) metrics, resampling cases.

A pooled metric is ``compute(sum_i stats_i)`` over the per-case sufficient statistics ``stats_i``
(:class:`~._binning.BinStats`, :class:`~._binning.SumStats` or :class:`~._adaptive.ValueStats`).
One bootstrap replicate draws ``n`` cases with replacement from the ``n`` cases and computes the
metric of their summed statistics, each case counted as often as it was drawn (the voxels of a case
stay together: the case, not the voxel, is the independent unit).

Conventions
-----------
* Draws: ``rng = np.random.default_rng(seed)``; ``idx = rng.integers(0, n, size=(n_resamples, n))``;
  replicate ``j`` weights case ``i`` by ``np.bincount(idx[j], minlength=n)[i]``. A fixed ``seed``
  (default 0) gives the same interval every time.
* Interval: the percentile interval, ``np.percentile(replicates, [50 (1 - confidence), 50 (1 +
  confidence)])`` (linear interpolation), over the replicates that are not NaN (a replicate is NaN
  when e.g. none of its cases has foreground); ``n_valid`` says how many those were.
* Paired comparison (``baseline=...``): the same draws for both methods, replicate = metric of the
  method minus metric of the baseline on the same resampled cases, so the interval is that of the
  difference (the cases must be the same, in the same order). An interval that excludes 0 says the
  difference is not explained by which cases happen to be in the data set.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np

from ._adaptive import ValueStats, check_binning
from ._binning import BinStats, SumStats, bin_edges
from ._checks import Regions, _check_types_and_shapes, _validate, resolve_region_labels
from .boundary import _boundary_ece_update
from .calibration import _cece_update, _ece_compute, _ece_update
from .ece_variants import _debiased_compute

__all__ = ["BootstrapInterval", "bootstrap_ci", "CaseStatistics"]

Stats = Union[BinStats, SumStats, ValueStats]


@dataclass(frozen=True)
class BootstrapInterval:
    """``estimate`` (on all cases, each once), percentile interval ``[low, high]`` at ``confidence``."""

    estimate: float
    low: float
    high: float
    confidence: float
    n_resamples: int
    n_valid: int


class _Stack:
    """Per-case statistics of one type, summed with one integer weight per case."""

    def __init__(self, stats: Sequence[Stats]):
        if not stats:
            raise ValueError("no case statistics given")
        kind = type(stats[0])
        if any(type(s) is not kind for s in stats) or kind not in (BinStats, SumStats, ValueStats):
            raise TypeError("case statistics must all be BinStats, all SumStats or all ValueStats")
        self.kind, self.n = kind, len(stats)
        if kind is BinStats:
            self.arrays = [np.stack([getattr(s, f) for s in stats]) for f in ("count", "conf_sum", "total")]
        elif kind is SumStats:
            self.arrays = [np.array([s.total for s in stats]), np.array([s.count for s in stats])]
        else:
            self.stats = list(stats)

    def weighted(self, w: np.ndarray) -> Stats:
        if self.kind is BinStats:
            return BinStats(*[np.tensordot(w, a, axes=1) for a in self.arrays])
        if self.kind is SumStats:
            return SumStats(float(w @ self.arrays[0]), int(w @ self.arrays[1]))
        out = None  # the cases drawn, each scaled by how often (merging ValueStats only appends arrays)
        for st, k in zip(self.stats, w.tolist()):
            if k:
                part = st.scaled(k)
                out = part if out is None else out + part
        return out if out is not None else ValueStats.zeros(self.stats[0].n_tasks, self.stats[0].n_bins)


def bootstrap_ci(case_stats: Sequence[Stats], compute: Callable[[Stats], float], n_resamples: int = 1000,
                 confidence: float = 0.95, seed: int = 0, baseline: Optional[Sequence[Stats]] = None
                 ) -> BootstrapInterval:
    """Percentile bootstrap interval of ``compute(sum of the case statistics)``, resampling cases.

    ``case_stats``: one statistics object per case (module docstring); ``compute``: statistics ->
    float (e.g. the ``_X_compute`` of the metric, or :meth:`CaseStatistics.bootstrap` which picks
    it). ``baseline``: the other method's statistics of the same cases for a paired interval of
    ``metric - baseline metric``. Returns :class:`BootstrapInterval`.
    """
    if not (isinstance(n_resamples, (int, np.integer)) and n_resamples >= 1):
        raise ValueError(f"n_resamples must be a positive integer, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    stack = _Stack(list(case_stats))
    other = None if baseline is None else _Stack(list(baseline))
    if other is not None and other.n != stack.n:
        raise ValueError(f"baseline has {other.n} cases but case_stats has {stack.n}")

    def value(w):
        v = float(compute(stack.weighted(w)))
        return v if other is None else v - float(compute(other.weighted(w)))

    estimate = value(np.ones(stack.n, np.int64))
    idx = np.random.default_rng(seed).integers(0, stack.n, size=(n_resamples, stack.n))
    reps = np.array([value(np.bincount(row, minlength=stack.n)) for row in idx])
    reps = reps[~np.isnan(reps)]
    if reps.size == 0:
        return BootstrapInterval(estimate, float("nan"), float("nan"), confidence, int(n_resamples), 0)
    low, high = np.percentile(reps, [50 * (1 - confidence), 50 * (1 + confidence)])
    return BootstrapInterval(estimate, float(low), float(high), confidence, int(n_resamples), int(reps.size))


#: scalar estimators of :class:`CaseStatistics` from the pooled statistics
ESTIMATORS = {
    "ece": _ece_compute,
    "debiased_l2": lambda s: _debiased_compute(s, squared=False),
    "debiased_l2_squared": lambda s: _debiased_compute(s, squared=True),
}


class CaseStatistics:
    """Sufficient statistics of one binned metric, kept case by case (thin stateful class).

    ``metric``: ``"ECE"`` (:func:`.calibration.ece`), ``"CECE"`` (:func:`.calibration.cece`) or
    ``"boundary ECE"`` (:func:`.boundary.boundary_ece`, ``update`` then needs the case's spacing),
    with ``n_bins`` (default 15, 10, 15), ``binning``, ``threshold`` (CECE), ``k_mm`` (boundary) and
    the label layout ``regions`` / ``region_labels`` as those functions. ``compute(estimator)`` gives
    the pooled value over all cases (``"ece"``: the metric itself; ``"debiased_l2"`` /
    ``"debiased_l2_squared"``: :func:`.ece_variants.debiased_l2_ece` on the same voxels);
    ``bootstrap(...)`` its interval (:func:`bootstrap_ci`). ``a + b``: the cases of both. Memory: one
    statistics object per case (fixed size for uniform bins, the case's distinct values for adaptive).
    """

    METRICS = {"ECE": 15, "CECE": 10, "boundary ECE": 15}

    def __init__(self, metric: str = "ECE", *, n_bins: Optional[int] = None, binning: str = "uniform",
                 threshold: float = 1e-3, k_mm: Optional[float] = None, regions: bool = False,
                 region_labels: Regions = None):
        if metric not in self.METRICS:
            raise ValueError(f"metric must be one of {tuple(self.METRICS)}, got {metric!r}")
        n_bins = self.METRICS[metric] if n_bins is None else n_bins
        bin_edges(n_bins)
        self.options = dict(metric=metric, n_bins=n_bins, binning=check_binning(binning), threshold=float(threshold),
                            k_mm=k_mm, regions=bool(regions), region_labels=resolve_region_labels(regions, region_labels))
        self.cases: List[Stats] = []

    def update(self, probs, labels, spacing=None, validate_args: bool = False) -> "CaseStatistics":
        """Add one case (``spacing``: only for ``"boundary ECE"``)."""
        o = self.options
        probs, labels, regions = _check_types_and_shapes(probs, labels, o["region_labels"])
        if validate_args:
            _validate(probs, labels, regions)
        if o["metric"] == "ECE":
            stats = _ece_update(probs, labels, o["n_bins"], regions, o["binning"])
        elif o["metric"] == "CECE":
            stats = _cece_update(probs, labels, o["n_bins"], o["threshold"], regions, o["binning"])
        else:
            stats = _boundary_ece_update(probs, labels, spacing, o["k_mm"], o["n_bins"], regions, o["binning"])
        self.cases.append(stats)
        return self

    def __add__(self, other: "CaseStatistics") -> "CaseStatistics":
        if not isinstance(other, CaseStatistics) or other.options != self.options:
            raise ValueError("can only merge CaseStatistics of the same metric and options")
        out = CaseStatistics.__new__(CaseStatistics)
        out.options, out.cases = dict(self.options), self.cases + other.cases
        return out

    merge = __add__

    @property
    def n_cases(self) -> int:
        return len(self.cases)

    def pooled(self) -> Stats:
        """The statistics of all cases together (their sum)."""
        if not self.cases:
            raise ValueError("no cases")
        return _Stack(self.cases).weighted(np.ones(len(self.cases), np.int64))

    def compute(self, estimator: str = "ece") -> float:
        return float(ESTIMATORS[_check_estimator(estimator)](self.pooled())) if self.cases else float("nan")

    def bootstrap(self, estimator: str = "ece", n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
                  baseline: Optional["CaseStatistics"] = None) -> BootstrapInterval:
        """:func:`bootstrap_ci` of ``compute(estimator)``; ``baseline``: the same cases of another method."""
        if baseline is not None and baseline.options != self.options:
            raise ValueError("the baseline must have the same metric and options")
        return bootstrap_ci(self.cases, ESTIMATORS[_check_estimator(estimator)], n_resamples, confidence, seed,
                            None if baseline is None else baseline.cases)


def _check_estimator(name: str) -> str:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {tuple(ESTIMATORS)}, got {name!r}")
    return name
