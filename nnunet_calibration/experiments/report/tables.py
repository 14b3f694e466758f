"""The report's numbers: pure functions over a :class:`~.data.ReportData` (no files, no nnU-Net).

Table (:func:`compute_tables`)
------------------------------
- A method's value for a metric = the mean over its folds of the fold's ``summary["mean"][metric]``
  (the evaluator's mean over that fold's cases); its spread = the sample standard deviation over
  folds (``ddof=1``; none with one fold); undefined (NaN) fold values are left out
  (:func:`nnunet_calibration.utils.mean_std`). Columns: :data:`~.data.METRICS`.
- ``SCE`` (signed class-wise calibration error, mean over classes; > 0 over-confident, < 0
  under-confident) and, in table.csv / report.json, one ``SCE_<class>`` column per class
  (:func:`class_columns`); ``AURC``: per fold the evaluator's AURC of the default case score against
  1 - DSC (:func:`nnunet_calibration.evaluation.scores.default_aurc`), mean/std over folds as above.
- Best and second best per column (``best`` / ``second`` marks; ties share the mark; SCE: the value
  closest to 0):
  :func:`nnunet_calibration.experiments.stats.best_two`.
- Friedman average rank and test over the blocks "(experiment, metric)" of ``rank_metrics``:
  :mod:`nnunet_calibration.experiments.stats` (post-hoc rows are ranked as methods of their own).
- Wilcoxon signed-rank tests of every row against the experiment's baseline, per metric, paired over
  **per-case** values of all validation folds: :func:`.stats.wilcoxon_vs_baseline`.
- Threshold sweep: mean/std over cases, :func:`.posthoc.summarise_sweep`.

Post-hoc rows: cross-fitting (:func:`nnunet_calibration.posthoc.scaling.crossfit`)
-----------------------------------------------
A ``+ TS`` (temperature scaling) or ``+ VS`` (vector scaling, one temperature per channel) row
applies to fold ``k``'s validation predictions the parameters fitted on the voxels of the *other*
folds' validation cases, so no fold is scored with parameters fitted on itself (each fold's
validation cases are unseen by its network and by its scaling). With a single fold there are no
other folds: the parameters are then fitted on that fold itself, flagged ``cross_fitted=False``
and said in the report. The parameters fitted on *all* folds (in-sample) are reported in an extra
column: they are what one would apply to new predictions.

Which fit each row kind uses is chosen in ONE place, :data:`SCALINGS`; fitting, cross-fitting and
applying are :mod:`nnunet_calibration.posthoc.scaling`'s (``fit``/``crossfit`` on ``log_probs``
(N, C) and targets (N,) class indices or (N, C) region memberships; ``apply_scaling`` on a
``(C, ...)`` probability map).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field


from nnunet_calibration.experiments import posthoc, stats
from nnunet_calibration.experiments.report import noise
from nnunet_calibration.experiments.report.data import METRICS, SCE_CLASS_PREFIX, ExperimentResult, ReportData
from nnunet_calibration.utils import mean_std

# -- post-hoc scaling: the one place where the rows' fits are chosen ------------------------------
@dataclass(frozen=True)
class Scaling:
    """A post-hoc row kind: ``kind`` "TS" / "VS" (row suffix " + TS" / " + VS") and the
    :mod:`nnunet_calibration.posthoc.scaling` method it fits ("temperature" / "vector"); fitting,
    cross-fitting and applying are :func:`~nnunet_calibration.posthoc.scaling.fit`,
    :func:`~nnunet_calibration.posthoc.scaling.crossfit` and
    :func:`~nnunet_calibration.posthoc.scaling.apply_scaling` with that method."""

    kind: str
    method: str


#: row kind -> its scaling
SCALINGS = {"TS": Scaling("TS", "temperature"), "VS": Scaling("VS", "vector")}


def vector_scaling_differs(n_channels: int) -> bool:
    """Whether a ``+ VS`` row can differ from ``+ TS``: not with a single channel (one sigmoid region)."""
    return n_channels > 1


# -- the table -----------------------------------------------------------------------------------
@dataclass
class Tables:
    """The numbers of :func:`compute_tables`; ``block`` = ``"<experiment>/<metric>"``.

    ``mean[method][block]``, ``std[method][block]``; ``folds[method][experiment] = (present,
    missing)``; ``marks[block] = (best methods, second-best methods)``; ``avg_rank``/``position``
    per method and ``friedman`` (:func:`.stats.friedman_test`); ``wilcoxon[experiment][method][metric]``
    (:func:`.stats.wilcoxon_vs_baseline`); ``sweeps[experiment][method]`` (rows of
    :func:`.posthoc.summarise_sweep`); ``noise``, ``differences``, ``convergence`` per experiment
    (:mod:`.noise`). Repeated runs (``run`` > 1) are not rows of the table (see :mod:`.noise`).
    """

    method_order: list
    mean: dict
    std: dict
    folds: dict
    marks: dict
    avg_rank: dict
    position: dict
    friedman: dict
    rank_metrics: tuple
    wilcoxon: dict = field(default_factory=dict)
    sweeps: dict = field(default_factory=dict)
    #: per experiment: :func:`.noise.noise_floor`, :func:`.noise.differences`, :func:`.noise.convergence`
    noise: dict = field(default_factory=dict)
    differences: dict = field(default_factory=dict)
    convergence: dict = field(default_factory=dict)
    #: per experiment: the per-class columns (``SCE_<class>``, :func:`class_columns`), in table.csv and report.json
    class_columns: dict = field(default_factory=dict)

    def mark(self, method: str, block: str) -> str:
        best, second = self.marks.get(block, (set(), set()))
        return "best" if method in best else ("second" if method in second else "")


def method_order(data: ReportData) -> list:
    """Row order: first appearance over the experiments (a trainer, then its post-hoc rows)."""
    order = []
    for e in data.experiments:
        for m in noise.base_rows(e):
            if m.method not in order:
                order.append(m.method)
    return order


def class_columns(e: ExperimentResult) -> list:
    """The per-class signed calibration error columns ``SCE_<class>`` of an experiment: its classes' order,
    then any other such key its rows' fold means hold (only those some row has)."""
    present = []
    for m in noise.base_rows(e):
        for fm in m.fold_means.values():
            present += [k for k in fm if k.startswith(SCE_CLASS_PREFIX) and k not in present]
    ordered = [SCE_CLASS_PREFIX + c for c in e.classes if SCE_CLASS_PREFIX + c in present]
    return ordered + [k for k in present if k not in ordered]


