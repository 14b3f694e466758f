"""calib-experiment with the SLURM backend against a real single-node SLURM started here.

The cluster (slurmctld, slurmd, munged; Debian packages ``slurmctld slurmd slurm-client munge``) is
started by ``experiments_testlib.SlurmCluster`` in a fresh state folder and stopped by PID afterwards. Without the
packages (or without root) the tests are skipped with the reason — never passed.

Two experiments are submitted at once:
- ``slurm-ok``: nnUNetTrainerDiceCE, folds 0 and 1, short training, in its own nnUNet_results: one job
  array of two tasks, then the report job (afterok) writes the report, whose numbers are checked
  against the evaluator;
- ``slurm-broken``: a trainer whose hyperparameter value makes nnU-Net fail at start-up: its task
  fails, SLURM cancels its report job (``--kill-on-invalid-dep=yes``), and ``status`` reports the
  fold as failed with its log.
Every wait has a timeout.
"""
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest

from experiments_testlib import (APT_COMMAND, SHORT, SlurmCluster, SlurmUnavailable, check_table_against_evaluator,
                                 missing_programs, write_experiment)
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
    from nnunet_calibration.experiments.config import load_experiment, validate
    from nnunet_calibration.experiments.status import fold_statuses, report_job_status

    exp = validate(load_experiment(exp_file), check_trainers=False)
    return exp, fold_statuses(exp), report_job_status(exp)


def _logs(exp) -> str:
    out = []
    for f in sorted((exp.state_dir / "logs").glob("*.log")):
        out.append(f"--- {f}\n" + "\n".join(f.read_text().splitlines()[-25:]))
    return "\n".join(out)


def test_slurm_experiment(slurm, synthetic_labels, tmp_path, capsys):
    ds = synthetic_labels
    ok = write_experiment(tmp_path / "ok.yaml", name="slurm-ok", dataset=ds.dataset_id, configuration="2d",
                          folds=[0, 1], device="cpu", training=SHORT, trainers=["nnUNetTrainerDiceCE"],
                          state_dir=str(tmp_path / "state_ok"),
                          nnunet_paths={"results": str(tmp_path / "results_ok")},
                          slurm={"cpus": 1, "mem": "2G", "time": "00:20:00", "report_cpus": 1, "report_mem": "2G"},
                          report={"max_fit_voxels": 50000})
    broken = write_experiment(tmp_path / "broken.yaml", name="slurm-broken", dataset=ds.dataset_id,
                              configuration="2d", folds=[0], device="cpu",
                              training=dict(SHORT, num_epochs="not-a-number"),
                              trainers=["nnUNetTrainerDiceCE"], state_dir=str(tmp_path / "state_broken"),
                              nnunet_paths={"results": str(tmp_path / "results_broken")},
                              slurm={"cpus": 1, "mem": "1G", "time": "00:10:00", "report_cpus": 1, "report_mem": "1G"})
    (tmp_path / "results_ok").mkdir()
    (tmp_path / "results_broken").mkdir()
    out_root = tmp_path / "reports"
    t0 = time.monotonic()
    assert cli.main(["run", str(broken), "--backend", "slurm", "--output-root", str(out_root)]) == 0
    assert cli.main(["run", str(ok), "--backend", "slurm", "--output-root", str(out_root)]) == 0
    printed = capsys.readouterr().out
    assert "submitted nnUNetTrainerDiceCE: job array" in printed

    # submitting again while the folds are queued or running submits no second training
    from nnunet_calibration.experiments.config import load_experiment, validate
    from nnunet_calibration.experiments.slurm import read_jobs, submit

    exp_ok = validate(load_experiment(ok))
    again = submit(exp_ok, str(out_root))
    assert again["trainers"] == {}
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
    log0 = (exp_ok.state_dir / "logs" / "nnUNetTrainerDiceCE_fold0.log").read_text()
    assert "nnUNetv2_train" in log0 and str(Path(os.sys.executable).parent) in log0
    jobs = read_jobs(exp_ok)
    assert jobs["submissions"][0]["report"]["depends_on"] == [jobs["submissions"][0]["trainers"]
                                                              ["nnUNetTrainerDiceCE"]["job_id"]]
    script = Path(jobs["submissions"][0]["report"]["script"]).read_text()
    assert "--cpus-per-task=1" in script and "--mem=2G" in script

    # the broken fold: failed with its log, its report job cancelled by SLURM, no report written
    assert rows_b[0]["status"] == "failed", (rows_b, _logs(exp_b))
    assert rows_b[0]["log"].endswith("nnUNetTrainerDiceCE_fold0.log") and Path(rows_b[0]["log"]).is_file()
    assert "num_epochs must be int" in Path(rows_b[0]["log"]).read_text()
    assert rep_b is not None and "CANCEL" in rep_b["state"], rep_b
    assert not (out_root / "slurm-broken").exists()
    rc = cli.main(["status", str(broken)])
    out = capsys.readouterr().out
    assert rc == 1 and "failed" in out and "nnUNetTrainerDiceCE_fold0.log" in out
