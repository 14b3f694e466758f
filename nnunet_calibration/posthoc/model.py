"""Post-hoc calibration of a trained nnU-Net model folder: fit (``calibration.json``) and apply.

Model folder
------------
``nnUNet_results/DatasetXXX_Name/Trainer__Plans__Configuration`` with ``dataset.json``,
``plans.json`` and ``fold_X/validation/CASE.npz`` (``nnUNetv2_train ... --npz``, or
``nnUNetv2_train ... --val --npz`` afterwards). Folds: ``-f`` or every ``fold_<int>`` folder
(``fold_all`` is never used: its validation cases were trained on). Every case of a used fold must
have its ``CASE.npz``; the references ``CASE{file_ending}`` are read with the evaluator's loader
from, in this order, the ``gt_folder`` argument, ``$nnUNet_preprocessed/DatasetXXX_Name/
gt_segmentations`` (what nnU-Net's own validation compares against) or
``$nnUNet_raw/DatasetXXX_Name/labelsTr``. Labels / regions come from ``dataset.json`` through the
evaluator's :func:`~nnunet_calibration.evaluation.core.label_info`. An ``ignore`` label of
``dataset.json`` (nnU-Net's sparse annotation) is honoured: its voxels are left out of the fit (not
counted in ``voxels.available``), for softmax labels and for sigmoid regions alike (a region never
contains the ignore label, so counting its voxels would make them negatives of every region).

Fit (:func:`fit_model`)
-----------------------
All voxels of the used validation cases (minus ignored ones) form the pool; at most ``max_voxels`` of them (default
2,000,000) are drawn uniformly without replacement with seed ``seed``
(:class:`~nnunet_calibration.posthoc.scaling.VoxelReservoir`). On that sample, one temperature
(``temperature``) or one per channel (``vector``) is fitted by NLL
(:mod:`~nnunet_calibration.posthoc.scaling`, which states every convention). ``calibration.json``
(written atomically: temporary file + rename) holds: ``format``/``version``; ``method``;
``nonlinearity`` (softmax / sigmoid); ``parameters`` (``temperature`` or ``temperatures`` with
``channels``); ``labels`` and ``regions_class_order`` of dataset.json; ``folds``, ``cases``,
``voxels`` (``available``, ``used``, ``max_voxels``, ``seed``); ``nll`` on the sample before and
after (in-sample); with two or more folds ``crossfit`` (for fold k the parameters fitted on the
other folds' sampled voxels, and the NLL of fold k's voxels before and after: an honest held-out
estimate); ``prob_floor`` (the value an exact zero probability is taken as: the smallest positive
float32, :data:`~.scaling.PROB_FLOOR`; version 1 files say 1e-7), ``t_bounds``; ``command``, ``date`` (UTC), ``package_version``;
``caveat`` (:data:`ENSEMBLE_CAVEAT`); since version 2 ``ignore_label``, ``model`` (which model:
``dataset``, ``plans``, ``configuration``, ``trainer`` of :func:`model_identity`, and ``folds``),
``scope`` (:func:`per_fold_scope` / :func:`ensemble_scope`) and ``prediction_folder``.

Ensemble fit (``predictions``): the same fit on a prediction folder of the fold ensemble
(``nnUNetv2_predict -f 0 1 2 3 4 --save_probabilities`` on held-out labelled cases, references in
``gt_folder``); its plans.json / dataset.json must be the model's; ``folds`` names the ensemble's
folds (nnU-Net does not record them); no cross-fit; caveat :data:`ENSEMBLE_FIT_CAVEAT`.

Apply: :mod:`nnunet_calibration.posthoc.apply`.

Fit reads every case with the evaluator's checks
(:func:`~nnunet_calibration.evaluation.case.read_checked`: geometry against ``CASE.pkl``, shapes,
channels, probabilities, label values); a case validated in two folds is an error.
"""
from __future__ import annotations

import json
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import numpy as np
from tqdm import tqdm

from nnunet_calibration.errors import UserError
from nnunet_calibration.evaluation.case import read_checked
from nnunet_calibration.evaluation.core import (EvaluationInputError, label_info, load_probabilities,
                                                reader_writer)
