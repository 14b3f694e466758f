"""Per-chunk kernels of the calibration metrics and the helpers that compute values from statistics.

A kernel adds one :class:`._chunk._Chunk` of voxels to a metric's sufficient statistics
(:class:`~._binning.BinStats` or :class:`~._binning.SumStats`); the single-case functions of
:mod:`.calibration` and :class:`.accumulator.CalibrationAccumulator` share them. Conventions are
documented in :mod:`.calibration` and :mod:`._binning`.
"""
from __future__ import annotations

from typing import Iterator, List, Tuple, Union

import numpy as np

from ._adaptive import ValueStats, sort_keys
from ._binning import BinStats, SumStats, bin_edges, sum64
from ._chunk import _Chunk, _chunks


def _ece_tasks(n_channels: int, regions) -> int:
    return 1 if regions is None else len(regions)


def _max_argmax(p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Channel max and argmax (first channel on ties, like ``np.argmax``), one channel at a time."""
    conf = p[0].copy()
    pred = np.zeros(p.shape[1], np.intp)
    for c in range(1, p.shape[0]):
        better = p[c] > conf
        pred[better] = c
        np.maximum(conf, p[c], out=conf)
    return conf, pred


def _ece_values(ch: _Chunk) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """``(task, confidence, correct)`` of ECE's voxels in the chunk (see :func:`.calibration.ece`)."""
    if ch.regions is None:
        idx = ch.fg_index()
        if idx.size == 0:
            return
        sub = ch.p.take(idx, axis=1)  # foreground voxels only (usually few)
        conf, pred = _max_argmax(sub)
        yield 0, conf, pred == ch.lab.take(idx)
    else:
        for r in range(len(ch.regions)):
            y = ch.target(r)
            if not y.any():
                continue
            pr = ch.p[r][y]
            yield r, np.maximum(pr, 1 - pr), pr > 0.5


def _ece_kernel(ch: _Chunk, stats: BinStats, edges: np.ndarray) -> None:
    for t, conf, correct in _ece_values(ch):
        stats.add_values_(t, conf, correct, edges)


def _class_channels(n_channels: int, regions, include_background: bool) -> List[int]:
    if regions is not None:
        return list(range(n_channels))
    return list(range(0 if include_background else 1, n_channels))


def _cece_values(ch: _Chunk, threshold: float, include_background: bool = False
                 ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """``(task, p_c, target)`` of CECE's voxels in the chunk (``p_c > threshold``, see :func:`.calibration.cece`)."""
    for t, c in enumerate(_class_channels(ch.p.shape[0], ch.regions, include_background)):
        v, y = ch.above(c, threshold)
        if v.size:
            yield t, v, y


def _cece_kernel(ch: _Chunk, stats: BinStats, edges: np.ndarray, threshold: float,
                 include_background: bool = False) -> None:
    shared = ch.p.dtype.type(threshold) < edges[1]  # then every value above e_1 is kept
    for t, c in enumerate(_class_channels(ch.p.shape[0], ch.regions, include_background)):
        v, y = ch.above(c, threshold)
        if not v.size:
            continue
        count = sums = None
        if shared:  # bins >= 2 from the chunk's cache (often folded from the ACE bins), first bin from totals
            count, sums = ch.rest_stats(c, edges)
            if 2 * int(count.sum()) > v.size:  # mostly above e_1: bin directly (as add_values_ does)
                count = None
        if count is not None:
            v_pos = v[y]
            stats.add_binned_(t, count, sums, v.size, v_pos.size, sum64(v), sum64(v_pos), v.size)
        else:
            stats.add_values_(t, v, y, edges)


def _marginal_kernel(ch: _Chunk, stats: BinStats, edges: np.ndarray, include_background: bool) -> None:
    n = ch.p.shape[1]
    for t, c in enumerate(_class_channels(ch.p.shape[0], ch.regions, include_background)):
        v, y = ch.above(c, edges[1])
        if 2 * v.size > n or n == 0:  # dense (or empty): bin every value
            stats.add_values_(t, ch.p[c], ch.target(c), edges)
        else:  # same statistics as add_values_, from totals shared with other metrics
            count, sums = ch.rest_stats(c, edges)
            stats.add_binned_(t, count, sums, n, ch.n_target(c), ch.sums64(c)[0], ch.sum64_target(c), n)


def _pece_kernel(ch: _Chunk, stats: BinStats, edges: np.ndarray) -> None:
    p = 1 - ch.p[0] if ch.regions is None else ch.p.max(0)
    stats.add_values_(0, p, ch.fg, edges, zero_in_first=False)


def _sdc_ece_compute(stats: BinStats) -> float:
    """SDC code's binary ECE: ``sum_b |sum p_b - sum y_b| / N`` with N = *all* voxels (``p = 0`` in no bin)."""
    total = int(stats.total[0])
    if total == 0:
        return float("nan")
    return float(np.abs(stats.confidence_sum[0] - stats.outcome_sum[0]).sum() / total)


def _sdc_cece_compute(stats: BinStats) -> float:
    """SDC code's CECE: mean over the classes that kept a voxel of their count-weighted binary ECE; 0 if none."""
    per = _weighted_ece_per_task(stats)
    per = per[~np.isnan(per)]
    return float(per.mean()) if per.size else 0.0


def _label_prob(ch: _Chunk) -> np.ndarray:
    """Probability of the reference label of every voxel (softmax only), cached per chunk."""
    def make():
        q = ch.p[0].copy()
        for c in range(1, ch.p.shape[0]):
            idx = ch.target_index(c)
            q[idx] = ch.p[c].take(idx)
        return q
    return ch._cached("label_prob", make)


def _clip_below(q: np.ndarray, eps: float) -> np.ndarray:
    """In place ``q = max(q, eps)`` (same values as ``np.maximum(q, eps)``, whose scalar form is
    several times slower than a compare when, as usual, few values are below ``eps``)."""
    low = q < eps
    if low.any():
        q[low] = eps
    return q


def _nll_kernel(ch: _Chunk, stats: SumStats, eps: float) -> None:
    if ch.regions is None:
        q = _clip_below(_label_prob(ch).copy(), eps)
        np.log(q, out=q)
        stats.total -= sum64(q)
        stats.count += q.size
    else:
        for r in range(len(ch.regions)):
            pr = ch.p[r]
            q = 1 - pr
            idx = ch.target_index(r)
            q[idx] = pr.take(idx)
            _clip_below(q, eps)
            np.log(q, out=q)
            stats.total -= sum64(q)
            stats.count += q.size


def _brier_kernel(ch: _Chunk, stats: SumStats) -> None:
    # sum_c (p_c - onehot_c)^2 = sum_c p_c^2 - 2 p_label + 1, summed in float64 over the chunk
    if ch.regions is None:
        n_ch, m = ch.p.shape
        total = sum(ch.sums64(c)[1] for c in range(n_ch))
        total -= 2.0 * sum64(_label_prob(ch))
        total += m
        stats.total += total / n_ch
        stats.count += m
    else:
        for r in range(len(ch.regions)):
            pr = ch.p[r]
            stats.total += ch.sums64(r)[1] - 2.0 * ch.sum64_target(r) + ch.n_target(r)
            stats.count += pr.size


def _run(probs, labels, regions, kernel, *args) -> None:
    for pc, lc in _chunks(probs, labels):
        kernel(_Chunk(pc, lc, regions), *args)


def _run_adaptive(probs, labels, regions, values, n_tasks: int, n_bins: int, *args) -> ValueStats:
    """:class:`~._adaptive.ValueStats` of the ``(task, value, outcome)`` triples that ``values(chunk,
    *args)`` yields over all chunks."""
    triples = (tr for pc, lc in _chunks(probs, labels) for tr in values(_Chunk(pc, lc, regions), *args))
    return _collect_adaptive(triples, n_tasks, n_bins)


def _collect_adaptive(triples, n_tasks: int, n_bins: int) -> ValueStats:
    """:class:`~._adaptive.ValueStats` of ``(task, value, outcome)`` triples: sort keys gathered per
    task, one sort per task at the end."""
    keys: List[list] = [[] for _ in range(n_tasks)]
    offered = [0] * n_tasks
    for t, v, y in triples:
        keys[t].append(sort_keys(v, y))
        offered[t] += v.size
    stats = ValueStats.zeros(n_tasks, n_bins)
    for t in range(n_tasks):
        stats.set_from_keys_(t, keys[t], offered[t])
    return stats


def _collect(triples, n_tasks: int, n_bins: int, binning: str, dtype) -> Union[BinStats, ValueStats]:
    """Statistics of ``(task, value, outcome)`` triples: equal-width :class:`BinStats` (edges in
    ``dtype``) or, with ``binning="adaptive"``, :class:`~._adaptive.ValueStats`."""
    if binning == "adaptive":
        return _collect_adaptive(triples, n_tasks, n_bins)
    stats = BinStats.zeros(n_tasks, n_bins)
    edges = bin_edges(n_bins, dtype)
    for t, v, y in triples:
        stats.add_values_(t, v, y, edges)
    return stats


def _weighted_ece_per_task(stats: BinStats) -> np.ndarray:
    """Count-weighted ECE of every task: ``sum_b n_b/N |conf_b - acc_b|``; NaN where N = 0."""
    n = stats.bin_count.sum(-1)
    gap_sum = np.abs(stats.confidence_sum - stats.outcome_sum).sum(-1)  # = sum_b n_b |mean conf - mean acc|
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, gap_sum / np.maximum(n, 1), np.nan)


def _nanmean_or_nan(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    return float(values.mean()) if values.size else float("nan")
