"""Ranking and tests of the report: Friedman average ranks, Friedman test, Wilcoxon vs the baseline.

Friedman average rank (the SDC paper, appendix "Friedman Ranking")
------------------------------------------------------------------
A *block* is one (dataset, metric) column of the table. In every block the methods are ranked from
best (1) to worst by their mean over folds, in the metric's direction (DSC: higher is better; HD95,
ECE, CECE, pECE, mL1-ACE, NLL, Brier, AURC: lower is better; the signed calibration error SCE: closer
to 0 is better, i.e. lower absolute value); ties get the average of the tied ranks
(``scipy.stats.rankdata``). A method's Friedman rank is the mean of its ranks over all blocks;
its position (in brackets in the table) ranks those means (ties share the lower position, "min").
Methods without a value in some block (no finished fold) are left out of the ranking.

The Friedman test (``scipy.stats.friedmanchisquare``) uses the same blocks as repeated measures of
the methods; it needs at least three methods (and at least two blocks): otherwise no p-value is
given and the report says why.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats as _st

HIGHER_IS_BETTER = {"DSC"}
#: signed metrics (``SCE``, ``SCE_<class>``): closer to 0 is better, the sign says over- (+) or under-confident (-)
SIGNED_PREFIX = "SCE"


def direction(metric: str) -> int:
    """+1 if higher is better, -1 if lower is better (only the DSC columns: DSC, DSC_<class>, DSC+PP).
    Signed metrics (:func:`is_signed`) are compared by their absolute value, lower is better (-1)."""
    return 1 if metric.startswith("DSC") else -1


def is_signed(metric: str) -> bool:
    """Whether ``metric`` is signed (the signed calibration error ``SCE`` / ``SCE_<class>``)."""
    return metric.startswith(SIGNED_PREFIX)


def goodness(metric: str, v):
    """The value as "higher is better": ``v`` (DSC), ``-|v|`` (signed metrics), ``-v`` (the others)."""
    if is_signed(metric):
        return -abs(v) if not isinstance(v, np.ndarray) else -np.abs(v)
    return direction(metric) * v


def friedman_ranks(values: dict[str, dict[str, float]]) -> tuple[dict[str, float], dict[str, int], dict]:
    """Average ranks of methods over blocks.

    ``values[method][block] = value`` where ``block`` is ``"<dataset>/<metric>"`` or ``"<metric>"``
    (the metric name after the last '/' sets the direction). Returns (average rank per method,
    position per method, per-block ranks ``{block: {method: rank}}``).
    """
    methods = [m for m in values if all(_finite(values[m].get(b)) for b in _blocks(values))]
    blocks = _blocks(values)
    per_block = {}
    for b in blocks:
        metric = b.rsplit("/", 1)[-1]
        v = np.array([values[m][b] for m in methods], dtype=float)
        r = _st.rankdata(-goodness(metric, v), method="average")
        per_block[b] = dict(zip(methods, r.tolist()))
    avg = {m: float(np.mean([per_block[b][m] for b in blocks])) if blocks else float("nan") for m in methods}
    pos_arr = _st.rankdata([avg[m] for m in methods], method="min") if methods else []
    pos = {m: int(p) for m, p in zip(methods, pos_arr)}
    return avg, pos, per_block


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _blocks(values: dict) -> list[str]:
    blocks = []
    for m in values:
        for b in values[m]:
            if b not in blocks:
                blocks.append(b)
    return blocks


def friedman_test(values: dict[str, dict[str, float]]) -> dict:
    """``{"statistic", "pvalue", "n_methods", "n_blocks", "note"}``; see the module docstring."""
    blocks = _blocks(values)
    methods = [m for m in values if all(_finite(values[m].get(b)) for b in blocks)]
    out = {"statistic": None, "pvalue": None, "n_methods": len(methods), "n_blocks": len(blocks), "note": ""}
    if len(methods) < 3:
        out["note"] = (f"Friedman test not computed: it needs at least 3 methods with every metric, "
                       f"got {len(methods)}")
        return out
    if len(blocks) < 2:
        out["note"] = "Friedman test not computed: it needs at least 2 metric columns"
        return out
    samples = [[-goodness(b.rsplit('/', 1)[-1], values[m][b]) for b in blocks] for m in methods]
    try:
        res = _st.friedmanchisquare(*samples)
        out["statistic"], out["pvalue"] = float(res.statistic), float(res.pvalue)
    except ValueError as e:
        out["note"] = f"Friedman test not computed: {e}"
    return out


def wilcoxon_vs_baseline(per_case: dict[str, dict[str, float]], baseline: str, metric: str) -> dict:
    """Paired two-sided Wilcoxon signed-rank test of every method against ``baseline`` on one metric.

    ``per_case[method][case] = value``: pairs are the cases both methods have (per-case values of
    the cross-validation's validation folds). Returns ``{method: {"n", "statistic", "pvalue",
    "median_diff", "note"}}`` (median of method - baseline).
    """
    out = {}
    base = per_case.get(baseline, {})
    for m, vals in per_case.items():
        if m == baseline:
            continue
        cases = sorted(c for c in vals if c in base and _finite(vals[c]) and _finite(base[c]))
        a = np.array([vals[c] for c in cases], dtype=float)
        b = np.array([base[c] for c in cases], dtype=float)
        rec = {"n": len(cases), "statistic": None, "pvalue": None,
               "median_diff": float(np.median(a - b)) if len(cases) else None, "note": ""}
        if len(cases) == 0:
            rec["note"] = "no paired cases"
        elif np.all(a == b):
            rec["note"] = "identical values"
        else:
            try:
                res = _st.wilcoxon(a, b)
                rec["statistic"], rec["pvalue"] = float(res.statistic), float(res.pvalue)
            except ValueError as e:
                rec["note"] = str(e)
        out[m] = rec
    return out


def best_two(values: dict[str, float], metric: str) -> tuple[set, set]:
    """Methods holding the best and the second-best value (ties share the mark)."""
    vals = {m: v for m, v in values.items() if _finite(v)}
    if not vals:
        return set(), set()
    distinct = sorted({goodness(metric, v) for v in vals.values()}, reverse=True)
    best = {m for m, v in vals.items() if goodness(metric, v) == distinct[0]}
    second = {m for m, v in vals.items() if len(distinct) > 1 and goodness(metric, v) == distinct[1]}
    return best, second
