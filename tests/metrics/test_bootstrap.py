"""Bootstrap intervals over cases: replicated by hand from the documented draws (concatenating the
voxels of the drawn cases and computing the metric with the written-out references)."""
import numpy as np
import pytest

from metrics_testlib import ref_adaptive_cece, ref_adaptive_ece, ref_cece, ref_ece, ref_nll, softmax_case
from nnunet_calibration.metrics import CaseStatistics, bootstrap_ci, ece
from nnunet_calibration.metrics import calibration as calib


def cases(n=6, seed=0):
    out = []
    for i in range(n):
        probs, labels = softmax_case((4 + i % 3, 5, 6), 3, seed * 100 + i, temperature=1.0 + i / 3)
        out.append((probs, labels))
    return out


def by_hand(data, ref, n_resamples, confidence, seed, baseline=None):
    """Draws as documented; the metric of the concatenated voxels of the drawn cases."""
    def metric(rows, src):
        p = np.concatenate([src[i][0].reshape(3, -1) for i in rows], 1)
        lab = np.concatenate([src[i][1].reshape(-1) for i in rows])
        return ref(p, lab)
    n = len(data)
    idx = np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))
    reps = np.array([metric(r, data) - (metric(r, baseline) if baseline else 0.0) for r in idx])
    reps = reps[~np.isnan(reps)]
    est = metric(range(n), data) - (metric(range(n), baseline) if baseline else 0.0)
    return est, np.percentile(reps, [50 * (1 - confidence), 50 * (1 + confidence)]), reps.size


@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
def test_bootstrap_ece_matches_replication_by_hand(binning):
    data = cases()
    acc = CaseStatistics("ECE", n_bins=7, binning=binning)
    for p, lab in data:
        acc.update(p, lab)
    ref = (lambda p, lab: ref_ece(p, lab, 7)) if binning == "uniform" else (lambda p, lab: ref_adaptive_ece(p, lab, 7))
    got = acc.bootstrap(n_resamples=40, confidence=0.9, seed=3)
    est, (lo, hi), n_valid = by_hand(data, ref, 40, 0.9, 3)
    assert got.estimate == pytest.approx(est, rel=1e-9)
    assert (got.low, got.high) == pytest.approx((lo, hi), rel=1e-9)
    assert got.n_valid == n_valid == 40 and got.low <= got.estimate <= got.high
    assert acc.compute() == pytest.approx(est, rel=1e-9)


@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
def test_paired_bootstrap_of_a_difference(binning):
    data, other = cases(seed=0), cases(seed=1)
    other = [(p, data[i][1]) for i, (p, _) in enumerate(other)]  # same cases (labels), another "method"
    a = CaseStatistics("CECE", n_bins=5, binning=binning)
    b = CaseStatistics("CECE", n_bins=5, binning=binning)
    for (pa, lab), (pb, _) in zip(data, other):
        a.update(pa, lab)
        b.update(pb, lab)
    ref = ((lambda p, lab: ref_cece(p, lab, 5, 1e-3)) if binning == "uniform"
           else (lambda p, lab: ref_adaptive_cece(p, lab, 5, 1e-3)))
    got = a.bootstrap(n_resamples=25, seed=7, baseline=b)
    est, (lo, hi), _ = by_hand(data, ref, 25, 0.95, 7, baseline=other)
    assert got.estimate == pytest.approx(est, rel=1e-9, abs=1e-12)
    assert (got.low, got.high) == pytest.approx((lo, hi), rel=1e-9, abs=1e-12)


def test_bootstrap_of_sum_statistics_and_nan_replicates():
    data = cases(4)
    stats = [calib._nll_update(p, lab) for p, lab in data]
    got = bootstrap_ci(stats, calib._nll_compute, n_resamples=30, seed=1)
    est, (lo, hi), _ = by_hand(data, lambda p, lab: ref_nll(p, lab), 30, 0.95, 1)
    assert got.estimate == pytest.approx(est, rel=1e-6) and (got.low, got.high) == pytest.approx((lo, hi), rel=1e-6)
    # a case without foreground: ECE NaN; replicates drawing only it are dropped
    p0, _ = data[0]
    stats = [calib._ece_update(p0, np.zeros(p0.shape[1:], np.int64)), calib._ece_update(*data[1])]
    got = bootstrap_ci(stats, calib._ece_compute, n_resamples=200, seed=0)
    assert 0 < 200 - got.n_valid < 200 and np.isfinite(got.low)


def test_case_statistics_pooled_equal_functions_and_merge_and_checks():
    data = cases(3)
    parts = [CaseStatistics("ECE", binning="adaptive").update(*d) for d in data]
    both = parts[0] + parts[1] + parts[2]
    p = np.concatenate([d[0].reshape(3, -1) for d in data], 1)
    lab = np.concatenate([d[1].reshape(-1) for d in data])
    assert both.n_cases == 3
    assert both.compute() == pytest.approx(ece(p, lab, binning="adaptive"), rel=1e-12)
    assert both.compute("debiased_l2_squared") < both.compute("ece") ** 2
    assert both.bootstrap(n_resamples=20).low == both.bootstrap(n_resamples=20).low  # fixed seed
    with pytest.raises(ValueError, match="same metric"):
        both + CaseStatistics("ECE")
    with pytest.raises(ValueError, match="estimator"):
        both.compute("mce")
    with pytest.raises(ValueError, match="metric"):
        CaseStatistics("pECE")
    with pytest.raises(ValueError, match="confidence"):
        bootstrap_ci(both.cases, calib._ece_compute, confidence=95)
    with pytest.raises(TypeError):
        bootstrap_ci([both.cases[0], calib._ece_update(*data[0])], calib._ece_compute)
