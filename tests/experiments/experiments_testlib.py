"""Helpers of the experiment tests: experiment files, the report table checked against the
evaluator, and a real single-node SLURM cluster (:class:`SlurmCluster`).

SLURM cluster
-------------
A real single-node SLURM cluster for tests, started without systemd in a fresh state folder.

Uses Debian's packages (``apt-get install -y slurmctld slurmd slurm-client munge``):

- ``munged`` runs as the ``munge`` user with its own key, socket, pid, log and seed files in
  ``STATE/munge`` (slurm.conf points at the socket with ``AuthInfo=socket=...``);
- ``slurmctld`` and ``slurmd`` run as root with ``SlurmctldHost=<hostname>(127.0.0.1)``,
  ``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``, no accounting, free TCP ports,
  everything (state, spool, logs, pid files) under ``STATE``;
- client commands (``sbatch``, ``squeue``, ...) find the cluster through ``SLURM_CONF``
  (:meth:`SlurmCluster.env`).

Daemons are stopped by the PIDs recorded when they started. Every wait has a timeout.
"""
from __future__ import annotations

import csv
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from nnunet_calibration.trainers.base import parse_hparams
from nnunet_calibration.utils import pid_alive
from testlib import SHORT_TRAINING

#: the same short training as the shared fixtures (tests/conftest.py), so their trainings can be reused
SHORT = parse_hparams(SHORT_TRAINING)
METRICS = ("DSC", "HD95", "ECE", "CECE", "pECE", "mL1-ACE", "NLL", "Brier")


def write_experiment(path: Path, **cfg) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_table(report: Path) -> dict:
    with open(report / "table.csv") as fh:
        return {row["method"]: row for row in csv.DictReader(fh)}


def check_table_against_evaluator(exp_name: str, report: Path, model_folders: dict, folds, dataset_name: str,
                                  preprocessed: Path, tmp: Path) -> None:
    """Every table mean equals the mean over folds of evaluate_folders(fold_X/validation) run here."""
    from nnunet_calibration.evaluation import evaluate_folders, validation_cases

    table = read_table(report)
    gt = preprocessed / dataset_name / "gt_segmentations"
    dj = preprocessed / dataset_name / "dataset.json"
    for label, model in model_folders.items():
        per_fold = []
        for f in folds:
            s = evaluate_folders([model / f"fold_{f}" / "validation"], gt, dj, tmp / label / str(f), progress=False,
                                 write=False, cases=validation_cases(preprocessed / dataset_name / "splits_final.json", f))
            per_fold.append(s["mean"])
        row = table[label]
        assert row[f"{exp_name}/folds"] == " ".join(map(str, folds))
        for m in METRICS:
            want = np.mean([pf[m] for pf in per_fold])
            assert float(row[f"{exp_name}/{m}"]) == pytest.approx(want, rel=1e-9, abs=1e-12), (label, m)
            if len(folds) > 1:
                sd = np.std([pf[m] for pf in per_fold], ddof=1)
                assert float(row[f"{exp_name}/{m}_std"]) == pytest.approx(sd, rel=1e-9, abs=1e-12)


def load_json(p) -> dict:
    return json.loads(Path(p).read_text())


def write_matching_record(experiment_file: Path, trainer: str, fold_dir: Path) -> None:
    """A ``calibration_hparams.json`` in ``fold_dir`` as the trainer writes it for this experiment's entry
    ``trainer`` (so the fold passes the reuse check and the run reaches nnU-Net)."""
    from nnunet_calibration.experiments.nnunet_checks import expected_record, trainer_class, validate
    from nnunet_calibration.experiments.environment import experiment_env
    from nnunet_calibration.settings import load_experiment

    exp = validate(load_experiment(experiment_file))
    entry = next(e for e in exp.trainers if e.label == trainer)
    want = expected_record(exp, entry, trainer_class(exp, entry, experiment_env(exp)))
    record = {k: want[k] for k in ("trainer", "loss", "loss_hparams", "loss_fixed")}
    record["overrides"] = {"parsed": want["training_overrides"]}
    fold_dir.mkdir(parents=True, exist_ok=True)
    (fold_dir / "calibration_hparams.json").write_text(json.dumps(record))


