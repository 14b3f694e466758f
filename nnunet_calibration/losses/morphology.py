"""Binary morphology and neighbourhood filters on one-hot maps, in torch (2D and 3D).

All operators act channel-wise on ``x`` of shape ``(N, C, H, W)`` or ``(N, C, D, H, W)`` holding
0/1 values, with a full square/cubic structuring element of side ``size`` (3 -> 3x3 or 3x3x3, i.e.
8-/26-connectivity): dilation is a max filter, erosion a min filter, both evaluated separably
(running maximum of shifted slices along each axis; identical to max-pooling, much faster on CPU).

Edge handling: the image border never creates a boundary. Windows are restricted to the image,
which is what *replicate* padding does for max/min pooling (a clamped index always lies inside the
same window). This equals ``scipy.ndimage.binary_erosion(..., border_value=1)``,
``binary_dilation(..., border_value=0)`` and scipy's grey-scale operators with ``mode='nearest'``.

Ignore label: a voxel with ``valid == False`` is treated like a voxel outside the image: it is
excluded from every window (neutral element: 0 for dilation, 1 for erosion), so ignored voxels
neither create nor extend structures. Values *at* ignored voxels are meaningless (callers mask them).

Operators (``MORPH_OPS``)::

    none               x
    erosion            x (-) B
    dilation           x (+) B
    opening            (x (-) B) (+) B
    closing            (x (+) B) (-) B
    gradient           (x (+) B) - (x (-) B)     (SDC paper section 3.2; default)
    internal_boundary  x - (x (-) B)
    external_boundary  (x (+) B) - x

Anisotropic 3D (``axes``): every operator and filter takes ``axes``, the spatial axes (0-based,
``0`` = D for 3D) along which the window extends; along the others its side is 1. ``axes=None`` means
all axes (3x3 / 3x3x3); in-plane 3x3x1 windows of an anisotropic volume are ``axes`` without the
through-plane axis (see :func:`window_axes`).

Neighbourhood filters used to build local targets (:func:`filter_normalized`): a normalised
convolution ``conv(x * valid) / conv(valid)`` with replicate padding; without ignored voxels that is
``conv(replicate_pad(x))`` with the kernel normalised to sum 1.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

MORPH_OPS = ("none", "erosion", "dilation", "opening", "closing", "gradient",
             "internal_boundary", "external_boundary")


def _check_size(size: int) -> int:
    size = int(size)
    if size < 1 or size % 2 != 1:
        raise ValueError(f"structuring element / kernel size must be a positive odd integer, got {size}")
    return size


#: nnU-Net's anisotropy threshold (``nnunetv2.configuration.ANISO_THRESHOLD``, used by its
#: ``get_do_separate_z``): a 3D spacing is anisotropic when ``max / min > 3``
ANISO_THRESHOLD = 3.0


def window_axes(ndim: int, spacing=None, threshold: float = ANISO_THRESHOLD):
    """Spatial axes of the local windows for a ``ndim``-D patch with voxel ``spacing``.

    ``None`` (every axis: 3x3 or 3x3x3) for 2D, without spacing, or for an isotropic-enough 3D
    spacing; for a 3D spacing with ``max / min > threshold`` (nnU-Net's rule, ``get_do_separate_z``)
    and a single axis of largest spacing (nnU-Net's ``get_lowres_axis``), the other two axes: the
    windows are in-plane 3x3x1, as the SDC authors process 3D volumes slice by slice.
    """
    if spacing is None or ndim != 3:
        return None
    sp = [float(v) for v in spacing]
    if len(sp) != 3 or min(sp) <= 0:
        raise ValueError(f"spacing must have 3 positive values for a 3D patch, got {spacing}")
    if max(sp) / min(sp) <= threshold:
        return None
    low = [i for i, v in enumerate(sp) if v == max(sp)]
    if len(low) != 1:
        return None
    return tuple(i for i in range(3) if i != low[0])


def _axes(x: Tensor, axes) -> tuple:
    """Tensor dims (2..) of the spatial ``axes`` (all when None)."""
    nsp = x.ndim - 2
    if axes is None:
        return tuple(range(2, x.ndim))
    axes = tuple(int(a) for a in axes)
    if any(a < 0 or a >= nsp for a in axes):
        raise ValueError(f"window axes {axes} out of range for {nsp} spatial dimensions")
    return tuple(a + 2 for a in axes)


def _pad_replicate(x: Tensor, r: int, dims=None) -> Tensor:
    if r == 0:
        return x
    dims = tuple(range(2, x.ndim)) if dims is None else dims
    pad = []
    for d in range(x.ndim - 1, 1, -1):  # F.pad lists the last dim first
        pad += [r, r] if d in dims else [0, 0]
    return F.pad(x, tuple(pad), mode="replicate")


def _check_nd(x: Tensor) -> None:
    if x.ndim not in (4, 5):
        raise ValueError(f"expected a (N, C, H, W) or (N, C, D, H, W) tensor, got shape {tuple(x.shape)}")


def _maxpool(x: Tensor, size: int, axes=None) -> Tensor:
    """Same-size max filter of side ``size`` along ``axes`` with replicate padding (separable: one
    running maximum of shifted slices per axis; much faster on CPU than ``max_pool``)."""
    _check_nd(x)
    r = size // 2
    dims = _axes(x, axes)
    out = _pad_replicate(x, r, dims)
    for d in dims:
        n = out.shape[d] - 2 * r
        acc = out.narrow(d, 0, n)
        for o in range(1, size):
            acc = torch.maximum(acc, out.narrow(d, o, n))
        out = acc
    return out


def _valid_like(x: Tensor, valid: Optional[Tensor]) -> Optional[Tensor]:
    if valid is None:
        return None
    if valid.ndim == x.ndim - 1:
        valid = valid.unsqueeze(1)
    return valid


def dilate(x: Tensor, size: int = 3, valid: Optional[Tensor] = None, axes=None) -> Tensor:
    """Binary dilation (max filter); ignored voxels count as 0."""
    size = _check_size(size)
    v = _valid_like(x, valid)
    if v is not None:
        x = torch.where(v, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return _maxpool(x, size, axes)


def erode(x: Tensor, size: int = 3, valid: Optional[Tensor] = None, axes=None) -> Tensor:
    """Binary erosion (min filter); ignored voxels count as 1."""
    size = _check_size(size)
    v = _valid_like(x, valid)
    if v is not None:
        x = torch.where(v, x, torch.ones((), dtype=x.dtype, device=x.device))
    return -_maxpool(-x, size, axes)


def morph(x: Tensor, op: str = "gradient", size: int = 3, valid: Optional[Tensor] = None, axes=None) -> Tensor:
    """Apply the morphological operator ``op`` (see module docstring) channel-wise."""
    if op == "none":
        return x
    if op == "erosion":
        return erode(x, size, valid, axes)
    if op == "dilation":
        return dilate(x, size, valid, axes)
    if op == "opening":
        return dilate(erode(x, size, valid, axes), size, valid, axes)
    if op == "closing":
        return erode(dilate(x, size, valid, axes), size, valid, axes)
    if op == "gradient":
        return dilate(x, size, valid, axes) - erode(x, size, valid, axes)
    if op == "internal_boundary":
        return x - erode(x, size, valid, axes)
    if op == "external_boundary":
        return dilate(x, size, valid, axes) - x
    raise ValueError(f"unknown morphological operator {op!r}; choose one of {MORPH_OPS}")


# ---------------------------------------------------------------------------------- kernels
class SepKernel(NamedTuple):
    """Neighbourhood kernel ``scale * (w (x) w (x) ... + delta * centre_impulse)``.

    ``w`` is a 1D weight vector (odd length) applied along every spatial axis; the dense kernel is
    available through :meth:`dense`. Both kernels used here (box, SVLS) have this form, which is
    evaluated separably with shifted slices (fast on CPU and GPU).
    """

    w: tuple
    delta: float = 0.0
    scale: float = 1.0

    def dense(self, ndim: int, dtype=torch.float64) -> Tensor:
        w = torch.tensor(self.w, dtype=dtype)
        k = w
        for _ in range(ndim - 1):
            k = k[..., None] * w
        k = k.clone()
        c = (len(self.w) // 2,) * ndim
        k[c] += self.delta
        return k * self.scale


def box_kernel(size: int = 3) -> SepKernel:
    """Mean filter of side ``size`` (sums to 1 in any dimension)."""
    size = _check_size(size)
    return SepKernel(tuple([1.0 / size] * size))


def svls_sep_kernel(sigma: float, size: int = 3, ndim: int = 2) -> SepKernel:
    """SVLS kernel (see :func:`svls_kernel`) in separable form.

    With ``G`` the normalised Gaussian (separable, centre weight ``g_c``), replacing the centre by
    the sum of the neighbours ``1 - g_c`` and renormalising gives
    ``K = (G + (1 - 2 g_c) delta) / (2 (1 - g_c))``.
    """
    size = _check_size(size)
    if sigma <= 0:
        raise ValueError(f"SVLS sigma must be > 0, got {sigma}")
    c = size // 2
    g = [math.exp(-((i - c) ** 2) / (2.0 * float(sigma) ** 2)) for i in range(size)]
    t = sum(g)
    g = [v / t for v in g]
    gc = g[c] ** ndim
    return SepKernel(tuple(g), 1.0 - 2.0 * gc, 1.0 / (2.0 * (1.0 - gc)))


def svls_kernel(sigma: float, ndim: int, size: int = 3, device=None, dtype=torch.float32) -> Tensor:
    """Dense spatially-varying label smoothing kernel (Islam & Glocker, IPMI 2021).

    A ``size^ndim`` isotropic Gaussian ``exp(-|d|^2 / (2 sigma^2))`` (``d`` in voxels from the
    centre) is normalised to sum 1; its centre weight is then replaced by the sum of all the
    other (neighbour) weights, and the kernel is normalised to sum 1 again. So the centre always
    gets weight 1/2 and the neighbours share the other 1/2 proportionally to the Gaussian.
    """
    return svls_sep_kernel(sigma, size, ndim).dense(ndim).to(device=device, dtype=dtype)


def _filter(x: Tensor, k: SepKernel, axes=None) -> Tensor:
    """Same-size channel-wise filtering along ``axes`` with replicate padding."""
    _check_nd(x)
    size = len(k.w)
    r = size // 2
    dims = _axes(x, axes)
    out = _pad_replicate(x, r, dims)
    for d in dims:
        n = out.shape[d] - 2 * r
        acc = out.narrow(d, 0, n) * k.w[0]
        for o in range(1, size):
            acc = acc + out.narrow(d, o, n) * k.w[o]
        out = acc
    if k.delta:
        out = out + k.delta * x
    if k.scale != 1.0:
        out = out * k.scale
    return out


def filter_normalized(x: Tensor, kernel: SepKernel, valid: Optional[Tensor] = None, axes=None) -> Tensor:
    """Normalised neighbourhood average ``conv(x * valid) / conv(valid)`` (replicate padding).

    Without ``valid`` this is the plain replicate-padded convolution with the kernel (which sums to
    1). Where no valid voxel is in the window the result is 0. ``axes``: see the module docstring
    (the kernel must then be built for ``len(axes)`` dimensions, e.g. the 2D SVLS kernel in-plane).
    """
    v = _valid_like(x, valid)
    if v is None:
        return _filter(x, kernel, axes)
    vf = v.to(x.dtype)
    num = _filter(x * vf, kernel, axes)
    den = _filter(vf, kernel, axes)
    return num / den.clamp_min(1e-12)


def normalize_over_classes(t: Tensor, fallback: Optional[Tensor] = None) -> Tensor:
    """Divide by the sum over the class dimension (dim 1).

    Voxels whose sum is 0 (no class survives the operator in the window) get ``fallback`` (e.g. the
    one-hot reference) if given, else stay all-zero.
    """
    s = t.sum(1, keepdim=True)
    out = t / s.clamp_min(1e-12)
    if fallback is not None:
        out = torch.where(s > 0, out, fallback)
    return out


def local_target(onehot: Tensor, *, op: str = "none", kernel: SepKernel, size: int = 3,
                 valid: Optional[Tensor] = None, fallback: str = "onehot", axes=None) -> Tensor:
    """Local (neighbourhood) target of the margin / SVLS / SDC losses.

    ``normalize_over_classes(filter_normalized(morph(onehot, op), kernel))`` with the empty-sum
    fallback ``"onehot"`` (the original one-hot reference) or ``"zero"``; morphology and filter
    along ``axes`` (module docstring).
    """
    if fallback not in ("onehot", "zero"):
        raise ValueError(f"fallback must be 'onehot' or 'zero', got {fallback!r}")
    m = morph(onehot, op, size, valid, axes)
    t = filter_normalized(m, kernel, valid, axes)
    return normalize_over_classes(t, onehot if fallback == "onehot" else None)


__all__ = ["MORPH_OPS", "ANISO_THRESHOLD", "SepKernel", "dilate", "erode", "morph", "box_kernel",
           "svls_kernel", "svls_sep_kernel", "window_axes",
           "filter_normalized", "normalize_over_classes", "local_target"]
