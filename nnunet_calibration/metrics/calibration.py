"""Calibration metrics of the SDC, ACE and DSC++ papers on one case or pooled over a data set.

Inputs (all functions)
----------------------
``probs``: floating array ``(C, *spatial)`` exactly as nnU-Net writes it (2D or 3D, any spatial
rank): either softmax probabilities *including* the background channel 0 (``regions=False``, the
default; channel ``c`` belongs to label ``c``), or, for region-based datasets, sigmoid probabilities
of the regions *without* a background channel (``regions=True``, meaning the same as in
:mod:`nnunet_calibration.losses`: the channels are independent sigmoid regions; the regions' label
tuples of dataset.json are then passed in channel order as ``region_labels``, e.g.
``[(1, 2, 3), (2, 3), (3,)]`` for BraTS whole tumour, tumour core, enhancing tumour).
``labels``: integer array ``(*spatial)``, the reference label map (label values, not regions).

Region semantics: with ``regions=True``, channel ``r`` is the binary task "voxel is in region r"
(``label in regions[r]``) with predicted probability ``p_r``; it is treated exactly like a two-class
softmax ``(1 - p_r, p_r)``. ``ece``, ``cece`` and the marginal errors are computed per region and
averaged over regions; ``pece`` uses the largest region probability ``max_r p_r`` as foreground
probability; ``nll`` and ``brier`` average the binary per-region values over regions.

Binning: see :mod:`nnunet_calibration.metrics._binning` (equal-width bins ``(e_{k-1}, e_k]``,
0 into the first bin and 1 into the last, empty bins skipped; pECE: 0 into no bin).

Undefined values are returned as NaN (e.g. ECE of a case without foreground voxels).

Structure (torchmetrics style)
------------------------------
Every binned metric ``X`` is split into ``_X_arg_validation`` (types, shapes, and with
``validate_args`` the values), ``_X_update(probs, labels, ...) -> BinStats`` (per-bin sufficient
statistics, see :class:`~nnunet_calibration.metrics._binning.BinStats`), merging by addition, and
``_X_compute(stats)``. The public function is update + compute on one case. The
:class:`CalibrationAccumulator` does all updates in one pass over the voxels, can be pickled,
merged and computed, and so gives exact dataset-wide ("pooled") values.

Memory and speed: the voxels are processed in chunks of ``CHUNK_VOXELS`` voxels; the bin of every
value is found in a vectorised way and the per-bin counts and sums are accumulated with
``np.bincount`` (sums in float64). No full-size copy of ``probs`` is made. Segmentation outputs are
mostly background, so per channel only the voxels above the first bin edge are binned one by one;
the first bin is the totals minus those. Within a chunk the accumulator computes each shared
quantity once (a channel's voxels above the smaller of the CECE threshold and the first ACE edge,
its float64 sums and reference counts; the 10 CECE bins folded from the 20 ACE bins when their edges
nest exactly), so all metrics cost little more than the most expensive one. Sharing changes the
order of some float64 additions, nothing else (tests against naive per-bin loops, rel. 1e-9).
"""
from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_calibration.settings.metrics import CONVENTIONS, MetricOptions

from ._binning import CHUNK_VOXELS, BinStats, SumStats, bin_edges, bin_index, bin_stats, fold_bin_stats, sum64

Regions = Optional[Sequence[Union[int, Sequence[int]]]]

#: Tolerance on ``sum_c p_c == 1`` for softmax inputs.
SOFTMAX_SUM_TOLERANCE = 1e-3

__all__ = [
    "ece", "cece", "pece", "marginal_calibration_errors", "nll", "brier",
    "CalibrationAccumulator", "validate_inputs", "validate_probabilities", "validate_labels",
    "normalize_regions", "resolve_region_labels",
]


# --------------------------------------------------------------------------------------------------
# validation and chunking
# --------------------------------------------------------------------------------------------------
def normalize_regions(regions: Regions) -> Optional[List[Tuple[int, ...]]]:
    """``None`` or a list of int tuples (a plain int ``k`` becomes ``(k,)``)."""
    if regions is None:
        return None
    out = []
    for r in regions:
        if np.isscalar(r):
            out.append((int(r),))
        else:
            out.append(tuple(int(i) for i in r))
    if not out:
        raise ValueError("regions must not be empty")
    return out


