"""Risk-coverage analysis of case-level confidence scores: AURC, e-AURC, AUGRC and the curves.

Inputs: one ``score`` per case (**higher = more confident**: the case is accepted first; negate a
score such as entropy where higher means less confident) and one ``risk`` per case (a loss >= 0,
e.g. ``1 - DSC``; 0/1 failures give the classical selective-classification risk).

Definitions (N cases; Traub et al. 2024, *Overcoming common flaws in the evaluation of selective
classification systems*, and their reference implementation in FD-Shifts)
--------------------------------------------------------------------------------------------
* Accepting every case with ``score >= t`` gives coverage ``c = n_accepted / N``, selective risk
  ``R(c) = sum_accepted risk / n_accepted`` and generalized risk ``G(c) = sum_accepted risk / N``
  (the risk of the accepted cases per case of the data set; ``G(c) = c R(c)``).
* Curve points: one per distinct score (thresholds from the highest score down), plus ``(0, 0)``
  for G. Cases with equal scores are accepted together (a tie is one point). Between points G is
  linear in c, which is exactly the mean over all orders in which the tied cases could be accepted
  one by one.
* ``AUGRC = integral_0^1 G(c) dc`` (trapezoids between the points, exact for the linear G).
* ``AURC = integral_0^1 G(c) / c dc``: the area under the selective risk of the same linear G, in
  closed form per segment (``a ln(c1/c0) + g1 - g0`` with ``G = a + b c``; on the first segment
  ``R`` is constant). This is FD-Shifts' AURC; Geifman et al.'s ``(1/N) sum_k R(k/N)`` and
  torch-uncertainty's trapezoid of ``R`` over ``[1/N, 1]`` divided by ``1 - 1/N`` differ from it by
  O(1/N) (they share the curve points).
* ``e-AURC = AURC - AURC*`` with ``AURC*`` the AURC of the optimal ranking of the same risks (score =
  -risk, lowest risk accepted first), i.e. the excess over the best possible ranking; >= 0 (up to
  rounding). For 0/1 risks with failure rate e, ``AURC* = e + (1 - e) ln(1 - e)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["RiskCoverageCurve", "risk_coverage_curve", "aurc", "eaurc", "augrc"]


@dataclass(frozen=True)
class RiskCoverageCurve:
    """Points of the risk-coverage curves, by increasing coverage (first point: coverage 0).

    ``coverage``: accepted fraction; ``selective_risk``: mean risk of the accepted cases (at coverage
    0 that of the first point, the curve's constant start); ``generalized_risk``: their risk summed
    per case of the data set (0 at coverage 0); ``threshold``: the lowest accepted score (``+inf`` at
    coverage 0). Plot ``selective_risk`` or ``generalized_risk`` against ``coverage``, linearly
    interpolating G (R then follows ``G / c``).
    """

    coverage: np.ndarray
    selective_risk: np.ndarray
    generalized_risk: np.ndarray
    threshold: np.ndarray


def _inputs(scores, risks):
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    r = np.asarray(risks, dtype=np.float64).reshape(-1)
    if s.size != r.size or s.size == 0:
        raise ValueError(f"need one score per risk and at least one case, got {s.size} scores and {r.size} risks")
    if not (np.all(np.isfinite(s)) and np.all(np.isfinite(r))):
        raise ValueError("scores and risks must be finite (no NaN)")
    if np.any(r < 0):
        raise ValueError("risks must be >= 0")
    return s, r


def risk_coverage_curve(scores, risks) -> RiskCoverageCurve:
    """The curve points (module docstring) of per-case ``scores`` (higher = more confident) and ``risks``."""
    s, r = _inputs(scores, risks)
    n = s.size
    order = np.argsort(-s, kind="stable")
    s, r = s[order], r[order]
    ends = np.append(np.flatnonzero(s[1:] != s[:-1]), n - 1)  # last case of each tie group
    accepted = ends + 1
    risk_sum = np.cumsum(r)[ends]
    return RiskCoverageCurve(coverage=np.concatenate([[0.0], accepted / n]),
                             selective_risk=np.concatenate([[risk_sum[0] / accepted[0]], risk_sum / accepted]),
                             generalized_risk=np.concatenate([[0.0], risk_sum / n]),
                             threshold=np.concatenate([[np.inf], s[ends]]))


def _area_over_coverage(curve: RiskCoverageCurve) -> float:
    """``integral G(c) / c dc`` of the piecewise-linear G (first segment: G / c constant)."""
    c, g = curve.coverage, curve.generalized_risk
    c0, c1, g0, g1 = c[1:-1], c[2:], g[1:-1], g[2:]
    b = (g1 - g0) / (c1 - c0)
    a = g0 - b * c0
    return float(g[1] + np.sum(a * np.log(c1 / c0) + (g1 - g0)))


def aurc(scores, risks) -> float:
    """Area under the selective risk-coverage curve (module docstring). Lower = better ranking and/or
    lower risk."""
    return _area_over_coverage(risk_coverage_curve(scores, risks))


def eaurc(scores, risks) -> float:
    """Excess AURC: AURC minus the AURC of the optimal ranking of the same risks. Lower = better; 0 =
    the scores rank the cases as well as the risks themselves."""
    _, r = _inputs(scores, risks)
    return aurc(scores, risks) - aurc(-r, r)


def augrc(scores, risks) -> float:
    """Area under the generalized risk-coverage curve (Traub et al. 2024). Lower = better."""
    curve = risk_coverage_curve(scores, risks)
    c, g = curve.coverage, curve.generalized_risk
    return float(np.sum(np.diff(c) * (g[1:] + g[:-1]) / 2))
