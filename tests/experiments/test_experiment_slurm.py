"""calib-experiment with the SLURM backend against a real single-node SLURM started here.

The cluster (slurmctld, slurmd, munged; Debian packages ``slurmctld slurmd slurm-client munge``) is
started by ``experiments_testlib.SlurmCluster`` in a fresh state folder and stopped by PID afterwards. Without the
packages (or without root) the tests are skipped with the reason — never passed.

``test_slurm_throttle_across_trainers``: two trainers, one array, ``max_parallel: 1``: one task runs,
the other is held by SLURM (``JobArrayTaskLimit``) although the node has room; then all is cancelled.

``test_slurm_experiment`` submits two experiments at once:
- ``slurm-ok``: nnUNetTrainerDiceCE, folds 0 and 1, short training, in its own nnUNet_results: one job
  array of two tasks, then the report job (afterok) writes the report, whose numbers are checked
  against the evaluator;
- ``slurm-broken``: a fold whose ``checkpoint_latest.pth`` is corrupt (and no previous one to fall
  back to), so nnU-Net's ``--c`` fails at start-up (the file passes ``calib-experiment check``, which
  refuses bad settings before submitting): its task fails, SLURM cancels its report job
  (``--kill-on-invalid-dep=yes``), and ``status`` reports the fold as failed with its log.

The time-limit test (``test_slurm_requeue_on_time_limit_signal``) trains one fold under SLURM and
sends the warning signal to the running task twice (``scancel --signal=USR1 --batch``): mid-training
(the training stops after its epoch with ``checkpoint_latest.pth``, the task requeues itself and
continues with ``--c``) and in the last epoch (the training finishes, stops before or during the
final validation, requeues, and the third run only validates with ``--val``); the fold ends with
exactly the planned epochs, each trained once. Every wait has a timeout.

The job scripts' contents (GPU vs CPU settings, gres, container, staging) are checked without SLURM
in ``test_experiment_jobscripts.py``.
"""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from experiments_testlib import (APT_COMMAND, SHORT, SlurmCluster, SlurmUnavailable, check_table_against_evaluator,
                                 missing_programs, write_experiment, write_matching_record)
from nnunet_calibration.experiments import cli

pytestmark = [pytest.mark.slurm, pytest.mark.nnunet]

TIMEOUT = 420  # seconds for the whole experiment (training + report) on a busy 2-core machine


@pytest.fixture(scope="module")
def slurm(request):
    missing = missing_programs()
    if missing:
        pytest.skip(f"SLURM not installed (missing {', '.join(missing)}); install with: {APT_COMMAND}")
    if os.geteuid() != 0:
        pytest.skip("starting a SLURM cluster (slurmd, munged as the munge user) needs root")
    # not under pytest's 0700 tmp folders: munged (user munge) must reach its socket folder
    state = Path(tempfile.mkdtemp(prefix="calib-slurm-", dir="/tmp"))
    os.chmod(state, 0o755)
    cluster = SlurmCluster(state / "cluster")
    try:
        cluster.start(timeout=60)
    except SlurmUnavailable as e:
        shutil.rmtree(state, ignore_errors=True)
        pytest.skip(f"SLURM cluster could not start here: {e}")
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    yield cluster
    cluster.stop()
    if saved is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = saved
    shutil.rmtree(state, ignore_errors=True)


def _status(exp_file):
    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.settings import load_experiment
    from nnunet_calibration.experiments.status import fold_statuses, report_job_status

    exp = validate(load_experiment(exp_file), check_trainers=False)
    return exp, fold_statuses(exp), report_job_status(exp)


def _job_fields(task: str) -> dict:
    """The ``Key=Value`` fields (``JobState``, ``Reason``, ``Restarts``, ...) of one ``scontrol show job -o``."""
    import re
    import subprocess

    out = subprocess.run(["scontrol", "show", "job", "-o", task], capture_output=True, text=True, timeout=60).stdout
    return dict(re.findall(r"\b(\w+)=(\S+)", out))


def _running_again(task: str, job: dict | None = None, restarts: int = 1) -> bool:
    """The requeued task (``Restarts`` >= ``restarts``) has started its next run (or finished it). A task
    that SLURM holds (``Reason`` containing "held") is released. ``job``: fields already read, if any."""
    import subprocess

    job = _job_fields(task) if job is None else job
    if "held" in job.get("Reason", "").lower():
        subprocess.run(["scontrol", "release", task], capture_output=True, timeout=60)
    n = job.get("Restarts", "")
    return n.isdigit() and int(n) >= restarts and job.get("JobState") in ("RUNNING", "COMPLETED")


