"""The pooled (dataset-wide) calibration metrics: :class:`CalibrationAccumulator`.

Conventions of every metric: :mod:`nnunet_calibration.metrics.calibration`.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple, Union

import numpy as np

from nnunet_calibration.settings.metrics import MetricOptions

from ._adaptive import ValueStats, sort_keys
from ._binning import BinStats, SumStats, bin_edges
from ._checks import Regions, _check_types_and_shapes, _validate, resolve_region_labels
from ._chunk import _Chunk, _chunks, _work_dtype
from ._kernels import (_brier_kernel, _cece_kernel, _cece_values, _class_channels, _ece_kernel, _ece_tasks,
                       _ece_values, _marginal_kernel, _nll_kernel, _pece_kernel, _sdc_cece_compute, _sdc_ece_compute)
from .boundary import _boundary_ece_update
from .calibration import (_brier_compute, _cece_compute, _ece_compute, _marginal_compute, _marginal_per_class,
                          _nll_compute, _pece_compute)
from .ece_variants import _debiased_compute, _signed_compute

__all__ = ["CalibrationAccumulator", "METRIC_KEYS"]

METRIC_KEYS = ("ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier", "SCE", "debiased-L2-ECE",
               "boundary-ECE")


class CalibrationAccumulator:
    """All calibration metrics, accumulated over any number of cases; picklable and mergeable.

    ``update(probs, labels)`` adds a case (one pass over its voxels, chunked); ``compute()``
    returns ``{"ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier"}`` computed
    from the summed per-bin statistics, i.e. the exact values one would get by concatenating the
    voxels of all cases into one big case ("pooled"). With a single case it equals the public
    functions (``ece``, ``cece``, ...) on that case. ``a + b`` / ``a.merge(b)`` combine accumulators
    filled in different processes (same options and label layout required).

    ``options``: a :class:`nnunet_calibration.settings.MetricOptions` (default: its defaults), the
    options and conventions of the public functions; ``include_background`` applies to the marginal
    errors only. The label layout: ``regions`` / ``region_labels`` as in :func:`resolve_region_labels`,
    ``ignore_index`` below.

    Conventions (``options.convention``):

    * ``"default"``: ECE, CECE, pECE as documented in :func:`ece`, :func:`cece`, :func:`pece`;
      ``options.binning`` ``"adaptive"``: ECE and CECE (and the two below) with equal-mass bins, their
      statistics :class:`~._adaptive.ValueStats` (exact and mergeable: the values' keys, 4 bytes per
      float32 value, and a histogram of buckets).
    * ``"SCE"``: mean over the classes of :func:`.ece_variants.signed_calibration_error` (CECE's voxels,
      threshold ``cece_threshold``; > 0 over-confident), per class :meth:`signed_per_class`;
      ``"debiased-L2-ECE"``: :func:`.ece_variants.debiased_l2_ece` from ECE's statistics (same voxels and
      bins as the ECE); ``"boundary-ECE"``: :func:`.boundary.boundary_ece` with half-width
      ``options.boundary_k_mm`` (default 2 x the case's largest spacing) and ECE's bins, only when every
      case was given its ``spacing`` in :meth:`update` (else NaN: a band needs millimetres). Ignore label:
      the band is that of the reference with the ignore label as one more label; ignored voxels are then
      left out like everywhere else.
    * ``"sdc-code"``: ECE and CECE as the SDC authors' published evaluation code computes them
      (EagleAdelaide/SDC-Loss ``src/sdc/metrics.py``, so that numbers can be put next to the paper's
      tables): ECE = binary ECE of the foreground probability ``1 - p_background`` (regions: the
      largest region probability) against ``label != 0`` over *all* voxels, bins ``(lo, hi]``
      literally (``p = 0`` falls into no bin but counts in the denominator N = number of voxels),
      ``sum_b n_b/N |mean p_b - mean y_b|``; CECE = for every class *including the background*
      (softmax; every region for regions) the binary ECE of ``p_c`` against ``[label == c]`` over the
      voxels with ``p_c > cece_threshold``, averaged over the classes that kept a voxel (0.0 if none).
      Use 10 bins for both (``n_bins_ece=10``; the evaluator does that by itself). pECE, the
      marginal errors, NLL and Brier are the same in both conventions.

    Ignore label: with ``ignore_index`` (nnU-Net's ``ignore`` label value), every voxel whose
    reference label equals ``ignore_index`` is removed before anything is counted, i.e. every metric
    is the metric of the remaining voxels only (as if the ignored voxels did not exist; this is how
    nnU-Net excludes them from its loss and its DSC). ``None``: no voxel is ignored.
    """

    def __init__(self, options: Optional[MetricOptions] = None, *, regions: bool = False,
                 region_labels: Regions = None, ignore_index: Optional[int] = None):
        if options is None:
            options = MetricOptions()
        elif not isinstance(options, MetricOptions):
            raise TypeError(f"options must be a MetricOptions, got {type(options).__name__}")
        for n in (options.n_bins_ece, options.n_bins_cece, options.n_bins_pece, options.n_bins_ace):
            bin_edges(n)
        self.options = options
        #: the label layout: softmax or regions (with their label tuples) and the ignored label
        self.layout = dict(regions=bool(regions), region_labels=resolve_region_labels(regions, region_labels),
                           ignore_index=None if ignore_index is None else int(ignore_index))
        self.n_cases = 0
        #: cases whose ``update`` had a spacing (the boundary-band ECE is defined when all had)
        self.n_boundary_cases = 0
        self.n_channels: Optional[int] = None
        self.stats: Optional[Dict[str, Union[BinStats, SumStats, ValueStats]]] = None

    # -- filling ---------------------------------------------------------------------------------
    def _init_stats(self, n_channels: int):
        o = self.options
        regions = self.layout["region_labels"]
        self.n_channels = n_channels
        sdc = o.convention == "sdc-code"
        stats = ValueStats.zeros if o.binning == "adaptive" else BinStats.zeros
        self.stats = {
            "ece": stats(1 if sdc else _ece_tasks(n_channels, regions), o.n_bins_ece),
            "cece": stats(len(_class_channels(n_channels, regions, sdc)), o.n_bins_cece),
            "boundary": stats(_ece_tasks(n_channels, regions), o.n_bins_ece),
            "pece": BinStats.zeros(1, o.n_bins_pece),
            "marginal": BinStats.zeros(len(_class_channels(n_channels, regions, o.include_background)),
                                       o.n_bins_ace),
            "nll": SumStats(),
            "brier": SumStats(),
        }

    def update(self, probs, labels, validate_args: bool = False, spacing=None) -> "CalibrationAccumulator":
        """Add one case. ``validate_args=True`` also checks the values (see :func:`validate_inputs`).
        ``spacing``: voxel size in mm in the array's axis order, for the boundary-band ECE (without it
        that metric is NaN)."""
        o = self.options
        probs, labels, regions = _check_types_and_shapes(probs, labels, self.layout["region_labels"])
        ignore = self.layout["ignore_index"]
        if validate_args:
            allowed = None
            if ignore is not None:
                allowed = (list(range(probs.shape[0])) if regions is None
                           else sorted({0, *[i for r in regions for i in r]})) + [ignore]
            _validate(probs, labels, regions, allowed)
        if self.stats is None:
            self._init_stats(probs.shape[0])
        elif probs.shape[0] != self.n_channels:
            raise ValueError(f"case has {probs.shape[0]} channels, earlier cases had {self.n_channels}")
        dt = _work_dtype(probs)
        e_ece, e_cece = bin_edges(o.n_bins_ece, dt), bin_edges(o.n_bins_cece, dt)
        e_pece, e_ace = bin_edges(o.n_bins_pece, dt), bin_edges(o.n_bins_ace, dt)
        s = self.stats
        sdc = o.convention == "sdc-code"
        adaptive = o.binning == "adaptive"
        keys = {"ece": [[] for _ in s["ece"].total], "cece": [[] for _ in s["cece"].total]}  # adaptive: sort keys
        offered = {k: np.zeros(len(v), np.int64) for k, v in keys.items()}
        # CECE and the marginal errors both need, per channel, the voxels above a threshold: gathered
        # once above the smaller one (see _Chunk.above)
        base = min(dt.type(o.cece_threshold), e_ace[1])
        for pc, lc in _chunks(probs, labels):
            if ignore is not None:
                keep = lc != ignore
                if not keep.all():
                    pc, lc = pc[:, keep], lc[keep]
                if lc.size == 0:
                    continue
            ch = _Chunk(pc, lc, regions, base)
            if sdc:
                _pece_kernel(ch, s["ece"], e_ece)  # same statistics: foreground probability, y = fg, 0 in no bin
            elif adaptive:
                _gather_keys(_ece_values(ch), keys["ece"], offered["ece"])
            else:
                _ece_kernel(ch, s["ece"], e_ece)
            _marginal_kernel(ch, s["marginal"], e_ace, o.include_background)
            if adaptive:
                _gather_keys(_cece_values(ch, o.cece_threshold, sdc), keys["cece"], offered["cece"])
            else:
                _cece_kernel(ch, s["cece"], e_cece, o.cece_threshold, sdc)  # after: may fold the ACE bins
            _pece_kernel(ch, s["pece"], e_pece)
            _nll_kernel(ch, s["nll"], o.nll_eps)
            _brier_kernel(ch, s["brier"])
        if adaptive:
            for k in keys:
                case = ValueStats.zeros(len(keys[k]), s[k].n_bins)
                for t, kt in enumerate(keys[k]):
                    case.set_from_keys_(t, kt, int(offered[k][t]))
                s[k] = case if self.n_cases == 0 else s[k] + case
        if spacing is not None:
            band = _boundary_ece_update(probs, labels, spacing, o.boundary_k_mm, o.n_bins_ece, regions, o.binning,
                                        ignore_index=ignore)
            s["boundary"] = band if self.n_boundary_cases == 0 else s["boundary"] + band
            self.n_boundary_cases += 1
        self.n_cases += 1
        return self

    # -- merging ---------------------------------------------------------------------------------
    def merge(self, other: "CalibrationAccumulator") -> "CalibrationAccumulator":
        """A new accumulator holding both (neither input is modified)."""
        if not isinstance(other, CalibrationAccumulator):
            raise TypeError(f"cannot merge CalibrationAccumulator with {type(other).__name__}")
        if other.options != self.options or other.layout != self.layout:
            raise ValueError(f"cannot merge accumulators with different options or label layouts: "
                             f"{self.options}, {self.layout} vs {other.options}, {other.layout}")
        out = CalibrationAccumulator(self.options, **self.layout)
        out.n_cases = self.n_cases + other.n_cases
        out.n_boundary_cases = self.n_boundary_cases + other.n_boundary_cases
        if self.stats is None or other.stats is None:
            src = self if other.stats is None else other
            out.n_channels = src.n_channels
            out.stats = None if src.stats is None else {k: _copy_stats(v) for k, v in src.stats.items()}
            return out
        if self.n_channels != other.n_channels:
            raise ValueError(f"cannot merge accumulators of {self.n_channels} and {other.n_channels} channels")
        out.n_channels = self.n_channels
        out.stats = {k: self.stats[k] + other.stats[k] for k in self.stats}
        return out

    __add__ = merge

    # -- results ---------------------------------------------------------------------------------
    def compute(self) -> Dict[str, float]:
        """``{"ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier", "SCE", "debiased-L2-ECE",
        "boundary-ECE"}`` (:data:`METRIC_KEYS`; NaN if empty)."""
        if self.stats is None:
            return {k: float("nan") for k in METRIC_KEYS}
        s = self.stats
        if self.options.convention == "sdc-code":
            out = {"ECE": _sdc_ece_compute(s["ece"]), "CECE": _sdc_cece_compute(s["cece"])}
        else:
            out = {"ECE": _ece_compute(s["ece"]), "CECE": _cece_compute(s["cece"])}
        out["pECE"] = _pece_compute(s["pece"], self.options.fp_weight)
        out.update(_marginal_compute(s["marginal"]))
        out["NLL"] = _nll_compute(s["nll"])
        out["Brier"] = _brier_compute(s["brier"])
        sce = self.signed_per_class()
        out["SCE"] = float(np.nanmean(sce)) if np.isfinite(sce).any() else float("nan")
        out["debiased-L2-ECE"] = _debiased_compute(s["ece"])
        out["boundary-ECE"] = (_ece_compute(s["boundary"]) if self.n_boundary_cases == self.n_cases
                               else float("nan"))
        return out

    def signed_per_class(self) -> np.ndarray:
        """Signed calibration error of every foreground class (softmax channels 1..C-1, or every region;
        :func:`.ece_variants.signed_calibration_error`, from CECE's statistics), NaN for a class without
        voxels above ``cece_threshold``."""
        if self.stats is None:
            raise ValueError("accumulator is empty")
        per = _signed_compute(self.stats["cece"])
        sdc_background = self.options.convention == "sdc-code" and self.layout["region_labels"] is None
        return per[1:] if sdc_background else per  # sdc-code's CECE statistics hold the background first

    def marginal_per_class(self) -> Dict[str, np.ndarray]:
        """Per-class mL1-ACE/ECE/MCE arrays (class order as in the marginal statistics)."""
        if self.stats is None:
            raise ValueError("accumulator is empty")
        return _marginal_per_class(self.stats["marginal"])

    def reliability(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Pooled reliability data per class from the marginal (ACE) statistics.

        Returns ``(edges, n, mean_confidence, observed_frequency)``, the last three ``(K, n_bins_ace)``
        with NaN for empty bins; class k is foreground channel k+1 (softmax, or channel k with
        ``include_background``) or region k.
        """
        if self.stats is None:
            raise ValueError("accumulator is empty")
        n, conf, freq = self.stats["marginal"].reliability()
        return bin_edges(self.options.n_bins_ace, np.float64), n, conf, freq


def _gather_keys(triples, keys: list, offered: np.ndarray) -> None:
    """Append the :func:`~._adaptive.sort_keys` of ``(task, value, outcome)`` triples per task."""
    for t, v, y in triples:
        keys[t].append(sort_keys(v, y))
        offered[t] += v.size


def _copy_stats(s):
    if isinstance(s, ValueStats):
        return s.copy()
    if isinstance(s, BinStats):
        return BinStats(s.count.copy(), s.conf_sum.copy(), s.total.copy())
    return SumStats(s.total, s.count)
