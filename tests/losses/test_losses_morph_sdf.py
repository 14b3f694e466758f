"""Morphological operators vs scipy.ndimage; exact EDT and reference SDF vs scipy's EDT."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from nnunet_calibration.losses import (euclidean_distance_transform, morph, reference_sdf,
                                       squared_edt_to_seeds)


def rand_masks(ndim, seed, p=0.55, shape=None):
    g = np.random.default_rng(seed)
    shape = shape or ((2, 3, 9, 11) if ndim == 2 else (2, 2, 6, 7, 8))
    m = g.random(shape) < p
    # smooth a bit so structures are blobby, keep some noise
    for b in range(shape[0]):
        for c in range(shape[1]):
            m[b, c] = ndi.binary_opening(m[b, c]) | (g.random(shape[2:]) < 0.05)
    m[0, 0] = False                      # empty channel
    m[1, 0] = True                       # full channel
    return m


@pytest.mark.parametrize("ndim", [2, 3])
def test_morphology_matches_scipy(ndim):
    m = rand_masks(ndim, ndim)
    x = torch.tensor(m, dtype=torch.float32)
    st = np.ones((3,) * ndim, bool)
    size = (3,) * ndim
    for b in range(m.shape[0]):
        for c in range(m.shape[1]):
            a = m[b, c]
            er = ndi.binary_erosion(a, st, border_value=1)
            di = ndi.binary_dilation(a, st, border_value=0)
            expect = {
                "erosion": er,
                "dilation": di,
                "opening": ndi.binary_dilation(er, st, border_value=0),
                "closing": ndi.binary_erosion(di, st, border_value=1),
                "gradient": di & ~er,
                "internal_boundary": a & ~er,
                "external_boundary": di & ~a,
            }
            # grey-scale operators with mode='nearest' (replicate) are the same on binary images
            assert np.array_equal(expect["opening"], ndi.grey_opening(a.astype(np.uint8), size=size, mode="nearest") > 0)
            assert np.array_equal(expect["closing"], ndi.grey_closing(a.astype(np.uint8), size=size, mode="nearest") > 0)
            assert np.array_equal(expect["gradient"],
                                  ndi.morphological_gradient(a.astype(np.uint8), size=size, mode="nearest") > 0)
            for op, e in expect.items():
                got = morph(x, op, 3)[b, c].numpy()
                assert np.array_equal(got > 0.5, e), (op, b, c)
                assert set(np.unique(got)) <= {0.0, 1.0}


@pytest.mark.parametrize("ndim", [2, 3])
def test_morphology_with_ignored_voxels_is_neutral(ndim):
    """Ignored voxels are excluded from windows: like scipy with them set to the neutral value."""
    m = rand_masks(ndim, 10 + ndim)
    g = np.random.default_rng(0)
    valid = g.random((m.shape[0],) + m.shape[2:]) > 0.3
    x = torch.tensor(m, dtype=torch.float32)
    v = torch.tensor(valid)
    st = np.ones((3,) * ndim, bool)
    for b in range(m.shape[0]):
        for c in range(m.shape[1]):
            a = m[b, c]
            er = ndi.binary_erosion(np.where(valid[b], a, True), st, border_value=1)
            di = ndi.binary_dilation(np.where(valid[b], a, False), st, border_value=0)
            op_ = ndi.binary_dilation(np.where(valid[b], er, False), st, border_value=0)
            cl = ndi.binary_erosion(np.where(valid[b], di, True), st, border_value=1)
            vb = valid[b]
            assert np.array_equal((morph(x, "erosion", 3, v)[b, c].numpy() > 0.5)[vb], er[vb])
            assert np.array_equal((morph(x, "dilation", 3, v)[b, c].numpy() > 0.5)[vb], di[vb])
            assert np.array_equal((morph(x, "opening", 3, v)[b, c].numpy() > 0.5)[vb], op_[vb])
            assert np.array_equal((morph(x, "closing", 3, v)[b, c].numpy() > 0.5)[vb], cl[vb])


def test_morphology_larger_element_and_bad_op():
    m = rand_masks(2, 3)
    x = torch.tensor(m, dtype=torch.float32)
    for b in range(2):
        for c in range(3):
            e = ndi.binary_erosion(m[b, c], np.ones((5, 5), bool), border_value=1)
            assert np.array_equal(morph(x, "erosion", 5)[b, c].numpy() > 0.5, e)
    with pytest.raises(ValueError, match="unknown morphological operator"):
        morph(x, "tophat")
    with pytest.raises(ValueError, match="odd"):
        morph(x, "erosion", 4)


@pytest.mark.parametrize("shape", [(2, 3, 17, 13), (1, 2, 7, 9, 6), (1, 1, 1, 12), (1, 1, 30, 2)])
def test_edt_matches_scipy(shape):
    g = np.random.default_rng(sum(shape))
    m = g.random(shape) > 0.15
    m.reshape(-1)[0] = False  # at least one zero voxel overall
    for b in range(shape[0]):
        for c in range(shape[1]):
            if m[b, c].all():
                m[b, c].reshape(-1)[g.integers(m[b, c].size)] = False
    got = euclidean_distance_transform(torch.tensor(m), chunk_bytes=4096).numpy()
    for b in range(shape[0]):
        for c in range(shape[1]):
            np.testing.assert_allclose(got[b, c], ndi.distance_transform_edt(m[b, c]), rtol=1e-6, atol=1e-6)
    # squared distances are exact integers
    sq = squared_edt_to_seeds(torch.tensor(~m)).numpy()
    assert np.array_equal(sq, np.round(sq))


def test_edt_sparse_seeds_far_away():
    m = np.ones((1, 1, 40, 33), bool)
    m[0, 0, 3, 30] = False
    got = euclidean_distance_transform(torch.tensor(m)).numpy()[0, 0]
    np.testing.assert_allclose(got, ndi.distance_transform_edt(m[0, 0]), rtol=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_reference_sdf_matches_scipy(ndim):
    m = rand_masks(ndim, 20 + ndim, p=0.4)
    got = reference_sdf(torch.tensor(m, dtype=torch.float32)).numpy()
    for b in range(m.shape[0]):
        for c in range(m.shape[1]):
            a = m[b, c]
            if not a.any():
                expect = np.ones(a.shape)
            elif a.all():
                expect = -np.ones(a.shape)
            else:
                bd = a & ~ndi.binary_erosion(a, np.ones((3,) * ndim, bool), border_value=1)
                d = ndi.distance_transform_edt(~bd)
                s = np.where(a, -d, d)
                expect = s / np.abs(s).max()
                # outside the object the distance to the boundary is the distance to the object
                out = ndi.distance_transform_edt(~a)
                np.testing.assert_allclose(d[~a], out[~a], rtol=1e-12)
            np.testing.assert_allclose(got[b, c], expect, rtol=1e-6, atol=1e-6)
            assert got[b, c].min() >= -1 - 1e-6 and got[b, c].max() <= 1 + 1e-6


def test_reference_sdf_signs_and_conventions():
    m = np.zeros((1, 3, 9, 9), np.float32)
    m[0, 0, 2:7, 2:7] = 1   # a 5x5 square
    m[0, 2] = 1             # fills the patch
    s = reference_sdf(torch.tensor(m)).numpy()[0]
    sq = s[0]
    assert sq[4, 4] < 0 and sq[0, 0] > 0                        # negative inside, positive outside
    assert np.all(sq[2, 2:7] == 0) and np.all(sq[2:7, 6] == 0)  # zero on the (internal) boundary
    assert np.abs(sq).max() == pytest.approx(1.0)
    # inside: centre is 2 voxels from the ring; outside: corner (0,0) is sqrt(8) from (2,2)
    assert sq[4, 4] == pytest.approx(-2 / np.sqrt(8)) and sq[0, 0] == pytest.approx(1.0)
    assert np.all(s[1] == 1.0)    # absent class: +1
    assert np.all(s[2] == -1.0)   # class filling the patch: -1


# ------------------------------------------------------------------ 3D in millimetres (issue 9)
ANISO = [(5.0, 1.5625, 1.5625), (1.0, 0.7, 3.4), (2.5, 2.5, 0.8)]


@pytest.mark.parametrize("spacing", ANISO + [(1.0, 1.0, 1.0)])
def test_edt_with_spacing_matches_scipy_sampling(spacing):
    g = np.random.default_rng(int(sum(spacing) * 10))
    m = g.random((2, 2, 7, 12, 10)) > 0.1
    m[0, 1] = True
    m[0, 1, 3, 0, 9] = False  # a single far seed
    got = euclidean_distance_transform(torch.tensor(m), chunk_bytes=4096, spacing=spacing).numpy()
    for b in range(2):
        for c in range(2):
            ref = ndi.distance_transform_edt(m[b, c], sampling=spacing)
            np.testing.assert_allclose(got[b, c], ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", ANISO)
def test_reference_sdf_in_mm_matches_scipy(spacing):
    """Random anisotropic masks: the torch SDF (mm, in-plane boundary element where nnU-Net's rule
    says anisotropic) equals the same definition written with scipy's EDT(sampling=spacing)."""
    from nnunet_calibration.losses import window_axes

    m = rand_masks(3, int(spacing[2] * 100), p=0.45, shape=(2, 3, 6, 9, 8))
    axes = window_axes(3, spacing)
    st = np.zeros((3, 3, 3), bool)
    sl = [slice(None) if (axes is None or a in axes) else slice(1, 2) for a in range(3)]
    st[tuple(sl)] = True
    got = reference_sdf(torch.tensor(m, dtype=torch.float32), spacing=spacing, axes=axes).numpy()
    for b in range(m.shape[0]):
        for c in range(m.shape[1]):
            a = m[b, c]
            if not a.any():
                expect = np.ones(a.shape)
            elif a.all():
                expect = -np.ones(a.shape)
            else:
                bd = a & ~ndi.binary_erosion(a, st, border_value=1)
                d = ndi.distance_transform_edt(~bd, sampling=spacing)
                s = np.where(a, -d, d)
                expect = s / np.abs(s).max()
            np.testing.assert_allclose(got[b, c], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spacing", [(5.0, 1.56, 1.56), (3.0, 1.0, 1.0), (3.01, 1.0, 1.0), (1.0, 1.0, 4.0),
                                     (4.0, 4.0, 1.0), (1.0, 1.0, 1.0)])
