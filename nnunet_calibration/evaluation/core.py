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
  ``CASE{file_ending}``) in the prediction folder must match the reference within
  ``SPACING_RTOL`` / ``ORIGIN_ATOL`` + ``ORIGIN_RTOL`` / ``DIRECTION_ATOL`` (see :func:`geometry_problems`).
* ``dataset_json``: default: ``dataset.json`` in the first prediction folder (nnU-Net copies it
  there), else in its parent or grand-parent (the model folder, for ``fold_X/validation``).
  Its ``labels`` and ``regions_class_order`` decide, through nnU-Net's ``LabelManager``, whether the
  channels are softmax classes (channel c = label c, background included) or sigmoid regions. An
  ``ignore`` label is supported as nnU-Net does it: its voxels are left out of every metric.

Per case
--------
* segmentation exactly as nnU-Net makes it from the probabilities (the result of
  ``LabelManager.convert_probabilities_to_segmentation``: argmax, or region thresholds at 0.5 in
  ``regions_class_order``; computed channel by channel to avoid a full-size copy, see
  :func:`probabilities_to_segmentation`); DSC and HD95 (:func:`segmentation_metrics`) per
  foreground class / region
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
renamed at the end, so nothing appears unless every case was evaluated. That folder
(``.OUT.tmp-<pid>-*``) is created before any case is computed (an unwritable location fails at
once), removed on any error or interrupt, and removed by a later run if its process is dead.
Parallel cases run in a ``ProcessPoolExecutor``; a worker that dies is an error naming its case(s).

Conventions: ``convention="default"`` as above; ``"sdc-code"`` as the SDC authors' evaluation code
(see :class:`nnunet_calibration.metrics.CalibrationAccumulator` and :func:`segmentation_metrics`).
"""
from __future__ import annotations

import csv
import json
import math
import multiprocessing
import os
import queue as queue_mod
import shutil
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_json, load_pickle
from nnunetv2.evaluation.evaluate_predictions import region_or_label_to_mask
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from nnunet_calibration.errors import UserError
from nnunet_calibration.io import CorruptFileError, quiet_itk, verify_image_file
from nnunet_calibration.metrics import (METRIC_KEYS, CalibrationAccumulator, dice, hd95, image_diagonal,
                                        validate_labels, validate_probabilities)
from nnunet_calibration.metrics.calibration import SOFTMAX_SUM_TOLERANCE
from nnunet_calibration.settings import MetricOptions
from nnunet_calibration.utils import (json_clean, keep_freed_memory, nanmean, remove_stale_staging, replace_dir,
                                      staging_dir)

PathLike = Union[str, os.PathLike]

SDC_CODE_CLASS = "foreground"
OUR_OUTPUTS = ("summary.json", "per_case.csv")

#: Geometry tolerances between a prediction (nnU-Net's CASE.pkl / segmentation) and its reference:
#: spacing relative 1e-4; origin 1e-3 mm absolute plus relative 1e-5; direction cosines 1e-4
#: absolute; shapes identical. (The same tolerances as ``calib-convert`` between image and label.)
SPACING_RTOL, ORIGIN_ATOL, ORIGIN_RTOL, DIRECTION_ATOL = 1e-4, 1e-3, 1e-5, 1e-4


class EvaluationInputError(UserError):
    """Bad input (the message names the file and what is wrong)."""


# --------------------------------------------------------------------------------------------------
# dataset.json / label handling
# --------------------------------------------------------------------------------------------------
def find_dataset_json(pred_folder: PathLike) -> Path:
    folder = Path(pred_folder).resolve()
    if not folder.is_dir():
        raise EvaluationInputError(f"{folder}: prediction folder does not exist")
    for cand in (folder, folder.parent, folder.parent.parent):
        if (cand / "dataset.json").is_file():
            return cand / "dataset.json"
    raise EvaluationInputError(f"{folder}: no dataset.json in the prediction folder or its parents; "
                               "pass it with -djfile")


def label_info(dataset_json: dict, source: str = "dataset.json"):
    """``(label_manager, class_names, region_labels or None)`` from a dataset.json dict.

    An ``ignore`` label is allowed (``label_manager.ignore_label``); it is not a class."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise EvaluationInputError(f"{source}: has no 'labels' dict")
    try:
        lm = LabelManager(labels, dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError) as e:
        raise EvaluationInputError(f"{source}: invalid labels ({e})") from e
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


