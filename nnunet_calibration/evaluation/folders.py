"""Evaluate nnU-Net prediction folders: DSC, HD95 and every calibration metric, per case and pooled.

Inputs
------
* ``pred_folders``: one or more folders holding ``CASE.npz`` (key ``probabilities``, float32
  ``(C, z, y, x)``) as written by ``nnUNetv2_predict --save_probabilities`` or by
  ``nnUNetv2_train --npz`` (``fold_X/validation``). All ``*.npz`` files of a folder are cases.
* ``gt_folder``: the references ``CASE{file_ending}`` (``file_ending`` from dataset.json), read
  with the reader/writer nnU-Net picks for the dataset (``determine_reader_writer_from_dataset_json``,
  so ``.nii.gz``, ``.png``, ``.tif``, ... all work) after :func:`nnunet_calibration.io.verify_image_file`
  (truncated / corrupt ``.gz`` streams are errors). The spacing comes from the reader's properties
  (nnU-Net's (z, y, x) order). A 2D image (nnU-Net's convention: one slice, first spacing 999 x the
  others) is evaluated in 2D, with probabilities of shape (C, 1, y, x) as nnU-Net stores them.
* expected cases: every reference in ``gt_folder`` (or ``cases=``); missing predictions /
  references and duplicate case ids are errors unless ``allow_missing`` (see :func:`collect_jobs`).
* geometry: spacing, shape, origin and direction of nnU-Net's ``CASE.pkl`` (or segmentation
  ``CASE{file_ending}``) in the prediction folder must match the reference within the tolerances
  of :mod:`nnunet_calibration.io` (see :func:`.reading.geometry_problems`).
* ``dataset_json``: default: ``dataset.json`` in the first prediction folder (nnU-Net copies it
  there), else in its parent or grand-parent (the model folder, for ``fold_X/validation``).
  Its ``labels`` and ``regions_class_order`` decide, through nnU-Net's ``LabelManager``, whether the
  channels are softmax classes (channel c = label c, background included) or sigmoid regions. An
  ``ignore`` label is supported as nnU-Net does it: its voxels are left out of every metric.

Per case (:mod:`.case`)
-----------------------
* segmentation exactly as nnU-Net makes it from the probabilities (the result of
  ``LabelManager.convert_probabilities_to_segmentation``: argmax, or region thresholds at 0.5 in
  ``regions_class_order``; computed channel by channel to avoid a full-size copy, see
  :func:`.segmentation.probabilities_to_segmentation`); DSC and HD95
  (:func:`.segmentation.segmentation_metrics`) per foreground class / region
  (``nnunetv2.evaluation.evaluate_predictions.region_or_label_to_mask``) with the conventions of
  :mod:`nnunet_calibration.metrics.segmentation` (both empty: DSC 1, HD95 0; one empty: DSC 0, HD95
  = image diagonal in mm, and the case gets a flag); ``DSC_mean``/``HD95_mean`` = mean over classes.
* calibration metrics of :mod:`nnunet_calibration.metrics`, from one
  :class:`CalibrationAccumulator` per case: ECE, CECE (``binning`` uniform or adaptive), pECE, the
  marginal errors, NLL, Brier, ``SCE`` (signed class-wise calibration error, mean over classes; > 0
  over-confident; per class ``SCE_classes``), ``debiased-L2-ECE`` (Kumar et al. 2019, on ECE's voxels
  and bins) and ``boundary-ECE`` (ECE within ``boundary_k_mm`` mm of the reference boundary, default 2
  voxels of the case's largest spacing; NaN without a band).
* case-level confidence scores (``case["scores"]``, :mod:`.scores`): foreground / boundary entropy,
  expected Dice, uncertain fraction.

Data set level
--------------
* ``mean``: mean over cases of the per-case values (NaN values, e.g. the ECE of a case without
  foreground, are left out of the mean; ``null`` in JSON if every case is NaN).
* ``pooled``: exact data-set-wide values from the summed per-bin statistics of all cases (equal-mass
  bins with ``binning="adaptive"``: from the cases' values, :class:`~nnunet_calibration.metrics.ValueStats`,
  as exact and mergeable); ``SCE_<class>``: the signed calibration error per calibration class.
* ``bootstrap``: percentile intervals of the pooled ECE and debiased L2 ECE over resampled cases
  (:func:`bootstrap_summary`; ``--bootstrap N``, 0: none).
* ``risk_coverage``: per score and risk (1 - DSC, HD95) the AURC, e-AURC and AUGRC over the cases
  (NaN convention: :mod:`.scores`).

Output (``out_dir``, :mod:`.output`): ``summary.json``, ``per_case.csv``, ``reliability_<class>.png``
(pooled reliability diagram per class, from the accumulator's marginal per-bin statistics,
``n_bins_ace`` bins) and ``dataset_reliability_histogram.png`` (the ACE paper's dataset reliability
histogram: per class, for every case and probability bin the case's observed frequency; the colour
is the number of cases; plots of at most :data:`.output.MAX_PLOTTED_CLASSES` classes),
``risk_coverage.png`` (selective risk 1 - DSC against coverage per score; with the other plots), and the
manifest of the files written (:data:`.output.MANIFEST`). Everything is first written to a temporary
folder next to ``out_dir`` that is renamed at the end, so nothing appears unless every case was
evaluated. That folder (``.OUT.tmp-<pid>-*``) is created before any case is computed (an unusable
location fails at once), removed on any error or interrupt, and removed by a later run if its
process is dead. The output may not be, contain or lie inside an input folder, and an existing one
is replaced only if it holds nothing but an earlier output of the evaluator (:mod:`.output`).
Parallel cases run in worker processes (:mod:`.pool`); a worker that dies is an error naming its
case(s); the workers die with the main process.

Conventions: ``convention="default"`` as above; ``"sdc-code"`` as the SDC authors' evaluation code
(see :class:`nnunet_calibration.metrics.CalibrationAccumulator` and :func:`.segmentation.segmentation_metrics`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_calibration.io import DIRECTION_ATOL, ORIGIN_ATOL, ORIGIN_RTOL, SPACING_RTOL
from nnunet_calibration.metrics import METRIC_KEYS, CalibrationAccumulator
from nnunet_calibration.output_location import check_not_an_input
from nnunet_calibration.settings import MetricOptions
from nnunet_calibration.utils import json_clean, nanmean

from .errors import EvaluationInputError
from .labels import find_dataset_json, label_info, read_dataset_json, reader_writer
from .output import OutputFolder, default_out_dir, plot_plan, write_outputs
from .pool import run_jobs
from .scores import risk_coverage_summary
from .segmentation import SDC_CODE_CLASS

PathLike = Union[str, os.PathLike]


def dataset_means(cases: List[dict], class_names: List[str],
                  calibration_names: Optional[List[str]] = None) -> Dict[str, float]:
    """Mean over cases of every per-case value (NaN values left out); ``SCE_<class>`` for the
    ``calibration_names`` (the signed calibration error per class)."""
    out = {"DSC": nanmean([c["metrics"]["DSC_mean"] for c in cases]),
           "HD95": nanmean([c["metrics"]["HD95_mean"] for c in cases])}
    for k in METRIC_KEYS:
        out[k] = nanmean([c["metrics"][k] for c in cases])
    for name in class_names:
        out[f"DSC_{name}"] = nanmean([c["metrics"]["DSC"][name] for c in cases])
        out[f"HD95_{name}"] = nanmean([c["metrics"]["HD95"][name] for c in cases])
    for name in calibration_names or []:
        out[f"SCE_{name}"] = nanmean([c["metrics"]["SCE_classes"][name] for c in cases])
    return out


def bootstrap_summary(case_accs: List[CalibrationAccumulator], options: MetricOptions) -> dict:
    """``summary["bootstrap"]``: percentile intervals of the pooled ``ECE`` and ``debiased-L2-ECE``,
    resampling cases (:func:`nnunet_calibration.metrics.bootstrap_ci`: ``options.bootstrap`` resamples,
    confidence :data:`~nnunet_calibration.settings.metrics.BOOTSTRAP_CONFIDENCE`, seed
    :data:`~nnunet_calibration.settings.metrics.BOOTSTRAP_SEED`); ``{"n_resamples": 0}`` when off."""
    from nnunet_calibration.metrics import bootstrap_ci
    from nnunet_calibration.metrics._kernels import _sdc_ece_compute
    from nnunet_calibration.metrics.calibration import _ece_compute
    from nnunet_calibration.metrics.ece_variants import _debiased_compute
    from nnunet_calibration.settings.metrics import BOOTSTRAP_CONFIDENCE, BOOTSTRAP_SEED

    out = {"n_resamples": options.bootstrap, "confidence": BOOTSTRAP_CONFIDENCE, "seed": BOOTSTRAP_SEED,
           "unit": "case"}
    if options.bootstrap == 0:
        return out
    stats = [a.stats["ece"] for a in case_accs]
    ece_compute = _sdc_ece_compute if options.convention == "sdc-code" else _ece_compute
    for key, compute in (("ECE", ece_compute), ("debiased-L2-ECE", _debiased_compute)):
        ci = bootstrap_ci(stats, compute, options.bootstrap, BOOTSTRAP_CONFIDENCE, BOOTSTRAP_SEED)
        out[key] = {"estimate": ci.estimate, "low": ci.low, "high": ci.high, "n_valid": ci.n_valid}
    return out


def _case_id(path: Path, ending: str) -> Optional[str]:
    return path.name[:-len(ending)] if path.name.endswith(ending) and not path.name.startswith(".") else None


def _scan_folder(folder: Path, gt_folder: Path, file_ending: str, found: dict, jobs: list, no_ref: list,
                 no_npz: list) -> None:
    """Add one prediction folder's cases to ``found`` / ``jobs`` / ``no_ref`` / ``no_npz``."""
    if not folder.is_dir():
        raise EvaluationInputError(f"{folder}: prediction folder does not exist")
    npzs = sorted(p for p in folder.glob("*.npz") if not p.name.startswith("."))
    if not npzs:
        raise EvaluationInputError(f"{folder}: no CASE.npz files (run nnU-Net with --save_probabilities / --npz)")
    ids = {p.name[:-4] for p in npzs}
    # nnU-Net writes CASE.pkl and CASE<file_ending> next to every CASE.npz
    for p in folder.iterdir():
        cid = _case_id(p, ".pkl") or _case_id(p, file_ending)
        if cid is not None and cid not in ids:
            no_npz.append(cid)
    for npz in npzs:
        case = npz.name[:-len(".npz")]
        found.setdefault(case, []).append(str(folder))
        ref = gt_folder / f"{case}{file_ending}"
        if not ref.is_file():
            no_ref.append(case)
            continue
        jobs.append({"case": case, "folder": str(folder), "npz": str(npz), "reference": str(ref),
                     "file_ending": file_ending})


