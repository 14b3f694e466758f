"""Integration with nnU-Net's conventions: Dice vs nnunetv2, DC_and_CE / DC_and_BCE, deep
supervision lists, ignore label invariance, finite gradients for every registered loss, errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from nnunetv2.training.loss.compound_losses import DC_and_BCE_loss, DC_and_CE_loss
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from nnunetv2.utilities.helpers import softmax_helper_dim1

import losses_testlib as R
from nnunet_calibration.losses import (LOSSES, CalibrationLoss, CrossEntropy, SDCLoss, SoftDice,
                                       WithDice, available_losses, build_loss)

IGN = 4


def labels_batch(ndim, seed=0, ignore=False, c=4, b=2):
    g = torch.Generator().manual_seed(seed)
    sp = (10, 9) if ndim == 2 else (5, 6, 7)
    x = torch.randn(b, c, *sp, generator=g, dtype=torch.float64) * 2
    t = torch.randint(0, c, (b, 1, *sp), generator=g).float()
    t[:, :, : sp[0] // 2] = torch.where(t[:, :, : sp[0] // 2] > 1, 2.0, 1.0)  # some structure
    if ignore:
        t[torch.rand(t.shape, generator=g) < 0.3] = IGN
    return x, t


def regions_batch(ndim, seed=0, ignore=False, r=3, b=2):
    g = torch.Generator().manual_seed(seed)
    sp = (10, 9) if ndim == 2 else (5, 6, 7)
    x = torch.randn(b, r, *sp, generator=g, dtype=torch.float64) * 2
    t = (torch.rand(b, r, *sp, generator=g) < 0.4).float()
    if ignore:
        t = torch.cat([t, (torch.rand(b, 1, *sp, generator=g) < 0.3).float()], 1)
    return x, t


def call(loss, x, t):
    if isinstance(loss, SDCLoss) or (isinstance(loss, WithDice) and isinstance(loss.loss, SDCLoss)):
        inner = loss if isinstance(loss, SDCLoss) else loss.loss
        k = inner.sdf_channels(x)
        sdf = torch.tanh(torch.linspace(-2, 2, x.shape[0] * k * x[0, 0].numel(), dtype=x.dtype)).reshape(
            x.shape[0], k, *x.shape[2:])
        return loss(x, t, sdf)
    return loss(x, t)


# ----------------------------------------------------------------------- Dice vs nnU-Net
@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("ndim", [2, 3])
def test_dice_matches_nnunet_memory_efficient_dice(ndim, ignore, batch_dice):
    x, t = labels_batch(ndim, 1, ignore)
    ref_dc = MemoryEfficientSoftDiceLoss(apply_nonlin=softmax_helper_dim1, batch_dice=batch_dice,
                                         do_bg=False, smooth=1e-5, ddp=False)
    mask = (t != IGN) if ignore else None
    t_d = torch.where(t == IGN, 0, t) if ignore else t
    ours = SoftDice(batch_dice=batch_dice, ignore_label=IGN if ignore else None)
    torch.testing.assert_close(ours(x, t), ref_dc(x, t_d, loss_mask=mask), rtol=1e-12, atol=1e-12)
    # regions: sigmoid, do_bg True
    xr, tr = regions_batch(ndim, 2, ignore)
    ref_r = MemoryEfficientSoftDiceLoss(apply_nonlin=torch.sigmoid, batch_dice=batch_dice, do_bg=True,
                                        smooth=1e-5, ddp=False)
    m = (1 - tr[:, -1:]).bool() if ignore else None
    ours_r = SoftDice(regions=True, batch_dice=batch_dice, ignore_label=1 if ignore else None)
    torch.testing.assert_close(ours_r(xr, tr), ref_r(xr, tr[:, :-1] if ignore else tr, loss_mask=m),
                               rtol=1e-12, atol=1e-12)


#: ``_DC`` losses whose calibration part reduces to plain CE/BCE with these hyperparameters
CE_EQUIVALENT = [("ce_dc", {}), ("ls_dc", {"alpha": 0.0}), ("focal_dc", {"gamma": 0.0}),
                 ("mbls_dc", {"margin": 1e6}), ("nacl_dc", {"alpha": 0.0}),
                 ("sdc_dc", {"alpha": 0.0, "lambda_sdf": 0.0})]


@pytest.mark.parametrize("batch_dice", [False, True])
@pytest.mark.parametrize("ignore", [False, True])
@pytest.mark.parametrize("name,kw", CE_EQUIVALENT, ids=[n for n, _ in CE_EQUIVALENT])
def test_dc_losses_use_nnunets_ce_scale(name, kw, ignore, batch_dice):
    """Issue 9: the CE/BCE part of every ``_DC`` loss has nnU-Net's scale exactly: compared with
    nnU-Net's own ``DC_and_CE_loss`` (labels) / ``DC_and_BCE_loss`` (regions) on the same tensors,
    with and without ignore label. (nnU-Net's BCE with an ignore label is the sum over regions and
    valid voxels divided by the number of valid voxels, R times the mean; without it the mean.)"""
    x, t = labels_batch(2, 3, ignore)
    ref = DC_and_CE_loss({"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
                         weight_ce=1, weight_dice=1, ignore_label=IGN if ignore else None,
                         dice_class=MemoryEfficientSoftDiceLoss)
    ours = build_loss(name, ignore_label=IGN if ignore else None, batch_dice=batch_dice, **kw)
    assert isinstance(ours, WithDice)
    torch.testing.assert_close(call(ours, x, t), ref(x, t), rtol=1e-12, atol=1e-12)

    xr, tr = regions_batch(3, 4, ignore)
    ref_r = DC_and_BCE_loss({}, {"batch_dice": batch_dice, "do_bg": True, "smooth": 1e-5, "ddp": False},
                            use_ignore_label=ignore, dice_class=MemoryEfficientSoftDiceLoss)
    ours_r = build_loss(name, regions=True, ignore_label=1 if ignore else None, batch_dice=batch_dice, **kw)
    # nnU-Net casts the region targets to float32, so its BCE is float32 here
    torch.testing.assert_close(call(ours_r, xr, tr), ref_r(xr, tr).double(), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------- deep supervision
@pytest.mark.parametrize("ndim", [2, 3])
def test_deep_supervision_lists(ndim):
    x0, t0 = labels_batch(ndim, 5, ignore=True)
    pool = torch.nn.functional.max_pool2d if ndim == 2 else torch.nn.functional.max_pool3d
    x1 = pool(x0, 2, ceil_mode=True)
    t1 = t0[(..., ) + tuple(slice(None, None, 2) for _ in range(ndim))].contiguous()
    weights = [0.5714, 0.2857]
    for name in ("nacl_gradient", "svls", "fcl_dc"):
        loss = build_loss(name, ignore_label=IGN)
        ds = DeepSupervisionWrapper(loss, weights)
        got = ds([x0, x1], [t0, t1])
        expect = weights[0] * loss(x0, t0) + weights[1] * loss(x1, t1)
        torch.testing.assert_close(got, expect)
    # independent value for the NACL case at both resolutions
    ref = 0.0
    for w, x, t in zip(weights, (x0, x1), (t0, t1)):
        lab = t[:, 0].numpy().astype(np.int64)
        valid = lab != IGN
        ref += w * R.ref_nacl(x.numpy(), np.where(valid, lab, 0), 0.1, "mean", "none", valid)
    got = DeepSupervisionWrapper(build_loss("nacl", ignore_label=IGN), weights)([x0, x1], [t0, t1])
    assert got.item() == pytest.approx(ref, rel=1e-9)
    # SDC: SDF head only at full resolution
    sdc = build_loss("sdc_dc", ignore_label=IGN)
    k = x0.shape[1] - 1
    sdf0 = torch.zeros(x0.shape[0], k, *x0.shape[2:], dtype=x0.dtype, requires_grad=True)
    got = DeepSupervisionWrapper(sdc, weights)([x0, x1], [t0, t1], [sdf0, None])
    expect = weights[0] * sdc(x0, t0, sdf0) + weights[1] * sdc(x1, t1)
    torch.testing.assert_close(got, expect)
    (g,) = torch.autograd.grad(got, sdf0)
    assert g.abs().sum() > 0


# ----------------------------------------------------------------------- every registered loss
ALL = available_losses()


@pytest.mark.parametrize("name", ALL)
def test_every_loss_ignore_invariance_and_finite_gradients(name):
    for ndim in (2, 3):
        x, t = labels_batch(ndim, 7, ignore=True)
        x = x.clone().requires_grad_(True)
        loss = build_loss(name, ignore_label=IGN, batch_dice=True)
        v = call(loss, x, t)
        (g,) = torch.autograd.grad(v, x)
        assert torch.isfinite(v) and torch.isfinite(g).all(), name
        assert g.abs().sum() > 0, name
        ign = (t[:, 0] == IGN)
        assert (g.movedim(1, 0)[:, ign] == 0).all(), f"{name}: gradient at ignored voxels"
        x2 = x.detach().clone()
        x2.movedim(1, 0)[:, ign] = torch.randn(int(ign.sum()) * x.shape[1], dtype=x.dtype).reshape(x.shape[1], -1) * 50
        torch.testing.assert_close(call(loss, x2, t), v.detach(), rtol=1e-10, atol=1e-12)
        # float32 path without ignore label
        v32 = call(build_loss(name), x.detach().float().requires_grad_(True), torch.where(t == IGN, 0, t))
        assert torch.isfinite(v32)


@pytest.mark.parametrize("name", ALL)
def test_every_loss_regions(name):
    for ndim in (2, 3):
        for ignore in (False, True):
            x, t = regions_batch(ndim, 8, ignore)
            x = x.clone().requires_grad_(True)
            loss = build_loss(name, regions=True, ignore_label=1 if ignore else None)
            v = call(loss, x, t)
            (g,) = torch.autograd.grad(v, x)
            assert torch.isfinite(v) and torch.isfinite(g).all() and g.abs().sum() > 0, name
            if ignore:
                ign = t[:, -1] > 0
                assert (g.movedim(1, 0)[:, ign] == 0).all(), name
                x2 = x.detach().clone()
                x2.movedim(1, 0)[:, ign] = 30.0
                torch.testing.assert_close(call(loss, x2, t), v.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["ce", "focal", "ecp", "ls", "svls", "fcl", "dscpp_ce"])
def test_gradcheck_smooth_losses(name):
    x, t = labels_batch(2, 9, ignore=True, b=1)
    x = x[:, :, :4, :3].clone().requires_grad_(True)
    t = t[:, :, :4, :3]
    loss = build_loss(name, ignore_label=IGN)
    assert torch.autograd.gradcheck(lambda z: loss(z, t), (x,), eps=1e-6, atol=1e-5)


def test_ignore_all_voxels_gives_zero_not_nan():
    x, t = labels_batch(2, 1)
    t = torch.full_like(t, IGN)
    for name in ("ce", "nacl", "sdc", "ace_ce", "dscpp_ce", "svls_dc"):
        v = call(build_loss(name, ignore_label=IGN), x.clone().requires_grad_(True), t)
        assert torch.isfinite(v), name


# ----------------------------------------------------------------------- errors and registry
def test_registry_and_errors():
    assert {"focal", "ecp", "ls", "svls", "mbls", "nacl", "nacl_min", "fcl", "sdc", "dscpp",
            "dscpp_ce", "ace_ce", "ace_dice", "ace_dice_ce"} <= set(LOSSES)
    for op in ("erosion", "dilation", "opening", "closing", "gradient", "internal_boundary",
               "external_boundary"):
        assert f"nacl_{op}" in LOSSES and f"svls_{op}_dc" in ALL
    assert "sdc_dc" in ALL and "dscpp_dc" not in ALL
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("nope")
    with pytest.raises(ValueError, match="bad hyperparameters"):
        build_loss("focal", gama=2)
    assert build_loss("focal", gamma=2.0).gamma == 2.0
    assert build_loss("sdc_dc", dice_weight=0.5, alpha=0.2).dice_weight == 0.5
    with pytest.raises(ValueError, match="target shape"):
        CrossEntropy()(torch.zeros(1, 3, 4, 4), torch.zeros(1, 1, 4, 5))
    with pytest.raises(ValueError, match="channels"):
        CrossEntropy(regions=True, ignore_label=1)(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="morphological"):
        build_loss("nacl", morph="tophat")
    with pytest.raises(ValueError, match="'min'"):
        build_loss("nacl_min", morph="gradient")

    class NoRegions(CrossEntropy):
        supports_regions = False
        name = "noregions"

    with pytest.raises(ValueError, match="does not support region"):
        NoRegions(regions=True)
    NoRegions(regions=False)


@pytest.mark.parametrize("name", ["ce_dc", "sdc_dc", "nacl_gradient", "svls", "dscpp_ce", "ace_dice_ce", "fcl"])
def test_half_precision_logits_are_computed_in_float32(name):
    """Under CUDA autocast nnU-Net's logits are float16; sums over voxels must not overflow."""
    x, t = labels_batch(2, 11, ignore=True)
    v16 = call(build_loss(name, ignore_label=IGN), x.half(), t)
    v32 = call(build_loss(name, ignore_label=IGN), x.half().float(), t)
    assert v16.dtype == torch.float32
    torch.testing.assert_close(v16, v32)
    big = torch.zeros(1, 2, 300, 300, dtype=torch.float16)  # 90k voxels x CE ln2: > fp16 max if summed in fp16
    assert torch.isfinite(build_loss("ce")(big, torch.zeros(1, 1, 300, 300)))
