"""The local backend: one fold's ``nnUNetv2_train`` command and environment, and every unfinished fold run
on this machine (one after another, or ``--parallel N`` side by side).

Every training runs ``nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER -p PLANS --npz -device DEVICE``
(``--c`` for an interrupted fold, only ``--val --npz`` for a trained fold without validation or
probabilities, nothing for a finished one; states: :mod:`.folds`) with ``nnUNet_results`` of its trainer entry and
``NNUNET_CALIB_HPARAMS`` (:mod:`nnunet_calibration.settings.training`). Output goes to
``<state>/logs/<label>_fold<F>.log``. Interrupted (Ctrl-C, SIGTERM), the backend stops the trainings it
started (their process groups) before it returns; they continue with ``--c`` from their last
checkpoint on the next run.
"""
from __future__ import annotations

import datetime as _dt
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from nnunet_calibration.experiments.environment import experiment_env, resolve_device
from nnunet_calibration.experiments.folds import (FoldStatus, fold_state, has_npz, log_path, read_local_state,
                                                  results_root, trained, write_local_state)
from nnunet_calibration.nnunet_utils import nnunet_command, training_env
from nnunet_calibration.settings import HPARAMS_ENV, Experiment, ExperimentError, TrainerEntry, hparams_env_value


def train_command(exp: Experiment, entry: TrainerEntry, fold: int, device: str,
                  num_gpus: int = 1) -> list[str] | None:
    """The ``nnUNetv2_train`` argv for this fold's state, or None when it is finished.

    ``num_gpus > 1`` (CUDA only) adds nnU-Net's multi-GPU mode ``-num_gpus N`` (DDP, one process per GPU).
    """
    state = fold_state(exp, entry, fold)
    if state == FoldStatus.ARCHIVED:
        return None
    base = nnunet_command("nnUNetv2_train") + [exp.dataset_name, exp.configuration, str(fold), "-tr", entry.name,
                                                "-p", exp.plans, "--npz", "-device", device]
    if num_gpus > 1 and device == "cuda":
        base += ["-num_gpus", str(num_gpus)]
    if state == FoldStatus.FINISHED:
        return None if has_npz(exp, entry, fold) else base + ["--val"]
    if state == FoldStatus.INTERRUPTED:
        # trained but not validated (stopped during the final validation): validate only
        return base + (["--val"] if trained(exp, entry, fold) else ["--c"])
    return base


def _skipped(exp: Experiment, entry: TrainerEntry, fold: int) -> str:
    """Why :func:`train_command` gave None: the fold is finished, or archived."""
    return f"skipped ({fold_state(exp, entry, fold)})"


def fold_env(exp: Experiment, entry: TrainerEntry, device: str, base: dict | None = None) -> dict:
    """One fold's training environment: :func:`~.environment.experiment_env` for ``device`` (on the CPU
    also ``nnUNet_n_proc_DA=0``), its ``nnUNet_results`` and ``NNUNET_CALIB_HPARAMS``, and this Python
    environment's ``bin`` first on ``PATH`` (nnU-Net's console scripts, the plugin)."""
    env = experiment_env(exp, base, device)
    if device == "cpu":
        env = training_env(env)
    env["nnUNet_results"] = str(results_root(exp, entry))
    value = hparams_env_value(exp.hparams_for(entry))
    if value is None:
        env.pop(HPARAMS_ENV, None)
    else:
        env[HPARAMS_ENV] = value
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


class _Children:
    """The trainings this process started (each in its own process group), stopped on interrupt."""

    def __init__(self):
        self.lock = threading.Lock()
        self.procs: set[subprocess.Popen] = set()
        self.stopping = False

    def start(self, cmd, env, out) -> subprocess.Popen:
        with self.lock:
            if self.stopping:
                raise KeyboardInterrupt("stopping")
            # a process group of its own (stopped as a whole on interrupt) in this session, so that the
            # training keeps the session's scheduling priority (nice / autogroup)
            proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, process_group=0)
            self.procs.add(proc)
        return proc

    def done(self, proc) -> None:
        with self.lock:
            self.procs.discard(proc)

    def stop_all(self, grace: float = 30.0) -> None:
        """SIGTERM to every running training's process group, SIGKILL after ``grace`` seconds."""
        with self.lock:
            self.stopping = True
            procs = list(self.procs)
        for proc in procs:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        for proc in procs:
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait()


def run_fold(exp: Experiment, entry: TrainerEntry, fold: int, device: str, log: Path | None = None,
             append: bool = False, extra_env: dict | None = None, children: _Children | None = None
             ) -> tuple[str, int]:
    """Train (or resume, or re-validate) one fold. Returns (what was done, return code).

    ``extra_env``: variables added to the fold's environment where not already set there (e.g.
    ``OMP_NUM_THREADS`` when folds run side by side)."""
    cmd = train_command(exp, entry, fold, device)
    if cmd is None:
        return _skipped(exp, entry, fold), 0
    what = "validation only (--val --npz)" if "--val" in cmd else ("resumed (--c)" if "--c" in cmd else "trained")
    env = fold_env(exp, entry, device)
    for k, v in (extra_env or {}).items():
        env.setdefault(k, v)
    children = children or _Children()
    out = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        out = open(log, "a" if append else "w")
        out.write(f"# {_dt.datetime.now().isoformat(timespec='seconds')} {what}: {' '.join(cmd)}\n")
        out.write(f"# nnUNet_results={env['nnUNet_results']} {HPARAMS_ENV}={env.get(HPARAMS_ENV)}\n")
        out.flush()
    try:
        proc = children.start(cmd, env, out)
        try:
            rc = proc.wait()
        finally:
            children.done(proc)
    finally:
        if out is not None:
            out.close()
    return what, rc