def _check_missing(pred_folders, gt_folder: Path, file_ending: str, no_ref: list, no_npz: list) -> None:
    if no_ref:
        refs = [str(gt_folder / f"{c}{file_ending}") for c in sorted(no_ref)[:20]]
        raise EvaluationInputError(
            f"{len(no_ref)} prediction(s) have no reference (missing files: {refs}) (--allow-missing skips them)")
    if no_npz:
        raise EvaluationInputError(
            f"{len(no_npz)} case(s) have no prediction CASE.npz in {[str(f) for f in pred_folders]}: "
            f"{no_npz[:20]} (--allow-missing skips them; for a single fold pass its validation cases)")


def collect_jobs(pred_folders: Sequence[PathLike], gt_folder: PathLike, file_ending: str,
                 cases: Optional[Sequence[str]] = None, allow_missing: bool = False
                 ) -> Tuple[List[dict], Dict[str, List[str]]]:
    """``(jobs, missing)``. Every ``CASE.npz`` of the folders is a case; the expected cases are
    ``cases`` (default: every reference ``CASE<file_ending>`` in ``gt_folder``).

    Errors listing the cases (:class:`EvaluationInputError`): a case id in two folders (or a folder
    given twice); a prediction without reference; an expected case without prediction (also a case
    with nnU-Net's ``CASE.pkl`` or segmentation but no npz). With ``allow_missing`` the last two are
    skipped and returned in ``missing = {"predictions": [...], "references": [...]}``."""
    gt_folder = Path(gt_folder)
    if not gt_folder.is_dir():
        raise EvaluationInputError(f"{gt_folder}: reference folder does not exist")
    resolved = [Path(f).resolve() for f in pred_folders]
    twice = sorted({str(f) for f in resolved if resolved.count(f) > 1})
    if twice:
        raise EvaluationInputError(f"prediction folder(s) given more than once: {twice}")
    found: Dict[str, List[str]] = {}
    jobs, no_ref, no_npz = [], [], []
    for folder in pred_folders:
        _scan_folder(Path(folder), gt_folder, file_ending, found, jobs, no_ref, no_npz)
    dup = {c: f for c, f in found.items() if len(f) > 1}
    if dup:
        shown = "; ".join(f"{c} in {f}" for c, f in sorted(dup.items())[:20])
        raise EvaluationInputError(f"{len(dup)} case id(s) found in more than one prediction folder: {shown}")
    if cases is None:
        expected = {c for c in (_case_id(p, file_ending) for p in gt_folder.iterdir()) if c is not None}
    else:
        expected = set(cases)
    no_npz = sorted((set(no_npz) | (expected - set(found))))
    if cases is not None:
        extra = sorted(set(found) - expected)
        if extra:
            raise EvaluationInputError(f"{len(extra)} prediction(s) not among the given cases: {extra[:20]}")
    if not allow_missing:
        _check_missing(pred_folders, gt_folder, file_ending, no_ref, no_npz)
    if not jobs:
        raise EvaluationInputError("no case has both a prediction and a reference")
    return jobs, {"predictions": no_npz, "references": sorted(no_ref)}


