"""Shared binning machinery and the sufficient-statistics containers.

Binning convention (used by every binned metric in this package)
-----------------------------------------------------------------
``n_bins`` equal-width bins on [0, 1] with edges ``e_0 = 0 < e_1 < ... < e_n = 1`` computed by
``np.linspace(0, 1, n_bins + 1)`` in float64 and then cast to the floating dtype of the
probabilities (float32 for nnU-Net output). Comparisons are made in that dtype, so a value that is
*equal* to an edge (as represented in that dtype) belongs to the lower bin:

* bin ``k`` (1-based, ``k = 1..n``) holds the values ``v`` with ``e_{k-1} < v <= e_k``;
* ``v = 0`` (which is ``<= e_0``) is put into the first bin by every metric except pECE, whose
  Algorithm 1 uses ``(lo, hi]`` literally, so that there ``v = 0`` falls into *no* bin;
* ``v = 1`` is in the last bin (``e_{n-1} < 1 <= e_n``);
* bins that hold no value are skipped (they contribute nothing and are not counted as bins).

Sufficient statistics
---------------------
:class:`BinStats` keeps, for a stack of binary "tasks" (classes, regions, ...), per bin and per
outcome ``o in {0, 1}`` (0 = negative / wrong, 1 = positive / correct):
``count[t, b, o]`` (int64) and ``conf_sum[t, b, o]`` (float64, sum of the binned values), plus
``total[t]``, the number of values offered to the task, including those that fell into no bin. All
calibration errors of this package are functions of these numbers, and the numbers of two disjoint
sets of voxels add up, which is what makes pooled (dataset-wide) values exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

#: Voxels processed per chunk. Keeps every temporary small (a few MB) whatever the case size.
CHUNK_VOXELS = 1 << 18


def sum64(x: np.ndarray) -> float:
    """Sum in float64 (``np.einsum`` with a float64 accumulator: same value as
    ``x.sum(dtype=np.float64)`` up to float64 rounding, ~15% faster on float32 input)."""
    return float(np.einsum("i->", np.asarray(x).reshape(-1), dtype=np.float64))


def bin_edges(n_bins: int, dtype=np.float32) -> np.ndarray:
    """Equal-width bin edges ``linspace(0, 1, n_bins + 1)`` cast to ``dtype`` (first 0, last 1)."""
    if not isinstance(n_bins, (int, np.integer)) or isinstance(n_bins, bool) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")
    return np.linspace(0.0, 1.0, int(n_bins) + 1).astype(dtype)


def bin_index(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """0-based bin index of every value for bins ``(e_{k-1}, e_k]``; values ``<= 0`` get ``-1``.

    Exactly equivalent to ``np.searchsorted(edges, values, side="left") - 1`` for values in [0, 1]
    (tested), but about 5x faster: a first guess ``ceil(v * n) - 1`` is off by at most one bin
    because of rounding and is corrected by comparing with the edges themselves.
    """
    n = edges.size - 1
    v = values
    idx = np.ceil(v * v.dtype.type(n)).astype(np.intp)
    idx -= 1
    np.maximum(idx, 0, out=idx)  # two one-sided bounds: faster than np.clip on integers
    np.minimum(idx, n - 1, out=idx)
    idx -= v <= edges.take(idx)  # guess one too high (also maps v == 0 to -1)
    idx += v > edges.take(idx + 1)  # guess one too low
    return idx


def bin_stats(values: np.ndarray, outcome: np.ndarray, edges: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-bin counts (int64) and float64 sums of ``values``, both ``(n_bins, 2)`` indexed by
    ``[bin, outcome]``; values ``<= 0`` are in no bin (see :func:`bin_index`)."""
    return _index_stats(bin_index(values, edges), outcome, values, edges.size - 1)


def _index_stats(idx: np.ndarray, outcome: np.ndarray, values: np.ndarray, n_bins: int
                 ) -> Tuple[np.ndarray, np.ndarray]:
    """:func:`bin_stats` from 0-based bin indices ``idx`` (``-1`` = in no bin); ``idx`` is
    overwritten (it becomes the ``bincount`` key)."""
    key = idx
    key += 1
    key *= 2
    key += outcome
    count = np.bincount(key, minlength=2 * n_bins + 2)[2:].reshape(n_bins, 2)
    sums = np.bincount(key, weights=values, minlength=2 * n_bins + 2)[2:].reshape(n_bins, 2)
    return count, sums