def reader_writer(dataset_json: dict, example_file: Optional[PathLike] = None):
    """The nnU-Net reader/writer *instance* for the dataset (``determine_reader_writer_from_dataset_json``:
    ``overwrite_image_reader_writer`` or the ``file_ending``)."""
    try:
        cls = determine_reader_writer_from_dataset_json(
            dataset_json, None if example_file is None else str(example_file), allow_nonmatching_filename=True,
            verbose=False)
    except Exception as e:  # nnU-Net raises RuntimeError if no reader supports the ending
        raise EvaluationInputError(f"no nnU-Net reader/writer for file ending {dataset_json.get('file_ending')!r} "
                                   f"({e})") from e
    return cls()


def _masks_keys(lm) -> list:
    return list(lm.foreground_regions) if lm.has_regions else list(lm.foreground_labels)


def validation_cases(splits_file: PathLike, fold: int) -> List[str]:
    """The validation case ids of ``fold`` in an nnU-Net ``splits_final.json`` (for ``cases=``)."""
    try:
        splits = load_json(str(splits_file))
        return list(splits[int(fold)]["val"])
    except Exception as e:
        raise EvaluationInputError(f"{splits_file}: cannot read the validation cases of fold {fold} ({e})") from e


# --------------------------------------------------------------------------------------------------
# reading (runs in a worker process)
# --------------------------------------------------------------------------------------------------
def load_probabilities(npz_path: PathLike) -> np.ndarray:
    """``probabilities`` of an nnU-Net npz (zip members are CRC-checked when read)."""
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


def read_reference(path: PathLike, reader=None) -> Tuple[np.ndarray, dict]:
    """A reference segmentation as nnU-Net reads it: ``(labels (z, y, x) int32, properties)``.

    ``reader``: an nnU-Net reader/writer instance (:func:`reader_writer`; default ``SimpleITKIO``).
    The file is checked first (:func:`nnunet_calibration.io.verify_image_file`: truncated / corrupt
    ``.gz`` streams and short NIfTI files are errors). 2D images come back as ``(1, y, x)`` with
    nnU-Net's spacing convention (first entry 999 x the largest in-plane spacing)."""
    path = Path(path)
    try:
        verify_image_file(path)
    except CorruptFileError as e:
        raise EvaluationInputError(f"unreadable reference: {e}") from e
    reader = SimpleITKIO() if reader is None else reader
    try:
        with quiet_itk():
            seg, props = reader.read_seg(str(path))
    except Exception as e:
        raise EvaluationInputError(f"{path}: unreadable reference ({type(e).__name__}: {e})") from e
    arr = np.asarray(seg)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if np.issubdtype(arr.dtype, np.floating):
        if np.any(arr != np.round(arr)):
            raise EvaluationInputError(f"{path}: reference holds non-integer values")
    return arr.astype(np.int32, copy=False), props


def is_2d(spacing: Sequence[float], shape: Sequence[int]) -> bool:
    """nnU-Net's 2D convention: one slice and a first spacing of at least 999 x the others."""
    return len(shape) == 3 and shape[0] == 1 and float(spacing[0]) >= 998.999 * max(float(s) for s in spacing[1:])


def load_reference(path: PathLike, reader=None) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """``(labels, spacing)`` with the spacing in the array's axis order; a 2D image is returned as
    ``(y, x)`` with its 2 in-plane spacings. See :func:`read_reference`."""
    arr, props = read_reference(path, reader)
    spacing = tuple(float(s) for s in props["spacing"])
    if is_2d(spacing, arr.shape):
        return arr[0], spacing[1:]
    return arr, spacing


def _prediction_properties(job: dict, reader) -> Tuple[Optional[dict], Optional[str]]:
    """nnU-Net's geometry of the prediction: ``CASE.pkl`` (properties written by nnU-Net) or else the
    segmentation ``CASE<file_ending>`` it wrote next to the npz. ``(None, None)`` if neither exists."""
    pkl = Path(job["folder"]) / f"{job['case']}.pkl"
    if pkl.is_file():
        try:
            props = load_pickle(str(pkl))
        except Exception as e:
            raise EvaluationInputError(f"{pkl}: unreadable properties pickle ({type(e).__name__}: {e})") from e
        if not isinstance(props, dict):
            raise EvaluationInputError(f"{pkl}: properties pickle does not hold a dict")
        return props, str(pkl)
    seg = Path(job["folder"]) / f"{job['case']}{job['file_ending']}"
    if seg.is_file():
        arr, props = read_reference(seg, reader)
        props = dict(props, shape_before_cropping=tuple(arr.shape))
        return props, str(seg)
    return None, None


