"""Evaluate nnU-Net prediction folders: DSC, HD95 and every calibration metric, per case and pooled.

Inputs
------
* ``pred_folders``: one or more folders holding ``CASE.npz`` (key ``probabilities``, float32
  ``(C, z, y, x)``) as written by ``nnUNetv2_predict --save_probabilities`` or by
  ``nnUNetv2_train --npz`` (``fold_X/validation``). All ``*.npz`` files of a folder are cases.
* ``gt_folder``: the references ``CASE{file_ending}`` (``file_ending`` from dataset.json), read
  with SimpleITK; the spacing comes from the reference (SimpleITK's (x, y, z) reversed to the
  array's (z, y, x) order). A 2D reference (y, x) matches probabilities of shape (C, 1, y, x),
  which is how nnU-Net stores 2D images.
* ``dataset_json``: default: ``dataset.json`` in the first prediction folder (nnU-Net copies it
  there), else in its parent or grand-parent (the model folder, for ``fold_X/validation``).
  Its ``labels`` and ``regions_class_order`` decide, through nnU-Net's ``LabelManager``, whether the
  channels are softmax classes (channel c = label c, background included) or sigmoid regions.

Per case
--------
* segmentation exactly as nnU-Net makes it from the probabilities (the result of
  ``LabelManager.convert_probabilities_to_segmentation``: argmax, or region thresholds at 0.5 in
  ``regions_class_order``; computed channel by channel to avoid a full-size copy, see
  :func:`probabilities_to_segmentation`); DSC and HD95 per foreground class / region
  (``nnunetv2.evaluation.evaluate_predictions.region_or_label_to_mask``) with the conventions of
  :mod:`nnunet_calibration.metrics.segmentation` (both empty: DSC 1, HD95 0; one empty: DSC 0, HD95
  = image diagonal in mm, and the case gets a flag); ``DSC_mean``/``HD95_mean`` = mean over classes.
* calibration metrics of :mod:`nnunet_calibration.metrics.calibration`, from one
  :class:`CalibrationAccumulator` per case.

Data set level
--------------
* ``mean``: mean over cases of the per-case values (NaN values, e.g. the ECE of a case without
  foreground, are left out of the mean; ``null`` in JSON if every case is NaN).
* ``pooled``: exact data-set-wide values from the summed per-bin statistics of all cases.

Output (``out_dir``): ``summary.json``, ``per_case.csv``, ``reliability_<class>.png`` (pooled
reliability diagram per class, from the accumulator's marginal per-bin statistics, ``n_bins_ace``
bins) and ``dataset_reliability_histogram.png`` (the ACE paper's dataset reliability histogram:
per class, for every case and probability bin the case's observed frequency; the colour is the
number of cases). Everything is first written to a temporary folder next to ``out_dir`` that is
renamed at the end, so nothing appears unless every case was evaluated.
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from nnunet_calibration.metrics import (METRIC_KEYS, CalibrationAccumulator, dice, hd95, validate_labels,
                                        validate_probabilities)

PathLike = Union[str, os.PathLike]

DEFAULT_OPTIONS = dict(n_bins_ece=15, n_bins_cece=10, n_bins_pece=10, n_bins_ace=20, fp_weight=2.0,
                       cece_threshold=1e-3, include_background=False, nll_eps=1e-7)
OUR_OUTPUTS = ("summary.json", "per_case.csv")


class EvaluationInputError(ValueError):
    """Bad input (the message names the file and what is wrong)."""


# --------------------------------------------------------------------------------------------------
# dataset.json / label handling
# --------------------------------------------------------------------------------------------------
def find_dataset_json(pred_folder: PathLike) -> Path:
    folder = Path(pred_folder).resolve()
    for cand in (folder, folder.parent, folder.parent.parent):
        if (cand / "dataset.json").is_file():
            return cand / "dataset.json"
    raise EvaluationInputError(f"{folder}: no dataset.json in the prediction folder or its parents; "
                               "pass it with -djfile")


def label_info(dataset_json: dict, source: str = "dataset.json"):
    """``(label_manager, class_names, regions or None)`` from a dataset.json dict."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise EvaluationInputError(f"{source}: has no 'labels' dict")
    try:
        lm = LabelManager(labels, dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError) as e:
        raise EvaluationInputError(f"{source}: invalid labels ({e})") from e
    if lm.has_ignore_label:
        raise EvaluationInputError(f"{source}: datasets with an 'ignore' label are not supported")
    if lm.has_regions:
        # LabelManager builds the regions from the labels dict in its order, skipping background/ignore
        class_names, regions = [], []
        for name, value in labels.items():
            vals = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
            if name == "ignore" or set(vals) == {0}:
                continue
            class_names.append(name)
            regions.append(tuple(vals))
        if len(regions) != lm.num_segmentation_heads:
            raise EvaluationInputError(f"{source}: could not match region names to regions")
        return lm, class_names, regions
    expected = list(range(len(lm.all_labels)))
    if list(lm.all_labels) != expected:
        raise EvaluationInputError(f"{source}: labels must be consecutive 0..{len(expected) - 1}, "
                                   f"got {lm.all_labels}")
    by_value = {int(v[0]) if isinstance(v, (list, tuple)) else int(v): k
                for k, v in labels.items() if k != "ignore"}
    return lm, [by_value[c] for c in lm.foreground_labels], None