from nnunet_calibration.posthoc import scaling
from nnunet_calibration.utils import write_json_atomic

PathLike = Union[str, os.PathLike]

CALIBRATION_FILE = "calibration.json"
FORMAT = "nnunet-calibration/calibration"
#: 2: fitted without the 1e-7 probability floor; ignore label honoured
VERSION = 2
DEFAULT_MAX_VOXELS = 2_000_000
COPIED_JSON = ("dataset.json", "plans.json", "predict_from_raw_data_args.json")
#: the key that marks a calibrated case in its ``CASE.pkl`` (a list: one entry per calibration applied)
PKL_MARK = "nnunet_calibration_applied"
ENSEMBLE_CAVEAT = (
    "The parameters were fitted on single-fold validation predictions (each case predicted by the one "
    "model that did not train on it). nnU-Net's multi-fold inference averages the folds' logits, which "
    "already softens over-confidence where the folds disagree; applied to such an ensemble the fitted "
    "temperature can over-correct (probabilities too soft). Applied to single-fold predictions it is "
    "what was fitted.")
ENSEMBLE_FIT_CAVEAT = (
    "The parameters were fitted on predictions of the fold ensemble (nnU-Net's averaged logits of the folds in "
    "'model.folds') on held-out labelled cases. Apply them to predictions of that same ensemble; single-fold "
    "predictions are more over-confident and would be under-corrected.")


class CalibrationError(UserError):
    """Bad input for fitting or applying (the message names the file and what is wrong)."""


# -- reading ---------------------------------------------------------------------------------------
def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise CalibrationError(f"{path}: file not found")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(f"{path}: unreadable JSON ({e})") from e


def _labels(dataset_json: dict, source: Path):
    try:
        return label_info(dataset_json, str(source))
    except EvaluationInputError as e:
        raise CalibrationError(str(e)) from e


def read_model_folder(model_folder: PathLike) -> dict:
    """``dataset_json``, ``plans``, ``label_manager``, ``channels`` (names), ``regions`` (or None)."""
    folder = Path(model_folder)
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: model folder does not exist")
    dj = _load_json(folder / "dataset.json")
    plans = _load_json(folder / "plans.json")
    lm, names, regions = _labels(dj, folder / "dataset.json")
    channels = names if regions is not None else ["background", *names]
    return {"folder": folder, "dataset_json": dj, "plans": plans, "label_manager": lm, "channels": channels,
            "regions": regions}


def validation_cases(model_folder: PathLike, folds: Optional[Sequence[int]] = None,
                     file_ending: str = ".nii.gz") -> dict[int, list[Path]]:
    """``{fold: [CASE.npz, ...]}`` of ``fold_X/validation``; every case there needs its npz."""
    folder = Path(model_folder)
    if folds is None:
        folds = sorted(int(p.name[5:]) for p in folder.glob("fold_*") if p.is_dir() and p.name[5:].isdigit())
        if not folds:
            raise CalibrationError(f"{folder}: no fold_<number> folders (is this a trained nnU-Net model folder?)")
    out = {}
    for f in folds:
        val = folder / f"fold_{f}" / "validation"
        if not val.is_dir():
            raise CalibrationError(f"{val}: validation folder does not exist (fold {f} not trained or not validated)")
        npzs = sorted(val.glob("*.npz"))
        segs = {p.name[:-len(file_ending)] for p in val.glob(f"*{file_ending}")}
        missing = sorted(segs - {p.name[:-4] for p in npzs})
        if not npzs or missing:
            what = f"cases without CASE.npz: {missing[:5]}" if npzs else "no CASE.npz files"
            raise CalibrationError(f"{val}: {what}; run nnUNetv2_train DATASET CONFIG {f} --val --npz "
                                   f"(-tr TRAINER -p PLANS) to write the validation probabilities")
        out[int(f)] = npzs
    seen: dict[str, int] = {}
    for f, npzs in out.items():
        for npz in npzs:
            case = npz.name[:-4]
            if case in seen:
                raise CalibrationError(f"{npz}: case '{case}' is in the validation of fold {seen[case]} and of fold "
                                       f"{f}; a case may be validated in one fold only (the fit would count it twice "
                                       "and the cross-fit would leak it)")
            seen[case] = f
    return out


