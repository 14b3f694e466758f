"""Signed class-wise calibration error and debiased L2 calibration error: direct formulas on small
arrays, properties (telescoping, sign, unbiasedness under perfect calibration), torch-uncertainty."""
import numpy as np
import pytest

from metrics_testlib import (BRATS_REGIONS, CASES, ref_bins, ref_equal_mass_masks, region_case, rk, softmax_case)
from nnunet_calibration.metrics import debiased_l2_ece, signed_calibration_error


# ----------------------------------------------------------------------------------------------
# signed calibration error
# ----------------------------------------------------------------------------------------------
def ref_signed(probs, labels, thr, regions=None):
    out = []
    for c in (range(probs.shape[0]) if regions is not None else range(1, probs.shape[0])):
        y = np.isin(labels, regions[c]) if regions is not None else labels == c
        keep = probs[c] > thr
        out.append(probs[c][keep].astype(np.float64).mean() - y[keep].mean() if keep.any() else np.nan)
    return np.array(out)


def bin_weighted_signed(v, y, masks):
    v, y = v.astype(np.float64), y.astype(np.float64)
    return sum(m.sum() / v.size * (v[m].mean() - y[m].mean()) for m in masks if m.any())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("thr", [1e-3, 0.3])
def test_signed_matches_direct_formula(case, thr):
    probs, labels = CASES[case]()
    np.testing.assert_allclose(signed_calibration_error(probs, labels, threshold=thr), ref_signed(probs, labels, thr),
                               rtol=1e-9, atol=1e-12)


def test_signed_is_the_bin_weighted_signed_gap_for_any_bins():
    probs, labels = softmax_case((7, 8, 9), 3, 4)
    got = signed_calibration_error(probs, labels)
    for c in (1, 2):
        keep = probs[c] > 1e-3
        v, y = probs[c][keep], labels[keep] == c
        for masks in (ref_bins(v, 10), ref_bins(v, 3), ref_equal_mass_masks(v, 15)):
            assert got[c - 1] == pytest.approx(bin_weighted_signed(v, y, masks), rel=1e-9, abs=1e-12)


def test_signed_sign_and_regions_and_empty_class():
    rng = np.random.default_rng(0)
    p1 = rng.random(50_000)
    y = (rng.random(p1.size) < p1).astype(np.int64)
    over = np.clip(p1 + 0.2, 0, 1)  # predicts class 1 more often than it occurs
    under = p1 * 0.7
    assert signed_calibration_error(np.stack([1 - over, over]), y)[0] > 0.1
    assert signed_calibration_error(np.stack([1 - under, under]), y)[0] < -0.1
    assert abs(signed_calibration_error(np.stack([1 - p1, p1]), y)[0]) < 0.01
    rp, rl = region_case((6, 7, 8), 3)
    np.testing.assert_allclose(signed_calibration_error(rp, rl, **rk(BRATS_REGIONS)),
                               ref_signed(rp, rl, 1e-3, BRATS_REGIONS), rtol=1e-9)
    probs, labels = softmax_case((5, 5), 3, 1)
    probs[0] += probs[2]
    probs[2] = 0
    out = signed_calibration_error(probs, labels)
    assert np.isfinite(out[0]) and np.isnan(out[1])


# ----------------------------------------------------------------------------------------------
# debiased L2 calibration error
# ----------------------------------------------------------------------------------------------
def ref_debiased_sq(v, y, masks):
    v, y = v.ravel().astype(np.float64), y.ravel().astype(np.float64)
    total = 0.0
    for m in masks:
        n = m.sum()
        if n >= 2:
            conf, acc = v[m].mean(), y[m].mean()
            total += n / v.size * ((conf - acc) ** 2 - acc * (1 - acc) / (n - 1))
    return total


def ref_debiased_ece(probs, labels, n_bins, binning, squared, regions=None):
    def one(v, y):
        masks = ref_bins(v, n_bins) if binning == "uniform" else ref_equal_mass_masks(v, n_bins)
        e2 = ref_debiased_sq(v, y, masks)
        return e2 if squared else np.sqrt(max(e2, 0.0))
    if regions is None:
        fg = labels != 0
        return one(probs.max(0)[fg], probs.argmax(0)[fg] == labels[fg])
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(labels, reg)
        if y.any():
            p = probs[r][y]
            vals.append(one(np.maximum(p, 1 - p), p > 0.5))
    return float(np.mean(vals))


@pytest.mark.parametrize("case", ["softmax3d", "softmax2d", "confident3d", "softmax3d_f64"])
@pytest.mark.parametrize("binning", ["uniform", "adaptive"])
@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("n_bins", [5, 15, 400])  # 400: many bins of 0 or 1 value
def test_debiased_matches_direct_formula(case, binning, squared, n_bins):
    probs, labels = CASES[case]()
    assert debiased_l2_ece(probs, labels, n_bins=n_bins, binning=binning, squared=squared) == pytest.approx(
        ref_debiased_ece(probs, labels, n_bins, binning, squared), rel=1e-9, abs=1e-12)


def test_debiased_regions_match_direct_formula():
    probs, labels = region_case((8, 9, 10), 2)
    for binning in ("uniform", "adaptive"):
        assert debiased_l2_ece(probs, labels, n_bins=8, binning=binning, **rk(BRATS_REGIONS)) == pytest.approx(
            ref_debiased_ece(probs, labels, 8, binning, False, BRATS_REGIONS), rel=1e-9)


def test_debiased_removes_the_bias_under_perfect_calibration():
    """Perfectly calibrated model (outcomes drawn with the predicted probability): the true CE is 0.
    The plug-in squared error is positive on average; the debiased estimate averages to 0."""
    rng = np.random.default_rng(11)
    debiased, plugin = [], []
    for _ in range(300):
        p1 = rng.uniform(0.5, 1.0, 600)
        y = (rng.random(600) < p1).astype(np.int64) + 1  # label 2 = "top class correct"
        probs = np.stack([np.zeros_like(p1), 1 - p1, p1])  # foreground: labels 1, 2
        debiased.append(debiased_l2_ece(probs, y, n_bins=10, squared=True))
        plugin.append(sum(m.sum() / p1.size * (p1[m].mean() - (y == 2)[m].mean()) ** 2  # no variance term
                          for m in ref_bins(p1, 10) if m.any()))
    debiased, plugin = np.array(debiased), np.array(plugin)
    se = debiased.std() / np.sqrt(debiased.size)
    assert abs(debiased.mean()) < 3 * se
    assert plugin.mean() > 10 * se and plugin.mean() > debiased.mean() + 5 * se


def test_debiased_matches_torch_uncertainty():
    """torch-uncertainty's _ace_compute(norm="l2", debias=True): equal-mass bins of the top-label
    confidence, the same per-bin correction; every bin holds thousands of values here."""
    torch = pytest.importorskip("torch")
    tu = pytest.importorskip("torch_uncertainty.metrics.classification.calibration.adaptive_calibration_error")
    probs, labels = softmax_case((48, 96, 96), 4, 9, temperature=3.0)
    fg = labels != 0
    conf, correct = probs.max(0)[fg], (probs.argmax(0) == labels)[fg]
    expected = float(tu._ace_compute(torch.from_numpy(conf), torch.from_numpy(correct).float(), 15, norm="l2",
                                     debias=True))
    assert debiased_l2_ece(probs, labels, n_bins=15, binning="adaptive") == pytest.approx(expected, abs=1e-6)