def _masks_keys(lm) -> list:
    return list(lm.foreground_regions) if lm.has_regions else list(lm.foreground_labels)


# --------------------------------------------------------------------------------------------------
# one case (runs in a worker process)
# --------------------------------------------------------------------------------------------------
def load_probabilities(npz_path: PathLike) -> np.ndarray:
    try:
        with np.load(npz_path) as z:
            if "probabilities" not in z.files:
                raise EvaluationInputError(f"{npz_path}: no array 'probabilities' in the npz (keys: {z.files})")
            probs = z["probabilities"]
    except EvaluationInputError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError, EOFError, ...
        raise EvaluationInputError(f"{npz_path}: unreadable npz ({type(e).__name__}: {e})") from e
    if not np.issubdtype(probs.dtype, np.floating):
        raise EvaluationInputError(f"{npz_path}: probabilities must be floating point, got {probs.dtype}")
    return probs


def load_reference(path: PathLike) -> Tuple[np.ndarray, Tuple[float, ...]]:
    import SimpleITK as sitk

    # ACDC-like headers (unscaled sform) make ITK warn on every read; the voxel array and pixdim spacing
    # are what counts, so the warning is silenced for this read only
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    sitk.ProcessObject.SetGlobalWarningDisplay(False)
    try:
        img = sitk.ReadImage(str(path))
    except Exception as e:
        raise EvaluationInputError(f"{path}: unreadable reference ({e})") from e
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    arr = sitk.GetArrayFromImage(img)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool):
        if np.any(arr != np.round(arr)):
            raise EvaluationInputError(f"{path}: reference holds non-integer values")
        arr = arr.astype(np.int32)
    return arr, tuple(float(s) for s in img.GetSpacing()[::-1])


def probabilities_to_segmentation(probs: np.ndarray, lm) -> np.ndarray:
    """Same result as nnU-Net's ``LabelManager.convert_probabilities_to_segmentation`` (argmax with
    the first channel winning ties, or ``seg[p_i > 0.5] = regions_class_order[i]`` in channel
    order), but without the full-size copy that ``np.argmax(axis=0)`` makes: one channel at a time,
    peak extra memory one float32 channel plus the uint8/uint16 map."""
    dtype = np.uint8 if max(lm.all_labels) < 255 else np.uint16
    seg = np.zeros(probs.shape[1:], dtype)
    if lm.has_regions:
        for i, c in enumerate(lm.regions_class_order):
            seg[probs[i] > 0.5] = c
        return seg
    best = probs[0].copy()
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        seg[better] = c
        np.maximum(best, probs[c], out=best)
    return seg


def evaluate_case(job: dict, lm, class_names: List[str], regions, options: dict):
    """Evaluate one case. Returns ``(case_entry, accumulator)``."""
    from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask

    npz, ref_path = job["npz"], job["reference"]
    probs = load_probabilities(npz)
    ref, spacing = load_reference(ref_path)
    if ref.ndim == probs.ndim - 2 and probs.ndim >= 3 and probs.shape[1] == 1:
        probs = probs[:, 0]  # nnU-Net stores 2D images as (C, 1, y, x)
    if probs.ndim != ref.ndim + 1 or probs.shape[1:] != ref.shape:
        raise EvaluationInputError(f"{npz}: probability map of shape {probs.shape[1:]} (channels {probs.shape[0]}) "
                                   f"does not match the reference {ref_path} of shape {ref.shape}")
    if probs.shape[0] != lm.num_segmentation_heads:
        raise EvaluationInputError(f"{npz}: {probs.shape[0]} channels but dataset.json implies "
                                   f"{lm.num_segmentation_heads} ({'regions' if regions else 'classes incl. background'})")
    try:
        validate_probabilities(probs, regions)
    except ValueError as e:
        raise EvaluationInputError(f"{npz}: {e}") from e
    try:
        validate_labels(ref, lm.all_labels)
    except ValueError as e:
        raise EvaluationInputError(f"{ref_path}: {e} (dataset.json labels)") from e

    acc = CalibrationAccumulator(regions=regions, **options).update(probs, ref)
    seg = probabilities_to_segmentation(probs, lm)
    del probs
    dsc, hd, flags = {}, {}, []
    for name, key in zip(class_names, _masks_keys(lm)):
        pm, rm = region_or_label_to_mask(seg, key), region_or_label_to_mask(ref, key)
        dsc[name] = dice(pm, rm)
        hd[name], worst = hd95(pm, rm, spacing, return_flag=True)
        if worst:
            which = "prediction" if not pm.any() else "reference"
            flags.append(f"{name}: empty {which}, HD95 set to the image diagonal ({hd[name]:.4g} mm)")
    metrics = {"DSC": dsc, "HD95": hd, "DSC_mean": float(np.mean(list(dsc.values()))),
               "HD95_mean": float(np.mean(list(hd.values())))}
    metrics.update(acc.compute())
    entry = {"case": job["case"], "folder": job["folder"], "prediction": str(npz), "reference": str(ref_path),
             "spacing": list(spacing), "metrics": metrics, "flags": flags}
    return entry, acc