def _check_arguments(pred_folders, num_processes, options, metric_options) -> Tuple[List[Path], MetricOptions]:
    if options is None:
        options = MetricOptions.from_mapping(metric_options, "evaluate_folders")
    elif metric_options:
        raise TypeError("give either options= or metric keyword options, not both")
    if isinstance(num_processes, bool) or not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
        raise EvaluationInputError(f"num_processes (-np) must be an integer >= 1, got {num_processes!r}")
    if isinstance(pred_folders, (str, os.PathLike)):
        pred_folders = [pred_folders]
    pred_folders = [Path(p) for p in pred_folders]
    if not pred_folders:
        raise EvaluationInputError("no prediction folder given")
    for f in pred_folders:
        if not f.is_dir():
            raise EvaluationInputError(f"{f}: prediction folder does not exist")
    return pred_folders, options


def _output_folder(out_dir: Optional[PathLike], setup: dict) -> OutputFolder:
    """The checked output folder with its staging folder, made before any case is computed."""
    default = default_out_dir(setup["pred_folders"])
    out = Path(out_dir).resolve() if out_dir is not None else default
    inputs = ([("prediction folder", f, True) for f in setup["pred_folders"]]
              + [("reference folder", setup["gt_folder"], True),
                 ("folder of dataset.json", setup["dj_path"].resolve().parent, False)])
    check_not_an_input(out, inputs, default)
    folder = OutputFolder(out)
    folder.prepare()
    return folder


