"""The calibration metrics' options (:class:`MetricOptions`): one place for their defaults and ranges.

Taken by :class:`nnunet_calibration.metrics.CalibrationAccumulator`, by the evaluator
(:func:`nnunet_calibration.evaluation.evaluate_folders`), by ``calib-evaluate`` (one option per
field) and by the experiment file (``evaluation.options``). The conventions each option controls
are documented in :mod:`nnunet_calibration.metrics.calibration`.
"""
from __future__ import annotations

from dataclasses import dataclass

from ._typed import (BOOL, HALF_OPEN_UNIT_INTERVAL, NON_NEGATIVE, NON_NEGATIVE_INT, OPEN_UNIT_INTERVAL, POSITIVE,
                     POSITIVE_INT, Settings, SettingsError, one_of, setting)

#: ``"default"``: the metrics as documented; ``"sdc-code"``: as the SDC authors' evaluation code
CONVENTIONS = ("default", "sdc-code")
#: ``convention="sdc-code"``: the SDC authors' code uses 10 ECE bins (unless ``n_bins_ece`` is given)
SDC_CODE_N_BINS_ECE = 10
#: the binning schemes of ECE and CECE (:mod:`nnunet_calibration.metrics._adaptive`)
BINNINGS = ("uniform", "adaptive")
#: the bootstrap intervals' confidence level and random seed (:mod:`nnunet_calibration.metrics.bootstrap`)
BOOTSTRAP_CONFIDENCE = 0.95
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class MetricOptions(Settings):
    """Options of the calibration metrics (frozen; checked when made)."""

    SECTION = "evaluation.options"

    n_bins_ece: int = setting(15, POSITIVE_INT, f"bins of ECE ({SDC_CODE_N_BINS_ECE} with --convention sdc-code "
                                                "unless given)")
    n_bins_cece: int = setting(10, POSITIVE_INT, "bins of CECE")
    n_bins_pece: int = setting(10, POSITIVE_INT, "bins of pECE")
    n_bins_ace: int = setting(20, POSITIVE_INT, "bins of mL1-ACE/ECE/MCE and of the reliability diagrams")
    fp_weight: float = setting(2.0, POSITIVE, "false-positive weight of pECE")
    cece_threshold: float = setting(1e-3, HALF_OPEN_UNIT_INTERVAL, "CECE keeps the voxels with p_c > threshold")
    include_background: bool = setting(False, BOOL, "include the background class in mL1-ACE/ECE/MCE (softmax only)")
    nll_eps: float = setting(1e-7, OPEN_UNIT_INTERVAL, "probabilities are clipped to >= eps in NLL")
    convention: str = setting(
        "default", one_of(CONVENTIONS),
        "'default': the metrics as documented (per-class DSC/HD95 in mm, foreground ECE of Eq. 6, CECE over the "
        "foreground classes); 'sdc-code': as the SDC authors' evaluation code (EagleAdelaide/SDC-Loss "
        "src/sdc/metrics.py), for numbers next to the paper's tables: ECE = binary ECE of 1-p_background vs "
        "label!=0 over all voxels (10 bins), CECE over all classes incl. background, DSC/HD95 of the foreground "
        "union (HD95 in voxels)")

    binning: str = setting(
        "uniform", one_of(BINNINGS),
        "bins of ECE, CECE, the debiased L2 ECE and the boundary-band ECE: 'uniform' (equal width) or 'adaptive' "
        "(equal mass: n bins of equally many voxels, Nixon et al. 2019; default convention only)")
    boundary_k_mm: float = setting(
        None, NON_NEGATIVE,
        "half-width in mm of the reference boundary band of the boundary-band ECE ('boundary-ECE') "
        "(default: 2 voxels of the case's largest spacing)", type=float)
    bootstrap: int = setting(
        1000, NON_NEGATIVE_INT,
        f"bootstrap resamples of the cases for the {BOOTSTRAP_CONFIDENCE:.0%} intervals of the pooled ECE and "
        "debiased L2 ECE (summary.json 'bootstrap'; 0: none; with --binning adaptive 0 unless given: every "
        "resample re-forms the equal-mass bins from all values, ~10 ns per value and resample)")

    def check(self) -> None:
        if self.binning == "adaptive" and self.convention == "sdc-code":
            raise SettingsError("binning 'adaptive' is for the default convention only (the SDC code's ECE and "
                                "CECE use equal-width bins)")

    @classmethod
    def prepare(cls, data: dict) -> dict:
        if data.get("convention") == "sdc-code" and "n_bins_ece" not in data:
            data["n_bins_ece"] = SDC_CODE_N_BINS_ECE
        if data.get("binning") == "adaptive" and "bootstrap" not in data:
            # equal-mass bins are re-formed from all values in every resample: measured about 10 ns per
            # value and resample, i.e. minutes for 1000 resamples of 40 BraTS-sized volumes
            data["bootstrap"] = 0
        return data
