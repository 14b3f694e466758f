"""What every (trainer, fold) of an experiment is doing: state, epoch, last pseudo-Dice, time left.

:func:`fold_statuses` combines the fold's files (:func:`~nnunet_calibration.experiments.runner.fold_state`),
SLURM's queue and the last local run with the progress read from nnU-Net's own training logs
(:func:`training_progress`); :func:`format_statuses` prints the table of ``calib-experiment status``
and :func:`watch` refreshes it (``--watch``).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import sys
import time
from pathlib import Path

from nnunetv2.utilities.dataset_name_id_conversion import convert_dataset_name_to_id

from nnunet_calibration.experiments.folds import (FoldStatus, archive_file, fold_folder, fold_state, has_npz, log_path,
                                                  read_local_state, recovery_events, results_root, trained)
from nnunet_calibration.settings import Experiment, ExperimentError


#: nnU-Net's default number of epochs (when neither the experiment nor the fold records one)
NNUNET_DEFAULT_EPOCHS = 1000
_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d+)?: (.*)$")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan")


def _log_sort_key(p: Path):
    # nnU-Net's names hold an unpadded date (training_log_2024_1_9_...): order by the numbers
    nums = [int(x) for x in re.findall(r"\d+", p.name)]
    return nums, p.name


def training_history(fold_folder: str | Path) -> dict[int, dict]:
    """Per-epoch values of one fold read from nnU-Net's ``training_log_*.txt`` files (all runs, oldest first).

    Returns ``{epoch: {"time": s or None, "train_loss", "val_loss", "pseudo_dice": [per class],
    "lr"}}`` (missing values None) for the epochs whose ``Epoch time`` line was logged (*done*).

    Resumes: a run continued with ``--c`` starts at the epoch of the checkpoint it loaded, so every
    epoch an earlier run logged from that epoch on is dropped (it was lost with the crashed run and
    trained again): a fold that logged 70 epochs, crashed and resumed from the checkpoint of epoch 50
    counts 50 done epochs, not 69.
    """
    folder = Path(fold_folder)
    logs = sorted(folder.glob("training_log_*.txt"), key=_log_sort_key) if folder.is_dir() else []
    history: dict[int, dict] = {}
    for log in logs:
        try:
            text = log.read_text(errors="replace")
        except OSError:
            continue
        current, first = None, True
        for line in text.splitlines():
            m = _LOG_LINE.match(line)
            if not m:
                continue
            msg = m.group(1).strip()
            if msg.startswith("Epoch ") and msg[6:].strip().isdigit():
                current = int(msg[6:].strip())
                if first:  # a new run starts here: what earlier runs logged from this epoch on is gone
                    for e in [e for e in history if e >= current]:
                        del history[e]
                    first = False
                history[current] = {"time": None, "train_loss": None, "val_loss": None, "pseudo_dice": None,
                                    "lr": None, "done": False}
            elif current is None:
                continue
            elif msg.startswith("Epoch time:"):
                nums = _NUMBER.findall(msg[len("Epoch time:"):])
                history[current]["time"] = float(nums[0]) if nums else None
                history[current]["done"] = True
            elif msg.startswith("Pseudo dice"):
                body = re.sub(r"np\.float\d*\(", "", msg[len("Pseudo dice"):])
                history[current]["pseudo_dice"] = [float(x) for x in _NUMBER.findall(body)]
            else:
                for key, prefix in (("train_loss", "train_loss"), ("val_loss", "val_loss"),
                                    ("lr", "Current learning rate:")):
                    if msg.startswith(prefix):
                        nums = _NUMBER.findall(msg[len(prefix):])
                        history[current][key] = float(nums[0]) if nums else None
    return {e: {k: v for k, v in rec.items() if k != "done"} for e, rec in sorted(history.items()) if rec["done"]}


def training_progress(fold_folder: str | Path, total_epochs: int | None = None) -> dict:
    """Progress of one fold read from nnU-Net's training logs (:func:`training_history`).

    Conventions: an epoch counts as *done* when nnU-Net logged its ``Epoch time`` line; a resumed run
    (``--c``) drops what earlier runs logged from its first epoch on (see :func:`training_history`).
    ``epoch`` is the number of epochs done; ``current`` the epoch in progress (None when the last one
    logged is done). ``pseudo_dice`` is the mean over classes (ignoring NaN, as nnU-Net's
    ``mean_fg_dice``) of the last done epoch's ``Pseudo dice`` list, ``pseudo_dice_per_class`` that
    list. ``epoch_time`` is the mean of the done epochs' times (s); ``eta`` = ``(total - epoch) *
    epoch_time`` seconds (0 when done, None without a timing). ``total``: ``total_epochs``, else
    ``num_epochs`` of the fold's ``calibration_hparams.json``, else nnU-Net's 1000. ``log``: the newest
    training log (None if none).
    """
    folder = Path(fold_folder)
    logs = sorted(folder.glob("training_log_*.txt"), key=_log_sort_key) if folder.is_dir() else []
    history = training_history(folder)
    current = None
    if logs:  # the epoch the newest log is in, if it is not done
        try:
            started = [int(m.group(1)) for m in re.finditer(r": Epoch (\d+)\s*$", logs[-1].read_text(errors="replace"),
                                                             re.MULTILINE)]
        except OSError:
            started = []
        if started and started[-1] not in history:
            current = started[-1]
    if total_epochs is None:
        try:
            total_epochs = int(json.loads((folder / "calibration_hparams.json").read_text())["training"]["num_epochs"])
        except (OSError, ValueError, KeyError, TypeError):
            total_epochs = NNUNET_DEFAULT_EPOCHS
    done = len(history)
    times = [r["time"] for r in history.values() if r["time"] is not None]
    dice = [r["pseudo_dice"] for r in history.values() if r["pseudo_dice"] is not None]
    last_dice = dice[-1] if dice else None
    finite = [d for d in (last_dice or []) if not math.isnan(d)]
    mean_time = sum(times) / len(times) if times else None
    remaining = max(total_epochs - done, 0)
    eta = 0.0 if remaining == 0 else (remaining * mean_time if mean_time is not None else None)
    return {"epoch": done, "total": total_epochs, "current": current,
            "last_epoch": max(history) if history else None,
            "pseudo_dice": (sum(finite) / len(finite)) if finite else None,
            "pseudo_dice_per_class": last_dice, "epoch_time": mean_time, "eta": eta,
            "log": str(logs[-1]) if logs else None}


def _total_epochs(exp: Experiment, spec) -> int | None:
    n = exp.hparams_for(spec).get("num_epochs")
    return int(n) if n is not None else None


def fold_statuses(exp: Experiment, use_slurm: bool = True) -> list[dict]:
    """One dict per (trainer, fold): label, trainer, fold, status, detail, log, folder, progress.

    ``progress`` is :func:`training_progress` of the fold (epoch / total, last pseudo-Dice, mean
    epoch time, estimated time left, nnU-Net's training log).

    status: ``finished``; ``archived`` (not here, but in the experiment's archive:
    :mod:`~nnunet_calibration.experiments.report.archive`); ``running`` / ``pending`` (and other SLURM states) for tasks SLURM still
    lists; ``failed`` (the last local run or SLURM task ended without a finished fold); ``interrupted``
    (a checkpoint exists, no ``nnUNetv2_train`` of the fold runs on this machine); ``in progress`` (with a
    checkpoint: such a process runs, :func:`_with_checkpoint`; without one: nnU-Net's log is fresh,
    :func:`_without_checkpoint`) / ``stopped`` (log silent and no checkpoint yet); ``not started``.
    The detail also names a resume that fell back to ``checkpoint_previous.pth`` because
    ``checkpoint_latest.pth`` was unreadable (:func:`~nnunet_calibration.experiments.folds.recovery_events`).
    """
    from nnunet_calibration.experiments.slurm import submitted_tasks

    jobs, active, slurm_note = _slurm_view(exp, use_slurm)
    submitted = submitted_tasks(jobs)
    local = read_local_state(exp)
    processes = training_processes()
    out = []
    for spec in exp.trainers:
        for fold in exp.folds_for(spec):
            rec = _fold_status(exp, spec, fold, active, submitted, local, processes)
            if slurm_note and not rec["detail"]:
                rec["detail"] = slurm_note
            out.append(rec)
    return out


def _slurm_view(exp: Experiment, use_slurm: bool) -> tuple[dict, dict, str]:
    """(recorded submissions, {(label, fold): (job, state)} of tasks SLURM still lists, a note if unreadable)."""
    from nnunet_calibration.experiments import slurm

    if not use_slurm:
        return {"submissions": []}, {}, ""
    try:
        jobs = slurm.read_jobs(exp)
        return jobs, slurm.active_tasks(exp, jobs), ""
    except (ExperimentError, OSError) as e:
        return {"submissions": []}, {}, f"(SLURM queue not readable: {e})"


def _fold_status(exp: Experiment, spec, fold: int, active: dict, submitted: dict, local: dict,
                 processes: list) -> dict:
    """One row of :func:`fold_statuses` (see its docstring for the states)."""
    st = fold_state(exp, spec, fold)
    log = log_path(exp, spec.label, fold)
    folder = fold_folder(exp, spec, fold)
    rec = {"label": spec.label, "trainer": spec.name, "fold": fold, "status": st, "detail": "",
           "log": str(log) if log.exists() else "", "folder": str(folder),
           "progress": training_progress(folder, _total_epochs(exp, spec))}
    key, run = (spec.label, fold), local.get(f"{spec.label}/{fold}", {})
    if key in active:
        jid, state = active[key]
        rec.update(status=state.lower(), detail=f"SLURM job {jid}")
    elif st == FoldStatus.ARCHIVED:
        rec["detail"] = f"evaluated rows in {archive_file(exp, spec)} (not trained again)"
    elif st == FoldStatus.FINISHED:
        if not has_npz(exp, spec, fold):
            rec["detail"] = "validation without --npz probabilities (run again to add them)"
    elif key in submitted and st == FoldStatus.INTERRUPTED and _stopped_at_time_limit(log):
        rec.update(detail=f"SLURM job {submitted[key]} stopped at its time limit with a checkpoint, not requeued; "
                          f"run again to continue (--c)", log=str(log))
    elif key in submitted:
        rec.update(status=FoldStatus.FAILED, detail=f"SLURM job {submitted[key]} ended without a finished fold ({st})",
                   log=str(log))
    elif run.get("status") == FoldStatus.FAILED:
        rec.update(status=FoldStatus.FAILED, detail=f"local run exited with {run.get('returncode')} at "
                                                    f"{run.get('time')} ({st})", log=run.get("log", str(log)))
    elif st == FoldStatus.INTERRUPTED:
        rec.update(_with_checkpoint(_running_pid(exp, spec, fold, processes), trained(exp, spec, fold)))
    elif st == FoldStatus.NOT_STARTED and rec["progress"]["log"]:
        rec.update(_without_checkpoint(rec["progress"]))
    return _with_recovery(rec, recovery_events(exp, spec, fold))


def _with_recovery(rec: dict, events: list[dict]) -> dict:
    """Add the last checkpoint fallback (the trainers' record) to the row's detail."""
    if events:
        e = events[-1]
        note = (f"resumed from {e.get('resumed_from')} (epoch {e.get('epoch')}) at {e.get('time')}: "
                f"{e.get('unreadable')} was unreadable" + (f" ({len(events)} such resumes)" if len(events) > 1 else ""))
        rec["detail"] = "; ".join(x for x in (rec["detail"], note) if x)
    return rec


#: a training log written less than this many seconds ago (or 5 mean epoch times, if longer) counts
#: as a training in progress
RECENT_LOG_SECONDS = 300.0


def _without_checkpoint(progress: dict, now: float | None = None) -> dict:
    """Status of a fold that has nnU-Net's training log but no checkpoint yet (nnU-Net writes one only
    every 50 epochs and at the end): ``in progress`` while its log was written within
    ``max(RECENT_LOG_SECONDS, 5 x epoch time)``, else ``stopped`` (its epochs are lost: the next run
    starts the fold again)."""
    try:
        age = (time.time() if now is None else now) - os.path.getmtime(progress["log"])
    except OSError:
        return {}
    limit = max(RECENT_LOG_SECONDS, 5 * (progress.get("epoch_time") or 0.0))
    if age <= limit:
        return {"status": FoldStatus.IN_PROGRESS, "detail": "no checkpoint yet (nnU-Net saves every 50 epochs and at the end)"}
    return {"status": FoldStatus.STOPPED, "detail": f"log silent for {_duration(age)} and no checkpoint: the next run "
                                           "starts this fold again"}


def _with_checkpoint(running_pid: int | None, finished_training: bool) -> dict:
    """Status of a fold with a checkpoint but no finished validation: ``in progress`` while an
    ``nnUNetv2_train`` of this fold runs on this machine (:func:`training_processes`; it must not be started a
    second time), else ``interrupted`` with what the next run does."""
    if running_pid is not None:
        return {"status": FoldStatus.IN_PROGRESS,
                "detail": f"nnUNetv2_train running on this machine (pid {running_pid}): do not start it a second time"}
    return {"status": FoldStatus.INTERRUPTED,
            "detail": ("trained, not validated; run again to validate (--val)" if finished_training else
                       "checkpoint present; run again to continue (--c)")}


def training_processes(proc: str = "/proc") -> list[tuple[int, list[str], str | None]]:
    """``(pid, arguments after nnUNetv2_train, its nnUNet_results)`` of every ``nnUNetv2_train`` process of this
    user that ``proc`` (Linux) lists; ``[]`` where there is no such folder. A process is one whose command line
    holds an argument named ``nnUNetv2_train`` (the console script, run directly or by a Python interpreter)."""
    out = []
    try:
        pids = [int(d) for d in os.listdir(proc) if d.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            with open(f"{proc}/{pid}/cmdline", "rb") as fh:
                argv = [a.decode(errors="replace") for a in fh.read().split(b"\0") if a]
            at = next((i for i, a in enumerate(argv[:2]) if os.path.basename(a) == "nnUNetv2_train"), None)
            if at is None:
                continue
            results = None
            with open(f"{proc}/{pid}/environ", "rb") as fh:
                for item in fh.read().split(b"\0"):
                    if item.startswith(b"nnUNet_results="):
                        results = item.split(b"=", 1)[1].decode(errors="replace")
        except OSError:  # ended meanwhile, or another user's
            continue
        out.append((pid, argv[at + 1:], results))
    return out


#: nnUNetv2_train's options that take no value (so the argument after them is positional)
_FLAGS = {"--c", "--val", "--npz", "--val_best", "--disable_checkpointing", "--use_compressed"}


def _same_dataset(arg: str, dataset_name: str) -> bool:
    """Whether nnUNetv2_train's dataset argument (a name, or an id as nnU-Net accepts it: ``27``, ``027``)
    names ``dataset_name``."""
    if arg.startswith("Dataset"):
        return arg == dataset_name
    return arg.isdigit() and int(arg) == convert_dataset_name_to_id(dataset_name)


def _running_pid(exp: Experiment, spec, fold: int, processes: list) -> int | None:
    """The pid of a process of :func:`training_processes` that trains this fold: dataset (name or id),
    configuration, fold, ``-tr`` (default nnUNetTrainer), ``-p`` (default nnUNetPlans) and ``nnUNet_results``
    (the entry's results root) as :func:`~.runner.train_command` gives them; None if there is none."""
    root = os.path.realpath(results_root(exp, spec))
    for pid, args, results in processes:
        pos = [a for i, a in enumerate(args) if not a.startswith("-") and (i == 0 or not args[i - 1].startswith("-")
                                                                           or args[i - 1] in _FLAGS)]
        opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i] in ("-tr", "-p")}
        if (len(pos) >= 3 and _same_dataset(pos[0], exp.dataset_name) and pos[1] == exp.configuration
                and pos[2] == str(fold) and opts.get("-tr", "nnUNetTrainer") == spec.name and opts.get("-p", "nnUNetPlans") == exp.plans
                and results is not None and os.path.realpath(results) == root):
            return pid
    return None


