"""Every loss on tiny tensors against an independent numpy computation (losses_testlib)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import losses_testlib as R
from nnunet_calibration.losses import (ACELoss, CrossEntropy, DSCPlusPlusLoss, ECPLoss, FCLLoss,
                                       FocalLoss, LabelSmoothingLoss, MbLSLoss, NACLLoss, SDCLoss,
                                       SVLSLoss, build_loss)

SHAPES = {2: (2, 4, 7, 6), 3: (2, 3, 4, 5, 6)}
IGNORE = 9


def make(ndim, seed=0, ignore=False, scale=3.0):
    g = np.random.default_rng(seed)
    b, c, *sp = SHAPES[ndim]
    z = g.normal(size=(b, c, *sp)) * scale
    # blocky labels so that neighbourhoods contain both interiors and boundaries
    lab = np.zeros((b, *sp), dtype=np.int64)
    for i in range(b):
        for k in range(1, c):
            lo = [g.integers(0, s - 1) for s in sp]
            hi = [min(s, l + g.integers(2, 4)) for s, l in zip(sp, lo)]
            lab[(i,) + tuple(slice(l, h) for l, h in zip(lo, hi))] = k
    lab.reshape(-1)[g.integers(0, lab.size, size=3)] = c - 1  # a few isolated voxels
    valid = None
    if ignore:
        valid = g.random(lab.shape) > 0.25
        lab_t = np.where(valid, lab, IGNORE)
    else:
        lab_t = lab
    target = torch.tensor(lab_t[:, None], dtype=torch.float32)  # nnU-Net passes float (B, 1, *sp)
    return z, lab, valid, torch.tensor(z, dtype=torch.float64, requires_grad=True), target


CASES = [
    ("ce", lambda: CrossEntropy, {}, lambda z, l, v: R.ref_ce(z, l, v)),
    ("focal", lambda: FocalLoss, {}, lambda z, l, v: R.ref_focal(z, l, 3.0, v)),
    ("focal_g2", lambda: FocalLoss, {"gamma": 2.0}, lambda z, l, v: R.ref_focal(z, l, 2.0, v)),
    ("ecp", lambda: ECPLoss, {}, lambda z, l, v: R.ref_ecp(z, l, 0.1, v)),
    ("ls", lambda: LabelSmoothingLoss, {}, lambda z, l, v: R.ref_ls(z, l, 0.1, v)),
    ("svls", lambda: SVLSLoss, {}, lambda z, l, v: R.ref_svls(z, l, 2.0, "none", v)),
    ("svls_s1", lambda: SVLSLoss, {"sigma": 1.0}, lambda z, l, v: R.ref_svls(z, l, 1.0, "none", v)),
    ("mbls", lambda: MbLSLoss, {"margin": 2.0}, lambda z, l, v: R.ref_mbls(z, l, 2.0, 0.1, v)),
    ("mbls_default", lambda: MbLSLoss, {}, lambda z, l, v: R.ref_mbls(z, l, 10.0, 0.1, v)),
    ("nacl", lambda: NACLLoss, {}, lambda z, l, v: R.ref_nacl(z, l, 0.1, "mean", "none", v)),
    ("nacl_min", lambda: NACLLoss, {"kernel": "min"}, lambda z, l, v: R.ref_nacl(z, l, 0.1, "min", "none", v)),
    ("fcl", lambda: FCLLoss, {}, lambda z, l, v: R.ref_fcl(z, l, 3.0, 0.1, v)),
    ("sdc_no_head", lambda: SDCLoss, {}, lambda z, l, v: R.ref_sdc(z, l, None, 0.1, 0.1, v)),
]
MORPH = ["erosion", "dilation", "opening", "closing", "gradient", "internal_boundary",
         "external_boundary"]
# morphological variants: Eq. 2 as the authors' code (default) and the earlier forms (margin_on)
CASES += [(f"nacl_{op}", lambda: NACLLoss, {"morph": op},
           (lambda op: lambda z, l, v: R.ref_margin_eq2(z, l, op, R.box_weights(z.ndim - 2), 0.1, v))(op))
          for op in MORPH]
CASES += [(f"svls_{op}", lambda: SVLSLoss, {"morph": op},
           (lambda op: lambda z, l, v: R.ref_margin_eq2(z, l, op, R.svls_weights(z.ndim - 2, 2.0), 0.1, v))(op))
          for op in MORPH]
CASES += [(f"nacl_{op}_logits", lambda: NACLLoss, {"morph": op, "margin_on": "logits"},
           (lambda op: lambda z, l, v: R.ref_nacl(z, l, 0.1, "mean", op, v))(op)) for op in MORPH]
CASES += [(f"svls_{op}_soft_target", lambda: SVLSLoss, {"morph": op, "margin_on": "soft_target"},
           (lambda op: lambda z, l, v: R.ref_svls(z, l, 2.0, op, v))(op)) for op in MORPH]
# the literal Eq. 2 (ce_target="transformed"): CE against the transformed mask, for ablations
CASES += [(f"nacl_{op}_ce_transformed", lambda: NACLLoss, {"morph": op, "ce_target": "transformed"},
           (lambda op: lambda z, l, v: R.ref_margin_eq2_literal(z, l, op, R.box_weights(z.ndim - 2), 0.1, v))(op))
          for op in ("erosion", "gradient")]
CASES += [(f"svls_{op}_ce_transformed", lambda: SVLSLoss, {"morph": op, "ce_target": "transformed"},
           (lambda op: lambda z, l, v: R.ref_margin_eq2_literal(z, l, op, R.svls_weights(z.ndim - 2, 2.0), 0.1, v))(op))
          for op in ("dilation", "internal_boundary")]
CASES += [("nacl_gradient_alpha05", lambda: NACLLoss, {"morph": "gradient", "alpha": 0.5},
           lambda z, l, v: R.ref_margin_eq2(z, l, "gradient", R.box_weights(z.ndim - 2), 0.5, v)),
          ("nacl_probs", lambda: NACLLoss, {"margin_on": "probs"},
           lambda z, l, v: R.ref_margin_eq2(z, l, "none", R.box_weights(z.ndim - 2), 0.1, v))]


@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name,cls,kw,ref", CASES, ids=[c[0] for c in CASES])
def test_loss_matches_numpy(name, cls, kw, ref, ndim, ignore):
    z, lab, valid, zt, target = make(ndim, seed=ndim + 10 * ignore, ignore=ignore)
    loss = cls()(**kw, ignore_label=IGNORE if ignore else None)
    val = loss(zt, target)
    assert val.ndim == 0
    np.testing.assert_allclose(val.item(), ref(z, lab, valid), rtol=1e-9, atol=1e-12)
    (g,) = torch.autograd.grad(val, zt)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    if ignore:
        assert (g.permute(1, 0, *range(2, g.ndim))[:, torch.from_numpy(~valid)] == 0).all()


@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_sdc_with_head_matches_numpy(ndim, ignore):
    z, lab, valid, zt, target = make(ndim, seed=3 + ignore, ignore=ignore)
    b, c, *sp = z.shape
    sdf_pred = np.tanh(np.random.default_rng(1).normal(size=(b, c - 1, *sp)))
    sp_t = torch.tensor(sdf_pred, requires_grad=True)
    loss = SDCLoss(ignore_label=IGNORE if ignore else None)
    val = loss(zt, target, sp_t)
    np.testing.assert_allclose(val.item(), R.ref_sdc(z, lab, sdf_pred, 0.1, 0.1, valid), rtol=1e-7)
    gz, gs = torch.autograd.grad(val, (zt, sp_t))
    assert torch.isfinite(gz).all() and torch.isfinite(gs).all() and gs.abs().sum() > 0
    # a perfect SDF head zeroes the SDF term
    fg = R.onehot(lab, c)[:, 1:]
    if valid is not None:
        fg = fg * valid[:, None]
    perfect = torch.tensor(R.ref_sdf(fg))
    np.testing.assert_allclose(loss(zt, target, perfect).item(), loss(zt, target).item(), rtol=1e-9)
    with pytest.raises(ValueError, match="sdf_pred"):
        loss(zt, target, sp_t[:, :1])


@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_dscpp_and_ace_match_numpy(ndim, ignore):
    z, lab, valid, zt, target = make(ndim, seed=5, ignore=ignore, scale=1.5)
    il = IGNORE if ignore else None
    p, y = R.softmax(z), R.onehot(lab, z.shape[1])
    d = DSCPlusPlusLoss(ignore_label=il)(zt, target)
    np.testing.assert_allclose(d.item(), R.ref_dscpp(p, y, 2.0, 1e-7, valid), rtol=1e-9)
    d_nobg = DSCPlusPlusLoss(include_background=False, ignore_label=il)(zt, target)
    np.testing.assert_allclose(d_nobg.item(), R.ref_dscpp(p[:, 1:], y[:, 1:], 2.0, 1e-7, valid), rtol=1e-9)
    dce = build_loss("dscpp_ce", ignore_label=il)(zt, target)
    np.testing.assert_allclose(dce.item(), R.ref_dscpp(p, y, 2.0, 1e-7, valid) + R.ref_ce(z, lab, valid),
                               rtol=1e-9)
    a = ACELoss(ce_weight=0.0, ignore_label=il)(zt, target)
    np.testing.assert_allclose(a.item(), R.ref_ace(p, y, valid), rtol=1e-9)
    ace_ce = build_loss("ace_ce", ignore_label=il)(zt, target)
    np.testing.assert_allclose(ace_ce.item(), R.ref_ace(p, y, valid) + R.ref_ce(z, lab, valid), rtol=1e-9)
    (g,) = torch.autograd.grad(a, zt)
    assert torch.isfinite(g).all() and g.abs().sum() > 0  # gradient flows through the bin means


def test_ace_gradient_is_through_bin_means():
    """d mL1-ACE / d p for a single (b, c) with one occupied bin: sign(mean p - mean y) / n."""
    p = torch.full((1, 1, 4, 1), 0.31, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64).reshape(1, 1, 4, 1)
    from nnunet_calibration.losses import hard_binned_l1_ace
    v = hard_binned_l1_ace(p, y, None, 20)
    assert v.item() == pytest.approx(abs(0.31 - 0.25))
    (g,) = torch.autograd.grad(v, p)
    np.testing.assert_allclose(g.numpy().ravel(), [0.25] * 4)


def test_svls_kernel_matches_reference_construction():
    from nnunet_calibration.losses import svls_kernel
    for ndim in (2, 3):
        k = svls_kernel(2.0, ndim).double().numpy()
        w = R.svls_weights(ndim, 2.0)
        for off, val in w.items():
            assert k[tuple(o + 1 for o in off)] == pytest.approx(val, rel=1e-6)
        assert k[(1,) * ndim] == pytest.approx(0.5)  # centre = sum of neighbours, normalised
        assert k.sum() == pytest.approx(1.0)


def test_defaults_are_table1():
    assert FocalLoss().gamma == 3.0
    assert ECPLoss().lam == 0.1
    assert LabelSmoothingLoss().alpha == 0.1
    assert SVLSLoss().sigma == 2.0
    assert (MbLSLoss().margin, MbLSLoss().alpha) == (10.0, 0.1)
    n = NACLLoss()
    assert (n.alpha, n.kernel_size, n.kernel) == (0.1, 3, "mean")
    assert (FCLLoss().gamma, FCLLoss().lam) == (3.0, 0.1)
    s = SDCLoss()
    assert (s.alpha, s.lambda_sdf, s.morph) == (0.1, 0.1, "gradient")
    assert DSCPlusPlusLoss().gamma == 2.0
    assert ACELoss().n_bins == 20


# ------------------------------------------------------------------------------- regions
def make_regions(ndim, seed=0, ignore=False, r=3):
    g = np.random.default_rng(seed)
    b = 2
    sp = SHAPES[ndim][2:]
    z = g.normal(size=(b, r, *sp)) * 3
    y = np.zeros((b, r, *sp))
    for i in range(b):
        for k in range(r):
            lo = [g.integers(0, s - 1) for s in sp]
            y[(i, k) + tuple(slice(l, l + 3) for l in lo)] = 1
    valid = None
    tgt = y
    if ignore:
        valid = g.random((b, *sp)) > 0.3
        tgt = np.concatenate([y, (~valid)[:, None].astype(float)], 1)
    return z, y, valid, torch.tensor(z, requires_grad=True), torch.tensor(tgt)


def sig(z):
    return 1 / (1 + np.exp(-z))


def rmean(vals, valid):
    """mean over voxels and regions of vals (B, R, *sp)"""
    if valid is None:
        return float(vals.mean())
    m = np.broadcast_to(valid[:, None], vals.shape)
    return float(vals[m].mean())


REGION_CASES = [
    ("ce", {}, lambda z, y: -(y * np.log(sig(z)) + (1 - y) * np.log(1 - sig(z)))),
    ("focal", {}, lambda z, y: (lambda pt: -((1 - pt) ** 3) * np.log(pt))(np.where(y > 0, sig(z), 1 - sig(z)))),
    ("ls", {}, lambda z, y: (lambda q: -(q * np.log(sig(z)) + (1 - q) * np.log(1 - sig(z))))(0.9 * y + 0.05)),
    ("mbls", {"margin": 1.0}, lambda z, y: -(y * np.log(sig(z)) + (1 - y) * np.log(1 - sig(z)))
     + 0.1 * np.maximum(np.abs(z) - 1.0, 0) / 2),
    ("ecp", {}, lambda z, y: -(y * np.log(sig(z)) + (1 - y) * np.log(1 - sig(z)))
     - 0.1 * (-(sig(z) * np.log(sig(z)) + (1 - sig(z)) * np.log(1 - sig(z)))) / 2),
]


@pytest.mark.parametrize("ignore", [False, True], ids=["plain", "ignore"])
@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("name,kw,vox", REGION_CASES, ids=[c[0] for c in REGION_CASES])
def test_regions_sigmoid_formulas(name, kw, vox, ndim, ignore):
    z, y, valid, zt, tgt = make_regions(ndim, seed=ndim, ignore=ignore)
    loss = build_loss(name, regions=True, ignore_label=1 if ignore else None, **kw)
    val = loss(zt, tgt)
    np.testing.assert_allclose(val.item(), rmean(vox(z, y), valid), rtol=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_regions_dscpp_ace_sdc(ndim):
    z, y, valid, zt, tgt = make_regions(ndim, seed=7, ignore=True)
    p = sig(z)
    d = build_loss("dscpp", regions=True, ignore_label=1)(zt, tgt)
    np.testing.assert_allclose(d.item(), R.ref_dscpp(p, y, 2.0, 1e-7, valid), rtol=1e-9)
    a = build_loss("ace_ce", regions=True, ignore_label=1, ce_weight=0.0)(zt, tgt)
    np.testing.assert_allclose(a.item(), R.ref_ace(p, y, valid), rtol=1e-9)
    # SDC on regions: binary problem per region, SDF per region map
    b, r, *sp = z.shape
    sdf_pred = np.tanh(np.random.default_rng(2).normal(size=z.shape))
    val = build_loss("sdc", regions=True, ignore_label=1)(zt, tgt, torch.tensor(sdf_pred))
    vt = valid[:, None]
    z2 = np.stack([np.zeros_like(z), z], 2).reshape(b * r, 2, *sp)
    lab2 = y.reshape(b * r, *sp).astype(np.int64) * np.broadcast_to(vt, y.shape).reshape(b * r, *sp)
    v2 = np.broadcast_to(vt, y.shape).reshape(b * r, *sp)
    expect = R.ref_sdc(z2, lab2, None, 0.1, 0.1, v2)
    s = R.ref_sdf(y * vt)
    expect += 0.1 * R.vmean(np.abs(sdf_pred - s).mean(1), valid)
    np.testing.assert_allclose(val.item(), expect, rtol=1e-7)


def test_ce_target_only_for_morphological_variants():
    with pytest.raises(ValueError, match="ce_target must be"):
        NACLLoss(morph="gradient", ce_target="ym")
    with pytest.raises(ValueError, match="literal Eq. 2 of a morphological variant"):
        SVLSLoss(ce_target="transformed")
    with pytest.raises(ValueError, match="literal Eq. 2 of a morphological variant"):
        NACLLoss(morph="gradient", margin_on="logits", ce_target="transformed")


def test_n_bins_name():
    """Bins are ``n_bins`` as in the metrics (the pre-release name ``num_bins`` is an error)."""
    from nnunet_calibration.losses import hard_binned_l1_ace

    z, lab, valid, zt, target = make(2, seed=4)
    assert build_loss("ace_ce", n_bins=7).n_bins == 7
    with pytest.raises(ValueError, match="num_bins"):
        build_loss("ace_ce", num_bins=7)
    p, y = torch.softmax(zt.detach(), 1), torch.nn.functional.one_hot(target[:, 0].long(), 4).movedim(-1, 1)
    a = hard_binned_l1_ace(p, y, None, n_bins=5)
    np.testing.assert_allclose(a.item(), R.ref_ace(p.numpy(), y.numpy(), None, bins=5), rtol=1e-9)
    with pytest.raises(ValueError, match="n_bins"):
        ACELoss(n_bins=0)


def test_each_loss_has_one_name_its_registry_key():
    for name in ("sdc", "nacl_gradient", "ace_dice_ce", "focal"):
        assert build_loss(name).name == name
    dc = build_loss("svls_opening_dc")
    assert dc.name == "svls_opening_dc" and dc.loss.name == "svls_opening"
    assert not any("name" in vars(cls) for cls in (ACELoss, CrossEntropy, SDCLoss, NACLLoss, SVLSLoss))
