"""Apply a fitted post-hoc calibration (``calibration.json`` of :mod:`nnunet_calibration.posthoc.model`)
to a prediction folder: :func:`apply_calibration`.

``PRED_FOLDER`` (``nnUNetv2_predict --save_probabilities`` output, or a ``MODEL/fold_X/validation``
folder of ``nnUNetv2_train --npz``, which has CASE.npz, CASE.pkl, segmentations and summary.json but
no dataset.json / plans.json: those are then taken, and copied to ``OUT``, from ``MODEL``; its
summary.json is not copied, it scores the uncalibrated probabilities) is rewritten into a *new* folder ``OUT`` in nnU-Net's own layout: ``CASE.npz`` (key
``probabilities``, float32, same shape), ``CASE.pkl`` copied, and the segmentation
``CASE{file_ending}``: copied unchanged when the calibration cannot change the decision (one
temperature; any sigmoid scaling), otherwise recomputed from the calibrated probabilities
exactly as nnU-Net does (argmax, first channel winning ties) and written with the plans'
reader/writer and the case's pkl properties. ``dataset.json``, ``plans.json`` and
``predict_from_raw_data_args.json`` are copied; ``calibration.json`` (the applied calibration plus
``applied_to``) is added, and every ``CASE.pkl`` gets the key :data:`PKL_MARK` (a list with one entry
per applied calibration). A folder so marked is refused as ``PRED_FOLDER`` unless ``force`` (the
temperature would be applied twice). Everything is written into a staging folder next to ``OUT``
(:class:`~nnunet_calibration.output_location.StagedOutput`, the checks shared with
``calib-evaluate``: a path under a file or an unwritable place fails before any case is read) that
is renamed at the end; on any error nothing is left. Errors (:class:`CalibrationError` or another
:class:`~nnunet_calibration.errors.UserError`, naming the file): no ``calibration.json``; a field of
it that is missing or wrong (``channels``, ``parameters.temperature(s)`` not a number, not within
the fit's bounds :data:`~.scaling.T_BOUNDS`, not one per channel); a label set or channel count that
differs from the calibration's; no npz files; probabilities failing the evaluator's check (NaN,
outside [0, 1], softmax sums off); an existing ``OUT``, or one that is, contains or lies inside
``PRED_FOLDER`` (or is or contains the model folder).

Which model (calibration.json version 2, field ``model``: dataset, plans, configuration, trainer,
folds; :func:`~.model.model_identity`): the calibration must belong to the model folder ``-m``
(its folder name ``Trainer__Plans__Configuration``, its plans.json's ``dataset_name`` /
``plans_name``, and a ``fold_X`` folder for every fold of ``model.folds``), and the predictions to
the same model: a validation folder's model folder by the same fields, an ``nnUNetv2_predict``
folder by its plans.json's ``dataset_name`` / ``plans_name`` (nnU-Net records neither trainer,
configuration nor folds there; its ``predict_from_raw_data_args.json`` holds only the input/output
arguments). A mismatch is a :class:`CalibrationError` naming both files and the field. A version 1
file (no ``model``) is accepted with a one-line warning on stderr (after the output is written):
its parameters and label set are still checked, refusing it would break every existing calibration;
fit again to get the check (and the unbiased fit).
"""
from __future__ import annotations

import json
import pickle
import shutil
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

from nnunet_calibration.evaluation.case import check_probabilities
from nnunet_calibration.evaluation.core import probabilities_to_segmentation
from nnunet_calibration.output_location import StagedOutput, check_not_an_input, check_output_path
from nnunet_calibration.posthoc import scaling
from nnunet_calibration.posthoc.model import (CALIBRATION_FILE, COPIED_JSON, PKL_MARK, CalibrationError, PathLike,
                                              _labels, _load_json, _load_probs, check_identity, model_identity,
                                              params_from_calibration, read_calibration)
from nnunet_calibration.utils import write_json_atomic


def _read_pkl(pkl: Path) -> dict:
    try:
        with open(pkl, "rb") as f:
            props = pickle.load(f)
    except Exception as e:
        raise CalibrationError(f"{pkl}: unreadable properties pickle ({type(e).__name__}: {e})") from e
    if not isinstance(props, dict):
        raise CalibrationError(f"{pkl}: properties pickle does not hold a dict")
    return props


def calibrated_mark(pred: Path, pkls: Sequence[Path]) -> Optional[str]:
    """Why ``pred`` is already a calibrated output (its ``calibration.json`` with ``applied_to``, or a
    ``CASE.pkl`` with :data:`~.model.PKL_MARK`), or ``None``."""
    cal = pred / CALIBRATION_FILE
    if cal.is_file():
        try:
            rec = json.loads(cal.read_text())
        except (OSError, ValueError):
            rec = None
        if isinstance(rec, dict) and "applied_to" in rec:
            return f"its {CALIBRATION_FILE} records an applied calibration"
    for pkl in pkls:
        if PKL_MARK in _read_pkl(pkl):
            return f"{pkl.name} is marked as calibrated ('{PKL_MARK}')"
    return None