def test_window_axes_follow_nnunets_anisotropy_rule(spacing):
    from nnunetv2.preprocessing.resampling.default_resampling import get_do_separate_z, get_lowres_axis

    from nnunet_calibration.losses import window_axes

    axes = window_axes(3, spacing)
    low = get_lowres_axis(spacing)
    if get_do_separate_z(spacing) and len(low) == 1:
        assert axes == tuple(a for a in range(3) if a != low[0])
    else:
        assert axes is None
    assert window_axes(2, spacing[:2]) is None  # 2D unchanged


@pytest.mark.parametrize("op", ["erosion", "dilation", "opening", "closing", "gradient"])
def test_inplane_morphology_matches_scipy(op):
    m = rand_masks(3, 31)
    st = np.ones((1, 3, 3), bool)  # axes (1, 2): in-plane, through-plane axis 0
    got = morph(torch.tensor(m, dtype=torch.float32), op, 3, axes=(1, 2)).numpy() > 0.5
    for b in range(m.shape[0]):
        for c in range(m.shape[1]):
            a = m[b, c]
            er = ndi.binary_erosion(a, st, border_value=1)
            di = ndi.binary_dilation(a, st, border_value=0)
            e = {"erosion": er, "dilation": di, "opening": ndi.binary_dilation(er, st, border_value=0),
                 "closing": ndi.binary_erosion(di, st, border_value=1), "gradient": di & ~er}[op]
            assert np.array_equal(got[b, c], e), (op, b, c)


