"""Calibration metrics against independent direct computations on tiny arrays (references in
``metrics_testlib``)."""
import re

import numpy as np
import pytest

from metrics_testlib import (BRATS_REGIONS, CASES, ref_binary_ece, ref_brier, ref_cece,
                             ref_ece, ref_marginal, ref_nll, ref_pece, region_case, rk, softmax_case)
from nnunet_calibration.metrics import (bin_edges, bin_index, brier, cece, ece, marginal_calibration_errors, nll,
                                        pece, validate_inputs)
from nnunet_calibration.metrics import calibration as calib


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


def test_validate_labels_reports_exactly_the_values_np_unique_finds():
    """The min/max shortcut names the same bad values as a set difference of ``np.unique`` (ints of several
    dtypes, values inside and outside the allowed range, a wide range, bool, float), and accepts valid maps."""
    from nnunet_calibration.metrics import validate_labels

    rng = np.random.default_rng(0)
    cases = [rng.integers(0, 4, (40, 50, 60)).astype(dt) for dt in (np.uint8, np.int16, np.int32, np.int64)]
    with_gap = rng.integers(0, 3, (30, 40)).astype(np.int16)
    with_gap[3, 4], with_gap[5, 6] = 5, 9  # inside [min, max] of the map, but not allowed
    negative = rng.integers(0, 3, (7, 8))
    negative[0, 0] = -2
    wide = rng.integers(0, 3, (9, 9))
    wide[1, 1] = 70000
    cases += [with_gap, negative, wide, rng.random((5, 6)) > 0.5, np.array([[0.0, 1.0], [2.5, 3.0]])]
    for lab in cases:
        for allowed in ([0, 1, 2, 3], [0, 1, 3], [1, 2]):
            bad = sorted(set(np.unique(lab.astype(np.int64) if lab.dtype == bool else lab).tolist()) - set(allowed))
            if bad:
                with pytest.raises(ValueError, match=re.escape(f"label values {bad} are not")):
                    validate_labels(lab, allowed)
            else:
                validate_labels(lab, allowed)
    validate_labels(np.zeros((0, 3), np.int16), [0])  # nothing to check