def _stopped_at_time_limit(log: Path) -> bool:
    """The task's last lines say it was stopped by the time-limit signal and not requeued."""
    try:
        with open(log, "rb") as fh:
            fh.seek(0, 2)
            fh.seek(max(0, fh.tell() - 4000))
            tail = fh.read().decode(errors="replace")
    except OSError:
        return False
    return "stopped by the time limit" in tail and "not requeued" in tail.rsplit("stopped by the time limit", 1)[1]


def report_job_status(exp: Experiment) -> dict | None:
    from nnunet_calibration.experiments import slurm

    try:
        jobs = slurm.read_jobs(exp)
    except (OSError, ValueError):
        return None
    if not jobs.get("submissions"):
        return None
    rep = jobs["submissions"][-1].get("report")
    if not rep:
        return None
    jid = rep["job_id"]
    try:
        queue = slurm.queue_states()
        state = queue.get(jid) or slurm.job_state(jid) or "unknown (no longer listed by SLURM)"
    except ExperimentError as e:
        state = f"unknown ({e})"
    return {"job_id": jid, "state": state, "log": str(exp.state_folder / "logs" / "report.log")}


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, sec = divmod(rest, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{sec:02d}s" if m else f"{sec}s"


def format_statuses(rows: list[dict]) -> str:
    """The status table: trainer, fold, state, epoch/total, last pseudo-Dice, mean epoch time, ETA, log."""
    w = max([len(r["label"]) for r in rows] + [7])
    lines = [f"{'trainer':<{w}}  fold  {'status':<12}  {'epoch':>11}  {'pseudoDice':>10}  {'s/epoch':>8}  "
             f"{'ETA':>7}  log / detail"]
    for r in rows:
        p = r.get("progress") or {}
        epoch = f"{p.get('epoch', 0)}/{p.get('total', '?')}" if p else "-"
        pdice = f"{p['pseudo_dice']:.4f}" if p.get("pseudo_dice") is not None else "-"
        etime = f"{p['epoch_time']:.1f}" if p.get("epoch_time") is not None else "-"
        eta = _duration(p.get("eta")) if p.get("epoch") else "-"
        log = r["log"] or p.get("log") or ""
        tail = " ".join(x for x in (log, r["detail"]) if x)
        lines.append(f"{r['label']:<{w}}  {r['fold']:>4}  {r['status']:<12}  {epoch:>11}  {pdice:>10}  {etime:>8}  "
                     f"{eta:>7}  {tail}")
    return "\n".join(lines)


_DONE_STATES = (FoldStatus.FINISHED, FoldStatus.ARCHIVED, FoldStatus.FAILED)


def watch(exp: Experiment, interval: float = 60.0, rounds: int | None = None, stream=None,
          use_slurm: bool = True) -> list[dict]:
    """Print the status table every ``interval`` seconds (clearing a terminal) until every fold is
    finished or failed, or ``rounds`` tables were printed. Returns the last rows."""
    stream = sys.stdout if stream is None else stream
    n = 0
    while True:
        rows = fold_statuses(exp, use_slurm=use_slurm)
        if stream.isatty():
            stream.write("\033[2J\033[H")
        stream.write(f"{exp.name}  {_dt.datetime.now().isoformat(timespec='seconds')}  "
                     f"(every {interval:g} s; Ctrl-C to stop)\n")
        stream.write(format_statuses(rows) + "\n")
        rep = report_job_status(exp) if use_slurm else None
        if rep:
            stream.write(f"report job {rep['job_id']}: {rep['state']} (log: {rep['log']})\n")
        stream.flush()
        n += 1
        if all(r["status"] in _DONE_STATES for r in rows) or (rounds is not None and n >= rounds):
            return rows
        time.sleep(interval)
