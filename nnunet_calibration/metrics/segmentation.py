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
  prediction surface voxel. Distances are Euclidean in mm between voxel centres (exact Euclidean
  distance transform with ``sampling=spacing``).
* Speed: both masks are cropped to the bounding box of their union (plus a 1-voxel margin) first;
  this does not change the result because every surface voxel lies inside that box.
"""
from __future__ import annotations

from typing import Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

__all__ = ["dice", "hd95", "image_diagonal"]


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


def _surface(mask: np.ndarray) -> np.ndarray:
    struct = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=struct, border_value=0)


def hd95(pred, ref, spacing=None, return_flag: bool = False) -> Union[float, Tuple[float, bool]]:
    """95th percentile Hausdorff distance in mm (conventions in the module docstring).

    ``return_flag=True`` returns ``(value, flagged)`` where ``flagged`` is True exactly when one mask
    is empty and the value is the worst case (image diagonal).
    """
    pred, ref = _as_masks(pred, ref)
    sp = _spacing(spacing, pred.ndim)
    has_p, has_r = bool(pred.any()), bool(ref.any())
    if not has_p and not has_r:
        return (0.0, False) if return_flag else 0.0
    if has_p != has_r:
        v = image_diagonal(pred.shape, sp)
        return (v, True) if return_flag else v
    union = pred | ref
    sl = []
    for ax in range(pred.ndim):
        other = tuple(i for i in range(pred.ndim) if i != ax)
        nz = np.flatnonzero(union.any(axis=other))
        sl.append(slice(max(int(nz[0]) - 1, 0), min(int(nz[-1]) + 2, pred.shape[ax])))
    sl = tuple(sl)
    sp_pred, sp_ref = _surface(pred[sl]), _surface(ref[sl])
    d_to_ref = ndimage.distance_transform_edt(~sp_ref, sampling=sp)
    d_to_pred = ndimage.distance_transform_edt(~sp_pred, sampling=sp)
    dists = np.concatenate([d_to_ref[sp_pred], d_to_pred[sp_ref]])
    v = float(np.percentile(dists, 95))
    return (v, False) if return_flag else v
