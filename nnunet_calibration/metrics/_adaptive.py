"""Equal-mass ("adaptive") binning and its exact, mergeable sufficient statistics.

Equal-mass edges (used with ``binning="adaptive"``)
---------------------------------------------------
For one task (class, region, ...) with ``N`` values and ``B = n_bins``:

1. sort the values ``v_(1) <= ... <= v_(N)``;
2. cut the sorted list into ``B`` consecutive parts exactly like ``np.array_split`` (and
   ``torch.tensor_split``): the first ``N mod B`` parts hold ``ceil(N / B)`` values, the others
   ``floor(N / B)``; with ``B > N`` the first ``N`` parts hold one value and the rest none;
3. the upper edge of part ``k`` is its largest value, ``e_k = v_(P_k)`` with ``P_k`` the position of
   its last element;
4. the bins are then ``(e_{k-1}, e_k]`` *by value* (``e_0 = -inf``): every value equal to an edge,
   and so every tie, lies in one bin, the lowest one whose edge it reaches. A tie group that
   straddles a cut therefore goes wholly into the lower bin, and a bin left without values (its
   values were all equal to the previous edge, or ``B > N``) is empty and skipped like any empty
   bin. Which outcome a tied value has never changes the bins.

Without ties this is exactly "sort and split into B parts" (torch-uncertainty's
``AdaptiveCalibrationError``, Nixon et al. 2019); with ties that split would depend on the order of
the tied values, which this definition avoids.

Sufficient statistics
---------------------
Equal-mass edges depend on all values, so per-bin statistics of two sets do not add up. What adds up
exactly is, per task, the distinct values with the number of negative and positive outcomes at each
(:class:`ValueStats`); the binned statistics (:class:`~._binning.BinStats`) are formed from them when
the metric is computed (:meth:`ValueStats.equal_mass`). Its size is the number of distinct values
(at most the number of values offered; float32 probabilities have at most 2^30 distinct values in
(0, 1]), i.e. much larger than the fixed-size statistics of equal-width bins.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence

import numpy as np

from nnunet_calibration.settings.metrics import BINNINGS

from ._binning import BinStats

__all__ = ["ValueStats", "BINNINGS", "check_binning"]



def check_binning(binning: str) -> str:
    if binning not in BINNINGS:
        raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}")
    return binning


def sort_keys(values: np.ndarray, outcome: np.ndarray) -> np.ndarray:
    """Integer keys that sort like ``(value, outcome)``: the value's bits shifted left by one, plus the
    outcome. For non-negative floats the bit pattern is monotone in the value (``-0.0`` is not
    allowed; the metrics only offer values > 0 here). float32 gives uint32 keys, float64 uint64."""
    if values.dtype == np.float32:
        bits = values.view(np.uint32)
    else:
        bits = np.ascontiguousarray(values, dtype=np.float64).view(np.uint64)
    key = bits << bits.dtype.type(1)
    key |= outcome.astype(bits.dtype)
    return key


def unique_inverse(x: np.ndarray):
    """``np.unique(x, return_inverse=True)`` for a 1-D array, by one stable argsort (several times
    faster than ``np.unique``'s inverse for float64 of this size)."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    new = np.concatenate(([True], xs[1:] != xs[:-1])) if xs.size else np.zeros(0, bool)
    inv = np.empty(x.size, np.intp)
    inv[order] = np.cumsum(new) - 1
    return xs[new], inv


@dataclass
class ValueStats:
    """Distinct values and per-outcome counts of a stack of tasks: exact statistics of equal-mass bins.

    Attributes
    ----------
    values: list (one per task) of sorted distinct values, float64.
    count: list (one per task) of int64 arrays ``(U, 2)``: number of values equal to ``values[j]``
        whose outcome is 0 (negative / incorrect) and 1 (positive / correct).
    total: int64 ``(T,)``: number of values offered to each task (as :class:`~._binning.BinStats`).
    n_bins: number of equal-mass bins formed by :meth:`equal_mass`.

    ``a + b``: the statistics of the union of two disjoint sets (same number of tasks and bins).
    """

    values: List[np.ndarray]
    count: List[np.ndarray]
    total: np.ndarray
    n_bins: int

    @classmethod
    def zeros(cls, n_tasks: int, n_bins: int) -> "ValueStats":
        return cls([np.zeros(0)] * n_tasks, [np.zeros((0, 2), np.int64)] * n_tasks, np.zeros(n_tasks, np.int64),
                   int(n_bins))

    def set_from_keys_(self, task: int, keys: Sequence[np.ndarray], n_offered: int) -> None:
        """In place: ``task`` gets the values behind the :func:`sort_keys` ``keys`` (several arrays,
        concatenated; float32 keys if uint32). One sort of all keys; replaces what the task held."""
        self.total[task] = n_offered
        k = np.concatenate(keys) if len(keys) > 1 else (keys[0].copy() if keys else np.zeros(0, np.uint32))
        if k.size == 0:
            self.values[task], self.count[task] = np.zeros(0), np.zeros((0, 2), np.int64)
            return
        k.sort()
        one = k.dtype.type(1)
        bits = k >> one  # the value's bits, now sorted
        first = np.flatnonzero(np.concatenate(([True], bits[1:] != bits[:-1])))
        n_all = np.diff(np.append(first, k.size))
        n_pos = np.add.reduceat((k & one).astype(np.int64), first)
        v = bits[first]
        v = v.view(np.float32) if k.dtype == np.uint32 else v.view(np.float64)
        count = np.empty((first.size, 2), np.int64)
        count[:, 0] = n_all - n_pos
        count[:, 1] = n_pos
        self.values[task] = v.astype(np.float64)
        self.count[task] = count

    def __add__(self, other: "ValueStats") -> "ValueStats":
        if not isinstance(other, ValueStats):
            raise TypeError(f"cannot merge ValueStats with {type(other).__name__}")
        if len(other.values) != len(self.values) or other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge statistics of {len(self.values)} tasks / {self.n_bins} bins with "
                             f"{len(other.values)} tasks / {other.n_bins} bins")
        values, count = [], []
        for va, ca, vb, cb in zip(self.values, self.count, other.values, other.count):
            u, inv = unique_inverse(np.concatenate([va, vb]))
            cab = np.concatenate([ca, cb])
            c = np.stack([np.bincount(inv, weights=cab[:, o], minlength=u.size) for o in (0, 1)], 1)
            c = np.rint(c).astype(np.int64)
            values.append(u)
            count.append(c)
        return ValueStats(values, count, self.total + other.total, self.n_bins)

    merge = __add__

    def scaled(self, weight: int) -> "ValueStats":
        """The statistics of every value repeated ``weight`` times (bootstrap resampling of cases)."""
        return ValueStats(list(self.values), [c * int(weight) for c in self.count], self.total * int(weight),
                          self.n_bins)

    def edge_index(self, task: int) -> np.ndarray:
        """Index (into ``values[task]``) of the upper edge ``e_k`` of each of the ``n_bins`` bins."""
        c = self.count[task]
        cum = np.cumsum(c[:, 0] + c[:, 1])
        q, r = divmod(int(cum[-1]) if cum.size else 0, self.n_bins)
        k = np.arange(1, self.n_bins + 1)
        ends = k * q + np.minimum(k, r)  # 1-based position of the last value of part k (np.array_split)
        return np.searchsorted(cum, np.maximum(ends, 1), side="left")

    def edges(self, task: int) -> np.ndarray:
        """The ``n_bins`` upper edges of a task's equal-mass bins (repeated where bins are empty)."""
        if not self.values[task].size:
            return np.full(self.n_bins, np.nan)
        return self.values[task][np.minimum(self.edge_index(task), self.values[task].size - 1)]

    def equal_mass(self) -> BinStats:
        """:class:`~._binning.BinStats` of the equal-mass bins (module docstring) of every task."""
        out = BinStats.zeros(len(self.values), self.n_bins)
        out.total[:] = self.total
        for t, (v, c) in enumerate(zip(self.values, self.count)):
            if not v.size:
                continue
            last = self.edge_index(t)  # bin k holds the distinct values last[k-1]+1 .. last[k]
            start = np.concatenate(([0], last[:-1] + 1))
            full = np.flatnonzero(last >= start)  # bins that hold values (others are empty)
            for o in (0, 1):
                co = np.ascontiguousarray(c[:, o])
                out.count[t, full, o] = np.add.reduceat(co, start[full])
                out.conf_sum[t, full, o] = np.add.reduceat(v * co, start[full])
        return out