def _release_requeued(task: str, timeout: float, diagnose, restarts: int = 1) -> None:
    """Move a requeued task's BeginTime (requeue time + 2 minutes) to now.

    Measured here: an ``scontrol update StartTime=now`` sent while the task is still ``COMPLETING`` is
    accepted and then overridden by the requeue's own 2-minute delay; sent once the task is
    ``PENDING`` it starts the task within seconds. So the update waits until the task has been
    pending for 3 s, and is retried until SLURM accepts it. Done when the update was accepted or the
    requeued task already runs again."""
    import subprocess

    end = time.monotonic() + timeout
    last, state = "", ""
    pending_since = None
    while time.monotonic() < end:
        job = _job_fields(task)
        state = job.get("JobState", "")
        if _running_again(task, job, restarts):
            return
        if state == "PENDING" and pending_since is None:
            pending_since = time.monotonic()
        if state == "PENDING" and time.monotonic() - pending_since >= 3:
            proc = subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], capture_output=True,
                                  text=True, timeout=60)
            last = (proc.stdout + proc.stderr).strip()
            if proc.returncode == 0:
                return
        time.sleep(1)
    pytest.fail(f"could not release the requeued task {task} within {timeout:.0f} s (state {state!r}, "
                f"last scontrol update: {last!r})\n{diagnose()}")


def _slurm_state(cluster, task: str) -> str:
    """What SLURM says about the task and the node, and its daemons' last log lines (for failures)."""
    import subprocess

    def run(cmd):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (p.stdout + p.stderr).strip()

    return (f"scontrol show job: {run(['scontrol', 'show', 'job', '-o', task])}\n"
            f"sinfo: {run(['sinfo', '-N', '-o', '%N %T %E'])}\n"
            f"squeue: {run(['squeue', '-a', '-o', '%i %T %r %S'])}\n"
            f"slurmctld log:\n{cluster._tail('slurmctld', 40)}\nslurmd log:\n{cluster._tail('slurmd', 40)}")


def _logs(exp) -> str:
    out = []
    for f in sorted((exp.state_folder / "logs").glob("*.log")):
        out.append(f"--- {f}\n" + "\n".join(f.read_text().splitlines()[-25:]))
    return "\n".join(out)


def test_slurm_throttle_across_trainers(slurm, synthetic_labels, tmp_path, capsys):
    """Two trainers, one array, ``max_parallel: 1``: SLURM runs one task and holds the other with
    ``JobArrayTaskLimit`` although the node has room for both; then everything is cancelled."""
    import subprocess

    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.experiments.slurm import read_jobs
    from nnunet_calibration.settings import load_experiment

    ds = synthetic_labels
    f = write_experiment(tmp_path / "th.yaml", name="slurm-throttle", dataset=ds.dataset_id, configuration="2d",
                         folds=[0], device="cpu", training=SHORT, trainers=["nnUNetTrainerDiceCE", "nnUNetTrainerFocal"],
                         state_dir=str(tmp_path / "state_th"), nnunet_paths={"results": str(tmp_path / "results_th")},
                         slurm={"cpus": 1, "mem": "1G", "time": "00:10:00", "max_parallel": 1, "report_cpus": 1,
                                "report_mem": "1G"})
    (tmp_path / "results_th").mkdir()
    assert cli.main(["run", str(f), "--backend", "slurm"]) == 0
    capsys.readouterr()
    sub = read_jobs(validate(load_experiment(f), check_trainers=False))["submissions"][0]
    array, report = sub["array"]["job_id"], sub["report"]["job_id"]
    assert sub["array"]["tasks"] == [["nnUNetTrainerDiceCE", 0], ["nnUNetTrainerFocal", 0]]

    def queue():
        out = subprocess.run(["squeue", "-h", "-r", "-j", array, "-o", "%i|%T|%r"], capture_output=True, text=True,
                             timeout=60).stdout
        return dict((line.split("|")[0], line.split("|")[1:]) for line in out.split())

    def one_running():
        q = queue()
        return q if sorted(v[0] for v in q.values()) == ["PENDING", "RUNNING"] else None

    try:
        seen = _wait_for("one task running, one held by the throttle", one_running, 120,
                         lambda: _slurm_state(slurm, array), interval=1)
        held = [v for v in seen.values() if v[0] == "PENDING"][0]
        assert held[1] == "JobArrayTaskLimit", seen
    finally:
        subprocess.run(["scancel", array, report], capture_output=True, timeout=60)
    _wait_for("the cancelled tasks to leave the queue", lambda: not queue(), 120, lambda: _slurm_state(slurm, array))