def reference_folder(model_folder: PathLike, gt_folder: Optional[PathLike] = None) -> Path:
    """Where the references are (module docstring, order of the candidates)."""
    if gt_folder is not None:
        if not Path(gt_folder).is_dir():
            raise CalibrationError(f"{gt_folder}: reference folder does not exist")
        return Path(gt_folder)
    dataset = Path(model_folder).resolve().parent.name
    tried = []
    for var, sub in (("nnUNet_preprocessed", "gt_segmentations"), ("nnUNet_raw", "labelsTr")):
        root = os.environ.get(var)
        if root:
            cand = Path(root) / dataset / sub
            tried.append(str(cand))
            if cand.is_dir():
                return cand
    tried_text = ", ".join(tried) if tried else "nothing: nnUNet_preprocessed and nnUNet_raw are not set"
    raise CalibrationError(f"{model_folder}: no reference folder found (tried {tried_text}); pass one with --gt")


def _read_case(npz: Path, gt: Path, file_ending: str, lm, regions, reader):
    """``(probs, ref)`` of a validation case after the evaluator's checks
    (:func:`~nnunet_calibration.evaluation.case.read_checked`: geometry against CASE.pkl, shapes,
    channels, probabilities, label values)."""
    case = npz.name[:-4]
    path = gt / f"{case}{file_ending}"
    if not path.is_file():
        raise CalibrationError(f"{path}: reference of case '{case}' not found")
    job = {"case": case, "folder": str(npz.parent), "npz": npz, "reference": path, "file_ending": file_ending}
    probs, ref, _, _ = read_checked(job, lm, regions, reader)
    return probs, ref


def _load_probs(path: Path, n_channels: int) -> np.ndarray:
    try:
        p = load_probabilities(path)
    except EvaluationInputError as e:
        raise CalibrationError(str(e)) from e
    if p.shape[0] != n_channels:
        raise CalibrationError(f"{path}: {p.shape[0]} probability channels, the label set has {n_channels}")
    return p


# -- which model -----------------------------------------------------------------------------------
#: the fields of ``calibration.json``'s ``model`` that name the model a calibration belongs to
IDENTITY_FIELDS = ("dataset", "plans", "configuration", "trainer")


def model_identity(model_folder: PathLike, plans: Optional[dict] = None) -> dict:
    """``{"dataset", "plans", "configuration", "trainer"}`` of ``.../DatasetXXX_Name/Trainer__Plans__Configuration``.

    ``dataset`` / ``plans``: nnU-Net's ``dataset_name`` / ``plans_name`` of the folder's ``plans.json``
    (``plans``: that dict if already read), else the parent folder's name / the folder name's middle
    part; ``trainer`` / ``configuration``: the folder name, split by nnU-Net's own
    ``convert_identifier_to_trainer_plans_config``. A field that cannot be known (a folder name not of
    that form) is ``None``, and is then not compared by :func:`check_identity`."""
    folder = Path(model_folder).resolve()
    if plans is None:
        plans = _load_json(folder / "plans.json") if (folder / "plans.json").is_file() else {}
    parts = folder.name.split("__")
    trainer = plans_name = configuration = None
    if len(parts) == 3 and all(parts):
        from nnunetv2.utilities.file_path_utilities import convert_identifier_to_trainer_plans_config
        trainer, plans_name, configuration = convert_identifier_to_trainer_plans_config(folder.name)
    dataset = plans.get("dataset_name") if isinstance(plans, dict) else None
    plans_name = (plans.get("plans_name") if isinstance(plans, dict) else None) or plans_name
    if dataset is None and folder.parent.name.startswith("Dataset"):
        dataset = folder.parent.name
    return {"dataset": dataset, "plans": plans_name, "configuration": configuration, "trainer": trainer}