def fold_bin_stats(count: np.ndarray, sums: np.ndarray, fine_edges: np.ndarray, edges: np.ndarray
                   ) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """Statistics of the coarser binning ``edges`` from those of ``fine_edges``, or ``None`` if the
    coarse edges are not exactly every m-th fine edge (then the bins do not nest). Exact: each
    coarse bin ``(e_{k-1}, e_k]`` is the union of m fine bins."""
    nb, nf = edges.size - 1, fine_edges.size - 1
    if nf % nb or fine_edges.dtype != edges.dtype or not np.array_equal(fine_edges[::nf // nb], edges):
        return None
    m = nf // nb
    return count.reshape(nb, m, 2).sum(1), sums.reshape(nb, m, 2).sum(1)


@dataclass
class BinStats:
    """Per-bin sufficient statistics of a stack of binary calibration tasks.

    Attributes
    ----------
    count: int64 array ``(T, n_bins, 2)``; ``count[t, b, o]`` = number of values of task ``t`` in bin
        ``b`` whose outcome is ``o`` (0: negative / incorrect, 1: positive / correct).
    conf_sum: float64 array ``(T, n_bins, 2)``; sum of the binned values (confidences) likewise.
    total: int64 array ``(T,)``; number of values offered to task ``t`` (including values that fell
        into no bin, e.g. pECE's ``p = 0``, but excluding values filtered out beforehand, e.g. the
        CECE threshold or ECE's background voxels).

    Two ``BinStats`` of the same shape add up (``a + b`` or ``a.merge(b)``): the statistics of the
    union of two disjoint voxel sets.
    """

    count: np.ndarray
    conf_sum: np.ndarray
    total: np.ndarray

    @classmethod
    def zeros(cls, n_tasks: int, n_bins: int) -> "BinStats":
        return cls(np.zeros((n_tasks, n_bins, 2), np.int64), np.zeros((n_tasks, n_bins, 2), np.float64),
                   np.zeros(n_tasks, np.int64))

    @property
    def n_bins(self) -> int:
        return self.count.shape[1]

    @property
    def bin_count(self) -> np.ndarray:
        """Number of values per bin, ``(T, n_bins)``."""
        return self.count.sum(-1)

    @property
    def outcome_sum(self) -> np.ndarray:
        """Per-bin sum of the 0/1 outcome, ``(T, n_bins)``: the number of positive (or correct) values."""
        return self.count[..., 1]

    @property
    def confidence_sum(self) -> np.ndarray:
        """Per-bin sum of the binned values (confidences), ``(T, n_bins)``; divide by
        :attr:`bin_count` for the mean confidence."""
        return self.conf_sum.sum(-1)

    def add_(self, task: int, idx: np.ndarray, outcome: np.ndarray, values: np.ndarray, n_offered: int):
        """In-place: add values with 0-based bin indices ``idx`` (``-1`` = in no bin) to ``task``."""
        count, sums = _index_stats(idx.copy(), outcome, values, self.n_bins)
        self.count[task] += count
        self.conf_sum[task] += sums
        self.total[task] += n_offered

    def add_values_(self, task: int, values: np.ndarray, outcome: np.ndarray, edges: np.ndarray,
                    n_offered: Optional[int] = None, zero_in_first: bool = True) -> None:
        """In-place: bin ``values`` (with boolean ``outcome``) into ``task``; ``n_offered`` (default
        ``values.size``) is added to ``total``. ``zero_in_first=False``: values ``== 0`` go to no bin.

        Fast path for the usual segmentation case where most values lie in the first bin: only the
        values above ``e_1`` are binned one by one (:meth:`add_split_`); the first bin's counts and
        sums are the totals minus theirs (float64 sums, so the result equals the direct one up to
        float64 rounding).
        """
        n = values.size
        if n_offered is None:
            n_offered = n
        if n == 0:
            self.total[task] += n_offered
            return
        rest = np.flatnonzero(values > edges[1])
        if 2 * rest.size > n:  # dense: bin everything
            idx = bin_index(values, edges)
            if zero_in_first:
                np.maximum(idx, 0, out=idx)
            self.add_(task, idx, outcome, values, n_offered)
            return
        v_pos = values[outcome]
        n_zero = n_zero_pos = 0
        if not zero_in_first:
            n_zero = int(np.count_nonzero(values == 0))  # a bool count: much faster than on floats
            if n_zero:
                n_zero_pos = v_pos.size - int(np.count_nonzero(v_pos))
        self.add_split_(task, values.take(rest), outcome.take(rest), edges, n, v_pos.size,
                        sum64(values), sum64(v_pos),
                        n_offered, n_zero, n_zero_pos)

    def add_split_(self, task: int, v_rest: np.ndarray, y_rest: np.ndarray, edges: np.ndarray, n: int,
                   n_pos: int, s: float, s_pos: float, n_offered: int, n_zero: int = 0, n_zero_pos: int = 0
                   ) -> None:
        """In-place: add a set of ``n`` values given by its totals and its values above ``e_1``.

        ``v_rest`` / ``y_rest``: exactly the values ``> e_1`` and their outcomes (any order); the
        other arguments as in :meth:`add_binned_`.
        """
        count, sums = bin_stats(v_rest, y_rest, edges)  # all in bins >= 2
        self.add_binned_(task, count, sums, n, n_pos, s, s_pos, n_offered, n_zero, n_zero_pos)

    def add_binned_(self, task: int, count: np.ndarray, sums: np.ndarray, n: int, n_pos: int, s: float,
                    s_pos: float, n_offered: int, n_zero: int = 0, n_zero_pos: int = 0) -> None:
        """In-place: add a set of ``n`` values given by its totals and the per-bin statistics
        (:func:`bin_stats`) of its values above ``e_1`` (first bin of ``count`` / ``sums`` empty).

        ``n_pos``: number of positive outcomes among all ``n`` values; ``s`` / ``s_pos``: float64
        sums of all values and of the values with a positive outcome; ``n_zero`` / ``n_zero_pos``:
        values equal to 0 that go to no bin (pECE) and the positives among them. The first bin gets
        the totals minus the rest; callers that already hold these totals (shared between metrics)
        skip a pass over the values.
        """
        self.count[task] += count
        self.conf_sum[task] += sums
        self.total[task] += n_offered
        n_first = n - int(count.sum()) - n_zero
        n_first_pos = n_pos - int(count[:, 1].sum()) - n_zero_pos
        s_first = s - float(sums.sum())
        s_first_pos = s_pos - float(sums[:, 1].sum())
        self.count[task, 0, 1] += n_first_pos
        self.count[task, 0, 0] += n_first - n_first_pos
        self.conf_sum[task, 0, 1] += s_first_pos
        self.conf_sum[task, 0, 0] += s_first - s_first_pos

    def _check_compatible(self, other: "BinStats"):
        if not isinstance(other, BinStats):
            raise TypeError(f"cannot merge BinStats with {type(other).__name__}")
        if other.count.shape != self.count.shape:
            raise ValueError(f"cannot merge statistics of shape {self.count.shape} and {other.count.shape} "
                             "(different number of classes/regions or bins)")

    def __add__(self, other: "BinStats") -> "BinStats":
        self._check_compatible(other)
        return BinStats(self.count + other.count, self.conf_sum + other.conf_sum, self.total + other.total)

    merge = __add__

    def reliability(self):
        """Per task and bin: ``(n, mean confidence, observed frequency)``, NaN for empty bins."""
        n = self.bin_count
        with np.errstate(invalid="ignore", divide="ignore"):
            return n, self.confidence_sum / n, self.outcome_sum / n


@dataclass
class SumStats:
    """Sum and count of a per-voxel quantity (NLL, Brier); they add up like :class:`BinStats`."""

    total: float = 0.0
    count: int = 0

    def __add__(self, other: "SumStats") -> "SumStats":
        if not isinstance(other, SumStats):
            raise TypeError(f"cannot merge SumStats with {type(other).__name__}")
        return SumStats(self.total + other.total, self.count + other.count)

    merge = __add__

    def mean(self) -> float:
        return float(self.total / self.count) if self.count else float("nan")