def geometry_problems(pred_props: dict, ref_props: dict, ref_shape: Sequence[int]) -> List[str]:
    """Differences beyond the tolerances (``SPACING_RTOL`` ...) between a prediction's nnU-Net
    properties and its reference's: spacing (nnU-Net order), shape (``shape_before_cropping``),
    and, when both have them (SimpleITK-based readers), ITK spacing, origin and direction."""
    out = []
    sp_p, sp_r = pred_props.get("spacing"), ref_props.get("spacing")
    if sp_p is not None and sp_r is not None:
        a, b = np.abs(np.asarray(sp_p, float)), np.abs(np.asarray(sp_r, float))
        k = min(a.size, b.size)
        if (is_2d(b, ref_shape) and k == 3) or k == len(ref_shape) + 1:
            k -= 1  # the 2D dummy spacing is not a real one
        if not np.allclose(a[a.size - k:], b[b.size - k:], rtol=SPACING_RTOL, atol=0):
            out.append(f"spacing {tuple(a.tolist())} vs {tuple(b.tolist())}")
    shp = pred_props.get("shape_before_cropping")
    if shp is not None and tuple(int(s) for s in shp) != tuple(int(s) for s in ref_shape):
        out.append(f"shape {tuple(int(s) for s in shp)} vs {tuple(int(s) for s in ref_shape)}")
    ip, ir = pred_props.get("sitk_stuff"), ref_props.get("sitk_stuff")
    if isinstance(ip, dict) and isinstance(ir, dict):
        if len(ip["origin"]) != len(ir["origin"]):
            out.append(f"dimension {len(ip['origin'])} vs {len(ir['origin'])}")
        else:
            if not np.allclose(ip["origin"], ir["origin"], rtol=ORIGIN_RTOL, atol=ORIGIN_ATOL):
                out.append(f"origin {tuple(ip['origin'])} vs {tuple(ir['origin'])}")
            if not np.allclose(ip["direction"], ir["direction"], rtol=0, atol=DIRECTION_ATOL):
                out.append(f"direction {np.round(ip['direction'], 4).tolist()} vs {np.round(ir['direction'], 4).tolist()}")
    return out


def probabilities_to_segmentation(probs: np.ndarray, lm, sum_tolerance: Optional[float] = None) -> np.ndarray:
    """Same result as nnU-Net's ``LabelManager.convert_probabilities_to_segmentation`` (argmax with
    the first channel winning ties, or ``seg[p_i > 0.5] = regions_class_order[i]`` in channel
    order), but without the full-size copy that ``np.argmax(axis=0)`` makes: one channel at a time,
    peak extra memory one float32 channel plus the uint8/uint16 map.

    ``sum_tolerance`` (softmax only): if given, the caller guarantees that every voxel's channel
    probabilities sum to at most ``1 + sum_tolerance`` (what
    :func:`~nnunet_calibration.metrics.validate_probabilities` checks). A voxel whose background
    probability exceeds ``0.5 + sum_tolerance`` is then background (every other channel is below
    ``0.5``), so the argmax is computed only for the remaining voxels (usually a few percent):
    same result, several times faster. ``None``: every voxel is compared.
    """
    dtype = np.uint8 if max(lm.all_labels) < 255 else np.uint16
    seg = np.zeros(probs.shape[1:], dtype)
    if lm.has_regions:
        for i, c in enumerate(lm.regions_class_order):
            seg[probs[i] > 0.5] = c
        return seg
    if sum_tolerance is None:
        _argmax_into(probs, seg)
        return seg
    flat_p = probs.reshape(probs.shape[0], -1)
    cand = np.flatnonzero(flat_p[0] <= 0.5 + float(sum_tolerance))
    sub_seg = np.zeros(cand.size, dtype)
    _argmax_into(flat_p.take(cand, axis=1), sub_seg)
    seg.reshape(-1)[cand] = sub_seg
    return seg