def check_identity(cal: dict, cal_path: PathLike, other: dict, other_source: str,
                   fields: Sequence[str] = IDENTITY_FIELDS) -> None:
    """A :class:`CalibrationError` naming both files and the first differing field when ``other`` (an
    identity, :func:`model_identity`) disagrees with ``cal["model"]``; fields unknown on either side
    are not compared. ``cal`` without ``model`` (a version 1 file): nothing to compare (the caller warns)."""
    mine = cal.get("model")
    if not isinstance(mine, dict):
        return
    for field in fields:
        a, b = mine.get(field), other.get(field)
        if a is not None and b is not None and a != b:
            raise CalibrationError(f"{cal_path}: field 'model.{field}' is {a!r} but {other_source} says {b!r}; "
                                   "this calibration belongs to another model (fit it for this one)")


def per_fold_scope(folds: Sequence[int]) -> str:
    """``scope`` of a calibration fitted on the models' own validation predictions (``fold_X/validation``)."""
    return f"folds {' '.join(map(str, folds))} validation (per fold: each case predicted by the fold that did not train on it)"


def ensemble_scope(folds: Sequence[int]) -> str:
    """``scope`` of a calibration fitted on predictions of the fold ensemble (averaged logits)."""
    return f"ensemble of folds {' '.join(map(str, folds))}"


# -- fit -------------------------------------------------------------------------------------------
def _params_json(params, method: str, channels: list) -> dict:
    if method == "temperature":
        return {"temperature": float(params)}
    return {"temperatures": [float(t) for t in np.asarray(params)], "channels": list(channels)}


def _temperature(value, path, field: str) -> float:
    lo, hi = scaling.T_BOUNDS
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CalibrationError(f"{path}: field '{field}' must be a number, got {value!r}")
    if not (math.isfinite(value) and lo * (1 - 1e-9) <= value <= hi * (1 + 1e-9)):
        raise CalibrationError(f"{path}: field '{field}' is {value!r}, outside the fitted range [{lo:g}, {hi:g}] "
                               "(t_bounds)")
    return float(value)


def params_from_calibration(calibration: dict, path: PathLike = CALIBRATION_FILE):
    """The parameters of a ``calibration.json`` dict: ``float`` (temperature) or ``ndarray`` (vector),
    checked: numbers within the fit's bounds :data:`~.scaling.T_BOUNDS`, one per channel of
    ``channels`` (a :class:`CalibrationError` naming ``path`` and the field otherwise)."""
    channels = calibration.get("channels")
    if not isinstance(channels, list) or not channels or not all(isinstance(c, str) for c in channels):
        raise CalibrationError(f"{path}: field 'channels' is missing or not a list of channel names "
                               f"(got {channels!r})")
    p = calibration.get("parameters")
    if not isinstance(p, dict):
        raise CalibrationError(f"{path}: field 'parameters' is missing or not an object")
    if calibration.get("method") == "temperature":
        return _temperature(p.get("temperature"), path, "parameters.temperature")
    temps = p.get("temperatures")
    if not isinstance(temps, list):
        raise CalibrationError(f"{path}: field 'parameters.temperatures' must be a list, got {temps!r}")
    if len(temps) != len(channels):
        raise CalibrationError(f"{path}: field 'parameters.temperatures' has {len(temps)} values for the "
                               f"{len(channels)} channels {channels}")
    if "channels" in p and p["channels"] != channels:
        raise CalibrationError(f"{path}: field 'parameters.channels' {p['channels']!r} differs from 'channels' "
                               f"{channels!r}")
    return np.asarray([_temperature(t, path, f"parameters.temperatures[{i}]") for i, t in enumerate(temps)], float)


def _package_version() -> str:
    try:
        from importlib.metadata import version
        return version("nnunet-calibration")
    except Exception:  # not installed (PYTHONPATH use)
        return "unknown"


def model_folds(model_folder: PathLike) -> list[int]:
    """The ``fold_<int>`` folders of a model folder (``fold_all`` is never one of them)."""
    folder = Path(model_folder)
    return sorted(int(p.name[5:]) for p in folder.glob("fold_*") if p.is_dir() and p.name[5:].isdigit())


