"""Fold results: where an experiment's trainings live, what state each fold is in, what it was trained with.

Layout (nnU-Net's own, plus the variants' trees)
------------------------------------------------
A training of trainer entry ``e`` on fold ``f`` is nnU-Net's folder
``<results_root>/<DatasetXXX_Name>/<Trainer>__<plans>__<configuration>/fold_<f>`` where
``results_root`` is ``nnUNet_results`` for a plain entry and ``<nnUNet_results>/calib_variants/<label>``
for an entry with ``hparams`` (two variants of one trainer class would otherwise share nnU-Net's
folder; give that tree as ``nnUNet_results`` to ``nnUNetv2_predict`` to use such a model). The
experiment's own state and logs are in ``Experiment.state_folder``: ``logs/<label>_fold<f>.log``,
``local_runs.json``, ``slurm_jobs.json``, ``slurm/``.

States (:class:`FoldStatus`, from nnU-Net's files in the fold folder)
--------------------------------------------------------------------
``finished``: ``checkpoint_final.pth`` and ``validation/summary.json`` exist (if the ``.npz``
probabilities are missing only ``nnUNetv2_train ... --val --npz`` runs to write them);
``archived``: not finished here, but the entry's evaluated rows are in the experiment's archive
(``report.archive``, :mod:`.report.archive`): nothing is trained;
``interrupted``: ``checkpoint_latest.pth`` (continued with ``--c``) or a final checkpoint without
validation (:func:`trained`: only ``--val --npz`` runs); ``not started``: neither. The trainers keep
one older ``checkpoint_previous.pth`` and record a resume that had to fall back to it
(:func:`recovery_events`; :mod:`nnunet_calibration.trainers.timelimit`). The status table adds
``failed``, ``in progress`` and ``stopped`` (see :mod:`.status`) and SLURM's own states.

What a fold was trained with
----------------------------
Every trainer of this package writes ``calibration_hparams.json`` into its fold folder
(:meth:`nnunet_calibration.trainers.base.nnUNetTrainerHparamsBase.used_hparams`): the trainer, its
loss (registry name), the loss's hyperparameters in full, its fixed arguments and nnU-Net's
training settings. :func:`record_problems` compares such a record with what an experiment asks for;
a finished or interrupted fold that was trained otherwise is never reused silently (see
:func:`nnunet_calibration.experiments.nnunet_checks.check_recorded_hparams`).

Writes of this package's own JSON files go through :func:`nnunet_calibration.utils.write_json_atomic`.
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path

from nnunet_calibration.settings import Experiment, TrainerEntry
from nnunet_calibration.timelimit import RECOVERY_FILE
from nnunet_calibration.utils import write_json_atomic

RECORD_FILE = "calibration_hparams.json"


class FoldStatus(str, Enum):
    """A fold's state (a ``str``: prints and compares as its value)."""

    FINISHED = "finished"
    INTERRUPTED = "interrupted"
    NOT_STARTED = "not started"
    FAILED = "failed"
    IN_PROGRESS = "in progress"
    STOPPED = "stopped"
    ARCHIVED = "archived"

    def __str__(self) -> str:
        return self.value


# -- layout --------------------------------------------------------------------------------------
def results_root(exp: Experiment, entry: TrainerEntry) -> Path:
    """The ``nnUNet_results`` ``entry`` trains into (see the module docstring)."""
    base = exp.nnunet_folder("results")
    return base / "calib_variants" / entry.label if entry.is_variant else base


def model_folder(exp: Experiment, entry: TrainerEntry) -> Path:
    if exp.dataset_name is None:
        raise ValueError("the experiment is not validated yet (dataset_name unknown): call nnunet_checks.validate")
    return results_root(exp, entry) / exp.dataset_name / f"{entry.name}__{exp.plans}__{exp.configuration}"


def fold_folder(exp: Experiment, entry: TrainerEntry, fold: int) -> Path:
    return model_folder(exp, entry) / f"fold_{fold}"


def archive_file(exp: Experiment, entry: TrainerEntry) -> Path | None:
    """``<report.archive>/<label>.json`` (None without ``report.archive``; :mod:`.report.archive`)."""
    return exp.resolve(exp.report.archive) / f"{entry.label}.json" if exp.report.archive else None


