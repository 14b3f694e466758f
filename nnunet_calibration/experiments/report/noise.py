"""Run-to-run noise, differences to the baseline, and convergence: pure functions over a report's rows.

Repeated runs
-------------
A trainer entry with ``run: 2, 3, ...`` (:class:`nnunet_calibration.settings.TrainerEntry`) is an
otherwise identical training of the entry with the same trainer and hyperparameters and ``run: 1``
(its *base*), usually on a few folds only. Such rows are not methods: they are left out of the table,
the ranks and the tests, and measure the run-to-run spread.

Noise floor (:func:`noise_floor`)
---------------------------------
For every base method with repeats and every fold trained at least twice, the sample standard
deviation (``ddof=1``) over the runs of that fold's value (the evaluator's mean over the fold's
cases); ``sd_run`` is the root mean of those variances over all (method, fold) pairs, i.e. the
spread of one fold's value from one training to the next.

A method's table value is a mean over ``n`` folds, and a difference to the baseline a difference of
two such means; with independent trainings its run-to-run standard deviation is
``sd_diff = sd_run * sqrt(2 / n)``. The **noise floor of a difference** is ``2 * sd_diff``.

Verdict (:func:`differences`): a method is called *better* or *worse* than the baseline in a metric
only where both hold: the paired per-case Wilcoxon test (:func:`..stats.wilcoxon_vs_baseline`, all
validation cases of the folds both have) gives p < 0.05, and the difference of the means exceeds the
noise floor; otherwise *not distinguishable*. Direction: DSC higher is better, every other metric
lower (:func:`..stats.direction`), the signed calibration error SCE closer to 0 (its mean's absolute value). Without repeats there is no noise floor and no verdict.

Convergence (:func:`convergence`)
---------------------------------
From nnU-Net's own training logs (:func:`nnunet_calibration.experiments.status.training_history`):
per epoch the pseudo-Dice (mean over classes, NaN classes left out) and the training loss, each
averaged over the folds that logged that epoch. Over the last 20% of the epochs (at least 3) a least
squares line is fitted to the baseline's pseudo-Dice; ``rise`` is its slope times the window length.
The baseline *still rose* when ``rise`` > 0.01 (one Dice point).
"""
from __future__ import annotations

import math

import numpy as np

from nnunet_calibration.experiments import stats
from nnunet_calibration.experiments.report.data import METRICS, ExperimentResult, MethodResult

#: significance level of the paired per-case test
ALPHA = 0.05
#: the noise floor of a difference is this many run-to-run standard deviations of that difference
NOISE_SIGMAS = 2.0
#: share of the epochs whose trend decides "still rising", and the rise that counts (Dice points)
LAST_SHARE, RISE_THRESHOLD = 0.2, 0.01


def base_rows(e: ExperimentResult) -> list[MethodResult]:
    """The rows that are methods (no repeats)."""
    return [m for m in e.methods if m.repeat_of is None]


def noise_floor(e: ExperimentResult) -> dict:
    """``{metric: {"sd_run", "pairs", "methods"}}`` from the repeated runs (empty without repeats)."""
    by_base: dict[str, list[MethodResult]] = {}
    for m in e.methods:
        if m.repeat_of is not None:
            by_base.setdefault(m.repeat_of, []).append(m)
    rows = {m.method: m for m in e.methods}
    out = {}
    for metric in METRICS:
        variances, methods = [], set()
        for base, repeats in by_base.items():
            runs = [rows[base]] + repeats if base in rows else repeats
            for fold in sorted({f for r in runs for f in r.fold_means}):
                v = [r.fold_means[fold].get(metric, math.nan) for r in runs if fold in r.fold_means]
                v = [x for x in v if math.isfinite(x)]
                if len(v) >= 2:
                    variances.append(float(np.var(v, ddof=1)))
                    methods.add(base)
        if variances:
            out[metric] = {"sd_run": math.sqrt(float(np.mean(variances))), "pairs": len(variances),
                           "methods": sorted(methods)}
    return out


