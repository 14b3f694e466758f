"""Calibration and segmentation metrics (numpy/scipy only, nothing from nnU-Net or torch).

Public API: :func:`ece`, :func:`cece` (both with ``binning="uniform"|"adaptive"``), :func:`pece`,
:func:`marginal_calibration_errors`, :func:`nll`, :func:`brier` (calibration; all take ``regions=False``
and, for sigmoid regions, ``regions=True, region_labels=[...]``), :func:`dice`, :func:`hd95` (per
binary mask), and :class:`CalibrationAccumulator` for exact pooled (dataset-wide) values.
More estimates (issue 23): :func:`signed_calibration_error`, :func:`debiased_l2_ece`
(:mod:`.ece_variants`), :func:`boundary_band` / :func:`boundary_ece` (:mod:`.boundary`),
:func:`bootstrap_ci` / :class:`CaseStatistics` (:mod:`.bootstrap`), case-level confidence scores
(:mod:`.case_scores`) and risk-coverage analysis (:mod:`.risk_coverage`).
Conventions are documented in :mod:`.calibration`, :mod:`.segmentation`, :mod:`._binning` and
:mod:`._adaptive` (equal-mass bins) and in each module named above; the accumulator is in
:mod:`.accumulator`.
"""
from nnunet_calibration.settings.metrics import CONVENTIONS

from ._adaptive import ValueStats
from ._binning import BinStats, SumStats, bin_edges, bin_index
from .accumulator import METRIC_KEYS, CalibrationAccumulator
from .calibration import (brier, cece, ece, marginal_calibration_errors, nll, normalize_regions, pece,
                          resolve_region_labels, validate_inputs, validate_labels, validate_probabilities)
from .bootstrap import BootstrapInterval, CaseStatistics, bootstrap_ci
from .boundary import boundary_band, boundary_ece, default_band_width
from .case_scores import (boundary_entropy, expected_dice, foreground_entropy, mean_pairwise_dice,
                          uncertain_fraction)
from .ece_variants import debiased_l2_ece, signed_calibration_error
from .risk_coverage import RiskCoverageCurve, augrc, aurc, eaurc, risk_coverage_curve
from .segmentation import dice, hd95, image_diagonal, surface_distances

__all__ = [
    "ece", "cece", "pece", "marginal_calibration_errors", "nll", "brier", "dice", "hd95",
    "image_diagonal", "surface_distances", "CalibrationAccumulator", "BinStats", "SumStats", "ValueStats",
    "bin_edges", "bin_index",
    "validate_inputs", "validate_probabilities", "validate_labels", "normalize_regions", "resolve_region_labels",
    "METRIC_KEYS", "CONVENTIONS",
    "signed_calibration_error", "debiased_l2_ece", "boundary_band", "boundary_ece", "default_band_width",
    "bootstrap_ci", "BootstrapInterval", "CaseStatistics",
    "foreground_entropy", "boundary_entropy", "expected_dice", "uncertain_fraction", "mean_pairwise_dice",
    "risk_coverage_curve", "RiskCoverageCurve", "aurc", "eaurc", "augrc",
]
