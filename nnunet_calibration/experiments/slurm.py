"""SLURM backend: ONE job array of every unfinished (trainer, fold) of the study, and one report job.

Everything goes through SLURM's own client programs (``sbatch``, ``squeue``, ``scontrol``); the
cluster is found the usual way (``slurm.conf`` or ``SLURM_CONF``).

- One array per submission, whatever the trainers: task ``i`` trains entry ``i`` of the task table
  ``<state>/slurm/tasks_<n>.json`` (label and fold; fold by fold, every trainer's fold 0 first), so
  ``slurm.max_parallel: N`` bounds the whole study to N tasks at once (``--array=0,1,...%N``). A task
  runs ``python -m nnunet_calibration.experiments.cli train-fold EXPERIMENT --task-table TABLE
  --task-index $SLURM_ARRAY_TASK_ID`` (:func:`train_fold_entry`), which decides at run time between a
  fresh training, ``--c`` (interrupted), ``--val --npz`` (trained, not validated) and nothing
  (finished): a requeued or re-submitted task never trains twice. Its output goes to
  ``<state>/logs/<label>_fold<F>.log``; SLURM's own file ``<state>/logs/slurm/<array>_<task>.out``
  holds the job script's lines.
- The report job depends on the array (and on earlier submissions' tasks still queued) with
  ``--dependency=afterok:... --kill-on-invalid-dep=yes``: SLURM cancels it when a fold fails. It
  never gets the GPUs; its options are the ``report_*`` ones (``report_extra_args``: default
  ``extra_args``, ``[]`` for none). Output: ``<state>/logs/report.log``.
- Job scripts (``<state>/slurm/train_<n>.sbatch``, ``report.sbatch``), in this order: the
  ``slurm.setup`` lines; this Python environment's ``bin`` first on ``PATH``; the nnU-Net folders and
  ``nnUNet_extTrainer`` (if set); nnU-Net's settings for the device
  (:func:`~nnunet_calibration.experiments.environment.job_settings`: on a GPU no CPU setting and
  ``nnUNet_n_proc_DA`` = cpus per GPU); the file's ``environment:`` (overrides); with
  ``slurm.scratch`` a node-local copy of the configuration's preprocessed data that
  ``nnUNet_preprocessed`` then points at; the command, prefixed by ``slurm.container``.
- Submitted ids are recorded in ``<state>/slurm_jobs.json``; ``run`` again skips folds that are
  finished or still pending/running in SLURM.
- Time limits (``slurm.signal_seconds``, ``--signal=B:USR1@N``): the job script records the warning
  in a stop file from its first line on and passes it to the task, which passes it to the training
  (:mod:`nnunet_calibration.trainers.timelimit`: exit 75 before training, after the current epoch
  with a checkpoint, or during the final validation); with ``slurm.requeue`` the task then requeues
  itself (``scontrol requeue``) and continues later (``--c`` or ``--val``) in the same job id and log.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from nnunet_calibration.experiments.environment import STAGED_ENV, job_environment, job_settings, resolve_device
from nnunet_calibration.experiments.folds import fold_state, log_path
from nnunet_calibration.experiments.runner import fold_env, train_command
from nnunet_calibration.settings import Experiment, ExperimentError
from nnunet_calibration.timelimit import STOP_FILE_ENV, TIMELIMIT_EXIT_CODE, TaskWarning, stop_file, stop_signal
from nnunet_calibration.utils import write_json_atomic

_TASK_INDEX = '"$SLURM_ARRAY_TASK_ID"'


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
    return dict(line.strip().split("|", 1) for line in proc.stdout.splitlines() if "|" in line)


def job_state(job_id: str) -> str | None:
    """Final state of a job SLURM still remembers (``scontrol show job``), else None."""
    proc = subprocess.run([_need("scontrol"), "show", "job", "-o", str(job_id)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=60)
    if proc.returncode != 0:
        return None
    return next((t.split("=", 1)[1] for t in proc.stdout.split() if t.startswith("JobState=")), None)


def _recorded(sub: dict):
    """(label, fold, task id) of one recorded submission: one array of the study (task i = entry i), or
    the earlier record of one array per trainer (``trainers: {label: {job_id, folds}}``, task = fold)."""
    arr = sub.get("array") or {}
    for i, (label, fold) in enumerate(arr.get("tasks", [])):
        yield label, int(fold), f"{arr['job_id']}_{i}"
    for label, rec in (sub.get("trainers") or {}).items():
        for fold in rec.get("folds", []):
            yield label, int(fold), f"{rec['job_id']}_{fold}"


def submitted_tasks(jobs: dict) -> dict[tuple[str, int], str]:
    """{(label, fold): "<array>_<index>"} of every recorded submission (the latest one wins)."""
    return {(label, fold): t for sub in jobs.get("submissions", []) for label, fold, t in _recorded(sub)}


def active_tasks(exp: Experiment, jobs: dict | None = None) -> dict[tuple[str, int], tuple[str, str]]:
    """{(label, fold): (task id, SLURM state)} for recorded tasks that SLURM still lists."""
    jobs = read_jobs(exp) if jobs is None else jobs
    tasks = {}
    for sub in jobs.get("submissions", []):  # every submission's tasks: an earlier one may still run
        for label, fold, t in _recorded(sub):
            tasks.setdefault((label, fold), []).append(t)
    if not tasks:
        return {}
    queue = queue_states()
    return {key: (t, queue[t]) for key, ids in tasks.items() for t in ids if t in queue}


# -- job scripts ---------------------------------------------------------------------------------
def _exports(values: dict) -> str:
    """``unset`` for the None values, ``export K=V`` for the others (values literal; ``PATH``'s
    trailing ``:$PATH`` expanded)."""
    unset = [k for k, v in values.items() if v is None]
    lines = [f"unset {' '.join(unset)}\n"] if unset else []
    for k, v in ((k, str(v)) for k, v in values.items() if v is not None):
        tail = ':"$PATH"' if k == "PATH" and v.endswith(":$PATH") else ""
        lines.append(f"export {k}={shlex.quote(v[:-6] if tail else v)}{tail}\n")
    return "".join(lines)


def _environment_lines(exp: Experiment, settings: dict, what: str) -> str:
    """The job's environment, section by section (:func:`~.environment.job_environment`)."""
    return "".join(f"# {title}\n" + _exports(values) for title, values in job_environment(exp, settings, what))


