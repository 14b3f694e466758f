"""nnunet_calibration.posthoc.scaling against direct formulas and known temperatures."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from nnunet_calibration.posthoc import scaling


def _log_softmax(z, axis=-1):
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def _draw_labels(q, rng):
    return (q.cumsum(1) > rng.random((len(q), 1))).argmax(1)


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_temperature_recovered_softmax(t_true):
    """The model reports softmax(t_true * z) for labels drawn from softmax(z): the fit finds t_true."""
    rng = np.random.default_rng(0)
    n, c = 400_000, 4
    z = np.clip(rng.normal(0, 1.5, (n, c)), -3, 3)  # t_true * z keeps every probability above the floor
    y = _draw_labels(np.exp(_log_softmax(z)), rng)
    log_p = _log_softmax(t_true * z)
    t = scaling.fit_temperature(log_p, y, regions=False)
    assert t == pytest.approx(t_true, rel=0.02)
    # the same with a fixed-seed sample of the voxels
    t_sub = scaling.fit_temperature(log_p, y, regions=False, max_voxels=300_000, seed=3)
    assert t_sub == pytest.approx(t_true, rel=0.02)
    assert t_sub != t
    assert scaling.fit_temperature(log_p, y, regions=False, max_voxels=300_000, seed=3) == t_sub


def test_temperature_recovered_sigmoid():
    rng = np.random.default_rng(1)
    n, r, t_true = 200_000, 3, 3.0
    z = np.clip(rng.normal(0, 1.5, (n, r)), -4, 4)
    y = (rng.random((n, r)) < 1 / (1 + np.exp(-z))).astype(np.uint8)
    p = 1 / (1 + np.exp(-t_true * z))
    t = scaling.fit_temperature(scaling.log_probabilities(p, regions=True), y, regions=True)
    assert t == pytest.approx(t_true, rel=0.02)


def test_vector_scaling_recovers_per_class_temperatures_softmax():
    """Labels drawn from softmax(log p / T_c) for known T_c: the joint fit finds every T_c."""
    rng = np.random.default_rng(2)
    n, t_true = 300_000, np.array([0.7, 1.5, 3.0])
    log_p = _log_softmax(rng.normal(0, 2.0, (n, 3)))
    y = _draw_labels(np.exp(_log_softmax(log_p / t_true)), rng)
    t = scaling.fit_vector_scaling(log_p, y, regions=False)
    assert t.shape == (3,)
    np.testing.assert_allclose(t, t_true, rtol=0.03)
    # never worse than one temperature on the fitted rows
    t1 = scaling.fit_temperature(log_p, y, regions=False)
    assert scaling.nll(log_p, y, False, t) < scaling.nll(log_p, y, False, t1)


def test_vector_scaling_recovers_per_region_temperatures_sigmoid():
    rng = np.random.default_rng(3)
    n, t_true = 200_000, np.array([0.5, 2.0])
    z = np.clip(rng.normal(0, 1.5, (n, 2)), -4, 4)
    y = (rng.random((n, 2)) < 1 / (1 + np.exp(-z))).astype(np.uint8)
    p = 1 / (1 + np.exp(-t_true * z))
    t = scaling.fit_vector_scaling(scaling.log_probabilities(p, True), y, regions=True)
    np.testing.assert_allclose(t, t_true, rtol=0.02)


def test_nll_matches_direct_formula():
    rng = np.random.default_rng(4)
    log_p = _log_softmax(rng.normal(0, 1, (50, 3)))
    y = rng.integers(0, 3, 50)
    q = np.exp(log_p / 1.7)
    q /= q.sum(1, keepdims=True)
    assert scaling.nll(log_p, y, False, 1.7) == pytest.approx(-np.mean(np.log(q[np.arange(50), y])), rel=1e-12)
    p = rng.uniform(0.01, 0.99, (50, 2))
    yr = rng.integers(0, 2, (50, 2))
    s = 1 / (1 + np.exp(-np.log(p / (1 - p)) / 0.6))
    direct = -np.mean(yr * np.log(s) + (1 - yr) * np.log(1 - s))
    assert scaling.nll(np.log(p), yr, True, 0.6) == pytest.approx(direct, rel=1e-10)


def _hand_nll(log_p, y, t):
    q = np.exp(log_p / t)
    q /= q.sum(1, keepdims=True)
    return -np.mean(np.log(q[np.arange(len(y)), y]))


def test_crossfit_equals_hand_computation():
    """Three small folds: for fold k the temperature that minimises the directly written NLL of the
    two other folds' voxels (grid search + scipy's bounded scalar minimiser on T itself)."""
    rng = np.random.default_rng(5)
    per_fold = {}
    for k, t_k in zip((0, 1, 2), (0.6, 1.5, 3.0)):
        z = rng.normal(0, 1.5, (400, 3))
        y = _draw_labels(np.exp(_log_softmax(z)), rng)
        per_fold[k] = (_log_softmax(t_k * z), y)
    got, cross = scaling.crossfit(per_fold, regions=False)
    assert sorted(got) == [0, 1, 2] and cross
    for k in per_fold:
        lp = np.concatenate([per_fold[j][0] for j in per_fold if j != k])
        y = np.concatenate([per_fold[j][1] for j in per_fold if j != k])
        grid = np.linspace(0.05, 20, 4000)
        t_grid = grid[np.argmin([_hand_nll(lp, y, t) for t in grid])]
        ref = minimize_scalar(lambda t: _hand_nll(lp, y, t), bounds=(max(0.05, t_grid - 0.01), t_grid + 0.01),
                              method="bounded", options={"xatol": 1e-7}).x
        assert got[k] == pytest.approx(ref, rel=1e-3)
    # the folds differ, so the cross-fitted temperatures differ from each other and from the pooled fit
    assert len({round(v, 3) for v in got.values()}) == 3
    vec, _ = scaling.crossfit(per_fold, regions=False, method="vector")
    assert all(v.shape == (3,) for v in vec.values())
    # one fold: nothing else to fit on, fitted in-sample and said so
    one, cross = scaling.crossfit({0: per_fold[0]}, regions=False)
    assert not cross and one[0] == pytest.approx(scaling.fit(*per_fold[0], False))


def test_apply_scaling_equals_logit_scaling_and_handles_underflow():
    rng = np.random.default_rng(6)
    z = rng.normal(0, 3, (4, 6, 5)).astype(np.float64)  # (C, y, x) logits
    p = np.exp(_log_softmax(z, axis=0)).astype(np.float32)
    out = scaling.apply_scaling(p, 2.0, regions=False)
    assert out.dtype == np.float32 and out.shape == p.shape
    np.testing.assert_allclose(out, np.exp(_log_softmax(z / 2.0, axis=0)), atol=2e-6)  # float32 input
    assert np.array_equal(out.argmax(0), p.argmax(0))
    # nnU-Net's saturated output: exact zeros and ones stay finite, sum to 1, keep the argmax
    sat = np.zeros((3, 4), np.float32)
    sat[0, :2] = 1
    sat[2, 2:] = 1
    soft = scaling.apply_scaling(sat, 4.0, regions=False)
    assert np.all(np.isfinite(soft))
    np.testing.assert_allclose(soft.sum(0), 1, rtol=1e-6)
    assert np.array_equal(soft.argmax(0), sat.argmax(0))
    # an exact zero is taken as the smallest float32 (2**-149) and becomes floor**(1/T) relative to the
    # winner: (2**-149) ** 0.25 = 1.09e-11 (with the old 1e-7 floor it was 0.0178)
    assert scaling.PROB_FLOOR == 2.0 ** -149
    assert soft[1, 0] / soft[0, 0] == pytest.approx(2.0 ** (-149 / 4), rel=1e-5)
    # sigmoid: sigmoid(logit(p) / T) per channel with its own T, 0.5 decision kept, saturation finite
    zr = rng.normal(0, 3, (2, 10))
    pr = (1 / (1 + np.exp(-zr))).astype(np.float32)
    pr[0, 0], pr[1, 0] = 0.0, 1.0
    outr = scaling.apply_scaling(pr, [2.0, 0.5], regions=True)
    # a stored float32 0 is 2**-149 (logit -149 ln 2), a stored 1 is 1 - 2**-25 (logit ln(2**25 - 1));
    # every other value keeps its own logit
    with np.errstate(divide="ignore"):  # the two saturated entries are set next
        zc = np.log(pr.astype(np.float64)) - np.log1p(-pr.astype(np.float64))
    zc[0, 0], zc[1, 0] = -149 * np.log(2), np.log(2.0 ** 25 - 1)
    expected = 1 / (1 + np.exp(-zc / np.array([[2.0], [0.5]])))
    np.testing.assert_allclose(outr, expected, atol=3e-6)
    assert np.array_equal(outr > 0.5, pr > 0.5)
    with pytest.raises(ValueError, match="3 temperatures for 2"):
        scaling.apply_scaling(pr, [1, 2, 3], regions=True)
    assert not scaling.changes_decision(2.0, False)
    assert not scaling.changes_decision([2.0, 0.5], True)
    assert scaling.changes_decision([2.0, 0.5, 1.0], False)


def test_temperature_recovered_from_float32_probabilities_of_very_confident_logits():
    """Issue 22: logits z of std 25 (a very confident model), labels drawn from softmax(z / 4) (the
    true temperature is 4), probabilities softmax(z) stored as float32 as nnU-Net's npz do: many
    probabilities are below 1e-7, some underflow to exactly 0. The fit recovers T = 4 to 2% (the old
    1e-7 floor gave 3.17); the same fit on the exact float64 log-softmax agrees."""
    rng = np.random.default_rng(8)
    n, c = 200_000, 3
    z = rng.normal(0, 25, (n, c))
    y = _draw_labels(np.exp(_log_softmax(z / 4.0)), rng)
    p32 = np.exp(_log_softmax(z)).astype(np.float32)
    assert np.mean(p32 < 1e-7) > 0.3 and np.any(p32 == 0)
    t = scaling.fit_temperature(scaling.log_probabilities(p32, False), y, regions=False)
    assert t == pytest.approx(4.0, rel=0.02)
    assert t == pytest.approx(scaling.fit_temperature(_log_softmax(z), y, regions=False), rel=1e-3)
    # the old floor's bias, measured the same way (documents what the floor change fixed)
    t_old = scaling.fit_temperature(np.log(np.clip(p32.astype(np.float64), 1e-7, 1)), y, regions=False)
    print(f"T = 4: fitted {t:.4f} (float32 probabilities), {t_old:.4f} with the old 1e-7 floor")
    assert t_old < 0.9 * 4.0


def test_voxel_reservoir_is_a_uniform_sample_and_add_case_equals_add():
    rng = np.random.default_rng(7)
    probs = [rng.dirichlet([1, 1, 1], size=(n,)).T.astype(np.float32) for n in (1000, 3000)]  # (C, n)
    labels = [rng.integers(0, 3, p.shape[1]) for p in probs]
    a, b = scaling.VoxelReservoir(400, seed=11), scaling.VoxelReservoir(400, seed=11)
    for g, (p, y) in enumerate(zip(probs, labels)):
        a.add_case(p, y, group=g)
        b.add(*scaling.voxel_sample(p, y), group=g)
    for x, w in zip(a.result(), b.result()):
        np.testing.assert_array_equal(x, w)
    lp, y, g = a.result()
    assert len(lp) == 400 and a.seen == 4000
    # every kept row is a real row of its case
    for k in (0, 1):
        full_lp, full_y = scaling.voxel_sample(probs[k], labels[k])
        rows = {tuple(r) + (t,) for r, t in zip(full_lp, full_y)}
        assert all(tuple(r) + (t,) in rows for r, t in zip(lp[g == k], y[g == k]))
    # uniform: on average a quarter of the sample from the small case
    share = []
    for seed in range(40):
        r = scaling.VoxelReservoir(400, seed=seed)
        for k in (0, 1):
            r.add_case(probs[k], labels[k], group=k)
        share.append(np.mean(r.result()[2] == 0))
    assert np.mean(share) == pytest.approx(0.25, abs=0.01)
    # no limit keeps everything, ignore label left out
    r = scaling.VoxelReservoir(None)
    yl = labels[0].copy()
    yl[:10] = 7
    r.add_case(probs[0], np.where(yl == 7, 7, yl), ignore_label=7)
    assert len(r.result()[0]) == 990


def test_bad_input_errors():
    with pytest.raises(ValueError, match="non-finite"):
        scaling.fit_temperature(np.array([[-np.inf, 0.0]]), np.array([1]), regions=False)
    with pytest.raises(ValueError, match="outside"):
        scaling.fit_temperature(np.log(np.full((2, 2), 0.5)), np.array([0, 2]), regions=False)
    with pytest.raises(ValueError, match="shape of log_probs"):
        scaling.fit_temperature(np.log(np.full((2, 2), 0.5)), np.array([0, 1]), regions=True)
    with pytest.raises(ValueError, match="unknown method"):
        scaling.fit(np.log(np.full((2, 2), 0.5)), np.array([0, 1]), False, method="matrix")
    with pytest.raises(ValueError, match="reference has"):
        scaling.voxel_sample(np.full((2, 3, 3), 0.5), np.zeros((3, 4), int))