def _worker(job, lm, class_names, regions, options):
    try:
        return "ok", evaluate_case(job, lm, class_names, regions, options)
    except EvaluationInputError as e:
        return "input-error", str(e)


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
def _nanmean(values) -> float:
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64)
    v = v[~np.isnan(v)]
    return float(v.mean()) if v.size else float("nan")


def dataset_means(cases: List[dict], class_names: List[str]) -> Dict[str, float]:
    out = {"DSC": _nanmean([c["metrics"]["DSC_mean"] for c in cases]),
           "HD95": _nanmean([c["metrics"]["HD95_mean"] for c in cases])}
    for k in METRIC_KEYS:
        out[k] = _nanmean([c["metrics"][k] for c in cases])
    for name in class_names:
        out[f"DSC_{name}"] = _nanmean([c["metrics"]["DSC"][name] for c in cases])
        out[f"HD95_{name}"] = _nanmean([c["metrics"]["HD95"][name] for c in cases])
    return out


def _json_clean(obj):
    if isinstance(obj, dict):
        return {str(k): _json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_clean(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return None if math.isnan(f) or math.isinf(f) else f
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def _safe_name(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def write_per_case_csv(path: Path, cases: List[dict], class_names: List[str]) -> None:
    cols = (["case", "folder"] + [f"DSC_{n}" for n in class_names] + [f"HD95_{n}" for n in class_names]
            + ["DSC_mean", "HD95_mean"] + list(METRIC_KEYS) + ["flags"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for c in cases:
            m = c["metrics"]
            row = [c["case"], c["folder"]] + [m["DSC"][n] for n in class_names] + \
                  [m["HD95"][n] for n in class_names] + [m["DSC_mean"], m["HD95_mean"]] + \
                  [m[k] for k in METRIC_KEYS] + ["; ".join(c["flags"])]
            w.writerow(["" if isinstance(v, float) and math.isnan(v) else
                        (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for v in row])


# --------------------------------------------------------------------------------------------------
# main entry
# --------------------------------------------------------------------------------------------------
def collect_jobs(pred_folders: Sequence[PathLike], gt_folder: PathLike, file_ending: str) -> List[dict]:
    gt_folder = Path(gt_folder)
    if not gt_folder.is_dir():
        raise EvaluationInputError(f"{gt_folder}: reference folder does not exist")
    jobs = []
    for folder in pred_folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise EvaluationInputError(f"{folder}: prediction folder does not exist")
        npzs = sorted(folder.glob("*.npz"))
        if not npzs:
            raise EvaluationInputError(f"{folder}: no CASE.npz files (run nnU-Net with --save_probabilities / --npz)")
        for npz in npzs:
            case = npz.name[:-len(".npz")]
            ref = gt_folder / f"{case}{file_ending}"
            if not ref.is_file():
                raise EvaluationInputError(f"{npz}: case '{case}' has no reference {ref}")
            jobs.append({"case": case, "folder": str(folder), "npz": str(npz), "reference": str(ref)})
    return jobs


def default_out_dir(pred_folders: Sequence[PathLike]) -> Path:
    folders = [str(Path(f).resolve()) for f in pred_folders]
    base = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    return Path(base) / "calibration_evaluation"


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise EvaluationInputError(f"{out_dir}: output path exists and is not a folder")
        foreign = [p.name for p in out_dir.iterdir()
                   if p.name not in OUR_OUTPUTS and not p.name.endswith(".png")]
        if foreign:
            raise EvaluationInputError(f"{out_dir}: output folder exists and holds other files ({foreign[:3]}); "
                                       "choose another -o")


def evaluate_folders(pred_folders: Sequence[PathLike], gt_folder: PathLike, dataset_json: Optional[PathLike] = None,
                     out_dir: Optional[PathLike] = None, num_processes: int = 1, progress: bool = True,
                     write: bool = True, **metric_options) -> dict:
    """Evaluate one or more prediction folders against ``gt_folder``; return (and write) the summary.

    ``metric_options``: ``n_bins_ece`` (15), ``n_bins_cece`` (10), ``n_bins_pece`` (10),
    ``n_bins_ace`` (20), ``fp_weight`` (2.0), ``cece_threshold`` (1e-3), ``include_background``
    (False, marginal errors only), ``nll_eps`` (1e-7). ``out_dir`` default:
    ``PRED_FOLDER/calibration_evaluation`` (several folders: in their common parent). With
    ``write=False`` nothing is written. Raises :class:`EvaluationInputError` on bad input.

    Summary schema: ``{"config", "classes", "cases": [{"case", "folder", "metrics": {"DSC": {cls: v},
    "HD95": {cls: v}, "DSC_mean", "HD95_mean", "ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE",
    "mL1-MCE", "NLL", "Brier"}, "flags": [...], ...}], "mean": {...}, "pooled": {...}}``.
    """
    unknown = set(metric_options) - set(DEFAULT_OPTIONS)
    if unknown:
        raise TypeError(f"unknown metric options {sorted(unknown)}")
    options = dict(DEFAULT_OPTIONS, **metric_options)
    if isinstance(pred_folders, (str, os.PathLike)):
        pred_folders = [pred_folders]
    pred_folders = [Path(p) for p in pred_folders]
    if not pred_folders:
        raise EvaluationInputError("no prediction folder given")
    dj_path = Path(dataset_json) if dataset_json is not None else find_dataset_json(pred_folders[0])
    try:
        with open(dj_path) as f:
            dj = json.load(f)
    except Exception as e:
        raise EvaluationInputError(f"{dj_path}: cannot read dataset.json ({e})") from e
    lm, class_names, regions = label_info(dj, str(dj_path))
    file_ending = dj.get("file_ending", ".nii.gz")
    jobs = collect_jobs(pred_folders, gt_folder, file_ending)
    out_dir = Path(out_dir) if out_dir is not None else default_out_dir(pred_folders)
    if write:
        _prepare_out_dir(out_dir)
    # validate options early (CalibrationAccumulator checks bins)
    CalibrationAccumulator(regions=regions, **options)

    from tqdm import tqdm

    work = partial(_worker, lm=lm, class_names=class_names, regions=regions, options=options)
    results = []
    n_proc = max(1, min(int(num_processes), len(jobs)))
    bar = tqdm(total=len(jobs), desc="calib-evaluate", unit="case", disable=not progress)
    try:
        if n_proc == 1:
            it = map(work, jobs)
            pool = None
        else:
            pool = multiprocessing.get_context("spawn").Pool(n_proc)
            it = pool.imap(work, jobs)
        for status, payload in it:
            if status != "ok":
                raise EvaluationInputError(payload)
            results.append(payload)
            bar.update(1)
        if pool is not None:
            pool.close()
            pool.join()
    finally:
        bar.close()
        if n_proc > 1 and pool is not None:
            pool.terminate()

    cases = [r[0] for r in results]
    pooled_acc = CalibrationAccumulator(regions=regions, **options)
    for _, acc in results:
        pooled_acc = pooled_acc + acc
    summary = {
        "config": {"pred_folders": [str(p) for p in pred_folders], "gt_folder": str(gt_folder),
                   "dataset_json": str(dj_path), "file_ending": file_ending,
                   "mode": "regions" if regions else "softmax",
                   "regions": [list(r) for r in regions] if regions else None,
                   "n_cases": len(cases), **options},
        "classes": class_names,
        "cases": cases,
        "mean": dataset_means(cases, class_names),
        "pooled": pooled_acc.compute(),
    }
    summary = _json_clean(summary)
    if write:
        _write_outputs(out_dir, summary, class_names, pooled_acc, [r[1] for r in results])
        summary["config"]["out_dir"] = str(out_dir)
    return summary


def _write_outputs(out_dir: Path, summary: dict, class_names, pooled_acc, case_accs) -> None:
    from .plots import plot_dataset_reliability_histogram, plot_reliability_diagram

    out_dir = out_dir.resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        summary["config"]["out_dir"] = str(out_dir)
        with open(tmp / "summary.json", "w") as f:
            json.dump(summary, f, indent=2, allow_nan=False)
        write_per_case_csv(tmp / "per_case.csv", summary["cases"], class_names)
        edges, n, conf, freq = pooled_acc.reliability()
        for k, name in enumerate(class_names):
            plot_reliability_diagram(tmp / f"reliability_{_safe_name(name)}.png", edges, n[k], conf[k], freq[k],
                                     title=f"Pooled reliability: {name} ({summary['config']['n_cases']} cases)")
        per_case_freq = np.stack([a.reliability()[3] for a in case_accs])  # (cases, K, bins)
        plot_dataset_reliability_histogram(tmp / "dataset_reliability_histogram.png", edges, per_case_freq,
                                           class_names)
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