def test_slurm_experiment(slurm, synthetic_labels, tmp_path, capsys):
    ds = synthetic_labels
    ok = write_experiment(tmp_path / "ok.yaml", name="slurm-ok", dataset=ds.dataset_id, configuration="2d",
                          folds=[0, 1], device="cpu", training=SHORT, trainers=["nnUNetTrainerDiceCE"],
                          state_dir=str(tmp_path / "state_ok"),
                          nnunet_paths={"results": str(tmp_path / "results_ok")},
                          slurm={"cpus": 1, "mem": "2G", "time": "00:20:00", "report_cpus": 1, "report_mem": "2G"},
                          report={"max_fit_voxels": 50000})
    broken = write_experiment(tmp_path / "broken.yaml", name="slurm-broken", dataset=ds.dataset_id,
                              configuration="2d", folds=[0], device="cpu", training=SHORT,
                              trainers=["nnUNetTrainerDiceCE"], state_dir=str(tmp_path / "state_broken"),
                              nnunet_paths={"results": str(tmp_path / "results_broken")},
                              slurm={"cpus": 1, "mem": "1G", "time": "00:10:00", "report_cpus": 1, "report_mem": "1G"})
    (tmp_path / "results_ok").mkdir()
    corrupt = (tmp_path / "results_broken" / ds.name / "nnUNetTrainerDiceCE__nnUNetPlans__2d" / "fold_0"
               / "checkpoint_latest.pth")
    write_matching_record(broken, "nnUNetTrainerDiceCE", corrupt.parent)  # ours, so the run reaches nnU-Net
    corrupt.write_bytes(b"not a checkpoint")
    out_root = tmp_path / "reports"
    t0 = time.monotonic()
    assert cli.main(["run", str(broken), "--backend", "slurm", "--output-root", str(out_root)]) == 0
    assert cli.main(["run", str(ok), "--backend", "slurm", "--output-root", str(out_root)]) == 0
    printed = capsys.readouterr().out
    assert "submitted job array" in printed and "  nnUNetTrainerDiceCE: folds [0, 1]" in printed

    # submitting again while the folds are queued or running submits no second training
    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.settings import load_experiment
    from nnunet_calibration.experiments.slurm import read_jobs, submit

    exp_ok = validate(load_experiment(ok))
    again = submit(exp_ok, str(out_root))
    assert again["array"] is None
    assert set(again["skipped"]["nnUNetTrainerDiceCE"]) == {0, 1}
    states = [s["status"] for s in _status(ok)[1]]
    assert all(s in ("pending", "running", "completing", "configuring", "finished") for s in states), states

    # wait (bounded) for the report of the good experiment and the failure of the broken one
    report = out_root / "slurm-ok" / "README.md"
    while time.monotonic() - t0 < TIMEOUT:
        exp_b, rows_b, rep_b = _status(broken)
        rep_ok = _status(ok)[2]
        ok_done = report.is_file() and rep_ok["state"] not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING")
        if ok_done and rows_b[0]["status"] == "failed" and rep_b and "CANCEL" in rep_b["state"]:
            break
        time.sleep(3)
    exp_ok, rows_ok, rep_ok = _status(ok)
    exp_b, rows_b, rep_b = _status(broken)
    assert report.is_file(), f"no report after {TIMEOUT} s; status {rows_ok} {rep_ok}\n{_logs(exp_ok)}"
    assert [r["status"] for r in rows_ok] == ["finished", "finished"]
    assert rep_ok["state"] in ("COMPLETED",) or rep_ok["state"].startswith("unknown"), rep_ok

    # the report job's numbers are the evaluator's
    model = tmp_path / "results_ok" / ds.name / "nnUNetTrainerDiceCE__nnUNetPlans__2d"
    check_table_against_evaluator("slurm-ok", report.parent, {"nnUNetTrainerDiceCE": model}, [0, 1], ds.name,
                                  Path(ds.env["nnUNet_preprocessed"]), tmp_path / "direct")
    # the jobs ran in this Python environment and wrote their logs to the state folder
    log0 = (exp_ok.state_folder / "logs" / "nnUNetTrainerDiceCE_fold0.log").read_text()
    assert "nnUNetv2_train" in log0 and str(Path(os.sys.executable).parent) in log0
    jobs = read_jobs(exp_ok)
    assert jobs["submissions"][0]["report"]["depends_on"] == [jobs["submissions"][0]["array"]["job_id"]]
    script = Path(jobs["submissions"][0]["report"]["script"]).read_text()
    assert "--cpus-per-task=1" in script and "--mem=2G" in script

    # the broken fold: failed with its log, its report job cancelled by SLURM, no report written
    assert rows_b[0]["status"] == "failed", (rows_b, _logs(exp_b))
    assert rows_b[0]["log"].endswith("nnUNetTrainerDiceCE_fold0.log") and Path(rows_b[0]["log"]).is_file()
    assert "--c" in Path(rows_b[0]["log"]).read_text() and "Traceback" in Path(rows_b[0]["log"]).read_text()
    assert rep_b is not None and "CANCEL" in rep_b["state"], rep_b
    assert not (out_root / "slurm-broken").exists()
    rc = cli.main(["status", str(broken)])
    out = capsys.readouterr().out
    assert rc == 1 and "failed" in out and "nnUNetTrainerDiceCE_fold0.log" in out