def _argmax_into(probs: np.ndarray, seg: np.ndarray) -> None:
    """``seg[...] = argmax`` over channels (first channel wins ties; ``seg`` starts at 0), one channel
    at a time: extra memory one channel of ``probs``."""
    best = probs[0].copy()
    for c in range(1, probs.shape[0]):
        better = probs[c] > best
        seg[better] = c
        np.maximum(best, probs[c], out=best)


def segmentation_metrics(seg: np.ndarray, ref: np.ndarray, lm, class_names: List[str], spacing,
                         convention: str = "default") -> Tuple[Dict[str, float], Dict[str, float], List[str]]:
    """DSC and HD95 per class / region (``convention="default"``) or of the foreground union
    (``"sdc-code"``: DSC ``(2|P&R| + 1e-6) / (|P| + |R| + 1e-6)``, HD95 in voxels with all-neighbour
    surfaces, as the SDC authors' code), conventions of :mod:`nnunet_calibration.metrics.segmentation`.

    Ignore label (``lm.ignore_label``): predicted voxels where the reference is the ignore label are
    removed from the predicted masks (nnU-Net's DSC convention), for DSC and HD95 alike.
    Speed: everything after one pass over the volume is done on the bounding box of the foreground
    of ``seg`` and ``ref`` plus a 1-voxel margin, which contains every class mask and its surface,
    so the values are those of the full volume; the worst-case HD95 uses the full image diagonal.
    Returns ``(dsc, hd95, flags)``.
    """
    sdc = convention == "sdc-code"
    ign = lm.ignore_label
    ref_fg = ref != 0 if ign is None else (ref != 0) & (ref != ign)
    union = ref_fg | (seg != 0)
    full_shape = seg.shape
    if union.any():
        other = [tuple(i for i in range(union.ndim) if i != ax) for ax in range(union.ndim)]
        sl = []
        for ax in range(union.ndim):
            nz = np.flatnonzero(union.any(axis=other[ax]) if other[ax] else union)
            sl.append(slice(max(int(nz[0]) - 1, 0), min(int(nz[-1]) + 2, union.shape[ax])))
        sl = tuple(sl)
    else:
        sl = tuple(slice(0, 1) for _ in full_shape)  # nothing anywhere: every mask is empty
    seg_c, ref_c, fg_c = seg[sl], ref[sl], ref_fg[sl]
    valid = None if ign is None else ref_c != ign
    if sdc:
        pairs = [(SDC_CODE_CLASS, seg_c != 0, fg_c)]
    else:
        pairs = [(name, region_or_label_to_mask(seg_c, key), region_or_label_to_mask(ref_c, key))
                 for name, key in zip(class_names, _masks_keys(lm))]
    sp = None if sdc else spacing
    dsc, hd, flags = {}, {}, []
    for name, pm, rm in pairs:
        if valid is not None:
            pm &= valid  # nnU-Net: predictions on ignored voxels do not count
        n_p, n_r = int(np.count_nonzero(pm)), int(np.count_nonzero(rm))
        inter = int(np.count_nonzero(pm & rm))
        if sdc:
            dsc[name] = (2 * inter + 1e-6) / (n_p + n_r + 1e-6)
        else:
            dsc[name] = dice(pm, rm)
        if n_p and n_r:
            hd[name] = hd95(pm, rm, sp, connectivity=pm.ndim if sdc else 1)
        elif not n_p and not n_r:
            hd[name] = 0.0
        else:
            hd[name] = image_diagonal(full_shape, sp)
            which = "prediction" if not n_p else "reference"
            flags.append(f"{name}: empty {which}, HD95 set to the image diagonal ({hd[name]:.4g} "
                         f"{'voxels' if sdc else 'mm'})")
    return dsc, hd, flags


