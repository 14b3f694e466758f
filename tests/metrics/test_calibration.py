"""Calibration metrics against independent direct computations on tiny arrays.

The reference implementations below are deliberately naive: explicit per-bin masks with
``lo < v <= hi`` (the papers' loops), Python loops over classes, one-hot arrays.
"""
import pickle

import numpy as np
import pytest

from nnunet_calibration.metrics import (CalibrationAccumulator, bin_edges, bin_index, brier, cece, ece,
                                        marginal_calibration_errors, nll, pece, validate_inputs)
from nnunet_calibration.metrics import calibration as calib
from nnunet_calibration.settings import MetricOptions, SettingsError

BRATS_REGIONS = [(1, 2, 3), (2, 3), (3,)]


# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------
def ref_bins(v, n_bins, zero_in_first=True):
    """List of boolean masks, one per bin (lo, hi]; v == 0 into the first bin if zero_in_first."""
    edges = np.linspace(0, 1, n_bins + 1).astype(v.dtype)
    masks = []
    for k in range(n_bins):
        m = (v > edges[k]) & (v <= edges[k + 1])
        if k == 0 and zero_in_first:
            m |= v == 0
        masks.append(m)
    return masks


def ref_binary_ece(v, y, n_bins):
    v = v.ravel()
    y = y.ravel().astype(np.float64)
    total = 0.0
    for m in ref_bins(v, n_bins):
        if m.sum() == 0:
            continue
        total += m.sum() / v.size * abs(v[m].astype(np.float64).mean() - y[m].mean())
    return total


def rk(region_labels):
    """Keyword arguments of the public metrics for softmax (``None``) or the given region label tuples."""
    return {} if region_labels is None else {"regions": True, "region_labels": region_labels}


def ref_ece(probs, labels, n_bins, regions=None):
    if regions is None:
        fg = labels != 0
        conf = probs.max(0)[fg]
        acc = probs.argmax(0)[fg] == labels[fg]
        return ref_binary_ece(conf, acc, n_bins)
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(labels, reg)
        if not y.any():
            continue
        p = probs[r][y]
        vals.append(ref_binary_ece(np.maximum(p, 1 - p), p > 0.5, n_bins))
    return float(np.mean(vals))


def ref_cece(probs, labels, n_bins, thr, regions=None):
    vals = []
    chans = range(probs.shape[0]) if regions is not None else range(1, probs.shape[0])
    for c in chans:
        y = np.isin(labels, regions[c]) if regions is not None else labels == c
        keep = probs[c] > thr
        if keep.sum() == 0:
            continue
        vals.append(ref_binary_ece(probs[c][keep], y[keep], n_bins))
    return float(np.mean(vals)) if vals else float("nan")


def ref_pece(probs, labels, n_bins, fp_weight, regions=None):
    """Algorithm 1 of the SDC paper, line by line."""
    p = (probs.max(0) if regions is not None else 1 - probs[0]).ravel()
    y = (labels != 0).ravel().astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1).astype(p.dtype)
    total = p.size
    out = 0.0
    for i in range(1, n_bins + 1):
        gamma = (edges[i - 1] < p) & (p <= edges[i])
        eta = gamma.sum()
        if eta > 0:
            p_hat = p[gamma].astype(np.float64).mean()
            a_hat = y[gamma].mean()
            fp = gamma & (y == 0)
            p_fp = p[fp].astype(np.float64).mean() if fp.sum() > 0 else 0.0
            out += eta / total * abs((p_hat - a_hat) + fp_weight * p_fp)
    return out


