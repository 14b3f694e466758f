"""Boundary band and boundary-band ECE against a direct construction: boundary voxels by a loop over
voxels and their face neighbours, distances from every voxel to every boundary voxel in mm."""
import numpy as np
import pytest
from scipy import ndimage

from metrics_testlib import (BRATS_REGIONS, blobs, ref_band, ref_binary_ece, ref_equal_mass_masks, ref_masked_ece,
                             region_case, rk, softmax_case)
from nnunet_calibration.metrics import boundary_band, boundary_ece, default_band_width


@pytest.mark.parametrize("shape,spacing,k", [((6, 7, 5), (2.5, 0.8, 1.3), None), ((6, 7, 5), (2.5, 0.8, 1.3), 1.7),
                                             ((6, 7, 5), (1.0, 1.0, 1.0), 0.0), ((9, 11), (0.7, 1.9), None),
                                             ((9, 11), (0.7, 1.9), 2.45), ((11, 12, 10), (1.5, 0.8, 1.0), None),
                                             ((18, 20), (0.7, 1.0), None)])
@pytest.mark.parametrize("seed", range(3))
def test_band_matches_direct_construction(shape, spacing, k, seed):
    lab = blobs(shape, seed)
    kk = default_band_width(spacing) if k is None else k
    band = boundary_band(lab, spacing, k)
    np.testing.assert_array_equal(band, ref_band(lab, np.array(spacing), kk))
    assert band.any()


def test_band_edge_cases():
    sp = (1.0, 2.0)
    assert not boundary_band(np.zeros((5, 6), int), sp).any()  # no foreground
    assert not boundary_band(np.ones((5, 6), int), sp).any()  # one label everywhere
    lab = np.zeros((5, 6), int)
    lab[:, :2] = 1  # touches three image borders: only the interface at column 1|2 is a boundary
    band = boundary_band(lab, sp, k_mm=0)
    assert band[:, 1:3].all() and band.sum() == 10
    assert default_band_width((3.0, 0.7, 0.7)) == 6.0
    # distance exactly k (2 voxels along the largest spacing) is inside
    assert boundary_band(lab, sp, k_mm=4.0)[:, 1:5].all() and not boundary_band(lab, sp, k_mm=4.0)[:, 5].any()
    with pytest.raises(ValueError, match="k_mm"):
        boundary_band(lab, sp, k_mm=-1)
    with pytest.raises(ValueError, match="spacing"):
        boundary_band(lab, (1.0,))


def test_band_on_bounding_box_equals_full_volume_edt():
    """A small structure in a large volume: the band computed on the bounding box equals the EDT of
    the whole volume (a different construction of the same definition)."""
    lab = np.zeros((40, 50, 60), np.int64)
    lab[10:14, 20:27, 30:33] = 1
    lab[12:13, 22:24, 31:32] = 2
    sp = np.array([3.0, 0.9, 1.1])
    full_edge = np.zeros(lab.shape, bool)
    for ax in range(3):
        d = np.diff(lab, axis=ax) != 0
        lo = [slice(None)] * 3
        hi = [slice(None)] * 3
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        full_edge[tuple(lo)] |= d
        full_edge[tuple(hi)] |= d
    for k in (None, 2.0, 7.5):
        kk = 2 * sp.max() if k is None else k
        ref = ndimage.distance_transform_edt(~full_edge, sampling=sp) <= kk * (1 + 1e-9)
        np.testing.assert_array_equal(boundary_band(lab, sp, k), ref)


def ref_boundary_ece(probs, labels, spacing, k, n_bins, binning="uniform", regions=None):
    def one(conf, correct):
        if binning == "uniform":
            return ref_binary_ece(conf, correct, n_bins)
        return ref_masked_ece(conf, correct, ref_equal_mass_masks(conf, n_bins))
    if regions is None:
        band = ref_band(labels, np.array(spacing), k)
        if not band.any():
            return float("nan")
        return one(probs.max(0)[band], (probs.argmax(0) == labels)[band])
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(labels, reg)
        band = ref_band(y, np.array(spacing), k)
        if band.any():
            p = probs[r][band]
            vals.append(one(np.maximum(p, 1 - p), (p > 0.5) == y[band]))
    return float(np.mean(vals)) if vals else float("nan")


@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
@pytest.mark.parametrize("seed", range(2))
def test_boundary_ece_matches_direct_construction(binning, seed):
    shape, sp = (7, 8, 6), (2.0, 0.9, 1.2)
    labels = blobs(shape, seed, n_labels=4)
    probs, _ = softmax_case(shape, 4, seed)
    kk = default_band_width(sp)
    assert boundary_ece(probs, labels, sp, n_bins=6, binning=binning) == pytest.approx(
        ref_boundary_ece(probs, labels, sp, kk, 6, binning), rel=1e-9)
    assert boundary_ece(probs, labels, sp, k_mm=1.0, n_bins=6, binning=binning) == pytest.approx(
        ref_boundary_ece(probs, labels, sp, 1.0, 6, binning), rel=1e-9)
    rp, _ = region_case(shape, seed)
    assert boundary_ece(rp, labels, sp, n_bins=6, binning=binning, **rk(BRATS_REGIONS)) == pytest.approx(
        ref_boundary_ece(rp, labels, sp, kk, 6, binning, BRATS_REGIONS), rel=1e-9)