def differences(e: ExperimentResult, mean: dict, wilcoxon: dict, noise: dict) -> dict:
    """``{method: {metric: {"diff", "noise_floor", "p", "verdict"}}}`` against the baseline (module docstring).

    ``mean[method][f"{experiment}/{metric}"]``: the table's means; ``wilcoxon[method][metric]``: the
    tests of :func:`..stats.wilcoxon_vs_baseline`."""
    base = next((m for m in base_rows(e) if m.method == e.baseline), None)
    if base is None:
        return {}
    out = {}
    for m in base_rows(e):
        if m.method == e.baseline or not m.fold_means:
            continue
        n = len(set(m.fold_means) & set(base.fold_means)) or 1
        per = {}
        for metric in METRICS:
            b = f"{e.name}/{metric}"
            mv, bv = mean.get(m.method, {}).get(b, math.nan), mean.get(base.method, {}).get(b, math.nan)
            diff = mv - bv
            sd = noise.get(metric, {}).get("sd_run")
            floor = NOISE_SIGMAS * sd * math.sqrt(2.0 / n) if sd is not None else None
            p = (wilcoxon.get(m.method, {}).get(metric) or {}).get("pvalue")
            per[metric] = {"diff": diff, "noise_floor": floor, "p": p, "verdict": _verdict(metric, diff, floor, p, abs(mv) - abs(bv))}
        out[m.method] = per
    return out


def _verdict(metric: str, diff: float, floor, p, abs_diff: float = math.nan) -> str:
    """``abs_diff``: |method| - |baseline|, which decides better / worse for a signed metric (closer to 0)."""
    if floor is None:
        return "no noise floor"
    if p is None or not math.isfinite(diff) or not (isinstance(p, float) and math.isfinite(p)):
        return "not tested"
    if p < ALPHA and abs(diff) > floor:
        if stats.is_signed(metric):
            return "better" if abs_diff < 0 else "worse"
        return "better" if diff * stats.direction(metric) > 0 else "worse"
    return "not distinguishable"


def learned(e: ExperimentResult) -> dict | None:
    """Whether every fold of the baseline reached ``e.learned_dsc`` (validation DSC, the table's DSC column
    before postprocessing): ``{"method", "threshold", "folds": {fold: DSC}, "learned"}``; None if not asked."""
    base = next((m for m in base_rows(e) if m.method == e.baseline), None)
    if e.learned_dsc is None or base is None or not base.fold_means:
        return None
    folds = {f: v.get("DSC", math.nan) for f, v in sorted(base.fold_means.items())}
    return {"method": base.method, "threshold": e.learned_dsc, "folds": folds,
            "learned": all(math.isfinite(v) and v >= e.learned_dsc for v in folds.values())}


def curves(m: MethodResult) -> dict:
    """Per epoch, mean over the folds that logged it: ``{"epochs", "pseudo_dice", "train_loss"}`` (lists)."""
    per_epoch: dict[int, dict[str, list]] = {}
    for hist in m.history.values():
        for epoch, rec in hist.items():
            slot = per_epoch.setdefault(int(epoch), {"pseudo_dice": [], "train_loss": []})
            pd = [x for x in (rec.get("pseudo_dice") or []) if x is not None and math.isfinite(x)]
            if pd:
                slot["pseudo_dice"].append(float(np.mean(pd)))
            if rec.get("train_loss") is not None:
                slot["train_loss"].append(float(rec["train_loss"]))
    epochs = sorted(per_epoch)
    return {"epochs": epochs,
            "pseudo_dice": [float(np.mean(per_epoch[e]["pseudo_dice"])) if per_epoch[e]["pseudo_dice"] else math.nan
                            for e in epochs],
            "train_loss": [float(np.mean(per_epoch[e]["train_loss"])) if per_epoch[e]["train_loss"] else math.nan
                           for e in epochs]}


def convergence(e: ExperimentResult) -> dict | None:
    """Whether the baseline's pseudo-Dice still rose over the last 20% of its epochs (module docstring)."""
    base = next((m for m in base_rows(e) if m.method == e.baseline), None)
    if base is None or not base.history:
        return None
    c = curves(base)
    x = np.asarray(c["epochs"], float)
    y = np.asarray(c["pseudo_dice"], float)
    keep = np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 5:
        return None
    k = max(3, int(math.ceil(LAST_SHARE * len(x))))
    xs, ys = x[-k:], y[-k:]
    slope = float(np.polyfit(xs, ys, 1)[0])
    rise = slope * float(xs[-1] - xs[0])
    return {"method": base.method, "epochs": [int(xs[0]), int(xs[-1])], "rise": rise,
            "start": float(ys[:max(1, k // 4)].mean()), "end": float(ys[-max(1, k // 4):].mean()),
            "still_rising": rise > RISE_THRESHOLD, "threshold": RISE_THRESHOLD}
