"""What the report is made of: typed records filled by :mod:`.gather`, read by :mod:`.tables`,
:mod:`.render` and :mod:`.plots` (no nnU-Net, no files: hand-made instances are enough for tests).

One :class:`ReportData` holds one :class:`ExperimentResult` per experiment file; each holds one
:class:`MethodResult` per table row: a trainer, or a trainer after post-hoc scaling (``kind``
``"TS"`` / ``"VS"``, see :mod:`.tables` for the cross-fitting).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from nnunet_calibration.metrics import BinStats
from nnunet_calibration.settings import DEFAULT_RANK_METRICS, REPORT_METRICS

#: table columns, in order (the evaluator's summary keys; DSC/HD95: mean over foreground classes)
METRICS = REPORT_METRICS
#: per-case key in the evaluator's summary for each table metric (others: the metric's own name)
CASE_KEYS = {"DSC": "DSC_mean", "HD95": "HD95_mean"}
#: table metrics that are not a key of the evaluator's ``summary["mean"]``: the AURC (of the default case
#: score against 1 - DSC, from ``summary["risk_coverage"]``; one value per fold, none per case)
FOLD_ONLY = ("AURC",)
#: prefix of the per-class columns of the signed calibration error (``SCE_<class>``, table.csv and report.json)
SCE_CLASS_PREFIX = "SCE_"
#: row-name suffix of each post-hoc kind
SUFFIX = {"trainer": "", "TS": " + TS", "VS": " + VS"}


@dataclass
class PosthocFit:
    """Parameters of a post-hoc row: cross-fitted per fold, plus the in-sample fit on all folds.

    ``per_fold[k]``: the parameters applied to fold ``k`` (a temperature, or one per channel),
    fitted on the other folds' validation voxels (``cross_fitted=True``); with a single fold there
    is nothing else to fit on, so it is fitted on that fold itself (``cross_fitted=False``, and the
    report says so). ``all_folds``: fitted on every fold's voxels (in-sample for the table; the value
    to apply to new predictions). ``fit_voxels[k]``: voxels behind ``per_fold[k]``. ``scope``: see the field.
    """

    method: str  # "temperature" or "vector"
    per_fold: dict
    all_folds: object
    fit_voxels: dict
    cross_fitted: bool
    #: which predictions the parameters are for, in the words of ``calibration.json``'s ``scope``
    #: (:func:`nnunet_calibration.posthoc.model.per_fold_scope`): the report's rows are always fitted
    #: on single-fold validation predictions, never on the fold ensemble
    scope: str = ""


@dataclass
class MethodResult:
    """One row of the table (one trainer, or one trainer after post-hoc scaling).

    ``fold_means[fold][metric]``: the evaluator's mean over that fold's cases (``AURC``: the fold's
    risk-coverage area; also ``SCE_<class>`` per calibration class); ``cases[case]``:
    per-case values (``{metric: value, "fold": fold}``); ``train_seconds[fold]``: training time of
    that fold, the sum of nnU-Net's logged epoch times (validation and export not included; empty
    for post-hoc rows); ``reliability``: the metrics
    accumulator's ECE statistics pooled over every validation case (``None`` if not computed);
    ``pooled``: :meth:`CalibrationAccumulator.compute` over all those cases; ``sweep_counts``: per
    case the ``(thresholds, 3)`` tp/fp/fn counts of :func:`.posthoc.threshold_counts`; ``run`` /
    ``repeat_of``: a repeated training (not a method, see :mod:`.noise`); ``history``: per fold and
    epoch nnU-Net's logged pseudo-Dice, losses and epoch time (trainer rows).
    """

    method: str
    trainer: str
    kind: str = "trainer"  # "trainer", "TS" or "VS"
    hparams: dict = field(default_factory=dict)
    folds: list = field(default_factory=list)
    missing_folds: list = field(default_factory=list)
    missing_info: list = field(default_factory=list)
    fold_means: dict = field(default_factory=dict)
    train_seconds: dict = field(default_factory=dict)
    cases: dict = field(default_factory=dict)
    reliability: Optional[BinStats] = None
    pooled: dict = field(default_factory=dict)
    sweep_counts: list = field(default_factory=list)
    fit: Optional[PosthocFit] = None
    #: repeat index (``TrainerEntry.run``) and, for run > 1, the label of the run-1 row it repeats
    run: int = 1
    repeat_of: Optional[str] = None
    #: nnU-Net's per-epoch log of each fold (:func:`nnunet_calibration.experiments.status.training_history`)
    history: dict = field(default_factory=dict)
    #: the postprocessing applied to each fold for the +PP columns (in words) and whether cross-fitted
    postprocessing: dict = field(default_factory=dict)
    postprocessing_cross_fitted: bool = True


@dataclass
class ExperimentResult:
    """One experiment file: what it asked for and its rows."""

    name: str
    dataset: str
    configuration: str
    plans: str
    folds: list
    baseline: Optional[str]
    methods: list  # [MethodResult]
    path: str = ""
    #: name of the experiment file's copy inside the report folder ('' when none was written)
    copy: str = ""
    training: dict = field(default_factory=dict)
    note: str = ""
    trainers: list = field(default_factory=list)  # [{"label", "trainer", "hparams", "nnUNet_results"}]
    regions: bool = False
    #: report.learned_dsc: the validation DSC every baseline fold should reach (None: not checked)
    learned_dsc: Optional[float] = None
    #: the calibration classes (foreground classes or regions): the per-class ``SCE_<class>`` columns
    classes: list = field(default_factory=list)


@dataclass
class ReportData:
    """Everything the report shows. ``rank_metrics``: the metrics the Friedman ranks use."""

    name: str
    experiments: list  # [ExperimentResult]
    rank_metrics: tuple = DEFAULT_RANK_METRICS
    command: Optional[str] = None
    machine: dict = field(default_factory=dict)

    @property
    def multi(self) -> bool:
        return len(self.experiments) > 1
