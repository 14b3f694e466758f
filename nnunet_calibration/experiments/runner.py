"""Running an experiment's (trainer, fold) trainings: fold state, the local backend, one fold's job.

Fold state on disk (nnU-Net's own files in ``fold_X``):

- ``finished``: ``checkpoint_final.pth`` and ``validation/summary.json`` exist and the validation
  folder holds the ``.npz`` probabilities (if they are missing, only ``nnUNetv2_train ... --val --npz``
  is run to write them: no training);
- ``interrupted``: ``checkpoint_latest.pth`` (or a final checkpoint without validation) exists:
  continued with ``--c``;
- ``not started``: neither.

Every training runs ``nnUNetv2_train DATASET CONFIG FOLD -tr TRAINER -p PLANS --npz -device DEVICE``
with ``nnUNet_results`` of its trainer entry and ``NNUNET_CALIB_HPARAMS`` (see
:mod:`nnunet_calibration.experiments.config`). Output goes to ``<state>/logs/<label>_fold<F>.log``.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from tqdm import tqdm

from nnunet_calibration.experiments.config import (Experiment, ExperimentError, TrainerSpec, hparams_env_value,
                                                   recorded_hparams)
from nnunet_calibration.nnunet_utils import nnunet_command, training_env
from nnunet_calibration.timelimit import TIMELIMIT_EXIT_CODE, stop_signal

FINISHED, INTERRUPTED, NOT_STARTED = "finished", "interrupted", "not started"


def fold_state(exp: Experiment, spec: TrainerSpec, fold: int) -> str:
    d = exp.fold_folder(spec, fold)
    if (d / "checkpoint_final.pth").is_file() and (d / "validation" / "summary.json").is_file():
        return FINISHED
    if (d / "checkpoint_latest.pth").is_file() or (d / "checkpoint_final.pth").is_file():
        return INTERRUPTED
    return NOT_STARTED


def has_npz(exp: Experiment, spec: TrainerSpec, fold: int) -> bool:
    return any((exp.fold_folder(spec, fold) / "validation").glob("*.npz"))


def log_path(exp: Experiment, label: str, fold: int | str) -> Path:
    return exp.state_dir / "logs" / f"{label}_fold{fold}.log"


def check_recorded_hparams(exp: Experiment) -> None:
    """Refuse to reuse a fold trained with other hyperparameters than the experiment asks for."""
    for spec in exp.trainers:
        want = exp.hparams_for(spec)
        for fold in exp.folds:
            folder = exp.fold_folder(spec, fold)
            got = recorded_hparams(folder)
            if got is None or fold_state(exp, spec, fold) == NOT_STARTED:
                continue
            if json.loads(json.dumps(got, sort_keys=True)) != json.loads(json.dumps(want, sort_keys=True)):
                raise ExperimentError(
                    f"{exp.path}: {folder} was trained with hyperparameters {got}, but this experiment asks for "
                    f"{want} for {spec.label}; it would be reused as is. Give the entry its own label with "
                    f"'hparams' (own results folder), use other nnunet_paths.results, or remove that folder.")


def train_command(exp: Experiment, spec: TrainerSpec, fold: int, device: str,
                  num_gpus: int = 1) -> list[str] | None:
    """The ``nnUNetv2_train`` argv for this fold's state, or None when it is finished.

    ``num_gpus > 1`` (CUDA only) adds nnU-Net's multi-GPU mode ``-num_gpus N`` (DDP, one process per GPU).
    """
    state = fold_state(exp, spec, fold)
    base = nnunet_command("nnUNetv2_train") + [exp.dataset_name, exp.configuration, str(fold), "-tr", spec.name,
                                                "-p", exp.plans, "--npz", "-device", device]
    if num_gpus > 1 and device == "cuda":
        base += ["-num_gpus", str(num_gpus)]
    if state == FINISHED:
        return None if has_npz(exp, spec, fold) else base + ["--val"]
    if state == INTERRUPTED:
        return base + ["--c"]
    return base


def fold_env(exp: Experiment, spec: TrainerSpec, base: dict | None = None) -> dict:
    env = training_env(exp.nnunet_env(base))
    env["nnUNet_results"] = str(exp.results_root(spec))
    value = hparams_env_value(exp.hparams_for(spec))
    if value is None:
        env.pop("NNUNET_CALIB_HPARAMS", None)
    else:
        env["NNUNET_CALIB_HPARAMS"] = value
    # the job's python environment first on PATH (nnU-Net's console scripts, the plugin)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    return env


def _local_state_file(exp: Experiment) -> Path:
    return exp.state_dir / "local_runs.json"


def read_local_state(exp: Experiment) -> dict:
    f = _local_state_file(exp)
    if f.is_file():
        try:
            return json.loads(f.read_text())
        except json.JSONDecodeError:
            return {}
    return {}


def _write_json_atomic(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def run_fold(exp: Experiment, spec: TrainerSpec, fold: int, device: str, log: Path | None = None,
             append: bool = False, extra_env: dict | None = None) -> tuple[str, int]:
    """Train (or resume, or re-validate) one fold. Returns (what was done, return code).

    ``extra_env``: variables added to the fold's environment where not already set there (e.g.
    ``OMP_NUM_THREADS`` when folds run side by side)."""
    cmd = train_command(exp, spec, fold, device)
    if cmd is None:
        return "skipped (finished)", 0
    what = "validation only (--val --npz)" if "--val" in cmd else ("resumed (--c)" if "--c" in cmd else "trained")
    env = fold_env(exp, spec)
    for k, v in (extra_env or {}).items():
        env.setdefault(k, v)
    if log is None:
        proc = subprocess.run(cmd, env=env)
        return what, proc.returncode
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a" if append else "w") as fh:
        fh.write(f"# {_dt.datetime.now().isoformat(timespec='seconds')} {what}: {' '.join(cmd)}\n")
        fh.write(f"# nnUNet_results={env['nnUNet_results']} NNUNET_CALIB_HPARAMS={env.get('NNUNET_CALIB_HPARAMS')}\n")
        fh.flush()
        proc = subprocess.run(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
    return what, proc.returncode


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


def run_local(exp: Experiment, progress: bool = True, parallel: int = 1) -> dict:
    """Run every unfinished (trainer, fold). Returns {(label, fold): (what, rc)}.

    ``parallel``: how many folds train side by side (default 1: one after another). With more than
    one, each training gets :func:`side_by_side_env` (``OMP_NUM_THREADS = max(1, cores // parallel)``,
    ``OMP_WAIT_POLICY=PASSIVE``) unless the environment sets them. On 2 cores two trainings side by
    side and one after another took about the same time per training (8.3 s vs 7.3 s per epoch of
    ``2d_small``).

    Order: fold by fold (every trainer's fold 0, then every trainer's fold 1, ...), so that a study
    stopped part-way has all its methods on the same folds.
    """
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ExperimentError(f"parallel must be an integer >= 1, got {parallel!r}")
    device = exp.resolve_device(slurm=False)
    state = read_local_state(exp)
    done = {}
    todo = []
    for fold in exp.folds:
        for spec in exp.trainers:
            if train_command(exp, spec, fold, device) is None:
                done[(spec.label, fold)] = ("skipped (finished)", 0)
            else:
                todo.append((spec, fold))
    extra = side_by_side_env(parallel)
    bar = tqdm(total=len(todo), desc=f"{exp.name}: trainings", disable=not progress, unit="fold")

    def record(spec: TrainerSpec, fold: int, what: str, rc: int) -> None:
        log = log_path(exp, spec.label, fold)
        done[(spec.label, fold)] = (what, rc)
        state[f"{spec.label}/{fold}"] = {"status": "finished" if rc == 0 else "failed", "what": what,
                                         "returncode": rc, "log": str(log),
                                         "time": _dt.datetime.now().isoformat(timespec="seconds")}
        _write_json_atomic(_local_state_file(exp), state)
        bar.update(1)
        if rc != 0:
            tqdm.write(f"FAILED: {spec.label} fold {fold} (exit {rc}); log: {log}")

    with ThreadPoolExecutor(max_workers=parallel) as pool:  # threads only wait for subprocesses
        futures = {}
        for spec, fold in todo:
            futures[pool.submit(run_fold, exp, spec, fold, device, log_path(exp, spec.label, fold),
                                extra_env=extra)] = (spec, fold)
        for fut in as_completed(futures):
            spec, fold = futures[fut]
            bar.set_postfix_str(f"{spec.label} fold {fold} done")
            what, rc = fut.result()
            record(spec, fold, what, rc)
    bar.close()
    return done


def fold_num_gpus(exp: Experiment, device: str) -> int:
    """GPUs one fold trains on: ``slurm.gpus`` on CUDA (nnU-Net's ``-num_gpus``), else 1."""
    return max(1, int(exp.slurm.gpus)) if device == "cuda" else 1


def _requeue(job_id: str) -> tuple[bool, str]:
    scontrol = shutil.which("scontrol")
    if scontrol is None:
        return False, "scontrol not found on PATH"
    try:
        proc = subprocess.run([scontrol, "requeue", job_id], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return False, str(e)
    return proc.returncode == 0, proc.stdout.strip()


def train_fold_main(exp: Experiment, label: str, fold: int, device: str, env: dict | None = None) -> int:
    """Entry point of one SLURM array task: train/resume one fold, output to this job's log (stdout).

    Time limits (``slurm.signal_seconds``): SLURM sends the warning signal (``SIGUSR1``) to this
    process (the batch step, ``--signal=B:USR1@N``); it is forwarded to the training's process group,
    whose trainer finishes its epoch, writes ``checkpoint_latest.pth`` and exits with
    :data:`~nnunet_calibration.trainers.timelimit.TIMELIMIT_EXIT_CODE`. Then, if ``slurm.requeue``,
    the task requeues itself (``scontrol requeue $SLURM_JOB_ID``): it runs again later, finds the
    checkpoint and continues with ``--c``. Returns the training's exit status, or
    ``TIMELIMIT_EXIT_CODE`` when the fold was stopped by the signal (requeued or not).
    """
    env = dict(os.environ if env is None else env)
    spec = exp.trainer(label)
    cmd = train_command(exp, spec, fold, device, fold_num_gpus(exp, device))
    if cmd is None:
        print(f"{label} fold {fold}: already finished, nothing to do", flush=True)
        return 0
    print(f"{label} fold {fold}: {' '.join(cmd)}", flush=True)
    child_env = fold_env(exp, spec, env)
    sig = stop_signal(env)
    received: list[int] = []
    proc: subprocess.Popen | None = None

    def forward(signum, frame):  # noqa: ARG001
        received.append(signum)
        print(f"{label} fold {fold}: received {signal.Signals(signum).name} (time limit near): the training "
              f"stops after its current epoch with a checkpoint", flush=True)
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signum)  # the training and, under DDP, its worker processes
            except ProcessLookupError:
                pass

    previous = signal.signal(sig, forward)
    try:
        # its own process group, so that the signal reaches nnU-Net's DDP workers too; the training
        # starts with the signal ignored: nnU-Net's multi-GPU parent process (mp.spawn) has no trainer
        # and would otherwise be killed by it, while every trainer installs its own handler
        proc = subprocess.Popen(cmd, env=child_env, start_new_session=True,
                                preexec_fn=lambda: signal.signal(sig, signal.SIG_IGN))
        while True:
            try:
                rc = proc.wait()
                break
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)
    finally:
        signal.signal(sig, previous)
    stopped = rc == TIMELIMIT_EXIT_CODE or (received and rc != 0)
    if not stopped or fold_state(exp, spec, fold) == FINISHED:
        return rc
    state = fold_state(exp, spec, fold)
    print(f"{label} fold {fold}: stopped by the time limit (exit {rc}); fold {state}", flush=True)
    job = env.get("SLURM_JOB_ID")
    if exp.slurm.requeue and job and state == INTERRUPTED:
        ok, out = _requeue(job)
        if ok:
            print(f"{label} fold {fold}: requeued SLURM job {job}; it continues from checkpoint_latest.pth (--c)",
                  flush=True)
        else:
            print(f"{label} fold {fold}: scontrol requeue {job} failed ({out}), not requeued; run "
                  f"calib-experiment run again to continue", flush=True)
    else:
        print(f"{label} fold {fold}: not requeued (slurm.requeue: {exp.slurm.requeue}); run calib-experiment "
              f"run again to continue with --c", flush=True)
    return TIMELIMIT_EXIT_CODE
