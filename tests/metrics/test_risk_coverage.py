"""AURC, e-AURC, AUGRC: by hand, against numerical integration of the defining integrals, ties as
the mean over all orders of the tied cases, closed forms of the optimal ranking, torch-uncertainty."""
import itertools

import numpy as np
import pytest
from scipy import integrate

from nnunet_calibration.metrics import augrc, aurc, eaurc, risk_coverage_curve


def test_by_hand():
    # scores 3 > 2 > 1, risks 0, 1, 0: G = 0 at 1/3, 1/3 at 2/3 and at 1
    s, r = [3.0, 2.0, 1.0], [0.0, 1.0, 0.0]
    assert augrc(s, r) == pytest.approx(1 / 18 + 1 / 9)
    # integral of G/c: 0 on [0, 1/3]; (c - 1/3)/c on [1/3, 2/3]; (1/3)/c on [2/3, 1]
    assert aurc(s, r) == pytest.approx((1 - np.log(2)) / 3 + np.log(1.5) / 3)
    curve = risk_coverage_curve(s, r)
    np.testing.assert_allclose(curve.coverage, [0, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(curve.selective_risk, [0, 0, 0.5, 1 / 3])
    np.testing.assert_allclose(curve.generalized_risk, [0, 0, 1 / 3, 1 / 3])
    np.testing.assert_array_equal(curve.threshold, [np.inf, 3, 2, 1])
    # all tied: one point; AURC = mean risk, AUGRC = mean risk / 2
    assert aurc([1, 1, 1], r) == pytest.approx(1 / 3) and augrc([1, 1, 1], r) == pytest.approx(1 / 6)


def numeric(scores, risks):
    """The defining integrals by adaptive quadrature of the linearly interpolated G."""
    c = risk_coverage_curve(scores, risks)
    g = lambda x: np.interp(x, c.coverage, c.generalized_risk)  # noqa: E731
    pts = list(c.coverage[1:-1])
    area_g = integrate.quad(g, 0, 1, points=pts, limit=200, epsabs=1e-13)[0]
    area_r = integrate.quad(lambda x: g(x) / x, 0, 1, points=pts, limit=200, epsabs=1e-13)[0]
    return area_r, area_g


@pytest.mark.parametrize("seed", range(4))
def test_against_numerical_integration(seed):
    rng = np.random.default_rng(seed)
    scores = rng.integers(0, 6, 11).astype(float)  # ties
    risks = rng.random(11)
    area_r, area_g = numeric(scores, risks)
    assert aurc(scores, risks) == pytest.approx(area_r, rel=1e-8)
    assert augrc(scores, risks) == pytest.approx(area_g, rel=1e-8)


def test_ties_equal_the_mean_over_all_orders_of_the_tied_cases():
    scores = np.array([0.9, 0.5, 0.5, 0.5, 0.2, 0.2, 0.95])
    risks = np.array([0.1, 0.8, 0.0, 0.3, 1.0, 0.4, 0.6])
    groups = [np.flatnonzero(scores == v) for v in np.unique(scores)[::-1]]
    a, g = [], []
    for perms in itertools.product(*[itertools.permutations(gr) for gr in groups]):
        order = np.concatenate([np.array(p) for p in perms])
        distinct = np.empty(scores.size)
        distinct[order] = -np.arange(scores.size)  # accepted in this order, no ties
        a.append(aurc(distinct, risks))
        g.append(augrc(distinct, risks))
    assert len(a) == 12
    assert aurc(scores, risks) == pytest.approx(np.mean(a), rel=1e-12)
    assert augrc(scores, risks) == pytest.approx(np.mean(g), rel=1e-12)


def test_excess_aurc_and_optimal_closed_forms():
    rng = np.random.default_rng(5)
    risks = rng.random(30)
    assert eaurc(-risks, risks) == pytest.approx(0, abs=1e-15)
    assert eaurc(rng.random(30), risks) > 0
    assert eaurc(risks, risks) > eaurc(rng.random(30), risks)  # the worst ranking
    # 0/1 failures with rate e: AURC* = e + (1 - e) ln(1 - e), AUGRC* = e^2 / 2
    fail = (rng.random(40) < 0.3).astype(float)
    e = fail.mean()
    assert aurc(-fail, fail) == pytest.approx(e + (1 - e) * np.log(1 - e), rel=1e-12)
    assert augrc(-fail, fail) == pytest.approx(e ** 2 / 2, rel=1e-12)
    with pytest.raises(ValueError, match="finite"):
        aurc([1.0, np.nan], [0, 1])
    with pytest.raises(ValueError, match=">= 0"):
        aurc([1.0, 2.0], [0, -1])
    with pytest.raises(ValueError, match="one score per risk"):
        augrc([1.0], [0, 1])


def test_curve_points_and_augrc_match_torch_uncertainty():
    """torch-uncertainty (0/1 errors, confidence = top probability, no ties): its error rates are our
    selective risks at k/N, and its AUGRC is the trapezoid over [1/N, 1] divided by 1 - 1/N, so ours
    = theirs * (1 - 1/N) + the first segment's G_1 / (2N)."""
    torch = pytest.importorskip("torch")
    tu = pytest.importorskip("torch_uncertainty.metrics.classification.risk_coverage")
    rng = np.random.default_rng(0)
    n = 5000
    conf = np.sort(rng.uniform(0.5, 1.0, n))
    conf = conf[np.concatenate([[True], np.diff(conf) > 0])]  # distinct
    n = conf.size
    err = (rng.random(n) > conf).astype(np.float64)  # wrong with probability 1 - conf
    probs = torch.from_numpy(np.stack([conf, 1 - conf], 1))
    targets = torch.from_numpy(err.astype(np.int64))  # target 1 = the prediction (class 0) is wrong
    rates = tu._aurc_rejection_rate_compute(probs.max(-1).values, (probs.argmax(-1) != targets) * 1.0).numpy()
    curve = risk_coverage_curve(conf, err)
    np.testing.assert_allclose(curve.selective_risk[1:], rates, rtol=1e-12)
    m = tu.AUGRC()
    m.update(probs, targets)
    first = err[np.argmax(conf)] / n
    assert augrc(conf, err) == pytest.approx(float(m.compute()) * (1 - 1 / n) + first / (2 * n), abs=1e-6)