# --------------------------------------------------------------------------------------------------
# one case (runs in a worker process)
# --------------------------------------------------------------------------------------------------
def evaluate_case(job: dict, lm, class_names: List[str], regions, options: dict, reader=None):
    """Evaluate one case. Returns ``(case_entry, accumulator)``.

    ``job``: ``{"case", "folder", "npz", "reference"}`` (optionally ``"file_ending"`` for the
    geometry look-up of a segmentation file); ``regions``: the region label tuples or ``None``;
    ``options``: the metrics' :class:`~nnunet_calibration.settings.MetricOptions`; ``reader``: nnU-Net
    reader/writer instance (default ``SimpleITKIO``).
    """
    npz, ref_path = job["npz"], job["reference"]
    reader = SimpleITKIO() if reader is None else reader
    probs = load_probabilities(npz)
    ref3, ref_props = read_reference(ref_path, reader)
    spacing3 = tuple(float(s) for s in ref_props["spacing"])
    flags = []
    pred_props, pred_src = _prediction_properties(dict(job, file_ending=job.get("file_ending", ".nii.gz")), reader)
    if pred_props is None:
        flags.append("geometry not checked (no CASE.pkl or segmentation file next to the npz)")
    else:
        problems = geometry_problems(pred_props, ref_props, ref3.shape)
        if problems:
            raise EvaluationInputError(f"geometry mismatch: prediction {pred_src} does not match the reference "
                                       f"{ref_path}: " + "; ".join(problems))
    two_d = is_2d(spacing3, ref3.shape)
    if two_d:
        ref, spacing = ref3[0], spacing3[1:]
        if probs.ndim == 4 and probs.shape[1] == 1:
            probs = probs[:, 0]  # nnU-Net stores 2D images as (C, 1, y, x)
    else:
        ref, spacing = ref3, spacing3
    if probs.ndim != ref.ndim + 1 or probs.shape[1:] != ref.shape:
        raise EvaluationInputError(f"{npz}: probability map of shape {probs.shape[1:]} (channels {probs.shape[0]}) "
                                   f"does not match the reference {ref_path} of shape {ref.shape}")
    if probs.shape[0] != lm.num_segmentation_heads:
        raise EvaluationInputError(f"{npz}: {probs.shape[0]} channels but dataset.json implies "
                                   f"{lm.num_segmentation_heads} ({'regions' if regions else 'classes incl. background'})")
    try:
        # the same tolerance as the argmax shortcut below, which relies on this check
        validate_probabilities(probs, regions is not None, SOFTMAX_SUM_TOLERANCE)
    except ValueError as e:
        raise EvaluationInputError(f"{npz}: {e}") from e
    allowed = list(lm.all_labels) + ([lm.ignore_label] if lm.ignore_label is not None else [])
    try:
        validate_labels(ref, allowed)
    except ValueError as e:
        raise EvaluationInputError(f"{ref_path}: {e} (dataset.json labels)") from e

    acc = CalibrationAccumulator(options, regions=regions is not None, region_labels=regions,
                                 ignore_index=lm.ignore_label).update(probs, ref)
    seg = probabilities_to_segmentation(probs, lm, sum_tolerance=SOFTMAX_SUM_TOLERANCE)  # sums checked above
    del probs
    dsc, hd, seg_flags = segmentation_metrics(seg, ref, lm, class_names, spacing, options.convention)
    flags += seg_flags
    metrics = {"DSC": dsc, "HD95": hd, "DSC_mean": float(np.mean(list(dsc.values()))),
               "HD95_mean": float(np.mean(list(hd.values())))}
    metrics.update(acc.compute())
    entry = {"case": job["case"], "folder": job["folder"], "prediction": str(npz), "reference": str(ref_path),
             "spacing": list(spacing), "metrics": metrics, "flags": flags}
    return entry, acc


_STARTED_QUEUE = None  # set in worker processes: (pid, case) is put there when a case starts


def _init_worker(q) -> None:
    global _STARTED_QUEUE
    _STARTED_QUEUE = q
    keep_freed_memory()  # a worker evaluates many large cases: reuse freed memory (see its docstring)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the workers
    q.put((os.getpid(), None))


def _worker(job, lm, class_names, regions, options, reader):
    if _STARTED_QUEUE is not None:
        _STARTED_QUEUE.put((os.getpid(), job["case"]))
    try:
        return "ok", evaluate_case(job, lm, class_names, regions, options, reader)
    except EvaluationInputError as e:
        return "input-error", str(e)


