"""Chunked passes over the voxels and the per-chunk cache that several metrics share.

The voxels are processed in chunks of ``CHUNK_VOXELS`` voxels (views, no full-size copy of
``probs``); :class:`_Chunk` caches per-channel quantities (references, voxels above a threshold,
float64 sums, binned statistics) so that the kernels of :mod:`._kernels` compute each once per chunk.
"""
from __future__ import annotations

from typing import Iterator, Tuple

import numpy as np

from ._binning import CHUNK_VOXELS, bin_stats, fold_bin_stats, sum64


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
