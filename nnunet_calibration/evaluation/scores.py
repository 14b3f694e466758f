"""Which cases to distrust (issue 23): the case-level confidence scores of ``calib-evaluate`` and
their risk-coverage analysis.

Per case (:func:`case_scores`, computed in :func:`.case.evaluate_case` while the probabilities are in
memory), from the probabilities and the predicted label map nnU-Net makes of them (argmax; sigmoid
regions: ``seg[p_r > 0.5] = regions_class_order[r]``), with the defaults of
:mod:`nnunet_calibration.metrics.case_scores` (no reference needed, so an ignore label plays no part):

=====================  ==================  ===================================================================
score (column)         direction           what
=====================  ==================  ===================================================================
``foreground_entropy``  higher = less sure  mean normalised entropy over the predicted foreground
``boundary_entropy``    higher = less sure  the same over the voxels within 2 x the largest spacing (mm)
                                            of a predicted boundary
``expected_dice``       higher = surer      soft Dice of the probabilities against the prediction
``uncertain_fraction``  higher = less sure  voxels with top-label probability < 0.9, per predicted
                                            foreground voxel
=====================  ==================  ===================================================================

A score is NaN (empty in ``per_case.csv``, ``null`` in ``summary.json``) when the prediction has no
foreground (``boundary_entropy``: no boundary). Mean pairwise Dice between folds is not computed:
each case id is in exactly one prediction folder (:func:`.folders.collect_jobs`).

Risk-coverage (:func:`risk_coverage_summary`, :mod:`nnunet_calibration.metrics.risk_coverage`):
per score and per risk (:data:`RISKS`: ``1-DSC`` = 1 - the case's mean DSC over classes,
``HD95`` = its mean HD95), the AURC, e-AURC and AUGRC, with the confidence = the score, negated
where higher = less sure. **NaN convention**: a case whose score or risk is NaN is left out of that
score's analysis for that risk; ``n_cases`` says how many were used, ``n_excluded`` and
``excluded_cases`` which were left out (no case left: the areas are NaN / ``null``).
"""
from __future__ import annotations

import math
from typing import Dict, List, Tuple

import numpy as np

from nnunet_calibration.metrics import (augrc, aurc, boundary_entropy, eaurc, expected_dice, foreground_entropy,
                                        risk_coverage_curve, uncertain_fraction)

#: score name (per-case column) -> whether a higher value means more confident (else negated as confidence)
SCORES: Dict[str, bool] = {"foreground_entropy": False, "boundary_entropy": False, "expected_dice": True,
                           "uncertain_fraction": False}
_FUNCTIONS = {"foreground_entropy": foreground_entropy, "boundary_entropy": boundary_entropy,
              "expected_dice": expected_dice, "uncertain_fraction": uncertain_fraction}
#: risk name -> what it is (per case, from the case's metrics)
RISKS: Dict[str, str] = {"1-DSC": "1 - DSC_mean", "HD95": "HD95_mean"}
#: the risk of ``risk_coverage.png``
PLOTTED_RISK = "1-DSC"
#: the score whose AURC against :data:`PLOTTED_RISK` the experiment report shows (its ``AURC`` column):
#: the expected Dice is the model's own estimate of the case's DSC, i.e. of 1 - the risk
DEFAULT_SCORE = "expected_dice"
AREAS = ("AURC", "e-AURC", "AUGRC")


def case_scores(probs: np.ndarray, seg: np.ndarray, spacing, regions) -> Dict[str, float]:
    """The scores of :data:`SCORES` of one case. ``probs``: checked probabilities (channels first);
    ``seg``: nnU-Net's label map of them; ``spacing``: in the array's axis order; ``regions``: the
    regions' label tuples or ``None`` (softmax)."""
    kw = {} if regions is None else {"regions": True, "region_labels": regions}
    out = {}
    for name, fn in _FUNCTIONS.items():
        extra = {"spacing": spacing} if fn is boundary_entropy else {}
        out[name] = float(fn(probs, seg, validate_args=False, **extra, **kw))
    return out


def default_aurc(summary: dict) -> float:
    """AURC of :data:`DEFAULT_SCORE` against :data:`PLOTTED_RISK` from an evaluator summary; NaN when the
    summary has none (written before ``risk_coverage`` existed, or no case left)."""
    v = ((summary.get("risk_coverage") or {}).get(DEFAULT_SCORE) or {}).get(PLOTTED_RISK) or {}
    return _number(v.get("AURC"))


def _number(v) -> float:
    return math.nan if v is None else float(v)


def risk_value(case: dict, risk: str) -> float:
    """The case's value of ``risk`` (:data:`RISKS`); NaN if missing (``null`` in a read summary)."""
    m = case["metrics"]
    if risk == "1-DSC":
        return 1.0 - _number(m.get("DSC_mean"))
    if risk == "HD95":
        return _number(m.get("HD95_mean"))
    raise ValueError(f"unknown risk {risk!r}; one of {list(RISKS)}")


def curve_inputs(cases: List[dict], score: str, risk: str) -> Tuple[np.ndarray, np.ndarray, List[str]]:
    """``(confidence, risk, excluded case ids)``: the cases whose score and risk are finite, the
    confidence being the score (negated where higher = less confident)."""
    sign = 1.0 if SCORES[score] else -1.0
    conf, risks, excluded = [], [], []
    for c in cases:
        s, r = _number(c["scores"].get(score)), risk_value(c, risk)
        if math.isfinite(s) and math.isfinite(r):
            conf.append(sign * s)
            risks.append(r)
        else:
            excluded.append(c["case"])
    return np.asarray(conf, float), np.asarray(risks, float), excluded


def risk_coverage_summary(cases: List[dict]) -> Dict[str, Dict[str, dict]]:
    """``summary["risk_coverage"]``: ``{score: {risk: {"AURC", "e-AURC", "AUGRC", "n_cases",
    "n_excluded", "excluded_cases"}}}`` (module docstring)."""
    out = {}
    for score in SCORES:
        out[score] = {}
        for risk in RISKS:
            conf, r, excluded = curve_inputs(cases, score, risk)
            if conf.size:
                areas = {"AURC": aurc(conf, r), "e-AURC": eaurc(conf, r), "AUGRC": augrc(conf, r)}
            else:
                areas = dict.fromkeys(AREAS, math.nan)
            out[score][risk] = {**areas, "n_cases": int(conf.size), "n_excluded": len(excluded),
                                "excluded_cases": excluded}
    return out


def plot_curves(cases: List[dict], risk: str = PLOTTED_RISK) -> dict:
    """The curves of ``risk_coverage.png``: ``{"scores": {score: curve}, "optimal": curve or None,
    "random": mean risk (NaN if none), "n_cases"}``; the optimal ranking and the random one (its
    expected selective risk is the mean risk at every coverage) over the cases with a finite risk."""
    curves = {}
    for score in SCORES:
        conf, r, _ = curve_inputs(cases, score, risk)
        if conf.size:
            curves[score] = risk_coverage_curve(conf, r)
    r_all = np.asarray([risk_value(c, risk) for c in cases], float)
    r_all = r_all[np.isfinite(r_all)]
    optimal = risk_coverage_curve(-r_all, r_all) if r_all.size else None
    return {"scores": curves, "optimal": optimal, "random": float(r_all.mean()) if r_all.size else math.nan,
            "n_cases": int(r_all.size)}