# --------------------------------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------------------------------
def dataset_means(cases: List[dict], class_names: List[str]) -> Dict[str, float]:
    out = {"DSC": nanmean([c["metrics"]["DSC_mean"] for c in cases]),
           "HD95": nanmean([c["metrics"]["HD95_mean"] for c in cases])}
    for k in METRIC_KEYS:
        out[k] = nanmean([c["metrics"][k] for c in cases])
    for name in class_names:
        out[f"DSC_{name}"] = nanmean([c["metrics"]["DSC"][name] for c in cases])
        out[f"HD95_{name}"] = nanmean([c["metrics"]["HD95"][name] for c in cases])
    return out


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
def _case_id(path: Path, ending: str) -> Optional[str]:
    return path.name[:-len(ending)] if path.name.endswith(ending) and not path.name.startswith(".") else None


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
        folder = Path(folder)
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
    missing = {"predictions": no_npz, "references": sorted(no_ref)}
    if not allow_missing:
        if no_ref:
            refs = [str(gt_folder / f"{c}{file_ending}") for c in sorted(no_ref)[:20]]
            raise EvaluationInputError(
                f"{len(no_ref)} prediction(s) have no reference (missing files: {refs}) (--allow-missing skips them)")
        if no_npz:
            raise EvaluationInputError(
                f"{len(no_npz)} case(s) have no prediction CASE.npz in {[str(f) for f in pred_folders]}: "
                f"{no_npz[:20]} (--allow-missing skips them; for a single fold pass its validation cases)")
    if not jobs:
        raise EvaluationInputError("no case has both a prediction and a reference")
    return jobs, missing


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


def _make_staging(out_dir: Path) -> Path:
    """Create the staging folder next to ``out_dir`` now, so that an unwritable location fails before
    any case is computed."""
    _prepare_out_dir(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir)
        tmp = staging_dir(out_dir)
        probe = tmp / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise EvaluationInputError(f"{out_dir}: output location is not writable ({e.strerror or e})") from e
    return tmp


def _run_jobs(jobs, lm, class_names, regions, options, reader, n_proc, bar) -> List[tuple]:
    if n_proc == 1:  # in this process (the caller decides on its allocator: see calib-evaluate)
        results = []
        for job in jobs:
            status, payload = _worker(job, lm, class_names, regions, options, reader)
            if status != "ok":
                raise EvaluationInputError(payload)
            results.append(payload)
            bar.update(1)
        return results
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Queue()
    pids, running = set(), {}  # running: pid -> case it started last

    def drain():
        while True:
            try:
                pid, case = started.get_nowait()
            except (queue_mod.Empty, OSError, ValueError):
                return
            pids.add(pid)
            if case is not None:
                running[pid] = case

    ex = ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_init_worker, initargs=(started,))
    futures = {}
    done_cases = set()
    results = {}
    try:
        for i, job in enumerate(jobs):
            futures[ex.submit(_worker, job, lm, class_names, regions, options, reader)] = i
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            drain()
            for fut in done:
                i = futures[fut]
                try:
                    status, payload = fut.result()
                except BrokenProcessPool:
                    time.sleep(0.2)  # let the queue's feeder threads deliver the last "started" records
                    drain()
                    lost = sorted({c for c in running.values() if c not in done_cases})
                    raise EvaluationInputError(
                        "a worker process died (killed, e.g. out of memory?) while evaluating case(s) "
                        f"{lost or [jobs[i]['case']]}; nothing written. Retry with fewer -np or more memory") from None
                if status != "ok":
                    raise EvaluationInputError(payload)
                results[i] = payload
                done_cases.add(jobs[i]["case"])
                bar.update(1)
    except BaseException:
        drain()
        ex.shutdown(wait=False, cancel_futures=True)
        for pid in pids:  # our own workers only, by pid
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        raise
    ex.shutdown(wait=True)
    return [results[i] for i in range(len(jobs))]