def _wait_for(what: str, predicate, timeout: float, diagnose, interval: float = 2.0):
    """Poll ``predicate`` until it returns a true value; fail with ``diagnose()`` after ``timeout`` s."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{diagnose()}")


def _epoch_lines(fold: Path) -> list[int]:
    """Every ``Epoch N`` line of nnU-Net's training logs of ``fold`` (all runs), in file order."""
    import re

    out = []
    for log in sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime):
        out += [int(m) for m in re.findall(r"^\S+ \S+: Epoch (\d+)\s*$", log.read_text(), flags=re.M)]
    return out


def test_slurm_requeue_on_time_limit_signal(slurm, synthetic_labels, tmp_path, capsys):
    """SLURM's time-limit warning twice: mid-training (checkpoint at the end of the epoch, exit 75,
    requeue, ``--c``) and in the last epoch (the training finishes, stops before or during the final
    validation, requeue, only ``--val``); the fold ends with exactly ``num_epochs`` epochs, each trained
    once (checked in nnU-Net's logs and in its final checkpoint); the report job (afterok) still runs."""
    import re
    import subprocess

    import numpy as np
    import torch

    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.settings import load_experiment
    from nnunet_calibration.experiments.folds import FoldStatus, fold_folder, fold_state
    from nnunet_calibration.experiments.slurm import read_jobs
    from nnunet_calibration.experiments.status import training_progress
    from nnunet_calibration.trainers.timelimit import TIMELIMIT_EXIT_CODE

    ds = synthetic_labels
    epochs = 4
    training = {"num_epochs": epochs, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1,
                "save_every": 1000}  # no periodic checkpoint: only the time-limit one
    f = write_experiment(tmp_path / "rq.yaml", name="slurm-requeue", dataset=ds.dataset_id, configuration="2d",
                         folds=[0], device="cpu", training=training, trainers=["nnUNetTrainerDiceCE"],
                         state_dir=str(tmp_path / "state_rq"), nnunet_paths={"results": str(tmp_path / "results_rq")},
                         slurm={"cpus": 1, "mem": "2G", "time": "00:20:00", "signal_seconds": 60, "requeue": True,
                                "max_parallel": 1, "report_cpus": 1, "report_mem": "2G"},
                         report={"max_fit_voxels": 20000, "temperature_scaling": False, "threshold_sweep": False})
    (tmp_path / "results_rq").mkdir()
    out_root = tmp_path / "reports"
    assert cli.main(["run", str(f), "--backend", "slurm", "--output-root", str(out_root)]) == 0
    capsys.readouterr()
    exp = validate(load_experiment(f))
    spec = exp.trainers[0]
    fold = fold_folder(exp, spec, 0)
    arr = read_jobs(exp)["submissions"][0]["array"]
    task = f"{arr['job_id']}_0"
    script = Path(arr["script"]).read_text()
    assert "--signal=B:USR1@60" in script and "--requeue" in script and "--array=0%1" in script
    log = exp.state_folder / "logs" / "nnUNetTrainerDiceCE_fold0.log"
    text = lambda: log.read_text() if log.is_file() else ""  # noqa: E731
    diag = lambda: f"log {log}:\n{text()[-3000:]}\n{_logs(exp)}"  # noqa: E731
    diag_all = lambda: f"{diag()}\n{_slurm_state(slurm, task)}"  # noqa: E731
    warn = lambda: subprocess.run(["scancel", "--signal=USR1", "--batch", task], capture_output=True,  # noqa: E731
                                  text=True, timeout=60)

    # 1. the trainer announces its handler in on_train_start: the warning now lands in epoch 0 or soon after
    _wait_for("the training to start", lambda: "time limit: on SIGUSR1" in text(), 300, diag, interval=0.5)
    proc = warn()
    assert proc.returncode == 0, proc.stderr
    _wait_for("the requeue", lambda: "requeued SLURM job" in text(), 240, diag, interval=0.5)
    log_first = text()
    assert f"exit status {TIMELIMIT_EXIT_CODE}" in log_first
    stopped = int(re.search(r"stopped after epoch (\d+)", log_first).group(1))
    assert 0 <= stopped < epochs - 1
    # between the runs: the checkpoint records the next epoch; status shows the progress so far
    ckpt = torch.load(fold / "checkpoint_latest.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == stopped + 1
    prog = training_progress(fold, epochs)
    assert prog["epoch"] == stopped + 1 and prog["total"] == epochs
    # SLURM holds a requeued job for a while (BeginTime, about 2 minutes) before it may start again:
    # release it so that the test stays short (a real cluster just waits); see _release_requeued for
    # when the update takes effect.
    _release_requeued(task, 240, diag_all)
    _wait_for("the requeued task to run again", lambda: _running_again(task), 300, diag_all, interval=1)

    # 2. the second run continues (--c); the warning in its last epoch: the training finishes and the
    # task stops before (or during) the final validation, requeues, and the third run only validates
    last_epoch = re.compile(rf": Epoch {epochs - 1}\s*$", re.M)
    _wait_for("the last epoch", lambda: last_epoch.search(text().split("requeued SLURM job", 1)[1]), 300, diag_all,
              interval=0.2)
    proc = warn()
    assert proc.returncode == 0, proc.stderr
    _wait_for("the second requeue", lambda: text().count("requeued SLURM job") == 2, 240, diag_all, interval=0.5)
    second = text().split("requeued SLURM job")[1]
    assert re.search(r"fold 0: .*nnUNetv2_train.* --c$", second, re.M), second[-3000:]
    assert re.search(r"time limit: warning (before|during) the final validation", second), second[-3000:]
    assert (fold / "checkpoint_final.pth").is_file() and fold_state(exp, spec, 0) == FoldStatus.INTERRUPTED
    _release_requeued(task, 240, diag_all, restarts=2)
    _wait_for("the task to run a third time", lambda: _running_again(task, restarts=2), 300, diag_all, interval=1)

    report = out_root / "slurm-requeue" / "README.md"
    _wait_for("the fold and the report", lambda: fold_state(exp, spec, 0) == FoldStatus.FINISHED and report.is_file(), 420,
              diag_all, interval=3)
    third = text().split("requeued SLURM job")[2]
    assert re.search(r"fold 0: .*nnUNetv2_train.* --val$", third, re.M) and " --c" not in third, third[-3000:]
    job = _job_fields(task)
    assert job.get("Restarts") == "2", job
    # every epoch trained exactly once, in order, over the three runs; none lost
    assert _epoch_lines(fold) == list(range(epochs)), _epoch_lines(fold)
    final = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert final["current_epoch"] == epochs
    logging = final["logging"]
    assert len(logging["epoch_end_timestamps"]) == epochs and len(logging["train_losses"]) == epochs
    assert not (fold / "checkpoint_latest.pth").exists() and any((fold / "validation").glob("*.npz"))

    # status against nnU-Net's own record of the run (its checkpoint's logger), not the log text
    prog = training_progress(fold, epochs)
    assert prog["epoch"] == epochs and prog["current"] is None and prog["eta"] == 0
    last = np.asarray(logging["dice_per_class_or_region"][-1], dtype=float)
    assert prog["pseudo_dice"] == pytest.approx(float(np.nanmean(last)), abs=1e-4)
    assert prog["pseudo_dice_per_class"] == pytest.approx(list(last), abs=1e-4)
    durations = np.array(logging["epoch_end_timestamps"]) - np.array(logging["epoch_start_timestamps"])
    assert prog["epoch_time"] == pytest.approx(float(durations.mean()), abs=0.01)
    assert cli.main(["status", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"{epochs}/{epochs}" in out and "finished" in out and f"{prog['pseudo_dice']:.4f}" in out