def archived(exp: Experiment, entry: TrainerEntry) -> bool:
    """Whether ``entry`` has an archive file (whether it matches: :func:`.nnunet_checks.check_recorded_hparams`)."""
    f = archive_file(exp, entry)
    return f is not None and f.is_file()


def log_path(exp: Experiment, label: str, fold: int | str) -> Path:
    return exp.state_folder / "logs" / f"{label}_fold{fold}.log"


def local_state_file(exp: Experiment) -> Path:
    return exp.state_folder / "local_runs.json"


# -- state ---------------------------------------------------------------------------------------
def fold_state(exp: Experiment, entry: TrainerEntry, fold: int) -> FoldStatus:
    d = fold_folder(exp, entry, fold)
    if (d / "checkpoint_final.pth").is_file() and (d / "validation" / "summary.json").is_file():
        return FoldStatus.FINISHED
    if archived(exp, entry):
        return FoldStatus.ARCHIVED
    if (d / "checkpoint_latest.pth").is_file() or (d / "checkpoint_final.pth").is_file():
        return FoldStatus.INTERRUPTED
    return FoldStatus.NOT_STARTED


def trained(exp: Experiment, entry: TrainerEntry, fold: int) -> bool:
    """The training is complete (``checkpoint_final.pth``); the final validation may still be missing."""
    return (fold_folder(exp, entry, fold) / "checkpoint_final.pth").is_file()


def recovery_events(exp: Experiment, entry: TrainerEntry, fold: int) -> list[dict]:
    """Resumes of this fold that fell back to ``checkpoint_previous.pth`` (the trainers' record,
    :data:`nnunet_calibration.timelimit.RECOVERY_FILE`), oldest first; ``[]`` if none."""
    f = fold_folder(exp, entry, fold) / RECOVERY_FILE
    try:
        events = json.loads(f.read_text()) if f.is_file() else []
    except (OSError, json.JSONDecodeError):
        return []
    return events if isinstance(events, list) else []


def has_npz(exp: Experiment, entry: TrainerEntry, fold: int) -> bool:
    return any((fold_folder(exp, entry, fold) / "validation").glob("*.npz"))


def read_local_state(exp: Experiment) -> dict:
    """What the local backend recorded about its last runs (``{}`` if nothing or unreadable)."""
    f = local_state_file(exp)
    try:
        return json.loads(f.read_text()) if f.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def write_local_state(exp: Experiment, state: dict) -> None:
    write_json_atomic(local_state_file(exp), state)


# -- what a fold was trained with ----------------------------------------------------------------
def read_record(fold: Path) -> dict | None:
    """The fold's ``calibration_hparams.json`` (None if absent or unreadable)."""
    f = Path(fold) / RECORD_FILE
    try:
        return json.loads(f.read_text()) if f.is_file() else None
    except (OSError, json.JSONDecodeError):
        return None


def _canonical(v):
    return json.loads(json.dumps(v, sort_keys=True, default=str))


def record_problems(record: dict, expected: dict) -> list[str]:
    """Differences between a fold's record and the ``expected`` one (keys ``trainer``, ``loss``,
    ``loss_hparams``, ``loss_fixed``, ``training_overrides``; see
    :func:`nnunet_calibration.experiments.nnunet_checks.expected_record`). A record that lacks the
    loss (written before the loss was recorded) cannot be checked and is a problem too."""
    problems = []
    if "loss" not in record:
        return ["the record does not name the loss (written by an older version), so it cannot be checked"]
    got = {"trainer": record.get("trainer"), "loss": record.get("loss"),
           "loss_hparams": record.get("loss_hparams", {}), "loss_fixed": record.get("loss_fixed", {}),
           "training_overrides": {k: v for k, v in ((record.get("overrides") or {}).get("parsed") or {}).items()
                                  if k in expected.get("training_keys", ())}}
    for key in ("trainer", "loss", "loss_hparams", "loss_fixed", "training_overrides"):
        if _canonical(got[key]) != _canonical(expected[key]):
            problems.append(f"{key} {got[key]!r} (wanted {expected[key]!r})")
    return problems