def ref_marginal(probs, labels, n_bins, include_background=False, regions=None):
    if regions is not None:
        chans = range(probs.shape[0])
    else:
        chans = range(0 if include_background else 1, probs.shape[0])
    aces, eces, mces = [], [], []
    for c in chans:
        y = (np.isin(labels, regions[c]) if regions is not None else labels == c).ravel().astype(np.float64)
        p = probs[c].ravel()
        gaps, weights = [], []
        for m in ref_bins(p, n_bins):
            if m.sum() == 0:
                continue
            gaps.append(abs(y[m].mean() - p[m].astype(np.float64).mean()))
            weights.append(m.sum() / p.size)
        aces.append(np.mean(gaps))
        eces.append(np.dot(gaps, weights))
        mces.append(np.max(gaps))
    return {"mL1-ACE": np.mean(aces), "mL1-ECE": np.mean(eces), "mL1-MCE": np.mean(mces)}


def ref_nll(probs, labels, eps=1e-7, regions=None):
    if regions is None:
        onehot = np.stack([labels == c for c in range(probs.shape[0])])
        return float(np.mean(-np.log(np.maximum((probs * onehot).sum(0).astype(np.float64), eps))))
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(labels, reg)
        p = probs[r].astype(np.float64)
        vals.append(-(y * np.log(np.maximum(p, eps)) + (1 - y) * np.log(np.maximum(1 - p, eps))))
    return float(np.mean(vals))


def ref_brier(probs, labels, regions=None):
    if regions is None:
        onehot = np.stack([labels == c for c in range(probs.shape[0])]).astype(np.float64)
    else:
        onehot = np.stack([np.isin(labels, reg) for reg in regions]).astype(np.float64)
    return float(np.mean(np.mean((probs.astype(np.float64) - onehot) ** 2, axis=0)))


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def softmax_case(shape, n_classes, seed, temperature=2.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, shape)
    logits = rng.normal(size=(n_classes, *shape)) * temperature
    logits += 2.5 * np.stack([labels == c for c in range(n_classes)])  # informative but imperfect
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    return p.astype(dtype), labels


def region_case(shape, seed, dtype=np.float32, sharpness=3.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, shape)
    if sharpness > 5:  # mostly background, like real outputs
        labels[rng.random(shape) < 0.8] = 0
    chans = []
    for reg in BRATS_REGIONS:
        y = np.isin(labels, reg)
        chans.append(1 / (1 + np.exp(-(rng.normal(size=shape) * 2 + sharpness * (2 * y - 1)))))
    return np.stack(chans).astype(dtype), labels


