"""Equal-mass ("adaptive") binning of ECE and CECE: against the binning written out on tiny arrays,
by hand, pooled = concatenated, and against torch-uncertainty's AdaptiveCalibrationError on
real-size random data (where its definition is the same: top-label confidences, no single-value
special cases)."""
import pickle

import numpy as np
import pytest

from metrics_testlib import (BRATS_REGIONS, CASES, ref_adaptive_cece, ref_adaptive_ece, ref_equal_mass_masks,
                             ref_masked_ece, region_case, rk, softmax_case)
from nnunet_calibration.metrics import cece, ece
from nnunet_calibration.metrics import calibration as calib
from nnunet_calibration.metrics._adaptive import ValueStats, sort_keys


def two_class(p1, labels):
    p1 = np.asarray(p1, np.float32)
    return np.stack([1 - p1, p1]), np.asarray(labels)


def test_equal_mass_bins_by_hand_with_a_tie_across_the_cut():
    # class-1 probabilities 0.1 0.2 0.2 0.2 0.9 -> 2 parts of 3 and 2 values; the first part ends at
    # 0.2, so all three 0.2 (one was in the second part) go to bin 1: {0.1, 0.2, 0.2, 0.2}, {0.9}
    probs, labels = two_class([0.1, 0.2, 0.2, 0.2, 0.9], [0, 1, 0, 0, 1])
    b1 = abs(np.float32(0.1) + 3 * np.float32(0.2) - 1) / 4  # |mean p - mean y| of bin 1
    b2 = abs(np.float32(0.9) - 1)
    expected = (4 * b1 + 1 * b2) / 5
    assert cece(probs, labels, n_bins=2, binning="adaptive") == pytest.approx(expected, rel=1e-6)
    stats = calib._cece_update(probs, labels, n_bins=2, binning="adaptive")
    assert stats.equal_mass().bin_count[0].tolist() == [4, 1]
    np.testing.assert_allclose(stats.edges(0), [np.float32(0.2), np.float32(0.9)])


def test_more_bins_than_values_gives_one_bin_per_distinct_value():
    p1 = [0.3, 0.3, 0.6, 0.8]
    probs, labels = two_class(p1, [1, 0, 1, 0])
    stats = calib._cece_update(probs, labels, n_bins=10, binning="adaptive").equal_mass()
    assert sorted(stats.bin_count[0].tolist()) == [0] * 7 + [1, 1, 2]
    p = np.float32(p1).astype(np.float64)
    expected = (2 * abs(p[0] - 0.5) + abs(p[2] - 1) + abs(p[3] - 0)) / 4
    assert cece(probs, labels, n_bins=10, binning="adaptive") == pytest.approx(expected, rel=1e-12)


def test_ties_never_depend_on_the_order_of_their_outcomes():
    rng = np.random.default_rng(3)
    p1 = rng.choice(np.float32([0.1, 0.25, 0.5, 0.7, 0.9]), 300)
    labels = (rng.random(300) < p1).astype(np.int64)
    probs = np.stack([1 - p1, p1])
    base = cece(probs, labels, n_bins=7, binning="adaptive")
    perm = rng.permutation(300)
    assert cece(probs[:, perm], labels[perm], n_bins=7, binning="adaptive") == pytest.approx(base, rel=1e-12)
    assert base == pytest.approx(ref_adaptive_cece(probs, labels, 7, 1e-3), rel=1e-12)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n_bins", [1, 3, 15, 1000])
