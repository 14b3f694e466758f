"""Boundary band of a label map and the ECE restricted to it.

Conventions
-----------
* ``spacing``: voxel size in mm per axis in the array's axis order (as :mod:`.segmentation`);
  ``None`` means 1 per axis (distances in voxels).
* Boundary voxels: the voxels with at least one face neighbour (``generate_binary_structure(ndim,
  1)``) *inside the image* that has another label, i.e. both sides of every interface between two
  labels (background included). The image border is not a boundary: a structure cut by the field of
  view has no boundary there. A bool mask is a label map of 0 and 1.
* Band: the voxels whose Euclidean distance in mm (between voxel centres) to the nearest boundary
  voxel is at most ``k_mm`` (boundary voxels themselves have distance 0). Distances are those of
  ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``; ``<=`` allows a relative 1e-9 for
  their rounding, so a distance of exactly ``k_mm`` is in the band.
* ``k_mm=None`` (default): **2 voxels of the largest spacing**, ``k_mm = 2 * max(spacing)``.
* No foreground, or one label everywhere: no boundary, an empty band.
* Speed: every boundary voxel lies within one voxel of the foreground (``label != 0``), so the band
  is formed on the foreground's bounding box grown by ``ceil(k_mm / spacing_i) + 1`` voxels per axis
  (clipped to the image), not on the whole volume; voxels outside that box are farther than
  ``k_mm`` from every boundary voxel. On that box the band is the dilation of the boundary voxels by
  the discrete ball of radius ``k_mm`` (:func:`_within`: 1-D maximum filters along the last axis,
  shifted and ORed over the ball's other offsets), the same set as thresholding the EDT, about ten
  times faster for the default width; for a ball of more than ``_MAX_OFFSETS`` offsets, the EDT.
  One band per call (softmax), one per region (regions; when no region holds the label 0, the
  regions' masks are formed on the foreground's grown box only, which holds all of them and their bands).
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from ._adaptive import ValueStats, check_binning
from ._binning import BinStats, CHUNK_VOXELS, bin_edges
from ._checks import Regions, _check_types_and_shapes, _validate, in_region, resolve_region_labels
from ._chunk import _work_dtype
from ._kernels import _collect, _ece_tasks, _max_argmax
from .calibration import _ece_compute
from .segmentation import _spacing

__all__ = ["boundary_band", "default_band_width", "boundary_ece"]

_EDT_TOLERANCE = 1e-9


def default_band_width(spacing) -> float:
    """The default band half-width: 2 voxels of the largest spacing, ``2 * max(spacing)`` mm."""
    return 2.0 * float(np.max(spacing))


def _boundary(lab: np.ndarray) -> np.ndarray:
    """Voxels with a face neighbour inside the array that has another value."""
    out = np.zeros(lab.shape, bool)
    for ax in range(lab.ndim):
        lo = [slice(None)] * lab.ndim
        hi = [slice(None)] * lab.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        diff = lab[tuple(lo)] != lab[tuple(hi)]
        out[tuple(lo)] |= diff
        out[tuple(hi)] |= diff
    return out


def _bbox(mask: np.ndarray) -> Optional[Tuple[Tuple[int, int], ...]]:
    """``(first, last + 1)`` per axis of the True voxels, or None."""
    out = []
    for ax in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != ax)))
        if hit.size == 0:
            return None
        out.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(out)


def _grown_box(labels: np.ndarray, sp: np.ndarray, k: float) -> Optional[tuple]:
    """Slices of the bounding box of ``labels != 0`` grown by ``ceil(k / spacing_i) + 1`` voxels per axis
    (clipped to the image): it holds every voxel within ``k`` mm of a boundary (module docstring). None if
    there is no foreground."""
    box = _bbox(labels != 0)
    if box is None:
        return None
    margin = np.ceil(k / sp).astype(int) + 1
    return tuple(slice(max(a - m, 0), min(b + m, n)) for (a, b), m, n in zip(box, margin, labels.shape))


def _band_in_box(labels: np.ndarray, sp: np.ndarray, k: float):
    """``(box slices, band on the box)`` of :func:`boundary_band` (every band voxel lies in the box: module
    docstring), or None when the band is empty."""
    sl = _grown_box(labels, sp, k)
    if sl is None:
        return None
    edge = _boundary(labels[sl])
    if not edge.any():
        return None
    return sl, _within(edge, sp, k)


def _band_width(spacing, ndim: int, k_mm: Optional[float]) -> Tuple[np.ndarray, float]:
    sp = _spacing(spacing, ndim)
    k = default_band_width(sp) if k_mm is None else float(k_mm)
    if not (np.isfinite(k) and k >= 0):
        raise ValueError(f"k_mm must be finite and >= 0, got {k_mm}")
    return sp, k


def _as_label_map(labels) -> np.ndarray:
    labels = np.asarray(labels)
    return labels.view(np.uint8) if labels.dtype == bool else labels


def boundary_band(labels, spacing=None, k_mm: Optional[float] = None) -> np.ndarray:
    """Boolean mask of the voxels within ``k_mm`` mm of a boundary of ``labels`` (module docstring).

    ``labels``: integer or bool array (2D or 3D, any rank); ``k_mm`` >= 0, default ``2 * max(spacing)``.
    """
    labels = _as_label_map(labels)
    sp, k = _band_width(spacing, labels.ndim, k_mm)
    band = np.zeros(labels.shape, bool)
    found = _band_in_box(labels, sp, k)
    if found is not None:
        band[found[0]] = found[1]
    return band


def _full_index(found, shape, origin) -> np.ndarray:
    """Flat indices into an image of ``shape`` of a band ``found = (box slices, band on the box)``; ``origin``:
    the position inside the image of the array the box refers to. (Written into a mask of the image and
    scanned once: measured faster than mapping the box's own indices.)"""
    sl, band = found
    full = np.zeros(shape, bool)
    full[tuple(slice(s.start + o, s.stop + o) for s, o in zip(sl, origin))] = band
    return np.flatnonzero(full)


def _region_band_indices(labels: np.ndarray, regions, spacing, k_mm) -> list:
    """``np.flatnonzero(boundary_band(in_region(labels, r), spacing, k_mm))`` for every region ``r``. When no region holds
    the label 0, every region's mask lies in the foreground ``labels != 0``, so its band lies in the foreground's
    bounding box grown as in :func:`_band_in_box`: the masks are formed on that box only (same indices)."""
    sp, k = _band_width(spacing, labels.ndim, k_mm)
    shape, origin = labels.shape, (0,) * labels.ndim
    if all(0 not in r for r in regions):
        sl = _grown_box(labels, sp, k)
        if sl is None:
            return [np.zeros(0, np.intp) for _ in regions]
        labels, origin = labels[sl], tuple(s.start for s in sl)
    out = []
    for region in regions:
        found = _band_in_box(in_region(labels, region).view(np.uint8), sp, k)
        out.append(np.zeros(0, np.intp) if found is None else _full_index(found, shape, origin))
    return out


def _ball_offsets(sp: np.ndarray, k: float):
    """The offsets ``d`` (all axes but the last) of the discrete ball ``sqrt(sum (d_i sp_i)^2) <= k (1 +
    tolerance)``, each with the half-width (voxels) of the ball along the last axis there."""
    kk = (k * (1 + _EDT_TOLERANCE)) ** 2
    radii = [int(np.floor(k * (1 + _EDT_TOLERANCE) / s)) for s in sp[:-1]]
    grids = np.meshgrid(*[np.arange(-r, r + 1) for r in radii], indexing="ij")
    lead = np.stack([g.reshape(-1) for g in grids], 1) if radii else np.zeros((1, 0), int)
    rest = kk - ((lead * sp[:-1]) ** 2).sum(1)
    keep = rest >= 0
    lead, rest = lead[keep], rest[keep]
    half = np.floor(np.sqrt(rest) / sp[-1]).astype(int)
    half += ((half + 1) * sp[-1]) ** 2 <= rest  # floor's rounding, both ways, against the exact rule
    half -= (half * sp[-1]) ** 2 > rest
    return lead, half


#: above this many offsets of the ball (large k_mm in voxels) the EDT is cheaper than shifted ORs
_MAX_OFFSETS = 400


def _within(edge: np.ndarray, sp: np.ndarray, k: float) -> np.ndarray:
    """Voxels whose distance in mm to a True voxel of ``edge`` is at most ``k`` (relative tolerance
    :data:`_EDT_TOLERANCE`): the dilation of ``edge`` by the discrete ball of radius ``k``, which is
    exactly ``distance_transform_edt(~edge, sampling=sp) <= k (1 + tol)`` (the EDT is the exact
    distance to the nearest True voxel). Computed as the OR, over the ball's offsets in the leading
    axes, of ``edge`` dilated along the last axis by the ball's half-width there (a 1-D maximum filter,
    one per distinct half-width), shifted by the offset; with more than :data:`_MAX_OFFSETS` offsets,
    by the EDT itself."""
    lead, half = _ball_offsets(sp, k)
    if len(lead) > _MAX_OFFSETS:
        return ndimage.distance_transform_edt(~edge, sampling=sp) <= k * (1 + _EDT_TOLERANCE)
    src = edge.view(np.uint8)
    along = {w: (ndimage.maximum_filter1d(src, 2 * w + 1, axis=-1, mode="constant") if w else src).view(bool)
             for w in np.unique(half).tolist()}
    out = np.zeros(edge.shape, bool)
    for d, w in zip(lead.tolist(), half.tolist()):
        dst, srs = [], []
        for di, n in zip(d, edge.shape[:-1]):
            if abs(di) >= n:
                break
            dst.append(slice(max(di, 0), n + min(di, 0)))  # out[v] |= along[v - d]
            srs.append(slice(max(-di, 0), n - max(di, 0)))
        else:
            out[tuple(dst)] |= along[w][tuple(srs)]
    return out


def _band_values(probs, labels, regions, spacing, k_mm, ignore_index=None
                 ) -> Iterator[Tuple[int, np.ndarray, np.ndarray]]:
    """``(task, confidence, correct)`` of the band voxels, in blocks of ``CHUNK_VOXELS``. ``ignore_index``:
    voxels with that reference label are left out (after the band is formed)."""
    flat_p = probs.reshape(probs.shape[0], -1)
    flat_l = labels.reshape(-1)
    cast = _work_dtype(probs)
    if regions is None:
        tasks = [(0, None, np.flatnonzero(boundary_band(labels, spacing, k_mm)))]
    else:
        tasks = [(r, region, idx) for r, (region, idx)
                 in enumerate(zip(regions, _region_band_indices(labels, regions, spacing, k_mm)))]
    if ignore_index is not None:
        tasks = [(t, target, idx[flat_l.take(idx) != ignore_index]) for t, target, idx in tasks]
    for t, target, idx in tasks:
        for s in range(0, idx.size, CHUNK_VOXELS):
            blk = idx[s:s + CHUNK_VOXELS]
            if target is None:
                conf, pred = _max_argmax(flat_p.take(blk, axis=1).astype(cast, copy=False))
                yield t, conf, pred == flat_l.take(blk)
            else:
                pr = flat_p[t].take(blk).astype(cast, copy=False)
                yield t, np.maximum(pr, 1 - pr), (pr > 0.5) == in_region(flat_l.take(blk), target)


def _boundary_ece_arg_validation(probs, labels, spacing, k_mm, n_bins, regions, validate_args, binning):
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    bin_edges(n_bins)
    check_binning(binning)
    _spacing(spacing, labels.ndim)
    if k_mm is not None and not (np.isfinite(k_mm) and k_mm >= 0):
        raise ValueError(f"k_mm must be finite and >= 0, got {k_mm}")
    if validate_args:
        _validate(probs, labels, regions)
    return probs, labels, regions


def _boundary_ece_update(probs, labels, spacing=None, k_mm: Optional[float] = None, n_bins: int = 15,
                         regions: Regions = None, binning: str = "uniform", ignore_index: Optional[int] = None
                         ) -> Union[BinStats, ValueStats]:
    probs, labels, regions = _check_types_and_shapes(probs, labels, regions)
    triples = _band_values(probs, labels, regions, spacing, k_mm, ignore_index)
    return _collect(triples, _ece_tasks(probs.shape[0], regions), n_bins, check_binning(binning), _work_dtype(probs))


def boundary_ece(probs, labels, spacing: Optional[Sequence[float]] = None, k_mm: Optional[float] = None,
                 n_bins: int = 15, binning: str = "uniform", regions: bool = False, region_labels: Regions = None,
                 validate_args: bool = True) -> float:
    """ECE of the voxels within ``k_mm`` mm of the reference boundary (boundary-band ECE).

    Band: :func:`boundary_band` of the reference ``labels`` with ``spacing`` (mm, array axis order)
    and half-width ``k_mm`` (default: **2 voxels of the largest spacing**, ``2 * max(spacing)``), on
    both sides of every label interface. Softmax: over the band voxels (background included: the
    band reaches into it), confidence = largest class probability, correct = ``argmax_c p_c ==
    label`` (lowest channel on ties), ``sum_b n_b/N |mean conf_b - mean correct_b|``. Regions: per
    region r the band of the region's reference mask, confidence ``max(p_r, 1 - p_r)``, correct =
    ``(p_r > 0.5) == [label in region r]``; mean over the regions with a non-empty band. Bins as
    :func:`.calibration.ece` (``binning`` ``"uniform"`` or ``"adaptive"``). NaN if no band voxel.
    Statistics: those of ECE (mergeable; pooled over cases with ``+``).
    """
    regions = resolve_region_labels(regions, region_labels)
    probs, labels, regions = _boundary_ece_arg_validation(probs, labels, spacing, k_mm, n_bins, regions,
                                                          validate_args, binning)
    return _ece_compute(_boundary_ece_update(probs, labels, spacing, k_mm, n_bins, regions, binning))
