"""Overlap and surface-distance metrics on binary masks: Dice (DSC) and HD95.

Conventions
-----------
* Masks are boolean (anything non-zero is foreground), 2D or 3D (any rank), same shape.
* ``spacing``: voxel size in mm per axis, **in the array's axis order** (for a SimpleITK image
  that is ``image.GetSpacing()[::-1]``).
* Both masks empty: DSC = 1, HD95 = 0 (perfect agreement on "nothing there").
* Exactly one mask empty: DSC = 0 and HD95 = the image diagonal in mm,
  ``sqrt(sum_i (shape_i * spacing_i)^2)``, the worst case; ``hd95(..., return_flag=True)`` then
  also returns ``True`` so that callers can flag the case.
* Surface of a mask = the mask minus its erosion with the face-connected structuring element
  (``generate_binary_structure(ndim, 1)``); voxels outside the image count as background, so mask
  voxels on the image border are surface voxels.
* HD95 = 95th percentile (``np.percentile``, linear interpolation) of the *pooled* set of both
  directed surface distances: the distance of every prediction surface voxel to the nearest
  reference surface voxel together with that of every reference surface voxel to the nearest
  prediction surface voxel. Distances are Euclidean in mm between voxel centres (the values of an
  exact Euclidean distance transform with ``sampling=spacing``).
* Speed: both masks are cropped to the bounding box of their union (plus a 1-voxel margin) first;
  this does not change the result because every surface voxel lies inside that box. Surfaces by
  shifted ANDs; nearest surface voxels by trying the offsets of a small ball in order of length,
  then a k-d tree for the rest, instead of two distance transforms of the volume (same values,
  tested against the full-volume transform; see :func:`surface_distances`).
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

__all__ = ["dice", "hd95", "image_diagonal", "surface_distances"]


def _as_masks(pred, ref) -> Tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred).astype(bool, copy=False)
    ref = np.asarray(ref).astype(bool, copy=False)
    if pred.shape != ref.shape:
        raise ValueError(f"pred has shape {pred.shape} but ref has shape {ref.shape}")
    return pred, ref


def _spacing(spacing, ndim: int) -> np.ndarray:
    sp = np.ones(ndim) if spacing is None else np.asarray(spacing, dtype=np.float64).reshape(-1)
    if sp.size != ndim:
        raise ValueError(f"spacing has {sp.size} entries but the masks have {ndim} dimensions")
    if not np.all(sp > 0):
        raise ValueError(f"spacing must be positive, got {tuple(sp)}")
    return sp


def dice(pred, ref) -> float:
    """Dice similarity coefficient ``2|P & R| / (|P| + |R|)``; 1 if both masks are empty."""
    pred, ref = _as_masks(pred, ref)
    sp, sr = int(np.count_nonzero(pred)), int(np.count_nonzero(ref))
    if sp + sr == 0:
        return 1.0
    return 2.0 * int(np.count_nonzero(pred & ref)) / (sp + sr)


def image_diagonal(shape: Sequence[int], spacing=None) -> float:
    """Length of the image diagonal in mm: ``sqrt(sum_i (shape_i * spacing_i)^2)``."""
    sp = _spacing(spacing, len(shape))
    return float(np.sqrt(np.sum((np.asarray(shape, dtype=np.float64) * sp) ** 2)))


def _surface(mask: np.ndarray, connectivity: int = 1) -> np.ndarray:
    """Mask voxels with at least one background neighbour (outside the image counts as background).

    ``connectivity=1``: face neighbours, computed with shifted logical ANDs (the same result as
    ``mask & ~binary_erosion(mask, generate_binary_structure(ndim, 1), border_value=0)``, tested,
    several times faster); otherwise ``scipy.ndimage`` erosion with ``generate_binary_structure(ndim,
    connectivity)``.
    """
    if connectivity != 1:
        struct = ndimage.generate_binary_structure(mask.ndim, connectivity)
        return mask & ~ndimage.binary_erosion(mask, structure=struct, border_value=0)
    interior = mask.copy()
    for ax in range(mask.ndim):
        if mask.shape[ax] < 3:
            interior[...] = False
            break
        lo = [slice(None)] * mask.ndim
        hi = [slice(None)] * mask.ndim
        lo[ax], hi[ax] = slice(0, -1), slice(1, None)
        interior[tuple(hi)] &= mask[tuple(lo)]
        interior[tuple(lo)] &= mask[tuple(hi)]
        edge = [slice(None)] * mask.ndim
        edge[ax] = 0
        interior[tuple(edge)] = False
        edge[ax] = -1
        interior[tuple(edge)] = False
    return mask & ~interior


def _bbox(union: np.ndarray, margin: int) -> tuple:
    sl = []
    for ax in range(union.ndim):
        other = tuple(i for i in range(union.ndim) if i != ax)
        nz = np.flatnonzero(union.any(axis=other)) if other else np.flatnonzero(union)
        sl.append(slice(max(int(nz[0]) - margin, 0), min(int(nz[-1]) + 1 + margin, union.shape[ax])))
    return tuple(sl)


def surface_distances(pred, ref, spacing=None, connectivity: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """Both directed surface distances in mm: ``(d(prediction surface -> reference surface),
    d(reference surface -> prediction surface))``, each the exact Euclidean distance from a surface
    voxel centre to the nearest surface voxel centre of the other mask, in ``np.argwhere`` order of
    the surface voxels. Both masks must be non-empty.

    Computation: masks cropped to the bounding box of their union plus a 1-voxel margin (every
    surface voxel lies inside, so nothing changes), surfaces by :func:`_surface`, then the nearest
    voxel of the other surface by :func:`_nearest` (ball offsets, then ``scipy.spatial.cKDTree``),
    which gives the same distances as a Euclidean distance transform of the other surface with
    ``sampling=spacing`` (tested against the full-volume transform) without transforming the volume.
    """
    pred, ref = _as_masks(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    sl = _bbox(pred | ref, 1)
    s_pred, s_ref = _surface(pred[sl], connectivity), _surface(ref[sl], connectivity)
    offsets, lengths, ext = _ball_offsets(sp, NEAR_RADIUS_VOXELS * float(sp.min()))
    a, b = _PaddedSurface(s_pred, ext), _PaddedSurface(s_ref, ext)
    return _nearest(a, b, sp, offsets, lengths), _nearest(b, a, sp, offsets, lengths)


#: Nearest-surface search: offsets up to this many times the smallest spacing are tried directly.
NEAR_RADIUS_VOXELS = 4


def _ball_offsets(sp: np.ndarray, radius_mm: float) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All integer offsets with length <= ``radius_mm`` (in mm), sorted by length; and the lengths."""
    ext = [int(np.floor(radius_mm / s)) for s in sp]
    grids = np.meshgrid(*[np.arange(-e, e + 1) for e in ext], indexing="ij")
    off = np.stack([g.ravel() for g in grids], 1)
    dist = np.sqrt(((off * sp) ** 2).sum(1))
    keep = dist <= radius_mm
    order = np.argsort(dist[keep], kind="stable")
    return off[keep][order], dist[keep][order], np.asarray(ext)