def _same_label_set(a: dict, b: dict) -> bool:
    def norm(labels):
        return {k: sorted(v) if isinstance(v, (list, tuple)) else [v] for k, v in labels.items()}
    return norm(a["labels"]) == norm(b["labels"]) and a.get("regions_class_order") == b.get("regions_class_order")


@dataclass
class _Plan:
    """What :func:`apply_calibration` checked before writing anything."""
    pred: Path
    cal: dict
    cal_path: Path
    params: Any
    lm: Any
    is_regions: bool
    n_channels: int
    npzs: list
    file_ending: str
    recompute: bool  # the calibration can change the argmax: segmentations are recomputed
    rw: Any  # nnU-Net's reader/writer (only when recomputing)
    json_files: dict  # name -> path of dataset.json / plans.json / predict_from_raw_data_args.json to copy


def _warn(message: str) -> None:
    print(f"calib-calibrate: warning: {message}", file=sys.stderr)


def _checked_calibration(model_folder: Path) -> tuple[dict, Path]:
    """The model folder's calibration, checked against the model folder: label set, and (files of
    version 2 and later) the identity of :func:`~.model.model_identity` and the folds (each of
    ``model.folds`` must be a ``fold_X`` folder of it). A file without ``model`` (version 1) is accepted
    with a warning on stderr (module docstring)."""
    cal = read_calibration(model_folder)
    cal_path = model_folder / CALIBRATION_FILE
    if not _same_label_set(_load_json(model_folder / "dataset.json"), cal):
        raise CalibrationError(f"{cal_path}: its label set differs from {model_folder / 'dataset.json'}; fit again")
    if not isinstance(cal.get("model"), dict):
        return cal, cal_path  # warned by apply_calibration once the output is written
    plans_file = model_folder / "plans.json"
    check_identity(cal, cal_path, model_identity(model_folder), f"the model folder {model_folder} (its name and "
                   f"{plans_file.name})")
    folds = cal["model"].get("folds") or []
    missing = [f for f in folds if not (model_folder / f"fold_{f}").is_dir()]
    if missing:
        raise CalibrationError(f"{cal_path}: field 'model.folds' is {folds} but the model folder {model_folder} has no "
                               f"{', '.join(f'fold_{f}' for f in missing)}; this calibration belongs to another "
                               "export of the model (fit it for this one)")
    return cal, cal_path


def validation_model_folder(pred: Path) -> Optional[Path]:
    """The model folder of a ``MODEL/fold_X/validation`` folder (``nnUNetv2_train --npz`` output: CASE.npz,
    CASE.pkl, segmentations, summary.json, but no dataset.json / plans.json), or None for any other folder."""
    pred = pred.resolve()
    if pred.name == "validation" and pred.parent.name.startswith("fold_") and \
            (pred.parent.parent / "dataset.json").is_file() and not (pred / "dataset.json").is_file():
        return pred.parent.parent
    return None


def _check_prediction_source(pred: Path, cal: dict, cal_path: Path) -> dict:
    """``{name: path}`` of the json files that describe ``pred`` (its own, or for a validation folder its
    model folder's), after checking that the model that made ``pred`` is the calibration's."""
    source = validation_model_folder(pred)
    if source is not None:
        check_identity(cal, cal_path, model_identity(source), f"the model folder {source} of the validation "
                       f"folder {pred}")
        return {n: source / n for n in ("dataset.json", "plans.json") if (source / n).is_file()}
    files = {n: pred / n for n in COPIED_JSON if (pred / n).is_file()}
    if "plans.json" in files:
        # nnU-Net's prediction folders record dataset and plans (plans.json), not trainer, configuration or folds
        other = model_identity(pred, _load_json(files["plans.json"]))
        check_identity(cal, cal_path, {"dataset": other["dataset"], "plans": other["plans"]},
                       f"{files['plans.json']} (dataset_name / plans_name)", fields=("dataset", "plans"))
    return files