def _staging_lines(exp: Experiment) -> str:
    """slurm.scratch: copy the configuration's preprocessed data to a node-local folder of this job."""
    if not exp.slurm.scratch:
        return ""
    from nnunet_calibration.experiments.nnunet_checks import data_identifier

    src = exp.nnunet_folder("preprocessed") / exp.dataset_name
    ident = data_identifier(exp, src / f"{exp.plans}.json")
    items = " ".join(shlex.quote(str(src / x)) for x in ("gt_segmentations", ident)) + f" {shlex.quote(str(src))}/*.json"
    scratch = exp.slurm.scratch.replace("\\", "\\\\").replace('"', '\\"').replace("`", "\\`")
    return (f"# node-local copy of the preprocessed {exp.configuration} data (slurm.scratch)\n"
            f'export {STAGED_ENV}="{scratch}/calib_{exp.name}_$SLURM_JOB_ID"\n'
            f'stage="${STAGED_ENV}/{exp.dataset_name}"\n'
            f'mkdir -p "$stage" && cp -r {items} "$stage/"\n'
            f'export nnUNet_preprocessed="${STAGED_ENV}"\n')


def _header(opts: list[str], what: str) -> str:
    return ("#!/bin/bash\n" + "".join(f"#SBATCH {o}\n" for o in opts) +
            f"# written by calib-experiment on {_dt.datetime.now().isoformat(timespec='seconds')}: {what}\n")


def _setup(setup: tuple) -> str:
    return ("# set-up (slurm.setup)\n" + "".join(line + "\n" for line in setup)) if setup else ""


def _command(exp: Experiment, args: list[str]) -> str:
    """This interpreter running ``calib-experiment ARGS``, behind ``slurm.container`` (shell text, as given)."""
    words = [sys.executable, "-m", "nnunet_calibration.experiments.cli", *args]
    return " ".join(([exp.slurm.container.strip()] if exp.slurm.container else []) +
                    [a if a == _TASK_INDEX else shlex.quote(a) for a in words])