def fold_aggregate(fold_means: dict, metric: str) -> tuple[float, float]:
    """Mean and sample std over folds of one metric (NaN folds left out)."""
    return mean_std([fm.get(metric, float("nan")) for fm in fold_means.values()])


def compute_tables(data: ReportData) -> Tables:
    """Table values, marks, Friedman ranks and test, Wilcoxon tests and sweeps (see module docstring)."""
    bad = sorted(set(data.rank_metrics) - set(METRICS))
    if bad:
        raise ValueError(f"rank metrics {bad} unknown; metrics: {list(METRICS)}")
    order = method_order(data)
    mean, std, folds = {m: {} for m in order}, {m: {} for m in order}, {m: {} for m in order}
    per_class = {e.name: class_columns(e) for e in data.experiments}
    for e in data.experiments:
        for m in noise.base_rows(e):
            for metric in list(METRICS) + per_class[e.name]:
                mean[m.method][f"{e.name}/{metric}"], std[m.method][f"{e.name}/{metric}"] = \
                    fold_aggregate(m.fold_means, metric)
            folds[m.method][e.name] = (list(m.folds), list(m.missing_folds))
    marks = {}
    for e in data.experiments:
        for metric in list(METRICS) + per_class[e.name]:
            b = f"{e.name}/{metric}"
            marks[b] = stats.best_two({k: mean[k].get(b) for k in order}, metric)
    rank_values = {m: {b: v for b, v in mean[m].items() if b.rsplit("/", 1)[-1] in data.rank_metrics}
                   for m in order}
    avg_rank, position, _ = stats.friedman_ranks(rank_values)
    ftest = stats.friedman_test(rank_values)
    wilcoxon, sweeps = {}, {}
    for e in data.experiments:
        if e.baseline is not None and any(m.method == e.baseline for m in e.methods):
            for metric in METRICS:
                per_case = {m.method: {c: v.get(metric, math.nan) for c, v in m.cases.items()}
                            for m in noise.base_rows(e)}
                for meth, r in stats.wilcoxon_vs_baseline(per_case, e.baseline, metric).items():
                    wilcoxon.setdefault(e.name, {}).setdefault(meth, {})[metric] = r
        for m in e.methods:
            if m.sweep_counts:
                sweeps.setdefault(e.name, {})[m.method] = posthoc.summarise_sweep(m.sweep_counts)
    floors = {e.name: noise.noise_floor(e) for e in data.experiments}
    diffs = {e.name: noise.differences(e, mean, wilcoxon.get(e.name, {}), floors[e.name]) for e in data.experiments}
    conv = {e.name: noise.convergence(e) for e in data.experiments}
    return Tables(order, mean, std, folds, marks, avg_rank, position, ftest, tuple(data.rank_metrics),
                  wilcoxon, sweeps, floors, diffs, conv, per_class)


def has_results(data: ReportData) -> bool:
    """Whether any row has at least one finished fold (an empty report is an error)."""
    return any(m.fold_means for e in data.experiments for m in e.methods)