def resolve_region_labels(regions: bool, region_labels: Regions) -> Optional[List[Tuple[int, ...]]]:
    """The label tuples of the regions (``regions=True``) or ``None`` (softmax, ``regions=False``).

    ``regions`` means the same as in :mod:`nnunet_calibration.losses`: the channels are independent
    sigmoid regions. The regions' label tuples (needed to build each region's reference from the
    label map) are passed as ``region_labels``; it is required with ``regions=True`` and not allowed
    without it.
    """
    if not isinstance(regions, (bool, np.bool_)):
        raise TypeError(f"regions must be a bool (channels are independent sigmoid regions); pass the label "
                        f"tuples as region_labels=..., got regions={regions!r}")
    if regions:
        if region_labels is None:
            raise ValueError("regions=True needs region_labels (the label tuples of the regions, in channel order)")
        return normalize_regions(region_labels)
    if region_labels is not None:
        raise ValueError("region_labels given but regions=False; pass regions=True for sigmoid region outputs")
    return None


def _check_types_and_shapes(probs, labels, regions) -> Tuple[np.ndarray, np.ndarray, Optional[list]]:
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim < 2:
        raise ValueError(f"probs must have shape (C, *spatial), got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise TypeError(f"probs must be a floating point array, got dtype {probs.dtype}")
    if not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise TypeError(f"labels must be an integer array, got dtype {labels.dtype}")
    if probs.shape[1:] != labels.shape:
        raise ValueError(f"probs has spatial shape {probs.shape[1:]} but labels has shape {labels.shape}")
    regions = normalize_regions(regions)
    if regions is None and probs.shape[0] < 2:
        raise ValueError("softmax probs need at least 2 channels (background + one class); "
                         "pass regions=... for sigmoid region outputs")
    if regions is not None and len(regions) != probs.shape[0]:
        raise ValueError(f"{len(regions)} regions given but probs has {probs.shape[0]} channels")
    return probs, labels, regions


def validate_probabilities(probs: np.ndarray, regions: bool = False,
                           softmax_tolerance: float = SOFTMAX_SUM_TOLERANCE) -> None:
    """Raise ``ValueError`` if ``probs`` has NaN, values outside [0, 1], or (softmax, ``regions=False``)
    a voxel whose channel probabilities do not sum to 1 within ``softmax_tolerance``.

    Memory and speed: one pass over the array in chunks of ``CHUNK_VOXELS`` voxels (minimum,
    maximum and channel sums of a chunk while it is in the cache), no full-size temporary.
    """
    probs = np.asarray(probs)
    if probs.size == 0:
        raise ValueError(f"probabilities are empty (shape {probs.shape})")
    lo, hi, worst = np.inf, -np.inf, 0.0
    dummy = np.zeros(probs.shape[1:], np.uint8)
    for pc, _ in _chunks(probs, dummy):
        c_lo, c_hi = pc.min(), pc.max()
        if np.isnan(c_lo) or np.isnan(c_hi):
            raise ValueError("probabilities contain NaN")
        lo, hi = min(lo, float(c_lo)), max(hi, float(c_hi))
        if not regions:
            total = pc[0] + pc[1] if pc.shape[0] > 1 else pc[0].copy()  # float32 sums: rounding ~1e-7
            for c in range(2, pc.shape[0]):
                total += pc[c]
            worst = max(worst, float(total.max()) - 1.0, 1.0 - float(total.min()))
    if lo < 0 or hi > 1:
        raise ValueError(f"probabilities outside [0, 1] (min {lo:.6g}, max {hi:.6g})")
    if worst > softmax_tolerance:
        raise ValueError(f"softmax probabilities do not sum to 1 over the channels "
                         f"(largest deviation {worst:.3g} > {softmax_tolerance:g})")


def validate_labels(labels: np.ndarray, allowed_labels: Sequence[int]) -> None:
    """Raise ``ValueError`` if ``labels`` holds a value that is not in ``allowed_labels``."""
    labels = np.asarray(labels)
    present = np.unique(labels) if labels.size <= (1 << 16) else _unique_small_ints(labels)
    allowed = sorted(int(a) for a in allowed_labels)
    bad = sorted(set(int(v) for v in present) - set(allowed))
    if bad:
        raise ValueError(f"label values {bad} are not among the allowed labels {allowed}")


def validate_inputs(probs: np.ndarray, labels: np.ndarray, regions: bool = False, region_labels: Regions = None,
                    allowed_labels: Optional[Sequence[int]] = None,
                    softmax_tolerance: float = SOFTMAX_SUM_TOLERANCE) -> None:
    """Check shapes, types and values; raise ``ValueError`` saying what is wrong.

    Checks: :func:`validate_probabilities` (no NaN, in [0, 1], softmax sums to 1 within
    ``softmax_tolerance``) and :func:`validate_labels` with ``allowed_labels`` (default:
    ``0..C-1`` for softmax, ``0`` and the labels of the regions for regions).
    """
    probs, labels, regions = _check_types_and_shapes(probs, labels, resolve_region_labels(regions, region_labels))
    _validate(probs, labels, regions, allowed_labels, softmax_tolerance)


def _validate(probs, labels, regions, allowed_labels=None, softmax_tolerance=SOFTMAX_SUM_TOLERANCE) -> None:
    validate_probabilities(probs, regions is not None, softmax_tolerance)
    if allowed_labels is None:
        if regions is None:
            allowed_labels = range(probs.shape[0])
        else:
            allowed_labels = sorted({0, *[i for r in regions for i in r]})
    validate_labels(labels, allowed_labels)


def _unique_small_ints(labels: np.ndarray) -> np.ndarray:
    lo, hi = int(labels.min()), int(labels.max())
    if lo >= 0 and hi < 65536:
        return np.flatnonzero(np.bincount(labels.reshape(-1), minlength=hi + 1))
    return np.unique(labels)


def _chunks(probs: np.ndarray, labels: np.ndarray) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yield ``(probs[:, chunk], labels[chunk])`` over the flattened voxels (views, no copy)."""
    c = probs.shape[0]
    if not probs.flags.c_contiguous:
        probs = np.ascontiguousarray(probs)
    flat_p = probs.reshape(c, -1)
    flat_l = labels.reshape(-1)
    cast = probs.dtype not in (np.float32, np.float64)
    for s in range(0, flat_l.size, CHUNK_VOXELS):
        pc = flat_p[:, s:s + CHUNK_VOXELS]
        yield (pc.astype(np.float32) if cast else pc), flat_l[s:s + CHUNK_VOXELS]


def _work_dtype(probs: np.ndarray):
    return probs.dtype if probs.dtype in (np.float32, np.float64) else np.dtype(np.float32)


class _Chunk:
    """One chunk of voxels with cached per-channel quantities that several metrics share.

    Every cached value is what a metric would compute on its own (the same selected values in the
    same order; float64 sums may be added in another order, which changes results only at float64
    rounding), so sharing changes speed, not results. ``base_threshold`` (set by
    :class:`CalibrationAccumulator`): the smallest threshold any metric of the pass asks
    :meth:`above` for; the voxels above it are gathered once per channel and the higher thresholds
    select from those.
    """

    def __init__(self, p: np.ndarray, lab: np.ndarray, regions, base_threshold=None):
        self.p, self.lab, self.regions = p, lab, regions
        self.base_threshold = base_threshold
        self._cache = {}  # every cached quantity, by key
        self._rest = {}  # channel -> {n_bins: (count, sums, edges)}, see rest_stats

    def _cached(self, key, make):
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = make()
        return v

    @property
    def fg(self) -> np.ndarray:
        """Reference foreground mask ``label != 0``."""
        return self._cached("fg", lambda: self.lab != 0)

    def target(self, channel: int) -> np.ndarray:
        """Binary reference of a channel: ``label == channel`` (softmax) or ``label in region``."""
        def make():
            if self.regions is None:
                return self.lab == channel
            region = self.regions[channel]
            t = self.lab == region[0]
            for v in region[1:]:
                t |= self.lab == v
            return t
        return self._cached(("target", channel), make)

    def n_target(self, c: int) -> int:
        """Number of voxels of the channel's reference."""
        return self._cached(("n", c), lambda: int(np.count_nonzero(self.target(c))))

    def sums64(self, c: int) -> Tuple[float, float]:
        """``(sum p_c, sum p_c^2)`` over the chunk in float64 (one float64 copy for both; products
        of float32 values are exact in float64; no BLAS, whose threads would compete with the
        evaluator's worker processes)."""
        def make():
            w = self.p[c].astype(np.float64)
            s1 = sum64(w)
            np.square(w, out=w)
            return s1, sum64(w)
        return self._cached(("s", c), make)

    def sum64_target(self, c: int) -> float:
        """Sum of ``p_c`` over the channel's reference voxels in float64."""
        return self._cached(("sp", c), lambda: sum64(self.p[c].take(self.target_index(c))))

    def above(self, c: int, threshold) -> Tuple[np.ndarray, np.ndarray]:
        """``(p_c[p_c > threshold], target(c)[p_c > threshold])`` in voxel order (comparison in the
        dtype of the probabilities, as ``p_c > threshold`` does)."""
        thr = self.p.dtype.type(threshold)

        def make():
            base = self.base_threshold
            if base is not None and thr > base:
                v, y = self.above(c, base)
                keep = v > thr
                return v[keep], y[keep]
            idx = np.flatnonzero(self.p[c] > thr)
            return self.p[c].take(idx), self.target(c).take(idx)
        return self._cached(("above", c, thr), make)

    def rest_stats(self, c: int, edges: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """:func:`~._binning.bin_stats` of the channel's values above ``edges[1]`` against its
        reference; folded from a finer binning of the same channel computed earlier in this chunk
        when its edges nest (e.g. 10 CECE bins from 20 ACE bins), else binned directly."""
        nb = edges.size - 1
        rest = self._rest.setdefault(c, {})  # n_bins -> (count, sums, edges)
        hit = rest.get(nb)
        if hit is not None and np.array_equal(hit[2], edges):
            return hit[0], hit[1]
        for n_fine, (count, sums, fine) in rest.items():
            folded = fold_bin_stats(count, sums, fine, edges) if n_fine > nb else None
            if folded is not None:
                count, sums = folded
                count[0] = 0  # the values in (e_0, e_1] are not "rest": clear the first coarse bin
                sums[0] = 0.0
                rest[nb] = (count, sums, edges)
                return count, sums
        v, y = self.above(c, edges[1])
        count, sums = bin_stats(v, y, edges)
        rest[nb] = (count, sums, edges)
        return count, sums

    def target_index(self, c: int) -> np.ndarray:
        """Flat indices of the channel's reference voxels."""
        return self._cached(("t_idx", c), lambda: np.flatnonzero(self.target(c)))

    def fg_index(self) -> np.ndarray:
        """Flat indices of the reference foreground voxels (``label != 0``)."""
        return self._cached("fg_idx", lambda: np.flatnonzero(self.fg))


# --------------------------------------------------------------------------------------------------
# per-chunk kernels (shared by the single-case functions and the accumulator)
# --------------------------------------------------------------------------------------------------
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


def _ece_kernel(ch: _Chunk, stats: BinStats, edges: np.ndarray) -> None:
    if ch.regions is None:
        idx = ch.fg_index()
        if idx.size == 0:
            return
        sub = ch.p.take(idx, axis=1)  # foreground voxels only (usually few)
        conf, pred = _max_argmax(sub)
        stats.add_values_(0, conf, pred == ch.lab.take(idx), edges)
    else:
        for r in range(len(ch.regions)):
            y = ch.target(r)
            if not y.any():
                continue
            pr = ch.p[r][y]
            stats.add_values_(r, np.maximum(pr, 1 - pr), pr > 0.5, edges)


def _class_channels(n_channels: int, regions, include_background: bool) -> List[int]:
    if regions is not None:
        return list(range(n_channels))
    return list(range(0 if include_background else 1, n_channels))


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


#: Names of the metric conventions (see :class:`CalibrationAccumulator`).


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


# --------------------------------------------------------------------------------------------------
# compute helpers
# --------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------
# ECE
# --------------------------------------------------------------------------------------------------
def _ece_arg_validation(probs, labels, n_bins, regions, validate_args):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _ece_update(probs, labels, n_bins: int = 15, regions: Regions = None) -> BinStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = BinStats.zeros(_ece_tasks(probs.shape[0], regions), n_bins)
    _run(probs, labels, regions, _ece_kernel, stats, bin_edges(n_bins, _work_dtype(probs)))
    return stats


def _ece_compute(stats: BinStats) -> float:
    return _nanmean_or_nan(_weighted_ece_per_task(stats))


def ece(probs, labels, n_bins: int = 15, regions: bool = False, region_labels: Regions = None,
        validate_args: bool = True) -> float:
    """Foreground ECE, Eq. 6 of the SDC paper (appendix A.1), as the NACL code computes it.

    Softmax: only voxels whose *reference* label is foreground (``label != 0``) are used;
    confidence = largest class probability (background included), accuracy =
    ``argmax_c p_c == label`` (ties: the lowest channel, as ``np.argmax``);
    ``ECE = sum_b |B_b|/N |mean conf_b - mean acc_b|`` with N = number of foreground voxels,
    equal-width ``(e_{k-1}, e_k]`` bins, empty bins skipped.
    Regions: per region r the voxels inside region r, confidence ``max(p_r, 1 - p_r)``, accuracy
    ``p_r > 0.5`` (nnU-Net's region threshold); mean over regions that have voxels.
    Returns NaN if there are no foreground voxels.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _ece_arg_validation(probs, labels, n_bins, regions, validate_args)
    return _ece_compute(_ece_update(probs, labels, n_bins, regions))


# --------------------------------------------------------------------------------------------------
# CECE
# --------------------------------------------------------------------------------------------------
def _cece_arg_validation(probs, labels, n_bins, threshold, regions, validate_args):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    if not (0 <= float(threshold) < 1):
        raise ValueError(f"threshold must be in [0, 1), got {threshold}")
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _cece_update(probs, labels, n_bins: int = 10, threshold: float = 1e-3, regions: Regions = None) -> BinStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = BinStats.zeros(len(_class_channels(probs.shape[0], regions, False)), n_bins)
    _run(probs, labels, regions, _cece_kernel, stats, bin_edges(n_bins, _work_dtype(probs)), threshold)
    return stats


def _cece_compute(stats: BinStats) -> float:
    return _nanmean_or_nan(_weighted_ece_per_task(stats))


def cece(probs, labels, n_bins: int = 10, threshold: float = 1e-3, regions: bool = False,
         region_labels: Regions = None, validate_args: bool = True) -> float:
    """Class-wise ECE (SDC paper Eq. 7, threshold as in Kull et al.).

    For every *foreground* class c (softmax channels 1..C-1, or every region): keep the voxels with
    ``p_c > threshold`` (strictly greater); binary ECE of ``p_c`` against ``[label == c]`` (regions:
    ``[label in region]``) over the kept voxels, count-weighted over the non-empty bins (denominator:
    number of kept voxels of that class). CECE = mean over the classes that kept at least one voxel
    (NaN if none did). Whether a class is present in the reference does not matter.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _cece_arg_validation(probs, labels, n_bins, threshold, regions, validate_args)
    return _cece_compute(_cece_update(probs, labels, n_bins, threshold, regions))


# --------------------------------------------------------------------------------------------------
# pECE
# --------------------------------------------------------------------------------------------------
def _pece_arg_validation(probs, labels, n_bins, fp_weight, regions, validate_args):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    if not np.isfinite(fp_weight):
        raise ValueError(f"fp_weight must be finite, got {fp_weight}")
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _pece_update(probs, labels, n_bins: int = 10, regions: Regions = None) -> BinStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = BinStats.zeros(1, n_bins)
    _run(probs, labels, regions, _pece_kernel, stats, bin_edges(n_bins, _work_dtype(probs)))
    return stats


def _pece_compute(stats: BinStats, fp_weight: float = 2.0) -> float:
    total = int(stats.total[0])
    if total == 0:
        return float("nan")
    n = stats.bin_count[0].astype(np.float64)
    ne = n > 0
    mean_p = stats.confidence_sum[0][ne] / n[ne]
    mean_a = stats.outcome_sum[0][ne] / n[ne]
    fp_n = stats.count[0, :, 0][ne]
    fp_mean = np.where(fp_n > 0, stats.conf_sum[0, :, 0][ne] / np.maximum(fp_n, 1), 0.0)
    return float((n[ne] / total * np.abs(mean_p - mean_a + fp_weight * fp_mean)).sum())


def pece(probs, labels, n_bins: int = 10, fp_weight: float = 2.0, regions: bool = False,
         region_labels: Regions = None, validate_args: bool = True) -> float:
    """Pixel-wise ECE with false-positive offset, Algorithm 1 of the SDC paper, exactly.

    ``p`` = foreground probability, ``1 - p_background`` (computed in the dtype of ``probs``) for
    softmax, the largest region probability ``max_r p_r`` for regions; ``y = [label != 0]``.
    Bins are ``(lo, hi]`` *literally*: a voxel with ``p = 0`` is in no bin, but ``total`` counts every
    voxel. Per non-empty bin: ``offset = fp_weight * mean p of the bin's y = 0 voxels`` (0 if none)
    and the bin adds ``n_b / total * |(mean p_b - mean y_b) + offset|``.

    Note: pECE is **not** zero for a perfectly calibrated model: the offset is non-negative and is
    added inside the absolute value, so any bin holding negatives with ``p > 0`` contributes even
    when ``mean p_b == mean y_b`` (e.g. all voxels at p = 0.5 with half of them foreground give
    ``|0 + 2 * 0.5| = 1``). It is zero only if the predicted foreground probability is 0 on every
    background voxel and matches the foreground frequency in every bin.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _pece_arg_validation(probs, labels, n_bins, fp_weight, regions, validate_args)
    return _pece_compute(_pece_update(probs, labels, n_bins, regions), fp_weight)


# --------------------------------------------------------------------------------------------------
# marginal L1 ACE / ECE / MCE
# --------------------------------------------------------------------------------------------------
def _marginal_arg_validation(probs, labels, n_bins, regions, validate_args):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _marginal_update(probs, labels, n_bins: int = 20, include_background: bool = False,
                     regions: Regions = None) -> BinStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = BinStats.zeros(len(_class_channels(probs.shape[0], regions, include_background)), n_bins)
    _run(probs, labels, regions, _marginal_kernel, stats, bin_edges(n_bins, _work_dtype(probs)),
         include_background)
    return stats


def _marginal_per_class(stats: BinStats) -> Dict[str, np.ndarray]:
    """Per class: ACE (mean |gap| over non-empty bins), ECE (count-weighted), MCE (max); NaN if empty."""
    n = stats.bin_count.astype(np.float64)
    ne = n > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        gap = np.abs(stats.confidence_sum - stats.outcome_sum) / n
    gap_ne = np.where(ne, gap, 0.0)
    n_ne = ne.sum(-1)
    n_tot = n.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ace = np.where(n_ne > 0, gap_ne.sum(-1) / np.maximum(n_ne, 1), np.nan)
        ece_ = np.where(n_tot > 0, (gap_ne * n).sum(-1) / np.maximum(n_tot, 1), np.nan)
        mce = np.where(n_ne > 0, np.where(ne, gap, -np.inf).max(-1), np.nan)
    return {"mL1-ACE": ace, "mL1-ECE": ece_, "mL1-MCE": mce}


def _marginal_compute(stats: BinStats) -> Dict[str, float]:
    return {k: _nanmean_or_nan(v) for k, v in _marginal_per_class(stats).items()}


def marginal_calibration_errors(probs, labels, n_bins: int = 20, include_background: bool = False,
                                regions: bool = False, region_labels: Regions = None,
                                validate_args: bool = True) -> Dict[str, float]:
    """Marginal L1 calibration errors of the ACE paper (Eqs. 1, 3, 4): mL1-ACE, mL1-ECE, mL1-MCE.

    Per class c (softmax channels 1..C-1, or 0..C-1 with ``include_background``; every region for
    region inputs, where ``include_background`` has no effect): ``p_c`` of *all* voxels against
    ``o = [label == c]`` (regions: ``[label in region]``) in ``n_bins`` equal-width bins. With
    ``gap_b = |mean o_b - mean p_b|`` over the non-empty bins: ACE_c = unweighted mean of gap_b,
    ECE_c = ``sum_b n_b/N gap_b`` (N = all voxels), MCE_c = ``max_b gap_b``. Each is then averaged
    over the classes. A class absent from the reference still counts (its observed frequency is 0
    in every bin, so its gaps are its mean probabilities).
    Returns ``{"mL1-ACE": .., "mL1-ECE": .., "mL1-MCE": ..}``.
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _marginal_arg_validation(probs, labels, n_bins, regions, validate_args)
    return _marginal_compute(_marginal_update(probs, labels, n_bins, include_background, regions))


# --------------------------------------------------------------------------------------------------
# NLL and Brier
# --------------------------------------------------------------------------------------------------
def _nll_update(probs, labels, eps: float = 1e-7, regions: Regions = None) -> SumStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = SumStats()
    _run(probs, labels, regions, _nll_kernel, stats, eps)
    return stats


def _nll_compute(stats: SumStats) -> float:
    return stats.mean()


def nll(probs, labels, eps: float = 1e-7, regions: bool = False, region_labels: Regions = None,
        validate_args: bool = True) -> float:
    """Negative log-likelihood (the DSC++ paper's NLL = cross-entropy), mean over voxels.

    Softmax: ``mean_i -log(max(p_{label_i}, eps))`` over all voxels (background included).
    Regions: binary NLL per region, ``-log(max(q, eps))`` with ``q = p_r`` inside and ``1 - p_r``
    outside the region, averaged over voxels and regions. ``eps = 1e-7`` clips zero probabilities
    (a voxel whose reference class got probability 0 costs ``-log(1e-7) = 16.1``). The clipping and
    the logarithm are computed in the dtype of ``probs`` (float32 for nnU-Net output, relative
    error ~1e-7), the sum over voxels in float64.
    """
    probs, labels, regions = _check_types_and_shapes(probs, labels, resolve_region_labels(regions, region_labels))
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if validate_args:
        _validate(probs, labels, regions)
    return _nll_compute(_nll_update(probs, labels, eps, regions))


def _brier_update(probs, labels, regions: Regions = None) -> SumStats:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    stats = SumStats()
    _run(probs, labels, regions, _brier_kernel, stats)
    return stats


def _brier_compute(stats: SumStats) -> float:
    return stats.mean()


def brier(probs, labels, regions: bool = False, region_labels: Regions = None, validate_args: bool = True) -> float:
    """Brier score of the DSC++ paper (Eq. 11): ``mean_i (1/C) sum_c (p_{c,i} - onehot_{c,i})^2``.

    Softmax: C channels including background, one-hot of the label. Regions: ``(1/R) sum_r
    (p_r - [label in region r])^2`` (equal to the two-class Brier of ``(1 - p_r, p_r)``).
    """
    probs, labels, regions = _check_types_and_shapes(probs, labels, resolve_region_labels(regions, region_labels))
    if validate_args:
        _validate(probs, labels, regions)
    return _brier_compute(_brier_update(probs, labels, regions))


# --------------------------------------------------------------------------------------------------
# accumulator
# --------------------------------------------------------------------------------------------------
METRIC_KEYS = ("ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier")


class CalibrationAccumulator:
    """All calibration metrics, accumulated over any number of cases; picklable and mergeable.

    ``update(probs, labels)`` adds a case (one pass over its voxels, chunked); ``compute()``
    returns ``{"ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier"}`` computed
    from the summed per-bin statistics, i.e. the exact values one would get by concatenating the
    voxels of all cases into one big case ("pooled"). With a single case it equals the public
    functions (``ece``, ``cece``, ...) on that case. ``a + b`` / ``a.merge(b)`` combine accumulators
    filled in different processes (same options and label layout required).

    ``options``: a :class:`nnunet_calibration.settings.MetricOptions` (default: its defaults), the
    options and conventions of the public functions; ``include_background`` applies to the marginal
    errors only. The label layout: ``regions`` / ``region_labels`` as in :func:`resolve_region_labels`,
    ``ignore_index`` below.

    Conventions (``options.convention``):

    * ``"default"``: ECE, CECE, pECE as documented in :func:`ece`, :func:`cece`, :func:`pece`.
    * ``"sdc-code"``: ECE and CECE as the SDC authors' published evaluation code computes them
      (EagleAdelaide/SDC-Loss ``src/sdc/metrics.py``, so that numbers can be put next to the paper's
      tables): ECE = binary ECE of the foreground probability ``1 - p_background`` (regions: the
      largest region probability) against ``label != 0`` over *all* voxels, bins ``(lo, hi]``
      literally (``p = 0`` falls into no bin but counts in the denominator N = number of voxels),
      ``sum_b n_b/N |mean p_b - mean y_b|``; CECE = for every class *including the background*
      (softmax; every region for regions) the binary ECE of ``p_c`` against ``[label == c]`` over the
      voxels with ``p_c > cece_threshold``, averaged over the classes that kept a voxel (0.0 if none).
      Use 10 bins for both (``n_bins_ece=10``; the evaluator does that by itself). pECE, the
      marginal errors, NLL and Brier are the same in both conventions.

    Ignore label: with ``ignore_index`` (nnU-Net's ``ignore`` label value), every voxel whose
    reference label equals ``ignore_index`` is removed before anything is counted, i.e. every metric
    is the metric of the remaining voxels only (as if the ignored voxels did not exist; this is how
    nnU-Net excludes them from its loss and its DSC). ``None``: no voxel is ignored.
    """

    def __init__(self, options: Optional[MetricOptions] = None, *, regions: bool = False,
                 region_labels: Regions = None, ignore_index: Optional[int] = None):
        if options is None:
            options = MetricOptions()
        elif not isinstance(options, MetricOptions):
            raise TypeError(f"options must be a MetricOptions, got {type(options).__name__}")
        for n in (options.n_bins_ece, options.n_bins_cece, options.n_bins_pece, options.n_bins_ace):
            bin_edges(n)
        self.options = options
        #: the label layout: softmax or regions (with their label tuples) and the ignored label
        self.layout = dict(regions=bool(regions), region_labels=resolve_region_labels(regions, region_labels),
                           ignore_index=None if ignore_index is None else int(ignore_index))
        self.n_cases = 0
        self.n_channels: Optional[int] = None
        self.stats: Optional[Dict[str, Union[BinStats, SumStats]]] = None

    # -- filling ---------------------------------------------------------------------------------
    def _init_stats(self, n_channels: int):
        o = self.options
        regions = self.layout["region_labels"]
        self.n_channels = n_channels
        sdc = o.convention == "sdc-code"
        self.stats = {
            "ece": BinStats.zeros(1 if sdc else _ece_tasks(n_channels, regions), o.n_bins_ece),
            "cece": BinStats.zeros(len(_class_channels(n_channels, regions, sdc)), o.n_bins_cece),
            "pece": BinStats.zeros(1, o.n_bins_pece),
            "marginal": BinStats.zeros(len(_class_channels(n_channels, regions, o.include_background)),
                                       o.n_bins_ace),
            "nll": SumStats(),
            "brier": SumStats(),
        }

    def update(self, probs, labels, validate_args: bool = False) -> "CalibrationAccumulator":
        """Add one case. ``validate_args=True`` also checks the values (see :func:`validate_inputs`)."""
        o = self.options
        probs, labels, regions = _check_types_and_shapes(probs, labels, self.layout["region_labels"])
        ignore = self.layout["ignore_index"]
        if validate_args:
            allowed = None
            if ignore is not None:
                allowed = (list(range(probs.shape[0])) if regions is None
                           else sorted({0, *[i for r in regions for i in r]})) + [ignore]
            _validate(probs, labels, regions, allowed)
        if self.stats is None:
            self._init_stats(probs.shape[0])
        elif probs.shape[0] != self.n_channels:
            raise ValueError(f"case has {probs.shape[0]} channels, earlier cases had {self.n_channels}")
        dt = _work_dtype(probs)
        e_ece, e_cece = bin_edges(o.n_bins_ece, dt), bin_edges(o.n_bins_cece, dt)
        e_pece, e_ace = bin_edges(o.n_bins_pece, dt), bin_edges(o.n_bins_ace, dt)
        s = self.stats
        sdc = o.convention == "sdc-code"
        # CECE and the marginal errors both need, per channel, the voxels above a threshold: gathered
        # once above the smaller one (see _Chunk.above)
        base = min(dt.type(o.cece_threshold), e_ace[1])
        for pc, lc in _chunks(probs, labels):
            if ignore is not None:
                keep = lc != ignore
                if not keep.all():
                    pc, lc = pc[:, keep], lc[keep]
                if lc.size == 0:
                    continue
            ch = _Chunk(pc, lc, regions, base)
            if sdc:
                _pece_kernel(ch, s["ece"], e_ece)  # same statistics: foreground probability, y = fg, 0 in no bin
            else:
                _ece_kernel(ch, s["ece"], e_ece)
            _marginal_kernel(ch, s["marginal"], e_ace, o.include_background)
            _cece_kernel(ch, s["cece"], e_cece, o.cece_threshold, sdc)  # after: may fold the ACE bins
            _pece_kernel(ch, s["pece"], e_pece)
            _nll_kernel(ch, s["nll"], o.nll_eps)
            _brier_kernel(ch, s["brier"])
        self.n_cases += 1
        return self

    # -- merging ---------------------------------------------------------------------------------
    def merge(self, other: "CalibrationAccumulator") -> "CalibrationAccumulator":
        """A new accumulator holding both (neither input is modified)."""
        if not isinstance(other, CalibrationAccumulator):
            raise TypeError(f"cannot merge CalibrationAccumulator with {type(other).__name__}")
        if other.options != self.options or other.layout != self.layout:
            raise ValueError(f"cannot merge accumulators with different options or label layouts: "
                             f"{self.options}, {self.layout} vs {other.options}, {other.layout}")
        out = CalibrationAccumulator(self.options, **self.layout)
        out.n_cases = self.n_cases + other.n_cases
        if self.stats is None or other.stats is None:
            src = self if other.stats is None else other
            out.n_channels = src.n_channels
            out.stats = None if src.stats is None else {k: _copy_stats(v) for k, v in src.stats.items()}
            return out
        if self.n_channels != other.n_channels:
            raise ValueError(f"cannot merge accumulators of {self.n_channels} and {other.n_channels} channels")
        out.n_channels = self.n_channels
        out.stats = {k: self.stats[k] + other.stats[k] for k in self.stats}
        return out

    __add__ = merge

    # -- results ---------------------------------------------------------------------------------
    def compute(self) -> Dict[str, float]:
        """``{"ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier"}`` (NaN if empty)."""
        if self.stats is None:
            return {k: float("nan") for k in METRIC_KEYS}
        s = self.stats
        if self.options.convention == "sdc-code":
            out = {"ECE": _sdc_ece_compute(s["ece"]), "CECE": _sdc_cece_compute(s["cece"])}
        else:
            out = {"ECE": _ece_compute(s["ece"]), "CECE": _cece_compute(s["cece"])}
        out["pECE"] = _pece_compute(s["pece"], self.options.fp_weight)
        out.update(_marginal_compute(s["marginal"]))
        out["NLL"] = _nll_compute(s["nll"])
        out["Brier"] = _brier_compute(s["brier"])
        return out

    def marginal_per_class(self) -> Dict[str, np.ndarray]:
        """Per-class mL1-ACE/ECE/MCE arrays (class order as in the marginal statistics)."""
        if self.stats is None:
            raise ValueError("accumulator is empty")
        return _marginal_per_class(self.stats["marginal"])

    def reliability(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pooled reliability data per class from the marginal (ACE) statistics.

        Returns ``(edges, n, mean_confidence, observed_frequency)``, the last three ``(K, n_bins_ace)``
        with NaN for empty bins; class k is foreground channel k+1 (softmax, or channel k with
        ``include_background``) or region k.
        """
        if self.stats is None:
            raise ValueError("accumulator is empty")
        n, conf, freq = self.stats["marginal"].reliability()
        return bin_edges(self.options.n_bins_ace, np.float64), n, conf, freq


def _copy_stats(s):
    if isinstance(s, BinStats):
        return BinStats(s.count.copy(), s.conf_sum.copy(), s.total.copy())
    return SumStats(s.total, s.count)