def _prediction_cases(model_folder: Path, identity: dict, dj: dict, pred: Path) -> list[Path]:
    """The ``CASE.npz`` of a prediction folder of this model (``nnUNetv2_predict --save_probabilities``),
    after checking its plans.json / dataset.json against the model folder's."""
    if not pred.is_dir():
        raise CalibrationError(f"{pred}: prediction folder does not exist")
    if (pred / "plans.json").is_file():
        other = model_identity(model_folder, _load_json(pred / "plans.json"))
        mine = {k: identity[k] for k in ("dataset", "plans")}
        for k, v in mine.items():
            if v is not None and other[k] is not None and other[k] != v:
                raise CalibrationError(f"{pred / 'plans.json'}: {'dataset_name' if k == 'dataset' else 'plans_name'} "
                                       f"{other[k]!r} differs from {model_folder / 'plans.json'} ({v!r}); these "
                                       "predictions were made by another model")
    if (pred / "dataset.json").is_file():
        pdj = _load_json(pred / "dataset.json")
        if pdj.get("labels") != dj.get("labels") or pdj.get("regions_class_order") != dj.get("regions_class_order"):
            raise CalibrationError(f"{pred / 'dataset.json'}: label set differs from {model_folder / 'dataset.json'}")
    npzs = sorted(pred.glob("*.npz"))
    if not npzs:
        raise CalibrationError(f"{pred}: no CASE.npz files (predict with --save_probabilities)")
    return npzs


def fit_model(model_folder: PathLike, folds: Optional[Sequence[int]] = None, method: str = "temperature",
              max_voxels: Optional[int] = DEFAULT_MAX_VOXELS, seed: int = 0, gt_folder: Optional[PathLike] = None,
              command: Optional[str] = None, progress: bool = True, write: bool = True,
              predictions: Optional[PathLike] = None) -> dict:
    """Fit and write (``write``) and return the ``calibration.json`` dict.

    Without ``predictions``: on the model's own validation predictions ``fold_X/validation`` of
    ``folds`` (per-fold scope, :func:`per_fold_scope`; cross-fitted estimate with two folds or more).
    With ``predictions``: on a prediction folder made by the ensemble of ``folds`` (default: every
    ``fold_<int>`` folder of the model; nnU-Net does not record the folds in the prediction folder, so
    they are taken as stated) on held-out labelled cases whose references are in ``gt_folder``
    (ensemble scope, :func:`ensemble_scope`; no cross-fit). Both record ``model`` (the identity of
    :func:`model_identity` plus ``folds``) and ``scope``."""
    if method not in scaling.METHODS:
        raise CalibrationError(f"unknown method {method!r}; choose one of {scaling.METHODS}")
    info = read_model_folder(model_folder)
    folder = info["folder"]
    dj, regions, channels = info["dataset_json"], info["regions"], info["channels"]
    file_ending = dj.get("file_ending", ".nii.gz")
    identity = model_identity(folder, info["plans"])
    if predictions is None:
        cases = validation_cases(folder, folds, file_ending)
        jobs = [(f, npz) for f, npzs in cases.items() for npz in npzs]
        used_folds, scope, what = sorted(cases), per_fold_scope(sorted(cases)), "validation cases"
    else:
        npzs = _prediction_cases(folder, identity, dj, Path(predictions))
        used_folds = sorted(int(f) for f in folds) if folds else model_folds(folder)
        if not used_folds:
            raise CalibrationError(f"{folder}: no fold_<number> folders; name the folds of the ensemble with -f")
        jobs = [(0, npz) for npz in npzs]
        scope, what = ensemble_scope(used_folds), "ensemble predictions"
    gt = reference_folder(folder, gt_folder)
    reader = reader_writer(dj)
    ignore_label = info["label_manager"].ignore_label
    res = scaling.VoxelReservoir(max_voxels, seed)
    for f, npz in tqdm(jobs, desc=f"calibration: reading {what}", unit="case", disable=not progress):
        p, y = _read_case(npz, gt, file_ending, info["label_manager"], regions, reader)
        try:
            res.add_case(p, y, regions, ignore_label=ignore_label, group=f)
        except ValueError as e:
            raise CalibrationError(f"{npz}: {e}") from e
    is_regions = regions is not None
    lp, y, groups = res.result()
    if len(lp) == 0:
        raise CalibrationError(f"{gt}: every reference voxel of the {len(jobs)} {what} is the ignore label "
                               f"{ignore_label}; nothing to fit on")
    params = scaling.fit(lp, y, is_regions, method)
    rec = {
        "format": FORMAT, "version": VERSION, "method": method,
        "nonlinearity": "sigmoid" if is_regions else "softmax",
        "parameters": _params_json(params, method, channels),
        "channels": channels, "labels": dj["labels"], "regions_class_order": dj.get("regions_class_order"),
        "model": dict(identity, folds=used_folds), "scope": scope,
        "prediction_folder": None if predictions is None else str(Path(predictions).resolve()),
        "model_folder": str(folder.resolve()), "folds": used_folds,
        "cases": len(jobs), "reference_folder": str(gt.resolve()), "ignore_label": ignore_label,
        "voxels": {"available": int(res.seen), "used": int(len(lp)), "max_voxels": max_voxels, "seed": seed},
        "nll": {"before": scaling.nll(lp, y, is_regions), "after": scaling.nll(lp, y, is_regions, params),
                "note": "in-sample: mean NLL of the fitted voxels"},
        "crossfit": None,
        "prob_floor": scaling.PROB_FLOOR, "t_bounds": list(scaling.T_BOUNDS),
        "command": command if command is not None else " ".join(sys.argv),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "package_version": _package_version(),
        "caveat": ENSEMBLE_CAVEAT if predictions is None else ENSEMBLE_FIT_CAVEAT,
    }
    by_fold = res.by_group()
    if predictions is None and len(by_fold) >= 2:
        cf, _ = scaling.crossfit(by_fold, is_regions, method)
        n = sum(len(v[0]) for v in by_fold.values())
        before = sum(scaling.nll(*by_fold[k], is_regions) * len(by_fold[k][0]) for k in by_fold) / n
        after = sum(scaling.nll(*by_fold[k], is_regions, cf[k]) * len(by_fold[k][0]) for k in by_fold) / n
        rec["crossfit"] = {"parameters": {str(k): _params_json(v, method, channels) for k, v in cf.items()},
                           "nll_before": before, "nll_after": after,
                           "note": "for fold k fitted on the other folds' sampled voxels, NLL on fold k's; "
                                   "voxel-weighted mean over folds"}
    if write:
        write_json_atomic(folder / CALIBRATION_FILE, rec)
    return rec