def _plan(pred: Path, model_folder: Path, out: Path, force: bool) -> _Plan:
    """Every check of the inputs and of ``out`` (nothing is written)."""
    cal, cal_path = _checked_calibration(model_folder)
    if not pred.is_dir():
        raise CalibrationError(f"{pred}: prediction folder does not exist")
    check_not_an_input(out, [("prediction folder", pred, True), ("model folder", model_folder, False)])
    check_output_path(out)
    if out.exists():
        raise CalibrationError(f"{out}: output folder exists; choose a new one")
    json_files = _check_prediction_source(pred, cal, cal_path)
    dj_path = json_files.get("dataset.json", pred / "dataset.json")
    dj = _load_json(dj_path)
    if not _same_label_set(dj, cal):
        raise CalibrationError(f"{dj_path}: label set {dj.get('labels')} (regions_class_order "
                               f"{dj.get('regions_class_order')}) differs from the calibration's {cal['labels']} "
                               f"({cal_path})")
    lm, _, regions = _labels(dj, dj_path)
    params = params_from_calibration(cal, cal_path)
    n_channels = len(cal["channels"])
    if n_channels != lm.num_segmentation_heads:
        raise CalibrationError(f"{cal_path}: field 'channels' names {n_channels} channels, the label set has "
                               f"{lm.num_segmentation_heads}")
    npzs = sorted(pred.glob("*.npz"))
    if not npzs:
        raise CalibrationError(f"{pred}: no CASE.npz files (predict with --save_probabilities)")
    recompute = scaling.changes_decision(params, regions is not None)
    rw = _reader_writer(json_files.get("plans.json", pred / "plans.json"), npzs) if recompute else None
    mark = calibrated_mark(pred, [p for p in (n.with_suffix(".pkl") for n in npzs) if p.is_file()])
    if mark is not None and not force:
        raise CalibrationError(f"{pred}: already calibrated ({mark}); applying again would scale twice; "
                               "pass --force to do it anyway")
    return _Plan(pred, cal, cal_path, params, lm, regions is not None, n_channels, npzs,
                 dj.get("file_ending", ".nii.gz"), recompute, rw, json_files)


def _reader_writer(plans_path: Path, npzs: Sequence[Path]):
    """nnU-Net's image reader/writer of the plans, to write recomputed segmentations (every pkl needed)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager  # only needed to write segmentations

    if not plans_path.is_file():
        raise CalibrationError(f"{plans_path}: needed to write the recomputed segmentations (vector scaling "
                               "can change the argmax) but not found")
    for npz in npzs:
        if not npz.with_suffix(".pkl").is_file():
            raise CalibrationError(f"{npz.with_suffix('.pkl')}: missing; its image properties are needed to write "
                                   "the segmentation")
    return PlansManager(_load_json(plans_path)).image_reader_writer_class()  # an instance (property + call)


def _write_case(plan: _Plan, npz: Path, tmp: Path, applied: dict) -> None:
    p = _load_probs(npz, plan.n_channels)
    check_probabilities(p, plan.is_regions, npz)  # the evaluator's check (NaN, range, sums)
    q = scaling.apply_scaling(p, plan.params, plan.is_regions)
    np.savez_compressed(tmp / npz.name, probabilities=q)
    pkl = npz.with_suffix(".pkl")
    props = _read_pkl(pkl) if pkl.is_file() else None
    if props is not None:  # marked as calibrated (PKL_MARK), otherwise as nnU-Net wrote it
        with open(tmp / pkl.name, "wb") as f:
            pickle.dump(dict(props, **{PKL_MARK: [*props.get(PKL_MARK, []), applied]}), f)
    seg = plan.pred / f"{npz.name[:-4]}{plan.file_ending}"
    if plan.recompute:
        plan.rw.write_seg(probabilities_to_segmentation(q, plan.lm), str(tmp / seg.name), props)
    elif seg.is_file():
        shutil.copy2(seg, tmp / seg.name)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def apply_calibration(pred_folder: PathLike, model_folder: PathLike, out_folder: PathLike,
                      progress: bool = True, force: bool = False) -> dict:
    """Write the calibrated copy of ``pred_folder`` to ``out_folder``; return the written ``calibration.json``.
    ``force``: apply to a folder that is already a calibrated output (scaling twice)."""
    pred, out = Path(pred_folder), Path(out_folder)
    plan = _plan(pred, Path(model_folder), out, force)
    applied = {"calibration": str(plan.cal_path.resolve()), "method": plan.cal["method"],
               "parameters": plan.cal["parameters"], "date": _now()}
    staged = StagedOutput(out)  # checks the location (writable) and creates the staging folder now
    tmp = staged.prepare()  # a killed run's staging folder (its pid is gone) is removed here
    try:
        for name, src in plan.json_files.items():
            shutil.copy2(src, tmp / name)
        for npz in tqdm(plan.npzs, desc="calibration: applying", unit="case", disable=not progress):
            _write_case(plan, npz, tmp, applied)
        rec = dict(plan.cal, applied_to={"prediction_folder": str(pred.resolve()), "cases": len(plan.npzs),
                                         "segmentations": "recomputed" if plan.recompute else "copied",
                                         "date": _now()})
        write_json_atomic(tmp / CALIBRATION_FILE, rec)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    if not isinstance(plan.cal.get("model"), dict):  # said once the output is written (a failed run: its error only)
        _warn(f"{plan.cal_path}: written by an older version (no 'model' field): not checked that it belongs to "
              "this model, and fitted with the biased 1e-7 probability floor; fit again to get both")
    return rec