def confident_case(shape, n_classes, seed):
    """Realistic segmentation output: most voxels background with p_background == 1 exactly or
    foreground probabilities far below 0.1 (exercises the first-bin fast path, and pECE's p = 0)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    labels[tuple(slice(s // 3, s // 3 + max(s // 3, 1)) for s in shape)] = 1
    labels[rng.random(shape) < 0.05] = rng.integers(1, n_classes)
    logits = rng.normal(size=(n_classes, *shape)) * 2
    logits += 12 * np.stack([labels == c for c in range(n_classes)])
    p = np.exp(logits - logits.max(0)).astype(np.float32)
    p /= p.sum(0)
    p[:, rng.random(shape) < 0.3] = np.eye(n_classes, dtype=np.float32)[0][:, None]  # exact 1 / 0
    return p, labels


CASES = {
    "confident3d": lambda: confident_case((8, 9, 10), 4, 0),
    "confident2d": lambda: confident_case((30, 31), 3, 1),
    "softmax3d": lambda: softmax_case((6, 7, 8), 4, 0),
    "softmax2d": lambda: softmax_case((17, 13), 3, 1),
    "softmax3d_f64": lambda: softmax_case((5, 6, 7), 3, 2, dtype=np.float64),
}


# ----------------------------------------------------------------------------------------------
# bins
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n_bins", [1, 7, 10, 15, 20, 100])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bin_index_matches_searchsorted_including_edges(n_bins, dtype):
    edges = bin_edges(n_bins, dtype)
    assert edges[0] == 0 and edges[-1] == 1 and edges.dtype == dtype
    rng = np.random.default_rng(n_bins)
    v = np.concatenate([edges, np.nextafter(edges, dtype(2)), np.nextafter(edges, dtype(-1)),
                        rng.random(5000).astype(dtype)])
    v = np.clip(v, 0, 1).astype(dtype)
    idx = bin_index(v, edges)
    # independent: bin k (0-based) holds e_k < v <= e_{k+1}; v == 0 -> -1
    for vi, ii in zip(v, idx):
        if vi == 0:
            assert ii == -1
        else:
            assert edges[ii] < vi <= edges[ii + 1]


@pytest.mark.parametrize("n_fine,n_coarse", [(20, 10), (20, 5), (20, 4), (100, 10), (12, 3), (20, 7)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_folded_bin_stats_equal_direct_binning(n_fine, n_coarse, dtype):
    """The chunk cache folds e.g. the 20 ACE bins into the 10 CECE bins: exact when the coarse edges
    are every m-th fine edge (checked), otherwise refused (None)."""
    from nnunet_calibration.metrics._binning import bin_stats, fold_bin_stats

    fine, coarse = bin_edges(n_fine, dtype), bin_edges(n_coarse, dtype)
    rng = np.random.default_rng(n_fine * n_coarse)
    v = np.concatenate([fine, coarse, np.nextafter(coarse, dtype(2)), rng.random(3000).astype(dtype)])
    v = np.clip(v, 0, 1).astype(dtype)
    y = rng.random(v.size) < 0.4
    folded = fold_bin_stats(*bin_stats(v, y, fine), fine, coarse)
    if n_fine % n_coarse:
        assert folded is None
        return
    if n_fine == 2 * n_coarse:  # linspace's k * step vs 2k * (step / 2): the same double, so they nest
        assert folded is not None
    if folded is None:  # edges that do not nest after rounding (e.g. 100 -> 10 in float64) are refused
        assert not np.array_equal(fine[::n_fine // n_coarse], coarse)
        return
    count, sums = bin_stats(v, y, coarse)
    np.testing.assert_array_equal(folded[0], count)
    np.testing.assert_allclose(folded[1], sums, rtol=1e-12)


def test_confident_case_uses_fast_path_and_has_exact_zeros():
    probs, labels = CASES["confident3d"]()
    assert ((1 - probs[0]) == 0).mean() > 0.25
    for c in range(1, 4):
        assert (probs[c] > 0.1).mean() < 0.5


def test_edge_values_land_in_lower_bin_zero_first_one_last():
    # two-class softmax; class-1 probabilities exactly on the 10-bin edges
    e = np.linspace(0, 1, 11).astype(np.float32)
    p1 = e.copy()
    probs = np.stack([1 - p1, p1])
    labels = np.zeros(11, np.int64)
    stats = calib._marginal_update(probs, labels, n_bins=10)
    n = stats.bin_count[0]
    # 0 -> bin 1, e_k -> bin k (1-based) for k >= 1: bin 1 gets {0, 0.1}, bins 2..10 one each
    assert n.tolist() == [2, 1, 1, 1, 1, 1, 1, 1, 1, 1]
    np.testing.assert_allclose(stats.confidence_sum[0], [0 + e[1]] + list(e[2:]), rtol=1e-7)
    # pECE: p = 1 - p_background; with dyadic edges k/8, 1 - (1 - e) == e exactly in float32.
    # p == 0 lies in no bin, but total counts it
    e8 = np.linspace(0, 1, 9).astype(np.float32)
    probs8 = np.stack([1 - e8, e8])
    assert np.array_equal(1 - probs8[0], e8)
    ps = calib._pece_update(probs8, np.zeros(9, np.int64), n_bins=8)
    assert ps.bin_count[0].tolist() == [1] * 8
    assert ps.total[0] == 9
    np.testing.assert_allclose(ps.confidence_sum[0], e8[1:])


def test_pece_zero_in_no_bin_but_in_total_by_hand():
    # 4 voxels: p = 0 (bg), 0 (bg), 0.5 (fg), 0.5 (bg); 2 bins.
    p_fg = np.array([0.0, 0.0, 0.5, 0.5], np.float32)
    labels = np.array([0, 0, 1, 0])
    probs = np.stack([1 - p_fg, p_fg])
    # only bin (0, 0.5] holds voxels: n=2, mean p=0.5, acc=0.5, FP mean p=0.5 -> |0 + 2*0.5| * 2/4
    assert pece(probs, labels, n_bins=2, fp_weight=2.0) == pytest.approx(0.5)
    assert pece(probs, labels, n_bins=2, fp_weight=0.0) == pytest.approx(0.0)


# ----------------------------------------------------------------------------------------------
# each metric vs reference
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_softmax_metrics_match_reference(case):
    probs, labels = CASES[case]()
    assert ece(probs, labels) == pytest.approx(ref_ece(probs, labels, 15), rel=1e-9, abs=1e-12)
    assert ece(probs, labels, n_bins=7) == pytest.approx(ref_ece(probs, labels, 7), rel=1e-9, abs=1e-12)
    assert cece(probs, labels) == pytest.approx(ref_cece(probs, labels, 10, 1e-3), rel=1e-9)
    assert cece(probs, labels, threshold=0.3) == pytest.approx(ref_cece(probs, labels, 10, 0.3), rel=1e-9)
    assert pece(probs, labels) == pytest.approx(ref_pece(probs, labels, 10, 2.0), rel=1e-9)
    assert pece(probs, labels, n_bins=4, fp_weight=0.5) == pytest.approx(ref_pece(probs, labels, 4, 0.5), rel=1e-9)
    m = marginal_calibration_errors(probs, labels)
    r = ref_marginal(probs, labels, 20)
    for k in r:
        assert m[k] == pytest.approx(r[k], rel=1e-9)
    m = marginal_calibration_errors(probs, labels, n_bins=5, include_background=True)
    r = ref_marginal(probs, labels, 5, include_background=True)
    for k in r:
        assert m[k] == pytest.approx(r[k], rel=1e-9)
    assert nll(probs, labels) == pytest.approx(ref_nll(probs, labels), rel=1e-6)
    assert brier(probs, labels) == pytest.approx(ref_brier(probs, labels), rel=1e-9)


@pytest.mark.parametrize("shape", [(6, 7, 5), (15, 11)])
@pytest.mark.parametrize("sharpness", [3.0, 30.0])
def test_region_metrics_match_reference(shape, sharpness):
    probs, labels = region_case(shape, 3, sharpness=sharpness)
    R = BRATS_REGIONS
    assert ece(probs, labels, **rk(R)) == pytest.approx(ref_ece(probs, labels, 15, R), rel=1e-9)
    assert cece(probs, labels, **rk(R)) == pytest.approx(ref_cece(probs, labels, 10, 1e-3, R), rel=1e-9)
    assert pece(probs, labels, **rk(R)) == pytest.approx(ref_pece(probs, labels, 10, 2.0, R), rel=1e-9)
    m = marginal_calibration_errors(probs, labels, **rk(R))
    r = ref_marginal(probs, labels, 20, regions=R)
    for k in r:
        assert m[k] == pytest.approx(r[k], rel=1e-9)
    assert nll(probs, labels, **rk(R)) == pytest.approx(ref_nll(probs, labels, regions=R), rel=1e-6)
    assert brier(probs, labels, **rk(R)) == pytest.approx(ref_brier(probs, labels, regions=R), rel=1e-9)


def test_region_as_two_class_softmax_equivalence():
    # a single region r behaves exactly like the two-class softmax (1 - p_r, p_r)
    rng = np.random.default_rng(5)
    labels = rng.integers(0, 2, (9, 10))
    p = rng.random((9, 10))
    reg = p[None]
    sm = np.stack([1 - p, p])
    for f in (ece, cece, pece, nll, brier):
        assert f(reg, labels, regions=True, region_labels=[(1,)]) == pytest.approx(f(sm, labels), rel=1e-9, abs=1e-12)
    a = marginal_calibration_errors(reg, labels, regions=True, region_labels=[1])
    b = marginal_calibration_errors(sm, labels)
    assert a == pytest.approx(b)


def test_nll_and_brier_by_hand():
    probs = np.array([[0.7, 0.2, 1.0], [0.3, 0.8, 0.0]])  # 3 voxels, 2 classes
    labels = np.array([0, 1, 1])
    # NLL: -(log .7 + log .8 + log 1e-7) / 3
    assert nll(probs, labels) == pytest.approx(-(np.log(0.7) + np.log(0.8) + np.log(1e-7)) / 3)
    # Brier: mean_i (1/2) sum_c (p - onehot)^2 = (2*.09 + 2*.04 + 2*1) / 2 / 3
    assert brier(probs, labels) == pytest.approx((0.18 + 0.08 + 2.0) / 6)


# ----------------------------------------------------------------------------------------------
# properties / conventions
# ----------------------------------------------------------------------------------------------
def perfectly_calibrated(n_per_level=200, levels=(0.05, 0.25, 0.45, 0.65, 0.85, 0.95)):
    """Two-class data where in each group of voxels with p1 = q exactly a fraction q is class 1."""
    p1, lab = [], []
    for q in levels:
        k = int(round(q * n_per_level))
        p1 += [q] * n_per_level
        lab += [1] * k + [0] * (n_per_level - k)
    p1 = np.array(p1)
    return np.stack([1 - p1, p1]), np.array(lab)


def test_perfectly_calibrated_has_zero_marginal_errors_but_positive_pece():
    probs, labels = perfectly_calibrated()
    m = marginal_calibration_errors(probs, labels, n_bins=10)
    assert m["mL1-ACE"] == pytest.approx(0, abs=1e-12)
    assert m["mL1-ECE"] == pytest.approx(0, abs=1e-12)
    assert m["mL1-MCE"] == pytest.approx(0, abs=1e-12)
    assert cece(probs, labels, n_bins=10) == pytest.approx(0, abs=1e-12)
    # pECE is NOT zero: every bin has background voxels with p > 0 -> offset fp_weight * q
    value = pece(probs, labels, n_bins=10, fp_weight=2.0)
    expected = np.mean([2.0 * q for q in (0.05, 0.25, 0.45, 0.65, 0.85, 0.95)])
    assert value == pytest.approx(expected, rel=1e-9)
    assert value > 0.5
    assert pece(probs, labels, n_bins=10, fp_weight=0.0) == pytest.approx(0, abs=1e-12)


def test_sampled_calibrated_model_has_small_ece():
    rng = np.random.default_rng(0)
    n = 200_000
    p1 = rng.random(n)
    y = (rng.random(n) < p1).astype(np.int64)
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    assert marginal_calibration_errors(probs, y)["mL1-ECE"] < 0.01
    assert cece(probs, y) < 0.01
    # a strongly overconfident version of the same model is clearly worse
    sharp = np.clip((p1 - 0.5) * 3 + 0.5, 0, 1)
    bad = np.stack([1 - sharp, sharp]).astype(np.float32)
    assert marginal_calibration_errors(bad, y)["mL1-ECE"] > 0.1


def test_ece_uses_only_foreground_voxels():
    probs, labels = softmax_case((8, 9), 3, 7)
    v = ece(probs, labels)
    # changing predictions on background voxels does not change ECE
    probs2 = probs.copy()
    bg = labels == 0
    probs2[:, bg] = np.array([0.2, 0.5, 0.3])[:, None]
    assert ece(probs2, labels) == pytest.approx(v, rel=1e-12)
    assert np.isnan(ece(probs, np.zeros_like(labels)))


def test_empty_classes():
    probs, labels = softmax_case((6, 6, 6), 4, 9)
    labels[labels == 2] = 0  # class 2 absent from the reference
    # marginal: the empty class still counts (observed frequency 0)
    m = marginal_calibration_errors(probs, labels)
    r = ref_marginal(probs, labels, 20)
    assert m == pytest.approx(r)
    # CECE: class whose probabilities never exceed the threshold is skipped
    probs3 = probs.copy()
    probs3[0] += probs3[3]
    probs3[3] = 0
    assert cece(probs3, labels) == pytest.approx(ref_cece(probs3, labels, 10, 1e-3), rel=1e-9)
    manual = np.mean([ref_binary_ece(probs3[c][probs3[c] > 1e-3], (labels == c)[probs3[c] > 1e-3], 10)
                      for c in (1, 2)])
    assert cece(probs3, labels) == pytest.approx(manual, rel=1e-9)
    # regions: a region absent from the reference is skipped by ECE
    rp, rl = region_case((5, 6, 7), 4)
    rl[rl == 3] = 2  # no enhancing tumour
    assert ece(rp, rl, **rk(BRATS_REGIONS)) == pytest.approx(ref_ece(rp, rl, 15, BRATS_REGIONS), rel=1e-9)


# ----------------------------------------------------------------------------------------------
# accumulator
# ----------------------------------------------------------------------------------------------
def _assert_same(a, b, rel=1e-10):
    assert set(a) == set(b)
    for k in a:
        if np.isnan(a[k]):
            assert np.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-13), k


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_accumulator_single_case_equals_functions(regions):
    probs, labels = softmax_case((6, 7, 8), 4, 11) if regions is None else region_case((6, 7, 8), 11)
    acc = CalibrationAccumulator(**rk(regions)).update(probs, labels)
    direct = {"ECE": ece(probs, labels, **rk(regions)), "CECE": cece(probs, labels, **rk(regions)),
              "pECE": pece(probs, labels, **rk(regions)), "NLL": nll(probs, labels, **rk(regions)),
              "Brier": brier(probs, labels, **rk(regions))}
    direct.update(marginal_calibration_errors(probs, labels, **rk(regions)))
    _assert_same(acc.compute(), direct)


@pytest.mark.parametrize("case", ["confident3d", "confident2d", "regions_sharp"])
@pytest.mark.parametrize("opts", [{}, {"cece_threshold": 0.3}, {"n_bins_ace": 4, "n_bins_cece": 7},
                                  {"include_background": True}])
def test_accumulator_shared_pass_matches_reference_on_confident_cases(case, opts):
    """The accumulator shares per-channel work between metrics (voxels above the smaller of the CECE
    threshold and the first ACE edge gathered once, totals reused); on mostly-background data, where
    that path is taken, every metric must still equal the naive reference."""
    if case == "regions_sharp":
        probs, labels = region_case((9, 10, 11), 7, sharpness=30.0)
        R = BRATS_REGIONS
    else:
        probs, labels = CASES[case]()
        R = None
    m = CalibrationAccumulator(MetricOptions(**opts), **rk(R)).update(probs, labels).compute()
    thr = opts.get("cece_threshold", 1e-3)
    assert m["ECE"] == pytest.approx(ref_ece(probs, labels, 15, R), rel=1e-9, abs=1e-12)
    assert m["CECE"] == pytest.approx(ref_cece(probs, labels, opts.get("n_bins_cece", 10), thr, R), rel=1e-9)
    assert m["pECE"] == pytest.approx(ref_pece(probs, labels, 10, 2.0, R), rel=1e-9)
    r = ref_marginal(probs, labels, opts.get("n_bins_ace", 20), include_background=opts.get("include_background", False),
                     regions=R)
    for k in r:
        assert m[k] == pytest.approx(r[k], rel=1e-9)
    assert m["NLL"] == pytest.approx(ref_nll(probs, labels, regions=R), rel=1e-6)
    assert m["Brier"] == pytest.approx(ref_brier(probs, labels, regions=R), rel=1e-9)


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_merge_of_two_halves_equals_whole(regions):
    probs, labels = softmax_case((8, 7, 6), 4, 12) if regions is None else region_case((8, 7, 6), 12)
    opts = MetricOptions(n_bins_ece=9, n_bins_cece=6, n_bins_pece=5, n_bins_ace=11, fp_weight=1.5)
    whole = CalibrationAccumulator(opts, **rk(regions)).update(probs, labels)
    a = CalibrationAccumulator(opts, **rk(regions)).update(probs[:, :3], labels[:3])
    b = CalibrationAccumulator(opts, **rk(regions)).update(probs[:, 3:], labels[3:])
    # through pickle, as between processes
    merged = pickle.loads(pickle.dumps(a)) + pickle.loads(pickle.dumps(b))
    assert merged.n_cases == 2
    _assert_same(merged.compute(), whole.compute())
    for k in ("ece", "cece", "pece", "marginal"):
        np.testing.assert_array_equal(merged.stats[k].count, whole.stats[k].count)
    # pooled over two *different* cases = metrics of the concatenated voxels
    p2, l2 = softmax_case((8, 7, 6), 4, 13) if regions is None else region_case((8, 7, 6), 13)
    pooled = CalibrationAccumulator(opts, **rk(regions)).update(probs, labels) + CalibrationAccumulator(
        opts, **rk(regions)).update(p2, l2)
    cat_p, cat_l = np.concatenate([probs, p2], 1), np.concatenate([labels, l2], 0)
    _assert_same(pooled.compute(), CalibrationAccumulator(opts, **rk(regions)).update(cat_p, cat_l).compute())
    # empty accumulator is neutral
    _assert_same((CalibrationAccumulator(opts, **rk(regions)) + whole).compute(), whole.compute())


def test_merge_rejects_different_options():
    probs, labels = softmax_case((4, 4), 3, 1)
    a = CalibrationAccumulator(MetricOptions(n_bins_ace=20)).update(probs, labels)
    b = CalibrationAccumulator(MetricOptions(n_bins_ace=10)).update(probs, labels)
    with pytest.raises(ValueError, match="different options"):
        a + b


def test_chunking_does_not_change_results(monkeypatch):
    probs, labels = softmax_case((7, 9, 11), 4, 21)
    full = CalibrationAccumulator().update(probs, labels).compute()
    monkeypatch.setattr(calib, "CHUNK_VOXELS", 37)
    _assert_same(CalibrationAccumulator().update(probs, labels).compute(), full, rel=1e-9)


def test_reliability_data_from_accumulator():
    probs, labels = softmax_case((6, 7, 8), 3, 22)
    acc = CalibrationAccumulator(MetricOptions(n_bins_ace=5)).update(probs, labels)
    edges, n, conf, freq = acc.reliability()
    assert n.shape == (2, 5)
    for k, c in enumerate((1, 2)):
        for b, m in enumerate(ref_bins(probs[c], 5)):
            assert n[k, b] == m.sum()
            if m.sum():
                assert conf[k, b] == pytest.approx(probs[c][m].astype(np.float64).mean())
                assert freq[k, b] == pytest.approx((labels[m] == c).mean())


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def test_validation_errors():
    probs, labels = softmax_case((4, 5), 3, 0)
    bad = probs.copy(); bad[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        ece(bad, labels)
    bad = probs.copy(); bad[1, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        ece(bad, labels)
    bad = probs.copy(); bad[1, 0, 0] = min(bad[1, 0, 0] + 0.01, 1.0); bad[0, 0, 0] = max(bad[0, 0, 0] - 0.0, 0.0)
    with pytest.raises(ValueError, match="sum to 1"):
        validate_inputs(bad, labels)
    with pytest.raises(ValueError, match="label values"):
        ece(probs, labels + 1)
    with pytest.raises(ValueError, match="shape"):
        ece(probs, labels[:, :3])
    with pytest.raises(ValueError, match="n_bins"):
        ece(probs, labels, n_bins=0)
    with pytest.raises(ValueError, match="regions"):
        ece(probs, labels, regions=True, region_labels=[(1,)])
    # region input need not sum to 1
    rp, rl = region_case((4, 5), 0)
    validate_inputs(rp, rl, **rk(BRATS_REGIONS))


# ----------------------------------------------------------------------------------------------
# convention="sdc-code": the SDC authors' evaluation code, transcribed here from its formulas
# ----------------------------------------------------------------------------------------------
def sdc_binary_ece(conf, y, n_bins):
    """sum over bins (lo, hi] of n_b / N * |mean conf_b - mean y_b|, N = all values (0 in no bin)."""
    conf = conf.reshape(-1).astype(np.float64)
    y = y.reshape(-1).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.sum() / conf.size * abs(conf[m].mean() - y[m].mean())
    return total


def sdc_code_metrics(probs, labels, thr=1e-3, n_bins=10):
    fg_p = 1.0 - probs[0]
    ece_ = sdc_binary_ece(fg_p, labels != 0, n_bins)
    per_class = []
    for c in range(probs.shape[0]):  # background included
        keep = probs[c] > thr
        if keep.any():
            per_class.append(sdc_binary_ece(probs[c][keep], (labels == c)[keep], n_bins))
    return ece_, (float(np.mean(per_class)) if per_class else 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_sdc_code_convention_matches_transcription(seed):
    probs, labels = softmax_case((7, 9, 11), 4, seed)
    probs[:, 0, 0, :4] = np.array([1, 0, 0, 0], np.float32)[:, None]  # p_fg = 0: in no bin, counted in N
    acc = CalibrationAccumulator(MetricOptions(convention="sdc-code", n_bins_ece=10)).update(probs, labels).compute()
    e, c = sdc_code_metrics(probs, labels)
    assert acc["ECE"] == pytest.approx(e, rel=1e-9)
    assert acc["CECE"] == pytest.approx(c, rel=1e-9)
    default = CalibrationAccumulator().update(probs, labels).compute()
    assert acc["pECE"] == default["pECE"] and acc["NLL"] == default["NLL"]  # the rest is unchanged
    assert acc["ECE"] != pytest.approx(default["ECE"])
    # pooled over two cases = the transcription on the concatenated voxels
    p2, l2 = softmax_case((5, 9, 11), 4, seed + 10)
    both = (CalibrationAccumulator(MetricOptions(convention="sdc-code", n_bins_ece=10)).update(probs, labels)
            + CalibrationAccumulator(MetricOptions(convention="sdc-code", n_bins_ece=10)).update(p2, l2)).compute()
    e, c = sdc_code_metrics(np.concatenate([probs.reshape(4, -1), p2.reshape(4, -1)], 1),
                            np.concatenate([labels.reshape(-1), l2.reshape(-1)]))
    assert both["ECE"] == pytest.approx(e, rel=1e-9) and both["CECE"] == pytest.approx(c, rel=1e-9)
    with pytest.raises(ValueError, match="convention"):
        CalibrationAccumulator(MetricOptions(convention="paper"))


def test_ignore_index_removes_voxels():
    probs, labels = softmax_case((6, 7, 8), 3, 4)
    labels = labels.copy()
    labels[np.random.default_rng(1).random(labels.shape) < 0.3] = 7
    keep = labels != 7
    acc = CalibrationAccumulator(ignore_index=7).update(probs, labels, validate_args=True).compute()
    direct = CalibrationAccumulator().update(probs[:, keep], labels[keep]).compute()
    _assert_same(acc, direct, rel=1e-12)