def test_adaptive_softmax_matches_written_out_binning(case, n_bins):
    probs, labels = CASES[case]()
    assert ece(probs, labels, n_bins=n_bins, binning="adaptive") == pytest.approx(
        ref_adaptive_ece(probs, labels, n_bins), rel=1e-9, abs=1e-12)
    for thr in (1e-3, 0.3):
        assert cece(probs, labels, n_bins=n_bins, threshold=thr, binning="adaptive") == pytest.approx(
            ref_adaptive_cece(probs, labels, n_bins, thr), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("sharpness", [3.0, 30.0])
def test_adaptive_regions_match_written_out_binning(sharpness):
    probs, labels = region_case((9, 10, 11), 5, sharpness=sharpness)
    R = BRATS_REGIONS
    assert ece(probs, labels, n_bins=10, binning="adaptive", **rk(R)) == pytest.approx(
        ref_adaptive_ece(probs, labels, 10, R), rel=1e-9)
    assert cece(probs, labels, n_bins=10, binning="adaptive", **rk(R)) == pytest.approx(
        ref_adaptive_cece(probs, labels, 10, 1e-3, R), rel=1e-9)


def test_adaptive_float64_input():
    probs, labels = softmax_case((5, 6, 7), 3, 2, dtype=np.float64)
    assert ece(probs, labels, n_bins=6, binning="adaptive") == pytest.approx(
        ref_adaptive_ece(probs, labels, 6), rel=1e-12)


def test_sort_keys_order_like_value_then_outcome():
    rng = np.random.default_rng(0)
    for dt in (np.float32, np.float64):
        v = rng.choice(rng.random(50).astype(dt), 400)
        y = rng.random(400) < 0.5
        k = sort_keys(v, y)
        order = np.argsort(k, kind="stable")
        ref = np.lexsort((y, v))
        np.testing.assert_array_equal(v[order], v[ref])
        np.testing.assert_array_equal(y[order], y[ref])


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_adaptive_statistics_merge_exactly(regions):
    probs, labels = softmax_case((8, 7, 6), 4, 12) if regions is None else region_case((8, 7, 6), 12)
    for update in (lambda p, l: calib._ece_update(p, l, 9, regions, binning="adaptive"),
                   lambda p, l: calib._cece_update(p, l, 9, 1e-3, regions, binning="adaptive")):
        whole = update(probs, labels)
        merged = pickle.loads(pickle.dumps(update(probs[:, :3], labels[:3]))) + update(probs[:, 3:], labels[3:])
        for t in range(whole.n_tasks):
            for got, want in zip(merged.distinct(t), whole.distinct(t)):
                np.testing.assert_array_equal(got, want)
            np.testing.assert_array_equal(merged.equal_mass().count, whole.equal_mass().count)
        np.testing.assert_array_equal(merged.total, whole.total)
    # pooled over two different cases = the concatenated voxels
    p2, l2 = softmax_case((5, 7, 6), 4, 13) if regions is None else region_case((5, 7, 6), 13)
    pooled = calib._ece_update(probs, labels, 9, regions, "adaptive") + calib._ece_update(p2, l2, 9, regions,
                                                                                           "adaptive")
    cat_p, cat_l = np.concatenate([probs, p2], 1), np.concatenate([labels, l2], 0)
    assert calib._ece_compute(pooled) == pytest.approx(ref_adaptive_ece(cat_p, cat_l, 9, regions), rel=1e-9)
    with pytest.raises(ValueError, match="bins"):
        pooled + ValueStats.zeros(pooled.n_tasks, 3)


def test_binning_option_is_checked():
    probs, labels = softmax_case((4, 5), 3, 0)
    with pytest.raises(ValueError, match="binning"):
        ece(probs, labels, binning="quantile")
    assert ece(probs, labels, binning="uniform") == ece(probs, labels)


def test_adaptive_written_out_reference_is_not_trivial():
    """The reference bins have (almost) equal counts without ties."""
    v = np.random.default_rng(1).random(103)
    sizes = [int(m.sum()) for m in ref_equal_mass_masks(v, 10)]
    assert sizes == [11, 11, 11] + [10] * 7
    assert ref_masked_ece(v, v > 0.5, ref_equal_mass_masks(v, 10)) > 0


# ----------------------------------------------------------------------------------------------
# torch-uncertainty (test-only dependency)
# ----------------------------------------------------------------------------------------------
def _tu_ace(conf, correct, n_bins, binary=False):
    torch = pytest.importorskip("torch")
    tu = pytest.importorskip("torch_uncertainty.metrics.classification.calibration.adaptive_calibration_error")
    if binary:  # conf is p here; torch-uncertainty takes max(p, 1 - p) and round(p) itself
        m = tu.BinaryAdaptiveCalibrationError(n_bins=n_bins)
        m.update(torch.from_numpy(conf), torch.from_numpy(correct))
    else:
        m = tu.MulticlassAdaptiveCalibrationError(num_classes=conf.shape[1], n_bins=n_bins)
        m.update(torch.from_numpy(conf), torch.from_numpy(correct))
    return float(m.compute())


@pytest.mark.parametrize("n_bins", [10, 15])
def test_adaptive_ece_matches_torch_uncertainty_multiclass(n_bins):
    """Same definition: top-label confidence and correctness of the foreground voxels, sorted and cut
    into n_bins parts. ~0.8M foreground voxels (float32 values do tie; a tie across a cut moves a
    value between two bins, which changes nothing when both bins' gaps have the same sign)."""
    probs, labels = softmax_case((64, 96, 96), 4, 7)
    fg = (labels != 0).reshape(-1)
    flat = probs.reshape(4, -1)[:, fg].T.copy()
    expected = _tu_ace(flat, labels.reshape(-1)[fg], n_bins)
    assert ece(probs, labels, n_bins=n_bins, binning="adaptive") == pytest.approx(expected, abs=1e-6)


def test_adaptive_region_ece_matches_torch_uncertainty_binary():
    """Regions: per region max(p, 1 - p) against round(p) == y over the region's voxels, as
    torch-uncertainty's BinaryAdaptiveCalibrationError; averaged over the regions."""
    probs, labels = region_case((48, 96, 96), 8)
    per_region = []
    for r, reg in enumerate(BRATS_REGIONS):
        y = np.isin(labels, reg)
        per_region.append(_tu_ace(probs[r][y], np.ones(int(y.sum()), np.float32), 15, binary=True))
    assert ece(probs, labels, n_bins=15, binning="adaptive", **rk(BRATS_REGIONS)) == pytest.approx(
        np.mean(per_region), abs=1e-6)


# ----------------------------------------------------------------------------------------------
# ValueStats' statistics (histogram of buckets, exact values only in the buckets holding a cut)
# against equal-mass bins written out on the sorted values
# ----------------------------------------------------------------------------------------------
def _written_out_bins(v, y, n_bins):
    """(count (n_bins, 2), sums (n_bins, 2), edges): the bins of ref_equal_mass_masks, bin i = part i."""
    v = np.asarray(v, np.float64)
    count, sums = np.zeros((n_bins, 2), np.int64), np.zeros((n_bins, 2))
    for i, m in enumerate(ref_equal_mass_masks(v, n_bins)):
        for o in (0, 1):
            mo = m & (y == o)
            count[i, o], sums[i, o] = mo.sum(), v[mo].sum()
    parts = [p[-1] for p in np.array_split(np.sort(v), n_bins) if p.size]
    edges = np.array(parts + [parts[-1]] * (n_bins - len(parts)))
    return count, sums, edges


def _assert_written_out_bins(stats, v, y, n_bins):
    """Task 0 of ``stats`` has exactly the bins, sums (to float64 rounding) and edges written out."""
    count, sums, edges = _written_out_bins(v, y, n_bins)
    got = stats.equal_mass()
    np.testing.assert_array_equal(got.count[0], count)
    np.testing.assert_allclose(got.conf_sum[0], sums, rtol=1e-12, atol=1e-300)
    np.testing.assert_array_equal(stats.edges(0), edges)
    assert got.total[0] == v.size


def _mixed_values(rng, n):
    """float32 values > 0 with every kind of tie and range the buckets must handle: repeated values,
    a continuum in [1e-3, 1], a cluster just below 1 (one bucket holds it), exact 1.0, subnormals."""
    parts = [rng.choice(rng.random(40).astype(np.float32), n // 4),
             rng.uniform(1e-3, 1, n // 4).astype(np.float32),
             (1 - rng.random(n // 4) * 1e-4).astype(np.float32),
             np.ones(n // 8, np.float32),
             (rng.random(n - 3 * (n // 4) - n // 8) * 1e-40).astype(np.float32)]
    v = np.concatenate(parts)
    v[v == 0] = np.float32(1e-45)
    return rng.permutation(v)


@pytest.mark.parametrize("n_bins", [1, 3, 15, 100])
def test_value_stats_equal_written_out_bins_float32(n_bins):
    rng = np.random.default_rng(n_bins)
    v = _mixed_values(rng, 200_000)
    y = (rng.random(v.size) < v).astype(np.int64)
    stats = ValueStats.zeros(1, n_bins)
    stats.set_from_keys_(0, [sort_keys(v[:70_000], y[:70_000]), sort_keys(v[70_000:], y[70_000:])], v.size)
    _assert_written_out_bins(stats, v, y, n_bins)


@pytest.mark.parametrize("n_bins", [2, 15, 1000])
def test_value_stats_merge_float32_float64_and_weights(n_bins):
    """Three cases, one of float64 values (most not float32 numbers, some in the same buckets as the
    float32 values, some equal to them; their keys are sorted, the float32 ones counted in the bucket
    table), one counted twice (bootstrap weight): the statistics equal those of all values written
    out, repeated values included; and few values with many bins (sorted, no table)."""
    rng = np.random.default_rng(7)
    a = _mixed_values(rng, 60_000)  # enough values in the cut buckets to count them in the bucket table
    b = _mixed_values(rng, 1000)
    c = np.concatenate([a[:300].astype(np.float64) * (1 + 1e-9 * rng.random(300)), a[300:400].astype(np.float64)])
    ya, yb, yc = ((rng.random(x.size) < 0.5).astype(np.int64) for x in (a, b, c))
    parts = []
    for x, yx in ((a, ya), (b, yb), (c, yc)):
        s = ValueStats.zeros(1, n_bins)
        s.set_from_keys_(0, [sort_keys(x, yx)], x.size)
        parts.append(s)
    pooled = parts[0] + parts[1].scaled(2) + pickle.loads(pickle.dumps(parts[2]))
    v = np.concatenate([a, b, b]).astype(np.float64)
    v = np.concatenate([v, c])
    y = np.concatenate([ya, yb, yb, yc])
    _assert_written_out_bins(pooled, v, y, n_bins)
    dv, dc = pooled.distinct(0)
    uv, inv = np.unique(v, return_inverse=True)
    np.testing.assert_array_equal(dv, uv)
    np.testing.assert_array_equal(dc, np.stack([np.bincount(inv, weights=y == o).astype(np.int64) for o in (0, 1)], 1))
    # few values, many bins: every distinct value is its own bin (no bucket table needed)
    few = ValueStats.zeros(1, 1000)
    few.set_from_keys_(0, [sort_keys(a[:50], ya[:50])], 50)
    count, sums, _ = _written_out_bins(a[:50], ya[:50], 1000)
    np.testing.assert_array_equal(few.equal_mass().count[0], count)


def test_value_stats_scaled_by_zero_is_empty_and_negative_weights_are_refused():
    v = np.float32([0.2, 0.4, 0.9])
    s = ValueStats.zeros(1, 2)
    s.set_from_keys_(0, [sort_keys(v, np.array([0, 1, 1]))], 3)
    zero = s.scaled(0)
    assert zero.total.tolist() == [0] and zero.equal_mass().count.sum() == 0
    assert np.isnan(zero.edges(0)).all()
    np.testing.assert_array_equal((zero + s).equal_mass().count, s.equal_mass().count)
    with pytest.raises(ValueError, match="weight"):
        s.scaled(-1)