def test_boundary_ece_without_boundary_is_nan_and_checks_arguments():
    probs, _ = softmax_case((5, 6), 3, 0)
    assert np.isnan(boundary_ece(probs, np.zeros((5, 6), np.int64), (1.0, 1.0)))
    with pytest.raises(ValueError, match="spacing"):
        boundary_ece(probs, np.zeros((5, 6), np.int64), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="k_mm"):
        boundary_ece(probs, np.zeros((5, 6), np.int64), (1.0, 1.0), k_mm=float("nan"))


def test_band_dilation_equals_edt_threshold_on_random_inputs():
    """The band is formed by dilating the boundary with the discrete ball (1-D maximum filters, shifted
    ORs); on random label maps, spacings (isotropic, anisotropic, 2D and 3D) and widths (0, on a voxel
    distance exactly, the default, wide enough for the EDT path) it equals the EDT threshold of the whole
    volume."""
    from nnunet_calibration.metrics.boundary import _MAX_OFFSETS, _ball_offsets

    rng = np.random.default_rng(5)
    checked = 0
    for trial in range(120):
        nd = int(rng.integers(2, 4))
        shape = tuple(int(s) for s in rng.integers(2, 13, nd))
        sp = rng.choice([0.5, 0.8, 1.0, 1.56, 3.0, 10.0], nd)
        lab = (ndimage.gaussian_filter(rng.random(shape), 1) > 0.5) * rng.integers(1, 3, shape)
        k = float(rng.choice([0.0, sp[0], 2 * sp.max(), 3.3, 5.0, 2 * sp[-1] + sp[0]]))
        edge = np.zeros(shape, bool)
        for ax in range(nd):
            d = np.diff(lab, axis=ax) != 0
            lo, hi = [slice(None)] * nd, [slice(None)] * nd
            lo[ax], hi[ax] = slice(None, -1), slice(1, None)
            edge[tuple(lo)] |= d
            edge[tuple(hi)] |= d
        if not edge.any():
            continue
        ref = ndimage.distance_transform_edt(~edge, sampling=sp) <= k * (1 + 1e-9)
        np.testing.assert_array_equal(boundary_band(lab, sp, k), ref, err_msg=f"{shape} {sp} {k}")
        checked += 1
    assert checked > 80
    lab = np.zeros((30, 30, 30), int)
    lab[10:20, 8:22, 12:15] = 1
    assert len(_ball_offsets(np.ones(3), 12.0)[0]) > _MAX_OFFSETS  # the EDT path
    sp = np.ones(3)
    edge = np.zeros(lab.shape, bool)
    for ax in range(3):
        d = np.diff(lab, axis=ax) != 0
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    np.testing.assert_array_equal(boundary_band(lab, sp, 12.0),
                                  ndimage.distance_transform_edt(~edge, sampling=sp) <= 12.0 * (1 + 1e-9))


def _small_structure(shape=(12, 16, 15)):
    """Labels 1..3 nested in a small part of a larger volume (so the band is found on a bounding box)."""
    lab = np.zeros(shape, np.int64)
    lab[7:10, 2:8, 8:13] = 1
    lab[8:9, 3:7, 9:12] = 2
    lab[8:9, 4:6, 10:11] = 3
    return lab


@pytest.mark.parametrize("regions", [BRATS_REGIONS, [(0, 1), (2, 3)], [(3,), (1, 2), (2, 3)]])
@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
def test_region_boundary_ece_of_a_small_structure(regions, binning):
    """Regions' bands are formed on the foreground's box (or, when a region holds the label 0, on the whole
    image): the same values as the direct construction on the full volume, with and without an ignore label."""
    lab = _small_structure()
    sp = (2.0, 0.9, 1.2)
    rng = np.random.default_rng(5)
    z = np.stack([rng.normal(size=lab.shape) + 4.0 * (2 * np.isin(lab, r) - 1) for r in regions])
    probs = (1 / (1 + np.exp(-z))).astype(np.float32)
    kw = rk(regions)
    assert boundary_ece(probs, lab, sp, n_bins=7, binning=binning, **kw) == pytest.approx(
        ref_boundary_ece(probs, lab, sp, default_band_width(sp), 7, binning, regions), rel=1e-9)
    from nnunet_calibration.metrics import CalibrationAccumulator
    from nnunet_calibration.settings import MetricOptions

    ign = lab.copy()
    ign[9, 13:16, 21:24] = 9  # ignored voxels inside the structure: left out after the bands are formed
    acc = CalibrationAccumulator(MetricOptions(n_bins_ece=7, binning=binning), ignore_index=9, **kw)
    got = acc.update(probs, ign, spacing=sp).compute()["boundary-ECE"]
    keep = ign != 9
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(ign, reg)  # the ignore label belongs to no region
        band = ref_band(y, np.array(sp), default_band_width(sp)) & keep
        if band.any():
            p = probs[r][band]
            conf, correct = np.maximum(p, 1 - p), (p > 0.5) == y[band]
            vals.append(ref_binary_ece(conf, correct, 7) if binning == "uniform"
                        else ref_masked_ece(conf, correct, ref_equal_mass_masks(conf, 7)))
    assert got == pytest.approx(np.mean(vals), rel=1e-9)