class _PaddedSurface:
    """A surface mask zero-padded by ``ext`` voxels per side, flattened, with the flat indices of
    its voxels (C order, i.e. ``np.argwhere`` order) and, on demand, their coordinates (voxels,
    in the unpadded array)."""

    def __init__(self, mask: np.ndarray, ext: np.ndarray):
        self.ext = np.asarray(ext, dtype=np.intp)
        shape = tuple(int(n + 2 * e) for n, e in zip(mask.shape, self.ext))
        pad = np.zeros(shape, bool)
        pad[tuple(slice(int(e), int(e) + n) for n, e in zip(mask.shape, self.ext))] = mask
        self.shape = shape
        self.strides = np.array(pad.strides, dtype=np.intp) // pad.itemsize
        self.flat = pad.reshape(-1)
        self.index = np.flatnonzero(self.flat)

    def coords(self, which=None) -> np.ndarray:
        """Voxel coordinates ``(n, ndim)`` of all surface voxels, or of ``index[which]``."""
        idx = self.index if which is None else self.index[which]
        return np.stack(np.unravel_index(idx, self.shape), 1) - self.ext


def _nearest(src: _PaddedSurface, dst: _PaddedSurface, sp: np.ndarray, offsets: np.ndarray,
             lengths: np.ndarray) -> np.ndarray:
    """Exact distance (mm) of every ``src`` voxel (``np.argwhere`` order) to the nearest ``dst`` voxel.

    Two stages with the same result as a Euclidean distance transform of ``~dst``: (1) the integer
    offsets of a ball of radius ``NEAR_RADIUS_VOXELS x min(spacing)`` (``offsets``, sorted by their
    ``lengths``; both surfaces padded by the ball's extent) are tried in order of length; the first
    offset at which a ``dst`` voxel lies gives the exact distance (every closer offset has been
    tried); (2) the voxels with nothing inside the ball get their nearest ``dst`` voxel from a k-d
    tree of the ``dst`` coordinates in mm.
    """
    out = np.empty(src.index.size)
    flat = dst.flat
    idx = src.index
    off_flat = offsets @ dst.strides
    remaining = np.arange(idx.size)  # positions in ``out`` of the entries of ``idx``
    alive = np.ones(idx.size, bool)  # entries of ``idx`` not resolved yet
    n_alive = idx.size
    for o, length in zip(off_flat.tolist(), lengths.tolist()):
        hit = flat[idx + o]
        hit &= alive
        n_hit = int(np.count_nonzero(hit))
        if n_hit:
            out[remaining[hit]] = length
            n_alive -= n_hit
            if n_alive == 0:
                break
            if 4 * n_alive < 3 * idx.size:  # drop resolved entries once a quarter is resolved
                keep = alive & ~hit
                remaining, idx = remaining[keep], idx[keep]
                alive = np.ones(idx.size, bool)
            else:  # cheaper than compressing two index arrays after every offset
                alive &= ~hit
    if n_alive and n_alive != alive.size:
        remaining = remaining[alive]
    if n_alive:
        # larger leaves than the default: measured ~5% faster queries and builds on surface clouds
        tree = cKDTree(dst.coords() * sp, leafsize=64, balanced_tree=False, compact_nodes=False)
        out[remaining] = tree.query(src.coords(remaining) * sp, k=1)[0]
    return out


def hd95(pred, ref, spacing=None, return_flag: bool = False, connectivity: int = 1
         ) -> Union[float, Tuple[float, bool]]:
    """95th percentile Hausdorff distance in mm (conventions in the module docstring).

    ``return_flag=True`` returns ``(value, flagged)`` where ``flagged`` is True exactly when one mask
    is empty and the value is the worst case (image diagonal). ``connectivity``: neighbourhood of the
    surface definition (1 = face neighbours, the default; ``ndim`` = all neighbours, as the SDC
    authors' code).
    """
    pred, ref = _as_masks(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return (0.0, False) if return_flag else 0.0
    if has_p != has_r:
        v = image_diagonal(pred.shape, sp)
        return (v, True) if return_flag else v
    d1, d2 = surface_distances(pred, ref, sp, connectivity)
    v = float(np.percentile(np.concatenate([d1, d2]), 95))
    return (v, False) if return_flag else v