def _summary(setup: dict, results: List[tuple], options: MetricOptions, missing: dict) -> Tuple[dict, object]:
    """``(summary, pooled accumulator)`` of the evaluated cases (see :func:`evaluate_folders`)."""
    lm, regions, class_names = setup["lm"], setup["regions"], setup["class_names"]
    seg_names = [SDC_CODE_CLASS] if options.convention == "sdc-code" else class_names
    cases_out = [r[0] for r in results]
    pooled_acc = CalibrationAccumulator(options, regions=regions is not None, region_labels=regions,
                                        ignore_index=lm.ignore_label)
    for _, acc in results:
        pooled_acc = pooled_acc + acc
    summary = {
        "config": {"pred_folders": [str(p) for p in setup["pred_folders"]], "gt_folder": str(setup["gt_folder"]),
                   "dataset_json": str(setup["dj_path"]), "file_ending": setup["file_ending"],
                   "reader_writer": type(setup["reader"]).__name__,
                   "mode": "regions" if regions else "softmax",
                   "regions": [list(r) for r in regions] if regions else None,
                   "ignore_label": lm.ignore_label,
                   "geometry_tolerance": {"spacing_rtol": SPACING_RTOL, "origin_atol_mm": ORIGIN_ATOL,
                                          "origin_rtol": ORIGIN_RTOL, "direction_atol": DIRECTION_ATOL},
                   "n_cases": len(cases_out), **options.to_dict()},
        "classes": seg_names,
        "calibration_classes": class_names,
        "cases": cases_out,
        "mean": dataset_means(cases_out, seg_names, class_names),
        "pooled": {**pooled_acc.compute(),
                   **{f"SCE_{n}": v for n, v in zip(class_names, pooled_acc.signed_per_class().tolist())}},
        "bootstrap": bootstrap_summary([r[1] for r in results], options),
        "risk_coverage": risk_coverage_summary(cases_out),
        "missing": missing,
        "plots": setup["plots"],
    }
    return json_clean(summary), pooled_acc