_WARNING = """# time-limit warning (SIG{sig}): recorded in a stop file from here on and passed on to the task
export {stop_env}={stop}/"$SLURM_JOB_ID"
rm -f "${stop_env}"
task=
trap 'touch "${stop_env}"; [ -z "$task" ] || kill -{sig} "$task" 2>/dev/null' {sig}
set -eo pipefail
"""
_SUPERVISE = """echo "host $(hostname) job $SLURM_JOB_ID = array task ${{SLURM_ARRAY_JOB_ID}}_$SLURM_ARRAY_TASK_ID $(date -Is)"
# the task runs in the background (the warning ignored until its handler is in place; the stop file
# keeps it) so that this shell can pass the warning on
( trap '' {sig}; exec {command} ) &
task=$!
rc=0; wait "$task" || rc=$?
while kill -0 "$task" 2>/dev/null; do rc=0; wait "$task" || rc=$?; done
{cleanup}exit "$rc"
"""


def training_script(exp: Experiment, device: str, table: Path, n_tasks: int) -> str:
    """The array's job script (see the module docstring)."""
    s = exp.slurm
    opts = [f"--job-name=calib_{exp.name}", f"--array={array_spec(range(n_tasks), s.max_parallel)}",
            f"--output={exp.state_folder / 'logs' / 'slurm' / '%A_%a.out'}", "--open-mode=append"]
    opts += _resource_opts(s.extra_args, s.cpus, s.mem, s.time, s.partition,
                           s.gres or (f"gpu:{s.gpus}" if s.gpus else None)) + timelimit_opts(s)
    sig = stop_signal().name[3:]
    command = _command(exp, ["train-fold", str(exp.path), "--task-table", str(table), "--task-index", _TASK_INDEX])
    cleanup = f'[ -z "${{{STAGED_ENV}:-}}" ] || rm -rf "${STAGED_ENV}"\n' if s.scratch else ""
    return (_header(opts, f"task i trains entry i of {table}") +
            _WARNING.format(sig=sig, stop_env=STOP_FILE_ENV, stop=shlex.quote(str(exp.state_folder / "slurm" / "stop")))
            + _setup(s.setup) + _environment_lines(exp, job_settings(exp, device), f"device {device}") +
            _staging_lines(exp) + _SUPERVISE.format(sig=sig, command=command, cleanup=cleanup))


def report_script(exp: Experiment, output_root: str | None = None) -> str:
    """The report job's script: CPU only, its own options."""
    s = exp.slurm
    opts = [f"--job-name=calib_{exp.name}_report", f"--output={exp.state_folder / 'logs' / 'report.log'}",
            "--open-mode=append"]
    extra = s.extra_args if s.report_extra_args is None else s.report_extra_args
    opts += _resource_opts(extra, s.report_cpus, s.report_mem, s.report_time, s.report_partition or s.partition)
    args = ["report", str(exp.path)] + (["--output-root", str(Path(output_root).resolve())] if output_root else [])
    return (_header(opts, "the report (after every fold)") + "set -eo pipefail\n" + _setup(s.setup) +
            _environment_lines(exp, {}, "the report") + "exec " + _command(exp, args) + "\n")


def _resource_opts(extra, cpus: int, mem, time, partition, gres: str | None = None) -> list[str]:
    # jobs start in the folder calib-experiment was called from (relative report paths resolve as locally)
    opts = [f"--chdir={os.getcwd()}", f"--cpus-per-task={cpus}"]
    opts += [f"--gres={gres}"] if gres else []
    opts += [f"--mem={mem}"] if mem else []
    opts += [f"--time={time}"] if time else []
    opts += [f"--partition={partition}"] if partition else []
    return opts + [str(a) for a in (extra or [])]


def array_spec(indices, max_parallel: int | None = None) -> str:
    """``--array`` value: the task indices, throttled to ``max_parallel`` tasks at once (``0,1,2%2``)."""
    text = ",".join(str(i) for i in indices)
    return f"{text}%{int(max_parallel)}" if max_parallel else text


def timelimit_opts(s) -> list[str]:
    """sbatch options of the time-limit handling (see the module docstring)."""
    opts = []
    if s.signal_seconds:
        # B: the signal goes to the batch shell (the job script, which passes it on)
        opts.append(f"--signal=B:{stop_signal().name[3:]}@{int(s.signal_seconds)}")
    opts.append("--requeue" if s.requeue else "--no-requeue")
    return opts


