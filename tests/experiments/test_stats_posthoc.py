"""Pure unit tests of the report's statistics and post-hoc calibration (no nnU-Net)."""
import math

import numpy as np
import pytest
from scipy import stats as st

from nnunet_calibration.experiments import posthoc, stats
from nnunet_calibration.posthoc import scaling


def test_friedman_ranks_hand_computed():
    # DSC: higher is better; HD95 and ECE: lower is better. A and B tie on ECE.
    values = {"A": {"DSC": 0.80, "HD95": 3.0, "ECE": 0.10},
              "B": {"DSC": 0.85, "HD95": 2.0, "ECE": 0.10},
              "C": {"DSC": 0.70, "HD95": 4.0, "ECE": 0.05}}
    avg, pos, per_block = stats.friedman_ranks(values)
    # by hand: DSC B1 A2 C3; HD95 B1 A2 C3; ECE C1, A and B share (2+3)/2
    assert per_block["DSC"] == {"A": 2, "B": 1, "C": 3}
    assert per_block["ECE"] == {"A": 2.5, "B": 2.5, "C": 1}
    assert avg["A"] == pytest.approx((2 + 2 + 2.5) / 3)
    assert avg["B"] == pytest.approx((1 + 1 + 2.5) / 3)
    assert avg["C"] == pytest.approx((3 + 3 + 1) / 3)
    assert pos == {"B": 1, "A": 2, "C": 3}
    # Friedman statistic by hand: k=3 methods, n=3 blocks, rank sums 6.5, 4.5, 7, tie correction for
    # one tie of size 2: chi2 = [12/(n k (k+1)) sum R^2 - 3 n (k+1)] / [1 - sum(t^3 - t)/(n k (k^2 - 1))]
    n, k = 3, 3
    raw = 12 / (n * k * (k + 1)) * (6.5 ** 2 + 4.5 ** 2 + 7 ** 2) - 3 * n * (k + 1)
    chi2 = raw / (1 - (2 ** 3 - 2) / (n * k * (k ** 2 - 1)))
    res = stats.friedman_test(values)
    assert res["statistic"] == pytest.approx(chi2)
    assert res["pvalue"] == pytest.approx(math.exp(-chi2 / 2))  # chi2 survival function with 2 dof


def test_friedman_blocks_with_datasets_and_missing_method():
    values = {"A": {"d1/DSC": 0.9, "d2/DSC": 0.5},
              "B": {"d1/DSC": 0.8, "d2/DSC": 0.6},
              "X": {"d1/DSC": float("nan"), "d2/DSC": 0.7}}  # no value: left out of the ranking
    avg, pos, _ = stats.friedman_ranks(values)
    assert set(avg) == {"A", "B"}
    assert avg == {"A": 1.5, "B": 1.5}
    assert pos == {"A": 1, "B": 1}
    res = stats.friedman_test(values)
    assert res["pvalue"] is None and "at least 3 methods" in res["note"]


def test_best_two_and_direction():
    best, second = stats.best_two({"a": 0.1, "b": 0.2, "c": 0.1, "d": 0.3}, "ECE")
    assert best == {"a", "c"} and second == {"b"}
    best, second = stats.best_two({"a": 0.1, "b": 0.2, "d": 0.3}, "DSC")
    assert best == {"d"} and second == {"b"}


