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
exactly is kept instead (:class:`ValueStats`), per task:

* the values themselves, as the :func:`sort_keys` of each update (``uint32`` for float32 values,
  ``uint64`` for float64; unsorted, one array per case, with an integer weight: ``a + b`` and
  :meth:`ValueStats.scaled` only append arrays or change weights);
* a histogram of the values over *buckets*: a value's bucket is the top ``8 + BUCKET_MANTISSA_BITS``
  bits of its float32 bit pattern (float64 values rounded to float32 first), i.e. intervals of
  relative width ``2**-BUCKET_MANTISSA_BITS``; per bucket the number of negative and positive
  outcomes and the float64 sums of their values. Buckets are monotone in the value, so
  bucket counts locate every cut ``P_k`` in one bucket.

:meth:`ValueStats.equal_mass` then needs the exact values only inside the (at most ``n_bins``)
buckets that hold a cut: a float32 value is its bucket plus the low ``23 - BUCKET_MANTISSA_BITS``
bits, so those values are counted with one ``bincount`` over the keys falling in those buckets; no
value is sorted (float64 values in them are sorted, they are few). Every other bucket lies wholly
inside one bin and contributes its histogram row. Counts are exact; sums are float64 sums in another
order than a per-value loop (they agree to float64 rounding). Memory: 4 bytes per float32 value
offered, plus the histogram (a few thousand rows for probabilities in [1e-3, 1]).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

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


#: float32 mantissa bits kept in a value's bucket (module docstring): buckets of relative width 2**-10
BUCKET_MANTISSA_BITS = 10
_LOW_BITS = 23 - BUCKET_MANTISSA_BITS  # float32 mantissa bits below the bucket
_N_BUCKETS = 1 << (31 - _LOW_BITS)  # every bucket id of a value >= 0 (inf included) is below this
_F32_SHIFT = np.uint32(_LOW_BITS + 1)  # a uint32 key's bucket: key >> _F32_SHIFT


def _bucket_of_keys(keys: np.ndarray) -> np.ndarray:
    """Bucket id of every :func:`sort_keys` key (uint32 or uint64), as uint32."""
    if keys.dtype == np.uint32:
        return keys >> _F32_SHIFT
    f32 = (keys >> np.uint64(1)).view(np.float64).astype(np.float32)  # rounding is monotone
    return f32.view(np.uint32) >> np.uint32(_LOW_BITS)


def _bucket_of_values(values: np.ndarray) -> np.ndarray:
    """Bucket id of float64 values >= 0 (as :func:`_bucket_of_keys`), as intp."""
    return (values.astype(np.float32).view(np.uint32) >> np.uint32(_LOW_BITS)).astype(np.intp)


def _values_of_keys(keys: np.ndarray) -> np.ndarray:
    one = keys.dtype.type(1)
    return (keys >> one).view(np.float32 if keys.dtype == np.uint32 else np.float64)


def _histogram(keys: np.ndarray):
    """``(ids, n, s)``: the occupied buckets of ``keys`` (sorted intp ids), counts ``(U, 2)`` int64 and
    float64 value sums ``(U, 2)`` per outcome."""
    if keys.size == 0:
        return np.zeros(0, np.intp), np.zeros((0, 2), np.int64), np.zeros((0, 2))
    idx = _bucket_of_keys(keys).astype(np.intp)
    idx <<= 1
    idx |= (keys & keys.dtype.type(1)).astype(np.intp)  # bucket * 2 + outcome
    base = int(idx.min()) & ~1
    if base:
        idx -= base
    n = np.bincount(idx)
    s = np.bincount(idx, weights=_values_of_keys(keys))
    if n.size % 2:
        n, s = np.append(n, 0), np.append(s, 0.0)
    n, s = n.reshape(-1, 2), s.reshape(-1, 2)
    rows = np.flatnonzero(n[:, 0] + n[:, 1])
    return rows + base // 2, n[rows], s[rows]


def _distinct_keys(keys: np.ndarray, weight: int):
    """``(values, count)`` of :func:`sort_keys` keys: sorted distinct values (float64) and the number
    of negative / positive outcomes at each ``(m, 2)``, times ``weight``. One sort of the keys."""
    k = np.sort(keys)
    first = np.flatnonzero(np.concatenate(([True], k[1:] != k[:-1])))
    cnt = np.diff(np.append(first, k.size)) * int(weight)
    u = k[first]  # distinct keys: a value appears at most twice, outcome 0 before outcome 1
    v = _values_of_keys(u).astype(np.float64)
    new = np.concatenate(([True], v[1:] != v[:-1]))
    grp = np.cumsum(new) - 1
    count = np.zeros((int(new.sum()), 2), np.int64)
    count[grp, (u & u.dtype.type(1)).astype(np.intp)] = cnt
    return v[new], count


