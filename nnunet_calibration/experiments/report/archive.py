"""The experiment archive: each trainer entry's evaluated report rows, kept once all its folds are finished.

Why: a study's trainings live in ``nnUNet_results`` (per fold a checkpoint and the validation probabilities,
tens of MB): too large to keep beside the experiment file, and lost with the machine they ran on. What the
report makes of a trainer entry is small: its :class:`~.report.data.MethodResult` rows (the trainer, its
cross-fitted ``+ TS`` / ``+ VS`` rows, per-case values, reliability statistics, sweep counts, post-hoc
parameters, nnU-Net's per-epoch log) and the evaluator's ``summary.json`` of each fold. With
``report.archive: FOLDER`` in the experiment file, these are written to ``FOLDER/<label>.json`` as soon as
the entry's folds are all finished (by ``calib-experiment run`` after each training, or by
``calib-experiment archive``), and from then on:

- ``run`` (local and SLURM) trains none of the entry's folds: their state is ``archived`` (``status``
  shows it) wherever a fold is not finished here, e.g. on a new machine;
- ``report`` takes the entry's rows from the archive when its folds are not all here (with all folds here
  it evaluates them again, as without an archive).

An archive is never reused silently: ``run`` and ``check``
(:func:`~nnunet_calibration.experiments.nnunet_checks.check_recorded_hparams`) refuse one that was made for another dataset, configuration, plans,
folds, trainer or hyperparameters (the folds' ``calibration_hparams.json`` records are kept and compared
by the same rule as a fold's own, :func:`~nnunet_calibration.experiments.folds.record_problems`), or with other metric options or report
settings, naming the file and the difference. The rows are exact: floats are written by Python's shortest
round-trip repr (``NaN`` / ``Infinity`` as JSON extensions) and numpy arrays with their dtype and shape.
The file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
from pathlib import Path

import numpy as np

from nnunet_calibration import __version__
from nnunet_calibration.experiments.folds import archive_file, record_problems
from nnunet_calibration.experiments.report.data import MethodResult, PosthocFit
from nnunet_calibration.metrics import BinStats
from nnunet_calibration.settings import Experiment, ExperimentError, MetricOptions, Report, TrainerEntry
from nnunet_calibration.utils import write_text_atomic

FORMAT = "nnunet-calibration archive 1"
#: the report settings that change an entry's rows (the others only change how rows are shown)
ROW_SETTINGS = ("temperature_scaling", "vector_scaling", "threshold_sweep", "postprocessing", "max_fit_voxels")
_CLASSES = {c.__name__: c for c in (MethodResult, PosthocFit, BinStats)}


# -- exact JSON of the report's records ------------------------------------------------------------
def encode(v):
    """A JSON-able form of ``v`` that :func:`decode` turns back into an equal object: the report's
    dataclasses, numpy arrays (dtype, shape), tuples and dicts with non-text keys are tagged."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        name = type(v).__name__
        if name not in _CLASSES:
            raise TypeError(f"cannot archive a {name}")
        return {"__dataclass__": name, "fields": {f.name: encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, np.ndarray):
        if v.dtype.kind not in "biuf":
            raise TypeError(f"cannot archive an array of dtype {v.dtype}")
        return {"__ndarray__": v.dtype.str, "shape": list(v.shape), "data": v.ravel().tolist()}
    if isinstance(v, np.generic):
        return encode(v.item())
    if isinstance(v, dict):
        if all(isinstance(k, str) and not k.startswith("__") for k in v):
            return {k: encode(x) for k, x in v.items()}
        return {"__dict__": [[encode(k), encode(x)] for k, x in v.items()]}
    if isinstance(v, tuple):
        return {"__tuple__": [encode(x) for x in v]}
    if isinstance(v, list):
        return [encode(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot archive a {type(v).__name__}")


def decode(v):
    """The inverse of :func:`encode`."""
    if isinstance(v, list):
        return [decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__dataclass__" in v:
        cls = _CLASSES.get(v["__dataclass__"])
        if cls is None:
            raise ValueError(f"unknown record type {v['__dataclass__']!r}")
        return cls(**{k: decode(x) for k, x in v["fields"].items()})
    if "__ndarray__" in v:
        return np.array(v["data"], dtype=np.dtype(v["__ndarray__"])).reshape(v["shape"])
    if "__dict__" in v:
        return {decode(k): decode(x) for k, x in v["__dict__"]}
    if "__tuple__" in v:
        return tuple(decode(x) for x in v["__tuple__"])
    return {k: decode(x) for k, x in v.items()}


# -- what an archive must match ----------------------------------------------------------------------
def _row_settings(report: Report) -> dict:
    return {k: getattr(report, k) for k in ROW_SETTINGS}


def identity(exp: Experiment, entry: TrainerEntry) -> dict:
    """What the archived rows are of, and what they were computed with (compared key by key)."""
    return {"dataset": exp.dataset_name, "configuration": exp.configuration, "plans": exp.plans,
            "trainer": entry.name, "label": entry.label, "run": entry.run, "folds": list(exp.folds_for(entry)),
            "hparams": exp.hparams_for(entry), "evaluation_options": exp.evaluation.options.to_dict(),
            "report": _row_settings(exp.report)}


def _canonical(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def read_archive(exp: Experiment, entry: TrainerEntry) -> dict:
    """The archive of ``entry`` as written by :func:`write_archive` (not decoded); an unreadable file or
    one of another format is an :class:`ExperimentError` naming it."""
    f = archive_file(exp, entry)
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ExperimentError(f"archive {f} cannot be read: {e}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ExperimentError(f"archive {f} is not an archive of this package (format {FORMAT!r})")
    return data


def archive_problems(exp: Experiment, entry: TrainerEntry, data: dict, expected_record: dict | None = None
                     ) -> list[str]:
    """How an archive differs from what the experiment asks for ([] when it matches). ``expected_record``:
    what each fold's ``calibration_hparams.json`` must hold (:func:`~nnunet_calibration.experiments.nnunet_checks.expected_record`)."""
    want, got = _canonical(identity(exp, entry)), _canonical(data.get("identity") or {})
    # an option or setting the archive does not name (it is newer than the archive) had its default then
    if isinstance(got.get("evaluation_options"), dict):
        got["evaluation_options"] = {**_canonical(MetricOptions().to_dict()), **got["evaluation_options"]}
    if isinstance(got.get("report"), dict):
        got["report"] = {**_canonical(_row_settings(Report())), **got["report"]}
    problems = [f"{k} {got.get(k)!r} (the experiment: {want[k]!r})" for k in want if got.get(k) != want[k]]
    if expected_record is not None:
        records = data.get("records") or {}
        for fold in exp.folds_for(entry):
            rec = records.get(str(fold))
            if rec is None:
                problems.append(f"fold {fold}: no training record")
            else:
                problems += [f"fold {fold}: {p}" for p in record_problems(rec, expected_record)]
    return problems


# -- write and read ----------------------------------------------------------------------------------
def write_archive(exp: Experiment, entry: TrainerEntry, rows: list, evaluations: dict, records: dict) -> Path:
    """Write ``entry``'s report ``rows`` (:class:`MethodResult`), the evaluator's summaries
    (``{row method: {fold: summary}}``) and the folds' training records; returns the file."""
    f = archive_file(exp, entry)
    if f is None:
        raise ExperimentError(f"{exp.path}: report.archive is not set")
    data = {"format": FORMAT, "experiment": exp.name, "identity": identity(exp, entry),
            "written": {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
                        "nnunet_calibration": __version__},
            "records": {str(k): v for k, v in records.items()},
            "rows": [encode(r) for r in rows],
            "evaluations": {m: {str(k): s for k, s in per.items()} for m, per in evaluations.items()}}
    return write_text_atomic(f, json.dumps(data, indent=1))


def load_rows(exp: Experiment, entry: TrainerEntry) -> tuple[list, dict]:
    """``(rows, evaluations)`` of ``entry``'s archive (see :func:`write_archive`); refused when it does
    not match the experiment (:func:`archive_problems`; the records are compared by
    :func:`~nnunet_calibration.experiments.nnunet_checks.check_recorded_hparams`, which needs the trainer class)."""
    data = read_archive(exp, entry)
    problems = archive_problems(exp, entry, data)
    if problems:
        raise ExperimentError(f"archive {archive_file(exp, entry)} does not match {exp.path}: " + "; ".join(problems))
    try:
        rows = [decode(r) for r in data["rows"]]
        evaluations = {m: {int(k): s for k, s in per.items()} for m, per in data["evaluations"].items()}
    except (KeyError, TypeError, ValueError) as e:
        raise ExperimentError(f"archive {archive_file(exp, entry)} is damaged: {e}") from None
    if not rows or not all(isinstance(r, MethodResult) for r in rows):
        raise ExperimentError(f"archive {archive_file(exp, entry)} holds no report rows")
    return rows, evaluations