def test_wilcoxon_pairs_by_case():
    rng = np.random.default_rng(0)
    base = {f"c{i}": float(v) for i, v in enumerate(rng.normal(0.5, 0.1, 12))}
    other = {c: v + 0.05 + 0.01 * i for i, (c, v) in enumerate(base.items())}
    other["extra"] = 1.0  # not in the baseline: not paired
    out = stats.wilcoxon_vs_baseline({"base": base, "m": other}, "base", "DSC")["m"]
    cases = sorted(base)
    ref = st.wilcoxon([other[c] for c in cases], [base[c] for c in cases])
    assert out["n"] == 12
    assert out["pvalue"] == pytest.approx(ref.pvalue)
    assert out["median_diff"] > 0


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_temperature_scaling_recovers_softmax_temperature(t_true):
    rng = np.random.default_rng(1)
    n, c = 200_000, 4
    z = np.clip(rng.normal(0, 1.5, (n, c)), -3, 3)  # no probability below the 1e-7 clip
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    y = (q.cumsum(1) > rng.random((n, 1))).argmax(1)  # labels drawn from the true probabilities
    # the model reports softmax(t_true * z): scaling its log-probabilities by 1/T recovers q at T = t_true
    p = np.exp(t_true * z - (t_true * z).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t = scaling.fit_temperature(scaling.log_probabilities(p, False), y, False)
    assert t == pytest.approx(t_true, rel=0.03)
    # and the scaled probabilities equal q
    scaled = scaling.apply_scaling(p.T[:, :100], t_true, False)
    np.testing.assert_allclose(scaled, q.T[:, :100], atol=1e-5)


def test_temperature_scaling_recovers_sigmoid_temperature():
    rng = np.random.default_rng(2)
    n, r, t_true = 100_000, 3, 3.0
    z = np.clip(rng.normal(0, 1.5, (n, r)), -4, 4)  # t_true * z stays inside the 1e-7 clip
    q = 1 / (1 + np.exp(-z))
    y = (rng.random((n, r)) < q).astype(np.uint8)
    p = 1 / (1 + np.exp(-t_true * z))
    t = scaling.fit_temperature(scaling.log_probabilities(p, True), y, True)
    assert t == pytest.approx(t_true, rel=0.03)
    np.testing.assert_allclose(scaling.apply_scaling(p.T, t_true, True), q.T, atol=1e-4)


def test_threshold_sweep_matches_direct_computation():
    rng = np.random.default_rng(3)
    cases = []
    for _ in range(3):
        probs = rng.dirichlet([1, 1, 1], size=(5, 7)).transpose(2, 0, 1).astype(np.float32)  # (C, 5, 7)
        labels = rng.integers(0, 3, (5, 7))
        cases.append((probs, labels))
    # an empty-reference case with no prediction above high thresholds
    p_empty = np.zeros((3, 5, 7), np.float32)
    p_empty[0] = 0.9
    p_empty[1] = 0.1
    cases.append((p_empty, np.zeros((5, 7), int)))
    counts = [posthoc.threshold_counts(posthoc.foreground_probability(p), posthoc.foreground_reference(l))
              for p, l in cases]
    rows = posthoc.summarise_sweep(counts)
    for i, t in enumerate(posthoc.THRESHOLDS):
        prec, rec, dsc = [], [], []
        for p, l in cases:
            pred = (1 - p[0]) >= t
            ref = l != 0
            tp = np.sum(pred & ref)
            fp = np.sum(pred & ~ref)
            fn = np.sum(~pred & ref)
            if tp + fp:
                prec.append(tp / (tp + fp))
            if tp + fn:
                rec.append(tp / (tp + fn))
            dsc.append(1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn))
        assert rows[i]["threshold"] == pytest.approx(t)
        assert rows[i]["DSC"] == pytest.approx(np.mean(dsc))
        assert rows[i]["recall"] == pytest.approx(np.mean(rec))
        if prec:
            assert rows[i]["precision"] == pytest.approx(np.mean(prec))
        else:
            assert math.isnan(rows[i]["precision"])
    assert len(rows) == 19 and rows[0]["threshold"] == 0.05 and rows[-1]["threshold"] == 0.95


def test_vector_scaling_recovers_per_region_temperatures():
    rng = np.random.default_rng(5)
    n, t_true = 100_000, np.array([0.5, 2.0, 3.0])
    z = np.clip(rng.normal(0, 1.5, (n, 3)), -4, 4) / np.maximum(t_true, 1)  # inside the 1e-7 clip
    q = 1 / (1 + np.exp(-z))
    y = (rng.random((n, 3)) < q).astype(np.uint8)
    p = 1 / (1 + np.exp(-t_true * z))
    t = scaling.fit_vector_scaling(scaling.log_probabilities(p, True), y, True)
    np.testing.assert_allclose(t, t_true, rtol=0.03)
    np.testing.assert_allclose(scaling.apply_scaling(p.T, t_true, True), q.T, atol=1e-4)


def test_vector_scaling_softmax_matches_direct_minimum():
    """Softmax vector scaling: NLL of softmax(log p_c / T_c) is minimal at the fitted T (checked on a grid)."""
    rng = np.random.default_rng(6)
    n = 20_000
    z = np.clip(rng.normal(0, 1.0, (n, 3)), -3, 3)
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    y = (q.cumsum(1) > rng.random((n, 1))).argmax(1)
    p = np.exp(2.0 * z - (2.0 * z).max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    t = np.asarray(scaling.fit_vector_scaling(scaling.log_probabilities(p, False), y, False))
    logp = np.log(p)

    def nll(tv):
        s = logp / tv
        s -= s.max(1, keepdims=True)
        return np.mean(np.log(np.exp(s).sum(1)) - s[np.arange(n), y])

    best = nll(t)
    grid = np.exp(np.linspace(-0.1, 0.1, 5))
    for a in grid:
        for b in grid:
            for c in grid:
                assert nll(t * np.array([a, b, c])) >= best - 1e-9
    assert nll(t) <= nll(np.full(3, scaling.fit_temperature(scaling.log_probabilities(p, False), y, False))) + 1e-12
