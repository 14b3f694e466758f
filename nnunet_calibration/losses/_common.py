"""Input handling shared by every loss: nnU-Net's target conventions, ignore label, regions.

Conventions (they are the contract with :mod:`nnunet_calibration.trainers`):

Plain labels (``regions=False``)
    ``net_output``: logits ``(B, C, *spatial)`` including the background channel.
    ``target``: label map ``(B, 1, *spatial)`` (float or integer, exactly as nnU-Net passes it;
    ``(B, *spatial)`` is accepted too). With ``ignore_label`` set, voxels carrying that label are
    *invalid*: they are removed from every term and every normaliser; their label is replaced by 0
    internally (the value never matters because they are masked).

Regions (``regions=True``, nnU-Net's ``DC_and_BCE_loss`` convention)
    ``net_output``: logits ``(B, R, *spatial)``, one independent sigmoid per region.
    ``target``: binary region maps ``(B, R, *spatial)``; when the dataset has an ignore label
    nnU-Net appends one more channel, ``target[:, -1]``, that is 1 on ignored voxels
    (``use_ignore_label=True``). Here that is selected by passing any non-``None`` ``ignore_label``
    together with ``regions=True``.

    Softmax-style losses are applied to regions by *binary decomposition*: region ``r`` of sample
    ``b`` becomes a two-class problem with logits ``(0, z_br)`` and labels ``{0: outside, 1: inside}``.
    ``softmax((0, z)) = (1 - sigmoid(z), sigmoid(z))``, so the cross-entropy of this two-class problem
    is exactly the binary cross-entropy of ``sigmoid(z)``; "mean over voxels" becomes "mean over
    voxels and regions" and "mean over classes" means over the two binary classes.

Reductions: every "mean over voxels" is ``sum over valid voxels / number of valid voxels``
(torch ``cross_entropy(..., ignore_index=...)`` semantics). If a batch contains no valid voxel the
term is 0 (torch would return NaN; nnU-Net skips its CE term in that case).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .morphology import window_axes


class Prepared(NamedTuple):
    """Softmax-form view of one resolution.

    logits: ``(N, C, *spatial)``; labels: ``(N, *spatial)`` long in ``[0, C)``;
    valid: ``(N, *spatial)`` bool or ``None`` (all valid). ``N = B`` for labels, ``B * R`` for regions.
    """

    logits: Tensor
    labels: Tensor
    valid: Optional[Tensor]


class ProbView(NamedTuple):
    """Probability view of one resolution (used by Dice-like and ACE losses).

    probs: ``(B, K, *spatial)`` softmax (labels, all C channels) or sigmoid (regions);
    onehot: ``(B, K, *spatial)`` float; valid: ``(B, 1, *spatial)`` bool or ``None``.
    """

    probs: Tensor
    onehot: Tensor
    valid: Optional[Tensor]


def onehot_from_labels(labels: Tensor, num_classes: int, dtype=torch.float32) -> Tensor:
    """``(N, *spatial)`` long -> ``(N, C, *spatial)`` one-hot (scatter, no host synchronisation)."""
    shape = (labels.shape[0], num_classes, *labels.shape[1:])
    out = torch.zeros(shape, device=labels.device, dtype=dtype)
    out.scatter_(1, labels.unsqueeze(1), 1)
    return out


def as_float(t: Tensor) -> Tensor:
    """Half-precision inputs (CUDA autocast) are promoted to float32 (sums over many voxels
    overflow float16); float32/float64 stay as they are."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def masked_mean(values: Tensor, valid: Optional[Tensor]) -> Tensor:
    """Mean of ``values`` ``(N, *spatial)`` over valid voxels; 0 if there is none."""
    values = as_float(values)
    if valid is None:
        return values.mean()
    total = torch.where(valid, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum()
    return total / valid.sum().clamp_min(1).to(values.dtype)


class CalibrationLoss(nn.Module):
    """Base class: parses nnU-Net's targets; subclasses implement :meth:`compute`.

    Class attribute ``supports_regions``: if ``False`` constructing with ``regions=True`` raises
    ``ValueError`` (nnU-Net trainers construct their loss in ``initialize()``, i.e. at start-up).
    """

    supports_regions: bool = True

    def __init__(self, *, regions: bool = False, ignore_label: Optional[int] = None, spacing=None):
        super().__init__()
        #: the loss's one name: its registry key when built by :func:`~.registry.build_loss`
        #: (which sets it), else the class name
        self.name = type(self).__name__
        if regions and not self.supports_regions:
            raise ValueError(
                f"{type(self).__name__} does not support region-based training "
                "(nnU-Net 'regions_class_order' / sigmoid outputs); use a plain-label dataset or "
                "another loss."
            )
        if ignore_label is not None and not regions:
            ignore_label = int(ignore_label)
            if ignore_label < 0:
                raise ValueError(f"ignore_label must be a non-negative label value, got {ignore_label}")
        self.regions = bool(regions)
        self.ignore_label = ignore_label
        #: voxel spacing of the 3D configuration (``None``: voxel units); used by the neighbourhood
        #: losses: in-plane windows when anisotropic (:func:`~.morphology.window_axes`) and the
        #: SDF in millimetres. 2D patches ignore it.
        self.spacing = None if spacing is None else tuple(float(v) for v in spacing)
        if self.spacing is not None and (len(self.spacing) not in (2, 3) or min(self.spacing) <= 0):
            raise ValueError(f"spacing must be 2 or 3 positive values, got {spacing}")

    def window_axes(self, net_output: Tensor):
        """Spatial axes of the local windows for this patch (``None``: all; see
        :func:`~.morphology.window_axes`)."""
        nsp = net_output.ndim - 2
        if self.spacing is None or nsp != 3 or len(self.spacing) != 3:
            return None
        return window_axes(3, self.spacing)

    def mm_spacing(self, net_output: Tensor):
        """Spacing for distances (3D patches with a 3D spacing), else ``None`` (voxel units)."""
        if self.spacing is None or net_output.ndim != 5 or len(self.spacing) != 3:
            return None
        return self.spacing

    # ------------------------------------------------------------------ target parsing
    def _check_shapes(self, net_output: Tensor, target: Tensor) -> None:
        if net_output.ndim not in (4, 5):
            raise ValueError(
                f"{type(self).__name__}: net_output must be (B, C, H, W) or (B, C, D, H, W), "
                f"got shape {tuple(net_output.shape)}"
            )
        if target.ndim == net_output.ndim - 1 and not self.regions:
            target = target.unsqueeze(1)
        if target.ndim != net_output.ndim or target.shape[0] != net_output.shape[0] \
                or target.shape[2:] != net_output.shape[2:]:
            raise ValueError(
                f"{type(self).__name__}: target shape {tuple(target.shape)} does not match "
                f"net_output shape {tuple(net_output.shape)}"
            )
        if self.regions:
            expect = net_output.shape[1] + (1 if self.ignore_label is not None else 0)
            if target.shape[1] != expect:
                raise ValueError(
                    f"{type(self).__name__}: regions target must have {expect} channels "
                    f"({net_output.shape[1]} regions"
                    f"{' + 1 ignore channel' if self.ignore_label is not None else ''}), "
                    f"got {target.shape[1]}"
                )
        elif target.shape[1] != 1:
            raise ValueError(
                f"{type(self).__name__}: plain-label target must be (B, 1, *spatial), "
                f"got {tuple(target.shape)}"
            )

    def _label_map(self, target: Tensor):
        """labels mode: (labels long (B, *sp), valid (B, *sp) bool or None)."""
        if target.ndim >= 4 and target.shape[1] == 1:
            target = target[:, 0]
        labels = target.long()
        if self.ignore_label is None:
            return labels, None
        valid = labels != self.ignore_label
        return torch.where(valid, labels, torch.zeros_like(labels)), valid

    def _region_maps(self, target: Tensor):
        """regions mode: (region maps float (B, R, *sp), valid (B, 1, *sp) bool or None)."""
        if self.ignore_label is None:
            return target.float(), None
        if target.dtype == torch.bool:
            valid = ~target[:, -1:]
        else:
            valid = (1 - target[:, -1:]).bool()
        maps = target[:, :-1].float()
        maps = torch.where(valid, maps, torch.zeros_like(maps))
        return maps, valid

    def prepare(self, net_output: Tensor, target: Tensor) -> Prepared:
        """Softmax-form view (binary decomposition for regions, see module docstring)."""
        if target.ndim == net_output.ndim - 1 and not self.regions:
            target = target.unsqueeze(1)
        self._check_shapes(net_output, target)
        net_output = as_float(net_output)
        if not self.regions:
            labels, valid = self._label_map(target)
            return Prepared(net_output, labels, valid)
        maps, valid = self._region_maps(target)
        b, r = net_output.shape[:2]
        sp = net_output.shape[2:]
        z = net_output.reshape(b * r, 1, *sp)
        logits = torch.cat([torch.zeros_like(z), z], dim=1)
        labels = maps.reshape(b * r, *sp).long()
        if valid is not None:
            valid = valid.expand(b, r, *sp).reshape(b * r, *sp)
        return Prepared(logits, labels, valid)

    def prob_view(self, net_output: Tensor, target: Tensor) -> ProbView:
        """Probability view: softmax + one-hot (labels) or sigmoid + region maps (regions)."""
        if target.ndim == net_output.ndim - 1 and not self.regions:
            target = target.unsqueeze(1)
        self._check_shapes(net_output, target)
        net_output = as_float(net_output)
        if self.regions:
            maps, valid = self._region_maps(target)
            return ProbView(torch.sigmoid(net_output), maps, valid)
        labels, valid = self._label_map(target)
        onehot = onehot_from_labels(labels, net_output.shape[1], dtype=net_output.dtype)
        return ProbView(torch.softmax(net_output, 1), onehot, None if valid is None else valid.unsqueeze(1))

    def extra_repr(self) -> str:
        return f"regions={self.regions}, ignore_label={self.ignore_label}, spacing={self.spacing}"


def ce_per_voxel(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-voxel cross-entropy ``(N, *spatial)`` (torch semantics, logits input)."""
    return F.cross_entropy(logits, labels, reduction="none")


def _onehot(prep: "Prepared"):
    """The one-hot reference of a prepared label batch, in the logits' dtype."""
    return onehot_from_labels(prep.labels, prep.logits.shape[1], dtype=prep.logits.dtype)