def _sbatch(script: Path, extra: list[str] | None = None) -> str:
    cmd = [_need("sbatch"), "--parsable", *(extra or []), str(script)]
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    if proc.returncode != 0:
        raise ExperimentError(f"sbatch failed for {script}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


# -- submitting ----------------------------------------------------------------------------------
def _unfinished(exp: Experiment, device: str, active: dict) -> tuple[list, dict]:
    """([(label, fold)] to train, fold by fold; {label: {fold: why skipped}})."""
    tasks, skipped = [], {}
    for fold in exp.all_folds:
        for spec in exp.trainers:
            key = (spec.label, fold)
            if fold not in exp.folds_for(spec):
                continue
            if key in active:
                why = f"already {active[key][1].lower()} as job {active[key][0]}"
            elif train_command(exp, spec, fold, device, fold_num_gpus(exp, device)) is None:
                why = str(fold_state(exp, spec, fold))  # finished, or archived
            else:
                tasks.append(key)
                continue
            skipped.setdefault(spec.label, {})[fold] = why
    return tasks, skipped


def submit(exp: Experiment, output_root: str | None = None) -> dict:
    """Submit the unfinished folds (one array) and the report job; return the record."""
    _need("sbatch")
    device = resolve_device(exp, slurm=True)
    jobs = read_jobs(exp)
    active = active_tasks(exp, jobs)
    sdir = exp.state_folder / "slurm"
    for d in (sdir / "stop", exp.state_folder / "logs" / "slurm"):
        d.mkdir(parents=True, exist_ok=True)
    n = len(jobs["submissions"])
    tasks, skipped = _unfinished(exp, device, active)
    record = {"time": _dt.datetime.now().isoformat(timespec="seconds"), "array": None, "report": None,
              "skipped": skipped}
    if tasks:
        table = write_json_atomic(sdir / f"tasks_{n}.json", {"experiment": str(exp.path), "tasks": [
            {"label": label, "fold": fold} for label, fold in tasks]})
        script = sdir / f"train_{n}.sbatch"
        script.write_text(training_script(exp, device, table, len(tasks)))
        record["array"] = {"job_id": _sbatch(script), "tasks": [list(t) for t in tasks], "table": str(table),
                           "script": str(script)}
    # the report waits for this array and for still-active tasks of earlier submissions
    deps = sorted(({record["array"]["job_id"]} if tasks else set()) | {t.split("_")[0] for t, _ in active.values()})
    last_report = (jobs["submissions"][-1].get("report") or {}).get("job_id") if jobs["submissions"] else None
    if not tasks and last_report and last_report in queue_states():
        # nothing new to train and the earlier report job still waits: do not start a second one
        record["report"] = {"job_id": last_report, "depends_on": [], "script": None, "reused": True}
        return record
    script = sdir / "report.sbatch"
    script.write_text(report_script(exp, output_root))
    extra = [f"--dependency=afterok:{':'.join(deps)}", "--kill-on-invalid-dep=yes"] if deps else []
    record["report"] = {"job_id": _sbatch(script, extra), "depends_on": deps, "script": str(script)}
    jobs["submissions"].append(record)
    write_json_atomic(jobs_file(exp), jobs)
    return record


# -- one array task ------------------------------------------------------------------------------
def fold_num_gpus(exp: Experiment, device: str) -> int:
    """GPUs one fold trains on: ``slurm.gpus`` (or ``gres``'s count) on CUDA (``-num_gpus``), else 1."""
    return max(1, int(exp.slurm.gpu_count)) if device == "cuda" else 1


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


def _log_to(path: Path) -> None:
    """From now on this process's stdout and stderr (and its children's) append to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _table_task(table: str, index: int) -> tuple[str, int]:
    """(label, fold) of entry ``index`` of a task table (:func:`submit`)."""
    try:
        task = json.loads(Path(table).read_text())["tasks"][int(index)]
        return str(task["label"]), int(task["fold"])
    except (OSError, ValueError, KeyError, IndexError, TypeError) as e:
        raise ExperimentError(f"task table {table}: no entry {index} ({type(e).__name__}: {e})") from None


def train_fold_entry(experiment: str, label: str | None, fold: int | None, device: str = "auto",
                     table: str | None = None, index: int | None = None) -> int:
    """``calib-experiment train-fold``: one SLURM task. The warning handler comes first; then the
    task's (label, fold) (from the task table when given), its log, the experiment, the training."""
    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.settings import load_experiment

    env = dict(os.environ)
    own = stop_file(env) is None
    if own:  # by hand, outside the job script: a stop file of this process
        env[STOP_FILE_ENV] = os.path.join(tempfile.gettempdir(), f"calib_stop_{os.getpid()}")
    warning = TaskWarning(env)
    try:
        if table is not None:
            label, fold = _table_task(table, index)
        exp = validate(load_experiment(experiment), check_trainers=False)
        if table is not None:
            print(f"array task {index}: {label} fold {fold}; output: {log_path(exp, label, fold)}", flush=True)
            _log_to(log_path(exp, label, fold))
        if device == "auto":
            device = resolve_device(exp, slurm=True)
        return train_fold_main(exp, label, fold, device, env, warning)
    finally:
        warning.close()
        if own and os.path.exists(env[STOP_FILE_ENV]):
            os.remove(env[STOP_FILE_ENV])


def train_fold_main(exp: Experiment, label: str, fold: int, device: str, env: dict | None = None,
                    warning: TaskWarning | None = None) -> int:
    """Train, resume or validate one fold (output: stdout). Returns the training's exit status, 0 when
    the fold is complete, or :data:`TIMELIMIT_EXIT_CODE` when the time-limit warning stopped it (then,
    with ``slurm.requeue``, the task has requeued itself; the next run continues with ``--c`` or ``--val``)."""
    env = dict(os.environ if env is None else env)
    own, warning = warning is None, warning or TaskWarning(env)
    spec = exp.trainer(label)
    try:
        print(f"# {_dt.datetime.now().isoformat(timespec='seconds')} host {socket.gethostname()} SLURM job "
              f"{env.get('SLURM_JOB_ID', '-')}", flush=True)
        if warning.came():
            print(f"{label} fold {fold}: time-limit warning before the training started", flush=True)
            return _after_warning(exp, spec, fold, device, env, None)
        cmd = train_command(exp, spec, fold, device, fold_num_gpus(exp, device))
        if cmd is None:
            print(f"{label} fold {fold}: already finished, nothing to do", flush=True)
            return 0
        print(f"{label} fold {fold}: {' '.join(cmd)}", flush=True)
        # its own process group, so that the warning reaches nnU-Net's DDP workers too; the training
        # starts with the signal ignored (nnU-Net's multi-GPU parent process has no trainer and would
        # be killed by it); every trainer installs its handler when it is constructed
        proc = subprocess.Popen(cmd, env=fold_env(exp, spec, device, env), start_new_session=True,
                                preexec_fn=lambda: signal.signal(warning.sig, signal.SIG_IGN))
        rc = warning.wait(proc)
        if rc == 0 or not (rc == TIMELIMIT_EXIT_CODE or warning.came()):
            return rc
        return _after_warning(exp, spec, fold, device, env, rc)
    finally:
        if own:
            warning.close()


def _after_warning(exp: Experiment, spec, fold: int, device: str, env: dict, rc: int | None) -> int:
    """The fold was stopped by the warning (``rc``: the training's exit status, None if none started):
    requeue the task unless the fold is complete."""
    label = spec.label
    nxt = train_command(exp, spec, fold, device, fold_num_gpus(exp, device))
    if nxt is None:
        print(f"{label} fold {fold}: complete (the warning came at its end)", flush=True)
        return 0
    what = "--val" if "--val" in nxt else ("--c" if "--c" in nxt else "a fresh start")
    print(f"{label} fold {fold}: stopped by the time limit (exit {rc}); it continues with {what}", flush=True)
    job = env.get("SLURM_JOB_ID")
    if exp.slurm.requeue and job:
        ok, out = _requeue(job)
        if ok:
            print(f"{label} fold {fold}: requeued SLURM job {job}", flush=True)
        else:
            print(f"{label} fold {fold}: scontrol requeue {job} failed ({out}), not requeued; run "
                  f"calib-experiment run again to continue", flush=True)
    else:
        print(f"{label} fold {fold}: not requeued (slurm.requeue: {exp.slurm.requeue}); run calib-experiment "
              f"run again to continue with {what}", flush=True)
    return TIMELIMIT_EXIT_CODE