def test_losses_use_inplane_windows_and_mm_sdf_when_anisotropic():
    """With an anisotropic 3D spacing each slice is processed like a 2D image (NACL, SVLS, SDC local
    terms); an isotropic spacing gives the 3x3x3 result; 2D ignores the spacing."""
    from nnunet_calibration.losses import build_loss

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 4, 8, 9, generator=g, dtype=torch.float64)
    coarse = torch.randint(0, 3, (1, 1, 4, 4, 5), generator=g).float()
    t = torch.nn.functional.interpolate(coarse, size=(4, 8, 9), mode="nearest")  # blocky labels
    for name in ("nacl", "nacl_gradient", "svls", "svls_opening", "sdc"):
        aniso = build_loss(name, spacing=(5.0, 1.5, 1.5))(x, t)
        iso = build_loss(name, spacing=(1.0, 1.0, 1.0))(x, t)
        none = build_loss(name)(x, t)
        torch.testing.assert_close(iso, none)
        assert not torch.allclose(aniso, none), name
        # slice by slice in 2D, averaged over the equally-sized slices = the anisotropic 3D value
        per_slice = torch.stack([build_loss(name)(x[:, :, d], t[:, :, d]) for d in range(4)]).mean()
        torch.testing.assert_close(aniso, per_slice)
    # SDC's SDF term: reference SDF in millimetres with in-plane boundary
    sdc = build_loss("sdc", spacing=(5.0, 1.5, 1.5), lambda_sdf=0.3)
    sdf = torch.tanh(torch.randn(1, 2, 4, 8, 9, generator=g, dtype=torch.float64))
    fg = torch.nn.functional.one_hot(t[:, 0].long(), 3).movedim(-1, 1)[:, 1:].double()
    ref = reference_sdf(fg, spacing=(5.0, 1.5, 1.5), axes=(1, 2)).double()
    torch.testing.assert_close(sdc.sdf_term(x, t, sdf), 0.3 * (sdf - ref).abs().mean())
    x2, t2 = x[:, :, 0], t[:, :, 0]
    torch.testing.assert_close(build_loss("sdc", spacing=(3.0, 1.0))(x2, t2), build_loss("sdc")(x2, t2))