def read_calibration(model_folder: PathLike) -> dict:
    """The ``calibration.json`` of a model folder, checked."""
    path = Path(model_folder) / CALIBRATION_FILE
    if not path.is_file():
        raise CalibrationError(f"{path}: not found; run 'calib-calibrate fit {model_folder}' first")
    cal = _load_json(path)
    if not isinstance(cal, dict) or cal.get("format") != FORMAT:
        got = cal.get("format") if isinstance(cal, dict) else type(cal).__name__
        raise CalibrationError(f"{path}: not a calibration file of this package (format {got!r})")
    if cal.get("method") not in scaling.METHODS:
        raise CalibrationError(f"{path}: field 'method' must be one of {scaling.METHODS}, got {cal.get('method')!r}")
    if not isinstance(cal.get("labels"), dict):
        raise CalibrationError(f"{path}: field 'labels' is missing or not an object")
    params_from_calibration(cal, path)
    return cal


def format_summary(rec: dict) -> Iterable[str]:
    """Human-readable lines about a calibration record (for the CLI)."""
    p = rec["parameters"]
    if "temperature" in p:
        yield f"method: temperature  T = {p['temperature']:.4f}"
    else:
        yield "method: vector  " + ", ".join(f"{c}: {t:.4f}" for c, t in zip(p["channels"], p["temperatures"]))
    if rec.get("scope"):
        yield f"scope: {rec['scope']}"
    yield (f"folds {rec['folds']}, {rec['cases']} cases, {rec['voxels']['used']} of {rec['voxels']['available']} "
           f"voxels; NLL {rec['nll']['before']:.4f} -> {rec['nll']['after']:.4f} (in-sample)")
    if rec.get("crossfit"):
        yield f"cross-fitted NLL {rec['crossfit']['nll_before']:.4f} -> {rec['crossfit']['nll_after']:.4f}"