def side_by_side_env(parallel: int, cores: int | None = None) -> dict:
    """Thread settings for ``parallel`` trainings side by side (empty for one training).

    ``OMP_NUM_THREADS = max(1, cores // parallel)`` and ``OMP_WAIT_POLICY=PASSIVE``: an nnU-Net
    training runs its data augmentation in a second thread of the same process, and with OpenMP's
    default (spinning) wait policy two single-threaded trainings on 2 cores took more than 40 s per
    epoch of 50 iterations of ``2d_small`` instead of 16.5 s (measured here; one training alone:
    7.3 s). Values already in the environment win (``run_fold`` only adds missing ones)."""
    if parallel <= 1:
        return {}
    cores = cores or os.cpu_count() or 1
    return {"OMP_NUM_THREADS": str(max(1, cores // parallel)), "OMP_WAIT_POLICY": "PASSIVE"}


def training_order(exp: Experiment) -> list[tuple[TrainerEntry, int]]:
    """Every (entry, fold) of the experiment in the local backend's order (``exp.order``, see :func:`run_local`)."""
    if exp.order == "trainers":
        return [(entry, fold) for entry in exp.trainers for fold in exp.folds_for(entry)]
    return [(entry, fold) for fold in exp.all_folds for entry in exp.trainers if fold in exp.folds_for(entry)]


def _archive(exp: Experiment, labels, progress: bool) -> None:
    """Archive the finished entries among ``labels`` (all: None) when ``report.archive`` is set; a failure
    is printed, not raised (the trainings go on)."""
    if not exp.report.archive:
        return
    from nnunet_calibration.experiments.report.gather import archive_finished  # the report's evaluation

    try:
        for label, path in archive_finished(exp, labels).items():
            tqdm.write(f"archived {label}: {path}")
    except Exception as e:  # noqa: BLE001 - reported; the archive can be made later
        tqdm.write(f"ARCHIVE FAILED for {labels or 'the finished entries'}: {e} "
                   f"(calib-experiment archive {exp.path} tries again)")


def run_local(exp: Experiment, progress: bool = True, parallel: int = 1) -> dict:
    """Run every unfinished (trainer, fold). Returns {(label, fold): (what, rc)}.

    ``parallel``: how many folds train side by side (default 1: one after another). With more than
    one, each training gets :func:`side_by_side_env` unless the environment sets them. On 2 cores two
    trainings side by side and one after another took about the same time per training.

    Order (``exp.order``): ``folds``, fold by fold (every trainer's fold 0, then every trainer's fold 1, ...),
    so that a study stopped part-way has all its methods on the same folds; ``trainers``, trainer by trainer.
    With ``report.archive``, every entry whose folds are all finished is archived
    (:func:`~.report.gather.archive_finished`): those finished before the run at its start, the others as
    soon as their last fold finishes (while the other trainings go on); a failed archiving is reported and
    the run goes on (``calib-experiment archive`` tries again). Interrupted (``KeyboardInterrupt``, i.e.
    Ctrl-C or SIGTERM under :func:`nnunet_calibration.utils.cli_main`), the running trainings are
    stopped (SIGTERM to their process groups, SIGKILL after 30 s) before the interrupt goes on.
    """
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ExperimentError(f"parallel must be an integer >= 1, got {parallel!r}")
    device = resolve_device(exp, slurm=False)
    state = read_local_state(exp)
    done, todo = {}, []
    for entry, fold in training_order(exp):
        if train_command(exp, entry, fold, device) is None:
            done[(entry.label, fold)] = (_skipped(exp, entry, fold), 0)
        else:
            todo.append((entry, fold))
    extra = side_by_side_env(parallel)
    children = _Children()
    bar = tqdm(total=len(todo), desc=f"{exp.name}: trainings", disable=not progress, unit="fold")

    def record(entry: TrainerEntry, fold: int, what: str, rc: int) -> None:
        log = log_path(exp, entry.label, fold)
        done[(entry.label, fold)] = (what, rc)
        state[f"{entry.label}/{fold}"] = {"status": str(FoldStatus.FINISHED if rc == 0 else FoldStatus.FAILED), "what": what,
                                          "returncode": rc, "log": str(log),
                                          "time": _dt.datetime.now().isoformat(timespec="seconds")}
        write_local_state(exp, state)
        bar.update(1)
        if rc != 0:
            tqdm.write(f"FAILED: {entry.label} fold {fold} (exit {rc}); log: {log}")
        else:
            _archive(exp, [entry.label], progress)

    pool = ThreadPoolExecutor(max_workers=parallel)  # threads only wait for subprocesses
    try:
        futures = {pool.submit(run_fold, exp, entry, fold, device, log_path(exp, entry.label, fold),
                               extra_env=extra, children=children): (entry, fold) for entry, fold in todo}
        _archive(exp, None, progress)  # entries finished before this run, while the trainings start
        for fut in as_completed(futures):
            entry, fold = futures[fut]
            bar.set_postfix_str(f"{entry.label} fold {fold} done")
            what, rc = fut.result()
            record(entry, fold, what, rc)
    except BaseException:
        children.stop_all()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return done