def _add_on_union(keys, *columns):
    """Sparse rows added on the union of their keys: ``keys`` a list of sorted, unique key arrays (one
    per operand), each of ``columns`` a list with one ``(len(keys[i]), ...)`` array per operand. Returns
    ``(union of the keys, summed rows of each column)``; a key present in several operands gets the sum."""
    union = np.unique(np.concatenate(keys))
    sums = [np.zeros((union.size,) + col[0].shape[1:], col[0].dtype) for col in columns]
    for i, k in enumerate(keys):  # keys are unique within each operand: plain fancy += is exact
        at = np.searchsorted(union, k)
        for total, col in zip(sums, columns):
            total[at] += col[i]
    return (union, *sums)


def _merge_distinct(parts):
    """Merge ``(values, count)`` pairs of :func:`_distinct_keys` (same value -> counts added)."""
    return _add_on_union([v for v, _ in parts], [c for _, c in parts])


@dataclass
class ValueStats:
    """Exact, mergeable statistics of equal-mass bins for a stack of tasks (module docstring).

    Attributes
    ----------
    ids, n, s: per task the occupied buckets (sorted), their counts ``(U, 2)`` (int64, outcome 0 / 1,
        weighted) and value sums ``(U, 2)`` (float64, weighted).
    pieces: per task a list of ``(keys, weight)``: the :func:`sort_keys` of one update and how many
        times each of its values counts.
    total: int64 ``(T,)``: number of values offered to each task (as :class:`~._binning.BinStats`).
    n_bins: number of equal-mass bins formed by :meth:`equal_mass`.

    ``a + b``: the statistics of the union of two disjoint sets (same number of tasks and bins).
    """

    ids: List[np.ndarray]
    n: List[np.ndarray]
    s: List[np.ndarray]
    pieces: List[List[Tuple[np.ndarray, int]]]
    total: np.ndarray
    n_bins: int

    @classmethod
    def zeros(cls, n_tasks: int, n_bins: int) -> "ValueStats":
        return cls([np.zeros(0, np.intp)] * n_tasks, [np.zeros((0, 2), np.int64)] * n_tasks,
                   [np.zeros((0, 2))] * n_tasks, [[] for _ in range(n_tasks)], np.zeros(n_tasks, np.int64),
                   int(n_bins))

    @property
    def n_tasks(self) -> int:
        return len(self.ids)

    def set_from_keys_(self, task: int, keys: Sequence[np.ndarray], n_offered: int) -> None:
        """In place: ``task`` gets the values behind the :func:`sort_keys` ``keys`` (several arrays of
        one dtype, concatenated); replaces what the task held. No sort: one histogram pass."""
        self.total[task] = n_offered
        k = np.concatenate(keys) if len(keys) > 1 else (keys[0] if keys else np.zeros(0, np.uint32))
        self.ids[task], self.n[task], self.s[task] = _histogram(k)
        self.pieces[task] = [(k, 1)] if k.size else []

    def copy(self) -> "ValueStats":
        """A copy whose lists can change without changing this one (the key arrays are never modified
        and are shared)."""
        return ValueStats(list(self.ids), list(self.n), list(self.s), [list(p) for p in self.pieces],
                          self.total.copy(), self.n_bins)

    def __add__(self, other: "ValueStats") -> "ValueStats":
        if not isinstance(other, ValueStats):
            raise TypeError(f"cannot merge ValueStats with {type(other).__name__}")
        if other.n_tasks != self.n_tasks or other.n_bins != self.n_bins:
            raise ValueError(f"cannot merge statistics of {self.n_tasks} tasks / {self.n_bins} bins with "
                             f"{other.n_tasks} tasks / {other.n_bins} bins")
        ids, n, s = [], [], []
        for t in range(self.n_tasks):
            u, nt, st = _add_on_union([self.ids[t], other.ids[t]], [self.n[t], other.n[t]], [self.s[t], other.s[t]])
            ids.append(u)
            n.append(nt)
            s.append(st)
        pieces = [a + b for a, b in zip(self.pieces, other.pieces)]
        return ValueStats(ids, n, s, pieces, self.total + other.total, self.n_bins)

    merge = __add__

    def scaled(self, weight: int) -> "ValueStats":
        """The statistics of every value repeated ``weight`` times (bootstrap resampling of cases)."""
        w = int(weight)
        if w < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        if w == 0:  # no value left (an all-zero histogram would have no cut to find)
            return ValueStats.zeros(self.n_tasks, self.n_bins)
        return ValueStats(list(self.ids), [c * w for c in self.n], [x * w for x in self.s],
                          [[(k, pw * w) for k, pw in p] for p in self.pieces], self.total * w, self.n_bins)

    # -- equal-mass bins ---------------------------------------------------------------------------
    def _cuts(self, task: int):
        """``(P, j, before)``: the 1-based positions ``P_k`` of the bins' upper edges in the sorted values
        (``np.array_split`` parts), the index (into ``ids``) of the bucket holding each, and per bucket
        the number of values in the buckets below it (weighted, both outcomes)."""
        per = self.n[task].sum(1)
        cum = np.cumsum(per)
        q, r = divmod(int(cum[-1]), self.n_bins)
        k = np.arange(1, self.n_bins + 1)
        pos = np.maximum(k * q + np.minimum(k, r), 1)
        return pos, np.searchsorted(cum, pos, side="left"), cum - per

    def _refine(self, task: int, rows: np.ndarray):
        """Distinct values (sorted, float64) of the buckets ``ids[task][rows]`` (``rows`` sorted) with
        their weighted counts ``(m, 2)`` per outcome, and the position in ``rows`` of each one's bucket.

        A float32 key in those buckets is counted in a table indexed by (bucket, low mantissa bits,
        outcome): no sort. Keys of float64 values, and float32 keys too few to fill the table (e.g.
        many bins on few values), are sorted instead (:func:`_distinct_keys`)."""
        bucket_ids = self.ids[task][rows]
        slot_of = np.full(_N_BUCKETS, -1, np.intp)
        slot_of[bucket_ids] = np.arange(rows.size)
        n_low = 1 << (_LOW_BITS + 1)  # low mantissa bits and the outcome bit of a uint32 key
        table = None
        parts = []  # (values, counts) of the sorted keys
        for keys, w in self.pieces[task]:
            slot = slot_of[_bucket_of_keys(keys)]
            sel = np.flatnonzero(slot >= 0)
            if not sel.size:
                continue
            if keys.dtype == np.uint32 and 8 * sel.size >= rows.size * n_low:
                comb = slot[sel] * n_low
                comb += (keys[sel] & np.uint32(n_low - 1)).astype(np.intp)
                cnt = np.bincount(comb, minlength=rows.size * n_low)
                table = cnt * w if table is None else table + cnt * w
            else:
                parts.append(_distinct_keys(keys[sel], w))
        if table is not None:
            t2 = table.reshape(rows.size, n_low // 2, 2)
            slot_i, low_i = np.nonzero(t2[:, :, 0] + t2[:, :, 1])
            bits = (bucket_ids[slot_i].astype(np.uint32) << np.uint32(_LOW_BITS)) | low_i.astype(np.uint32)
            parts.append((bits.view(np.float32).astype(np.float64), t2[slot_i, low_i]))
        values, count = parts[0] if len(parts) == 1 else _merge_distinct(parts)
        return values, count, slot_of[_bucket_of_values(values)]

    def distinct(self, task: int):
        """``(values, count)``: every distinct value of the task (sorted, float64) and its weighted
        counts ``(U, 2)`` per outcome (for inspection and tests; sorts all values)."""
        parts = [_distinct_keys(k, w) for k, w in self.pieces[task]]
        if not parts:
            return np.zeros(0), np.zeros((0, 2), np.int64)
        return parts[0] if len(parts) == 1 else _merge_distinct(parts)

    def _edges_and_refined(self, task: int):
        pos, j, before = self._cuts(task)
        rows = np.unique(j)
        values, count, slot = self._refine(task, rows)
        per = count.sum(1)
        cs = np.cumsum(per)
        first = np.searchsorted(slot, np.arange(rows.size), side="left")  # first refined value of each row
        prev = np.where(first > 0, cs[np.maximum(first - 1, 0)], 0)
        g = cs - prev[slot] + before[rows][slot]  # position in the sorted values of each distinct value's last copy
        edges = values[np.searchsorted(g, pos, side="left")]
        return edges, j, rows, values, count

    def edges(self, task: int) -> np.ndarray:
        """The ``n_bins`` upper edges of a task's equal-mass bins (repeated where bins are empty)."""
        if not self.ids[task].size:
            return np.full(self.n_bins, np.nan)
        return self._edges_and_refined(task)[0]

    def equal_mass(self) -> BinStats:
        """:class:`~._binning.BinStats` of the equal-mass bins (module docstring) of every task."""
        out = BinStats.zeros(self.n_tasks, self.n_bins)
        out.total[:] = self.total
        for t in range(self.n_tasks):
            ids = self.ids[t]
            if not ids.size:
                continue
            edges, j, rows, values, count = self._edges_and_refined(t)
            whole = np.ones(ids.size, bool)
            whole[rows] = False  # buckets without a cut: wholly in the bin after the edges below them
            b_whole = np.searchsorted(ids[j], ids[whole], side="left")
            b_val = np.searchsorted(edges, values, side="left")  # the lowest bin whose edge it reaches
            bins = np.concatenate([b_whole, b_val])
            cnt = np.concatenate([self.n[t][whole], count])
            sums = np.concatenate([self.s[t][whole], values[:, None] * count])
            for o in (0, 1):
                out.count[t, :, o] = np.rint(np.bincount(bins, weights=cnt[:, o], minlength=self.n_bins))
                out.conf_sum[t, :, o] = np.bincount(bins, weights=sums[:, o], minlength=self.n_bins)
        return out