# ------------------------------------------------------------------ a real single-node SLURM cluster
PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
APT_COMMAND = "apt-get update && apt-get install -y slurmctld slurmd slurm-client munge"
DAEMONS = ("munged", "slurmctld", "slurmd")


class SlurmUnavailable(RuntimeError):
    """The SLURM/munge packages are missing or the cluster cannot start here (tests skip with this reason)."""


def missing_programs() -> list[str]:
    need = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd",
            "sbatch": None, "squeue": None, "scontrol": None}
    missing = []
    for name, path in need.items():
        if path is not None and Path(path).exists():
            continue
        if shutil.which(name) is None:
            missing.append(name)
    return missing


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_line() -> str:
    """The node description of this machine as slurmd reports it (``slurmd -C``), with NodeAddr."""
    out = subprocess.run([_prog("slurmd"), "-C"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         timeout=30).stdout
    line = next((l for l in out.splitlines() if l.startswith("NodeName=")), None)
    if line is None:
        raise SlurmUnavailable(f"slurmd -C printed no NodeName line: {out.strip()}")
    return line + " NodeAddr=127.0.0.1 State=UNKNOWN"


def _prog(name: str) -> str:
    for d in ("/usr/sbin", "/usr/bin"):
        if Path(d, name).exists():
            return str(Path(d, name))
    found = shutil.which(name)
    if found is None:
        raise SlurmUnavailable(f"{name} not installed (install with: {APT_COMMAND})")
    return found


def _pid_alive(pid: int) -> bool:
    """:func:`nnunet_calibration.utils.pid_alive`, and not a zombie."""
    if not pid_alive(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


class SlurmCluster:
    def __init__(self, state: str | os.PathLike, partition: str = "debug"):
        self.state = Path(state).resolve()
        self.partition = partition
        self.conf = self.state / "slurm.conf"
        self.hostname = socket.gethostname().split(".")[0]

    # -- paths -------------------------------------------------------------------------------
    def pidfile(self, daemon: str) -> Path:
        return (self.state / "munge" / "munged.pid") if daemon == "munged" else self.state / f"{daemon}.pid"

    def logfile(self, daemon: str) -> Path:
        return (self.state / "munge" / "munged.log") if daemon == "munged" else self.state / f"{daemon}.log"

    def env(self, base: dict | None = None) -> dict:
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    # -- start -------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        missing = missing_programs()
        if missing:
            raise SlurmUnavailable(f"missing {', '.join(missing)} (install with: {APT_COMMAND})")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd/munged needs root")
        try:
            munge_user = pwd.getpwnam("munge")
        except KeyError:
            raise SlurmUnavailable("no 'munge' user (is the munge package installed?)") from None
        if self.state.exists() and any(self.state.iterdir()):
            raise RuntimeError(f"state folder {self.state} is not empty: use a fresh one per run")
        self.state.mkdir(parents=True, exist_ok=True)
        os.chmod(self.state, 0o755)
        for sub in ("state", "spool"):
            (self.state / sub).mkdir()
        try:
            self._start_munge(munge_user, timeout)
            self._write_conf()
            self._spawn("slurmctld", [_prog("slurmctld"), "-f", str(self.conf)])
            self._wait_pidfile("slurmctld", timeout)
            self._spawn("slurmd", [_prog("slurmd"), "-f", str(self.conf)])
            self._wait_pidfile("slurmd", timeout)
            self._wait_node_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self, user: pwd.struct_passwd, timeout: float) -> None:
        d = self.state / "munge"
        d.mkdir(mode=0o700)
        key = d / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        for p in (d, key):
            os.chown(p, user.pw_uid, user.pw_gid)
        cmd = [_prog("munged"), "--force", f"--socket={d / 'munge.socket'}", f"--key-file={key}",
               f"--log-file={d / 'munged.log'}", f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"]
        runuser = shutil.which("runuser") or "/usr/sbin/runuser"
        proc = subprocess.run([runuser, "-u", "munge", "--", *cmd], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise SlurmUnavailable(f"munged did not start: {proc.stdout.strip()}")
        self._wait_pidfile("munged", timeout)
        # munge socket: the parent folder must be reachable by clients
        os.chmod(d, 0o755)

    def _write_conf(self) -> None:
        s = self.state
        lines = [
            "ClusterName=calibtest",
            f"SlurmctldHost={self.hostname}(127.0.0.1)",
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={s / 'munge' / 'munge.socket'}",
            f"StateSaveLocation={s / 'state'}",
            f"SlurmdSpoolDir={s / 'spool'}",
            f"SlurmctldPidFile={self.pidfile('slurmctld')}",
            f"SlurmdPidFile={self.pidfile('slurmd')}",
            f"SlurmctldLogFile={self.logfile('slurmctld')}",
            f"SlurmdLogFile={self.logfile('slurmd')}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU_Memory",
            "ReturnToService=2",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            "MinJobAge=300",
            "KillWait=5",
            "Waittime=0",
            _node_line(),
            f"PartitionName={self.partition} Nodes={self.hostname} Default=YES MaxTime=INFINITE State=UP",
        ]
        # slurmd -C names the node after the short hostname; keep them consistent
        self.conf.write_text("\n".join(lines) + "\n")

    def _spawn(self, daemon: str, cmd: list[str]) -> None:
        # the daemons fork into the background and write their pid files; their output goes to their logs
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60,
                              env=self.env())
        if proc.returncode != 0:
            raise SlurmUnavailable(f"{daemon} did not start ({proc.returncode}): {proc.stdout.strip()}\n"
                                   f"{self._tail(daemon)}")

    def _tail(self, daemon: str, n: int = 30) -> str:
        try:
            return "\n".join(self.logfile(daemon).read_text().splitlines()[-n:])
        except OSError:
            return f"(no log {self.logfile(daemon)})"

    def _wait_pidfile(self, daemon: str, timeout: float) -> int:
        end = time.monotonic() + timeout
        f = self.pidfile(daemon)
        while time.monotonic() < end:
            try:
                pid = int(f.read_text().strip())
                if _pid_alive(pid):
                    return pid
            except (OSError, ValueError):
                pass
            time.sleep(0.2)
        raise SlurmUnavailable(f"{daemon} wrote no live pid to {f} within {timeout:.0f} s:\n{self._tail(daemon)}")

    def _wait_node_idle(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        out = ""
        while time.monotonic() < end:
            proc = subprocess.run(["sinfo", "-h", "-N", "-o", "%t"], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True, env=self.env(), timeout=30)
            out = proc.stdout.strip()
            if proc.returncode == 0 and out.startswith("idle"):
                return
            time.sleep(0.5)
        raise SlurmUnavailable(f"node not idle within {timeout:.0f} s (sinfo: {out!r})\n"
                               f"slurmctld log:\n{self._tail('slurmctld')}\nslurmd log:\n{self._tail('slurmd')}")

    # -- stop --------------------------------------------------------------------------------
    def stop(self, timeout: float = 20.0) -> None:
        """Stop slurmd, slurmctld and munged by the PIDs in their pid files (SIGTERM, then SIGKILL)."""
        for daemon in ("slurmd", "slurmctld", "munged"):
            try:
                pid = int(self.pidfile(daemon).read_text().strip())
            except (OSError, ValueError):
                continue
            if not _pid_alive(pid):
                continue
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            end = time.monotonic() + timeout
            while time.monotonic() < end and _pid_alive(pid):
                time.sleep(0.2)
            if _pid_alive(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