def evaluate_folders(pred_folders: Sequence[PathLike], gt_folder: PathLike, dataset_json: Optional[PathLike] = None,
                     out_dir: Optional[PathLike] = None, num_processes: int = 1, progress: bool = True,
                     write: bool = True, cases: Optional[Sequence[str]] = None, allow_missing: bool = False,
                     options: Optional[MetricOptions] = None, **metric_options) -> dict:
    """Evaluate one or more prediction folders against ``gt_folder``; return (and write) the summary.

    ``options``: the metrics' :class:`~nnunet_calibration.settings.MetricOptions` (defaults, ranges and
    conventions there); or, instead, its fields as keywords (``n_bins_ece=10, ...``), read by
    ``MetricOptions.from_mapping`` (so ``convention="sdc-code"`` implies 10 ECE bins unless given). ``out_dir`` default:
    ``PRED_FOLDER/calibration_evaluation`` (several folders: in their common parent). With
    ``write=False`` nothing is written. Raises :class:`EvaluationInputError` on bad input.

    ``cases``: the case ids that must be evaluated (default: every reference in ``gt_folder``; for
    one fold's ``validation`` folder pass that fold's validation cases, :func:`validation_cases`).
    Missing predictions / references are errors unless ``allow_missing`` (then they are skipped and
    listed in ``summary["missing"]``). ``num_processes`` >= 1.

    Summary schema: ``{"config", "classes", "cases": [{"case", "folder", "metrics": {"DSC": {cls: v},
    "HD95": {cls: v}, "DSC_mean", "HD95_mean", "ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE",
    "mL1-MCE", "NLL", "Brier"}, "flags": [...], ...}], "mean": {...}, "pooled": {...},
    "missing": {"predictions": [...], "references": [...]}}``.
    """
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
    dj_path = Path(dataset_json) if dataset_json is not None else find_dataset_json(pred_folders[0])
    try:
        with open(dj_path) as f:
            dj = json.load(f)
    except Exception as e:
        raise EvaluationInputError(f"{dj_path}: cannot read dataset.json ({e})") from e
    lm, class_names, regions = label_info(dj, str(dj_path))
    seg_names = [SDC_CODE_CLASS] if options.convention == "sdc-code" else class_names
    file_ending = dj.get("file_ending", ".nii.gz")
    jobs, missing = collect_jobs(pred_folders, gt_folder, file_ending, cases, allow_missing)
    reader = reader_writer(dict(dj, file_ending=file_ending), jobs[0]["reference"])
    out_dir = Path(out_dir).resolve() if out_dir is not None else default_out_dir(pred_folders)
    staging = _make_staging(out_dir) if write else None  # before computing: an unwritable output fails now

    from tqdm import tqdm

    try:
        n_proc = min(int(num_processes), len(jobs))
        with tqdm(total=len(jobs), desc="calib-evaluate", unit="case", disable=not progress) as bar:
            results = _run_jobs(jobs, lm, class_names, regions, options, reader, n_proc, bar)
        cases_out = [r[0] for r in results]
        pooled_acc = CalibrationAccumulator(options, regions=regions is not None, region_labels=regions,
                                            ignore_index=lm.ignore_label)
        for _, acc in results:
            pooled_acc = pooled_acc + acc
        summary = {
            "config": {"pred_folders": [str(p) for p in pred_folders], "gt_folder": str(gt_folder),
                       "dataset_json": str(dj_path), "file_ending": file_ending,
                       "reader_writer": type(reader).__name__,
                       "mode": "regions" if regions else "softmax",
                       "regions": [list(r) for r in regions] if regions else None,
                       "ignore_label": lm.ignore_label,
                       "geometry_tolerance": {"spacing_rtol": SPACING_RTOL, "origin_atol_mm": ORIGIN_ATOL,
                                              "origin_rtol": ORIGIN_RTOL, "direction_atol": DIRECTION_ATOL},
                       "n_cases": len(cases_out), **options.to_dict()},
            "classes": seg_names,
            "calibration_classes": class_names,
            "cases": cases_out,
            "mean": dataset_means(cases_out, seg_names),
            "pooled": pooled_acc.compute(),
            "missing": missing,
        }
        summary = json_clean(summary)
        if write:
            _write_outputs(out_dir, staging, summary, class_names, pooled_acc, [r[1] for r in results])
            summary["config"]["out_dir"] = str(out_dir)
    except BaseException:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    return summary


def _write_outputs(out_dir: Path, tmp: Path, summary: dict, class_names, pooled_acc, case_accs) -> None:
    from .plots import plot_dataset_reliability_histogram, plot_reliability_diagram

    summary["config"]["out_dir"] = str(out_dir)
    with open(tmp / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    write_per_case_csv(tmp / "per_case.csv", summary["cases"], summary["classes"])
    edges, n, conf, freq = pooled_acc.reliability()
    for k, name in enumerate(class_names):
        plot_reliability_diagram(tmp / f"reliability_{_safe_name(name)}.png", edges, n[k], conf[k], freq[k],
                                 title=f"Pooled reliability: {name} ({summary['config']['n_cases']} cases)")
    per_case_freq = np.stack([a.reliability()[3] for a in case_accs])  # (cases, K, bins)
    plot_dataset_reliability_histogram(tmp / "dataset_reliability_histogram.png", edges, per_case_freq,
                                       class_names)
    replace_dir(tmp, out_dir)
