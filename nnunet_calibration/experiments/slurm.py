"""SLURM backend: one job array per trainer (one task per unfinished fold) and one report job.

Everything goes through SLURM's own client programs (``sbatch``, ``squeue``, ``scontrol``); the
cluster is found the usual way (``slurm.conf`` or ``SLURM_CONF``).

- Each array task runs ``python -m nnunet_calibration.experiments.cli train-fold EXPERIMENT
  --trainer LABEL --fold $SLURM_ARRAY_TASK_ID --device DEVICE`` (:func:`train_fold_main`), which decides at run time between
  a fresh training, ``--c`` (interrupted) and nothing (finished): a requeued or re-submitted task
  never trains twice. Its output: ``<state>/logs/<label>_fold<F>.log``.
- The report job depends on all arrays with ``--dependency=afterok:ID:ID... --kill-on-invalid-dep=yes``:
  SLURM cancels it when any fold fails. Output: ``<state>/logs/report.log``.
- Job scripts (``<state>/slurm/*.sbatch``) put this Python environment's ``bin`` first on ``PATH``,
  call this interpreter explicitly and export the nnU-Net folders, ``nnUNet_extTrainer`` (if set),
  nnU-Net's speed settings (if set) and the trainer's ``NNUNET_CALIB_HPARAMS``.
- Submitted ids are recorded in ``<state>/slurm_jobs.json``; ``run`` again skips folds that are
  finished or still pending/running in SLURM.
- Time limits: with ``slurm.signal_seconds: N`` (default 600) the arrays get
  ``--signal=B:USR1@N``. The task (``train-fold``) forwards the signal to the training, whose
  trainer (every trainer of this package) finishes the current epoch, writes
  ``checkpoint_latest.pth`` and exits with status 75; with ``slurm.requeue: true`` (default, and
  ``--requeue``) the task then requeues itself with ``scontrol requeue``; it starts again later and
  continues with ``--c``. A requeued task keeps its job id and appends to the same log; the report
  job still waits for it. Without requeue the task ends with 75 (failed for SLURM; the report job
  is cancelled) and ``calib-experiment run`` continues it.
- ``slurm.max_parallel: N`` throttles each array to N tasks at once (``--array=0,1,2,3,4%N``);
  ``slurm.gpus: N > 1`` trains each fold with nnU-Net's multi-GPU mode (``-num_gpus N``, DDP).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from nnunet_calibration.experiments.environment import experiment_env, resolve_device
from nnunet_calibration.experiments.folds import FoldStatus, fold_state, log_path, results_root
from nnunet_calibration.experiments.runner import fold_env, train_command
from nnunet_calibration.settings import HPARAMS_ENV, Experiment, ExperimentError, hparams_env_value
from nnunet_calibration.timelimit import TIMELIMIT_EXIT_CODE, stop_signal
from nnunet_calibration.utils import write_json_atomic

_PASS_ENV = ("nnUNet_extTrainer", "nnUNet_compile", "nnUNet_def_n_proc", "nnUNet_npp", "nnUNet_nps",
             "nnUNet_n_proc_DA", "OMP_NUM_THREADS", "SLURM_CONF")


def jobs_file(exp: Experiment) -> Path:
    return exp.state_folder / "slurm_jobs.json"


def read_jobs(exp: Experiment) -> dict:
    f = jobs_file(exp)
    if not f.is_file():
        return {"submissions": []}
    return json.loads(f.read_text())


def _need(prog: str) -> str:
    p = shutil.which(prog)
    if p is None:
        raise ExperimentError(f"SLURM client program {prog!r} not found on PATH (install slurm-client)")
    return p


def queue_states() -> dict[str, str]:
    """``{"<jobid>_<task>" or "<jobid>": state}`` of every job SLURM still lists (one line per array task)."""
    proc = subprocess.run([_need("squeue"), "-h", "-r", "-o", "%i|%T"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    if proc.returncode != 0:
        raise ExperimentError(f"squeue failed: {proc.stderr.strip()}")
    out = {}
    for line in proc.stdout.splitlines():
        if "|" in line:
            jid, state = line.strip().split("|", 1)
            out[jid] = state
    return out


def job_state(job_id: str) -> str | None:
    """Final state of a job SLURM still remembers (``scontrol show job``), else None."""
    proc = subprocess.run([_need("scontrol"), "show", "job", "-o", str(job_id)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    for tok in proc.stdout.split():
        if tok.startswith("JobState="):
            return tok.split("=", 1)[1]
    return None


def _sbatch_lines(opts: list[str]) -> str:
    return "".join(f"#SBATCH {o}\n" for o in opts)


def _exports(env: dict) -> str:
    return "".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in env.items())


def _common_env(exp: Experiment) -> dict:
    env = {}
    for key in ("raw", "preprocessed", "results"):
        try:
            env[f"nnUNet_{key}"] = str(exp.nnunet_folder(key))
        except ExperimentError:
            if key != "raw":
                raise
    base = experiment_env(exp, device=resolve_device(exp, slurm=True))
    for k in _PASS_ENV:
        if base.get(k):
            env[k] = base[k]
    return env


def _script(exp: Experiment, opts: list[str], env: dict, command: list[str]) -> str:
    bindir = str(Path(sys.executable).parent)
    return ("#!/bin/bash\n" + _sbatch_lines(opts) + "set -eo pipefail\n"
            f"# written by calib-experiment on {_dt.datetime.now().isoformat(timespec='seconds')}\n"
            f"export PATH={shlex.quote(bindir)}:\"$PATH\"\n" + _exports(env) +
            "echo \"host $(hostname) job ${SLURM_JOB_ID} task ${SLURM_ARRAY_TASK_ID:-none} $(date -Is)\"\n"
            "exec " + " ".join(shlex.quote(c) for c in command) + "\n")


def _resource_opts(s, gpus: int, cpus: int, mem, time, partition) -> list[str]:
    # jobs start in the folder calib-experiment was called from (relative report paths resolve as locally)
    opts = [f"--chdir={os.getcwd()}", f"--cpus-per-task={cpus}"]
    if gpus:
        opts.append(f"--gres=gpu:{gpus}")
    if mem:
        opts.append(f"--mem={mem}")
    if time:
        opts.append(f"--time={time}")
    if partition:
        opts.append(f"--partition={partition}")
    opts += [str(a) for a in (s.extra_args or [])]
    return opts


def array_spec(folds, max_parallel: int | None = None) -> str:
    """``--array`` value: the folds, throttled to ``max_parallel`` tasks at once (``0,1,2%2``)."""
    text = ",".join(str(f) for f in folds)
    return f"{text}%{int(max_parallel)}" if max_parallel else text


def timelimit_opts(s) -> list[str]:
    """sbatch options of the time-limit handling (see the module docstring)."""
    opts = []
    if s.signal_seconds:
        # B: the signal goes to the batch step (train-fold, which forwards it to the training)
        opts.append(f"--signal=B:{stop_signal().name[3:]}@{int(s.signal_seconds)}")
    opts.append("--requeue" if s.requeue else "--no-requeue")
    return opts


def _sbatch(script: Path, extra: list[str] | None = None) -> str:
    cmd = [_need("sbatch"), "--parsable", *(extra or []), str(script)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    if proc.returncode != 0:
        raise ExperimentError(f"sbatch failed for {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def active_tasks(exp: Experiment, jobs: dict | None = None) -> dict[tuple[str, int], tuple[str, str]]:
    """{(label, fold): (job id, SLURM state)} for recorded tasks that SLURM still lists."""
    jobs = read_jobs(exp) if jobs is None else jobs
    if not jobs.get("submissions"):
        return {}
    queue = queue_states()
    out = {}
    for sub in jobs["submissions"]:
        for label, rec in sub.get("trainers", {}).items():
            jid = rec["job_id"]
            for fold in rec["folds"]:
                for key in (f"{jid}_{fold}", jid):
                    if key in queue:
                        out[(label, fold)] = (f"{jid}_{fold}", queue[key])
                        break
    return out


def submit(exp: Experiment, output_root: str | None = None) -> dict:
    """Submit the unfinished folds (one array per trainer) and the report job; return the record."""
    _need("sbatch")
    s = exp.slurm
    device = resolve_device(exp, slurm=True)
    active = active_tasks(exp)
    sdir = exp.state_folder / "slurm"
    sdir.mkdir(parents=True, exist_ok=True)
    (exp.state_folder / "logs").mkdir(parents=True, exist_ok=True)
    py = sys.executable
    record = {"time": _dt.datetime.now().isoformat(timespec="seconds"), "trainers": {}, "report": None,
              "skipped": {}}
    common = _common_env(exp)
    for spec in exp.trainers:
        folds, skipped = [], {}
        for fold in exp.folds_for(spec):
            if (spec.label, fold) in active:
                skipped[fold] = f"already {active[(spec.label, fold)][1].lower()} as job {active[(spec.label, fold)][0]}"
            elif train_command(exp, spec, fold, device, fold_num_gpus(exp, device)) is None:
                skipped[fold] = str(FoldStatus.FINISHED)
            else:
                folds.append(fold)
        record["skipped"][spec.label] = skipped
        if not folds:
            continue
        env = dict(common)
        env["nnUNet_results"] = str(results_root(exp, spec))
        hp = hparams_env_value(exp.hparams_for(spec))
        if hp:
            env[HPARAMS_ENV] = hp
        opts = [f"--job-name=calib_{exp.name}_{spec.label}", f"--array={array_spec(folds, s.max_parallel)}",
                f"--output={log_path(exp, spec.label, '%a')}", "--open-mode=append"]
        opts += _resource_opts(s, s.gpus, s.cpus, s.mem, s.time, s.partition)
        opts += timelimit_opts(s)
        command = [py, "-m", "nnunet_calibration.experiments.cli", "train-fold", str(exp.path), "--trainer",
                   spec.label, "--fold", "${SLURM_ARRAY_TASK_ID}", "--device", device]
        text = _script(exp, opts, env, command).replace("'${SLURM_ARRAY_TASK_ID}'", "\"${SLURM_ARRAY_TASK_ID}\"")
        script = sdir / f"{spec.label}.sbatch"
        script.write_text(text)
        record["trainers"][spec.label] = {"job_id": _sbatch(script), "folds": folds, "script": str(script)}
    # the report waits for every array of this submission and for still-active earlier tasks
    deps = sorted({r["job_id"] for r in record["trainers"].values()} |
                  {jid.split("_")[0] for jid, _ in active.values()})
    previous = read_jobs(exp)["submissions"]
    last_report = (previous[-1].get("report") or {}).get("job_id") if previous else None
    if not record["trainers"] and last_report and last_report in queue_states():
        # nothing new to train and the earlier report job still waits: do not start a second one
        record["report"] = {"job_id": last_report, "depends_on": [], "script": None, "reused": True}
        return record
    opts = [f"--job-name=calib_{exp.name}_report", f"--output={exp.state_folder / 'logs' / 'report.log'}",
            "--open-mode=append"]
    opts += _resource_opts(s, 0, s.report_cpus, s.report_mem, s.report_time, s.report_partition or s.partition)
    command = [py, "-m", "nnunet_calibration.experiments.cli", "report", str(exp.path)]
    if output_root is not None:
        command += ["--output-root", str(Path(output_root).resolve())]
    script = sdir / "report.sbatch"
    script.write_text(_script(exp, opts, common, command))
    extra = [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"] if deps else []
    record["report"] = {"job_id": _sbatch(script, extra), "depends_on": deps, "script": str(script)}
    jobs = read_jobs(exp)
    jobs["submissions"].append(record)
    write_json_atomic(jobs_file(exp), jobs)
    return record


# -- one array task ------------------------------------------------------------------------------
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
    child_env = fold_env(exp, spec, device, env)
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
    if not stopped or fold_state(exp, spec, fold) == FoldStatus.FINISHED:
        return rc
    state = fold_state(exp, spec, fold)
    print(f"{label} fold {fold}: stopped by the time limit (exit {rc}); fold {state}", flush=True)
    job = env.get("SLURM_JOB_ID")
    if exp.slurm.requeue and job and state == FoldStatus.INTERRUPTED:
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
