"""Exact Euclidean distance transform and the reference signed distance function (SDF), in torch.

Distances are Euclidean, in voxel units, or in millimetres with ``spacing`` (exact anisotropic
distances, as ``scipy.ndimage.distance_transform_edt(..., sampling=spacing)``; the trainers pass
the 3D configuration's spacing; 2D stays in voxels). Everything runs on the tensor's device without
host synchronisation, for 2D ``(N, C, H, W)`` and 3D ``(N, C, D, H, W)`` batches.

Algorithm (exact): squared distances are separable. Along the longest spatial axis the 1D distance
to the nearest seed of each line is found with cumulative max/min scans (O(n)); along each other
axis ``f(i) = min_j g(j) + (i - j)^2`` is evaluated by brute force over all ``j`` (O(n^2) per line,
fully vectorised, chunked over lines so that the temporary stays below ``chunk_bytes``). In voxel
units all values are integers below 2^24, hence exact in float32; with a spacing they are float32
(relative error ~1e-7).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .morphology import erode


def _default_chunk_bytes(device: torch.device) -> int:
    return (256 << 20) if device.type == "cuda" else (8 << 20)


def _scan_axis(seeds: Tensor, dim: int, sentinel: float, step: float = 1.0) -> Tensor:
    """Squared 1D distance along ``dim`` (voxel step ``step``) to the nearest seed in the same line
    (``(sentinel * step)^2`` if none)."""
    n = seeds.shape[dim]
    shape = [1] * seeds.ndim
    shape[dim] = n
    idx = torch.arange(n, device=seeds.device, dtype=torch.float32).view(shape)
    neg = torch.full((), -sentinel, device=seeds.device, dtype=torch.float32)
    pos = torch.full((), float(n) + sentinel, device=seeds.device, dtype=torch.float32)
    last = torch.where(seeds, idx, neg).cummax(dim).values
    nxt = torch.where(seeds, idx, pos).flip(dim).cummin(dim).values.flip(dim)
    d = torch.minimum(idx - last, nxt - idx).clamp_max(sentinel) * float(step)
    return d * d


def _minplus_axis(g: Tensor, dim: int, chunk_bytes: int, step: float = 1.0) -> Tensor:
    """``f(i) = min_j g(j) + (step * (i - j))^2`` along ``dim`` (brute force, chunked over lines)."""
    g = g.movedim(dim, -1)
    shape = g.shape
    n = shape[-1]
    lines = g.reshape(-1, n)
    ar = torch.arange(n, device=g.device, dtype=g.dtype) * float(step)
    quad = (ar[:, None] - ar[None, :]) ** 2  # (i, j)
    per = max(1, int(chunk_bytes) // (n * n * 4))
    out = torch.empty_like(lines)
    for s in range(0, lines.shape[0], per):
        out[s:s + per] = (lines[s:s + per, None, :] + quad).amin(-1)
    return out.reshape(shape).movedim(-1, dim)


def _check_spacing(spacing, nsp: int):
    if spacing is None:
        return [1.0] * nsp
    sp = [float(v) for v in spacing]
    if len(sp) != nsp or min(sp) <= 0:
        raise ValueError(f"spacing must have {nsp} positive values (one per spatial axis), got {spacing}")
    return sp


def squared_edt_to_seeds(seeds: Tensor, chunk_bytes: Optional[int] = None, spacing=None) -> Tensor:
    """Exact squared Euclidean distance of every voxel to the nearest ``True`` voxel of ``seeds``.

    ``seeds``: bool ``(N, C, *spatial)``; distances are computed independently per ``(n, c)``, in
    voxel units or, with ``spacing`` (one value per spatial axis), in the spacing's units.
    Channels without any seed get a value larger than any real squared distance (check with
    ``seeds.any()`` per channel). Returns float32 of the same shape.
    """
    if seeds.ndim < 3:
        raise ValueError(f"seeds must be (N, C, *spatial), got shape {tuple(seeds.shape)}")
    seeds = seeds.bool()
    if chunk_bytes is None:
        chunk_bytes = _default_chunk_bytes(seeds.device)
    sp_dims = list(range(2, seeds.ndim))
    steps = _check_spacing(spacing, len(sp_dims))
    sizes = [seeds.shape[d] for d in sp_dims]
    sentinel = float(sum(sizes) + 1) * max(steps) / min(steps)
    first_i = max(range(len(sizes)), key=lambda i: sizes[i])  # scan the longest axis
    g = _scan_axis(seeds, sp_dims[first_i], sentinel, steps[first_i])
    for i, d in enumerate(sp_dims):
        if i != first_i:
            g = _minplus_axis(g, d, chunk_bytes, steps[i])
    return g


def euclidean_distance_transform(mask: Tensor, chunk_bytes: Optional[int] = None, spacing=None) -> Tensor:
    """Torch equivalent of ``scipy.ndimage.distance_transform_edt(mask, sampling=spacing)`` per
    ``(n, c)`` channel.

    Distance of every non-zero voxel to the nearest zero voxel (0 on zero voxels), in voxel units
    or the units of ``spacing``. ``mask``: ``(N, C, *spatial)``. Channels without any zero voxel get
    a large positive value (scipy's result there is not a distance either).
    """
    return squared_edt_to_seeds(~mask.bool(), chunk_bytes, spacing).sqrt()


def reference_sdf(onehot_fg: Tensor, chunk_bytes: Optional[int] = None, spacing=None, axes=None) -> Tensor:
    """Reference signed distance function per sample and channel, normalised into ``[-1, 1]``.

    ``onehot_fg``: ``(B, K, *spatial)`` binary masks (one per foreground class or region).
    Returns float32 ``(B, K, *spatial)``.

    Definitions (per sample ``b`` and channel ``k``, object ``O`` = voxels with value 1):

    * boundary ``dO``: voxels of ``O`` with at least one voxel outside ``O`` in their 3x3(x3)
      neighbourhood (internal boundary, 8/26-connectivity; the image border is not a boundary);
      ``axes`` restricts the neighbourhood (in-plane 3x3x1 for anisotropic 3D, see
      :func:`~.morphology.window_axes`);
    * ``s(x) = -dist(x, dO)`` inside ``O``, ``+dist(x, dO)`` outside, so ``s = 0`` exactly on
      ``dO``; ``dist`` is the exact Euclidean distance, in voxel units or, with ``spacing``, in
      millimetres (anisotropic EDT). Outside ``O`` this equals the distance to the nearest voxel
      of ``O``;
    * ``s / max|s|`` over the patch, so the range is ``[-1, 1]``;
    * a channel with no voxel of ``O`` gives ``+1`` everywhere, one filled by ``O`` gives ``-1``.
    """
    if onehot_fg.ndim not in (4, 5):
        raise ValueError(f"onehot_fg must be (B, K, H, W) or (B, K, D, H, W), got {tuple(onehot_fg.shape)}")
    with torch.no_grad():
        fg = onehot_fg.detach() > 0.5
        fgf = fg.to(torch.float32)
        boundary = fg & (erode(fgf, 3, axes=axes) < 0.5)
        d = squared_edt_to_seeds(boundary, chunk_bytes, spacing).sqrt()
        s = torch.where(fg, -d, d)
        red = tuple(range(2, s.ndim))
        shape = s.shape[:2] + (1,) * len(red)
        has_b = boundary.flatten(2).any(-1).reshape(shape)
        has_fg = fg.flatten(2).any(-1).reshape(shape)
        s = s / s.abs().amax(red, keepdim=True).clamp_min(1e-12)
        const = torch.where(has_fg, -1.0, 1.0).to(s.dtype)
        s = torch.where(has_b, s, const)
    return s


__all__ = ["squared_edt_to_seeds", "euclidean_distance_transform", "reference_sdf"]