def evaluate_folders(pred_folders: Sequence[PathLike], gt_folder: PathLike, dataset_json: Optional[PathLike] = None,
                     out_dir: Optional[PathLike] = None, num_processes: int = 1, progress: bool = True,
                     write: bool = True, cases: Optional[Sequence[str]] = None, allow_missing: bool = False,
                     options: Optional[MetricOptions] = None, plots: bool = True, **metric_options) -> dict:
    """Evaluate one or more prediction folders against ``gt_folder``; return (and write) the summary.

    ``options``: the metrics' :class:`~nnunet_calibration.settings.MetricOptions` (defaults, ranges and
    conventions there); or, instead, its fields as keywords (``n_bins_ece=10, ...``), read by
    ``MetricOptions.from_mapping`` (so ``convention="sdc-code"`` implies 10 ECE bins unless given). ``out_dir`` default:
    ``PRED_FOLDER/calibration_evaluation`` (several folders: in their common parent). With
    ``write=False`` nothing is written. Raises :class:`EvaluationInputError` on bad input. Where the
    output may be and what happens to an existing one: :mod:`.output` (before any case is computed, the
    location is checked and the staging folder made). ``plots``: reliability diagrams of at most
    :data:`.output.MAX_PLOTTED_CLASSES` classes (``False``: none), recorded in ``summary["plots"]``.

    ``cases``: the case ids that must be evaluated (default: every reference in ``gt_folder``; for
    one fold's ``validation`` folder pass that fold's validation cases, :func:`.labels.split_validation_cases`).
    Missing predictions / references are errors unless ``allow_missing`` (then they are skipped and
    listed in ``summary["missing"]``). ``num_processes`` >= 1.

    Summary schema: ``{"config", "classes", "cases": [{"case", "folder", "metrics": {"DSC": {cls: v},
    "HD95": {cls: v}, "DSC_mean", "HD95_mean", "ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE",
    "mL1-MCE", "NLL", "Brier", "SCE", "debiased-L2-ECE", "boundary-ECE", "SCE_classes": {cls: v}},
    "scores": {score: v}, "flags": [...], ...}], "mean": {...}, "pooled": {...},
    "bootstrap": {"n_resamples", "confidence", "seed", "unit", "ECE": {"estimate", "low", "high", "n_valid"},
    "debiased-L2-ECE": {...}},
    "risk_coverage": {score: {risk: {"AURC", "e-AURC", "AUGRC", "n_cases", "n_excluded", "excluded_cases"}}},
    "missing": {"predictions": [...], "references": [...]}, "plots": {"drawn", "classes", "note", ...}}``.
    """
    pred_folders, options = _check_arguments(pred_folders, num_processes, options, metric_options)
    dj_path = Path(dataset_json) if dataset_json is not None else find_dataset_json(pred_folders[0])
    dj = read_dataset_json(dj_path)
    lm, class_names, regions = label_info(dj, str(dj_path))
    file_ending = dj.get("file_ending", ".nii.gz")
    jobs, missing = collect_jobs(pred_folders, gt_folder, file_ending, cases, allow_missing)
    reader = reader_writer(dict(dj, file_ending=file_ending), jobs[0]["reference"])
    setup = {"lm": lm, "class_names": class_names, "regions": regions, "pred_folders": pred_folders,
             "gt_folder": gt_folder, "dj_path": dj_path, "file_ending": file_ending, "reader": reader,
             "plots": plot_plan(class_names, plots and write, "--no-plots" if write else "write=False")}
    output = _output_folder(out_dir, setup) if write else None  # before computing: a bad output fails now

    from tqdm import tqdm

    try:
        n_proc = min(int(num_processes), len(jobs))
        with tqdm(total=len(jobs), desc="calib-evaluate", unit="case", disable=not progress) as bar:
            results = run_jobs(jobs, (lm, class_names, regions, options, reader), n_proc, bar)
        summary, pooled_acc = _summary(setup, results, options, missing)
        if write:
            write_outputs(output, summary, class_names, pooled_acc, [r[1] for r in results])
    except BaseException:
        if output is not None:
            output.discard()
        raise
    return summary
