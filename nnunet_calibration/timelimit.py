"""The time-limit and checkpoint protocol shared by the trainers and the experiment runner (no torch, no nnU-Net).

The trainers' side (stop at the end of the epoch on the warning signal, write a checkpoint, exit;
atomic checkpoints with one older copy) is :mod:`nnunet_calibration.trainers.timelimit`; the SLURM
task's side (record and forward the signal, requeue on :data:`TIMELIMIT_EXIT_CODE`) is
:mod:`nnunet_calibration.experiments.slurm`; ``calib-experiment status`` reads the recovery record.
This module holds what they must agree on, so that the runner does not import the trainers (and
with them nnU-Net's training code, which switches matplotlib's backend on import).

The warning travels two ways, so that it is never lost while a process starts (when no handler can
be installed yet): as the signal, and as the *stop file* named by :data:`STOP_FILE_ENV`, which the
job script and the SLURM task create when the signal reaches them. A training checks the file where
it checks its flag (end of start-up, every epoch end, before the final validation).
"""
from __future__ import annotations

import os
import signal
import subprocess

#: exit status of a training stopped by the time-limit signal (sysexits' EX_TEMPFAIL)
TIMELIMIT_EXIT_CODE = 75
#: environment variable naming the warning signal (``USR1`` by default)
SIGNAL_ENV = "NNUNET_CALIB_STOP_SIGNAL"
#: set to ``1`` to install the handler outside SLURM too (``0`` disables it inside SLURM)
ENABLE_ENV = "NNUNET_CALIB_TIMELIMIT"
#: environment variable naming the stop file: its existence means "the time-limit warning came"
STOP_FILE_ENV = "NNUNET_CALIB_STOP_FILE"

#: nnU-Net's checkpoint that ``--c`` continues from, and the one older copy the trainers keep of it
LATEST_CHECKPOINT = "checkpoint_latest.pth"
PREVIOUS_CHECKPOINT = "checkpoint_previous.pth"
#: written into the fold folder when a resume fell back to :data:`PREVIOUS_CHECKPOINT` (a JSON list
#: of ``{"time", "unreadable", "error", "resumed_from", "epoch"}``)
RECOVERY_FILE = "checkpoint_recovery.json"


def stop_signal(env: dict | None = None) -> signal.Signals:
    """The warning signal (``SIGUSR1`` unless :data:`SIGNAL_ENV` says otherwise)."""
    env = os.environ if env is None else env
    name = (env.get(SIGNAL_ENV) or "USR1").upper()
    name = name if name.startswith("SIG") else "SIG" + name
    try:
        return signal.Signals[name]
    except KeyError:
        raise ValueError(f"{SIGNAL_ENV}={env.get(SIGNAL_ENV)!r} is not a signal name (e.g. USR1, USR2)") from None


def handler_wanted(env: dict | None = None) -> bool:
    """True inside a SLURM job (``SLURM_JOB_ID`` set) unless :data:`ENABLE_ENV` is ``0``; or when it is ``1``."""
    env = os.environ if env is None else env
    flag = env.get(ENABLE_ENV)
    if flag is not None and flag.strip() != "":
        return flag.strip() not in ("0", "false", "no")
    return bool(env.get("SLURM_JOB_ID"))


def stop_file(env: dict | None = None) -> str | None:
    """The stop file's path (:data:`STOP_FILE_ENV`), or None when none is agreed on."""
    env = os.environ if env is None else env
    return env.get(STOP_FILE_ENV) or None


def stop_file_present(env: dict | None = None) -> bool:
    """Whether the warning came as the stop file."""
    path = stop_file(env)
    return bool(path) and os.path.exists(path)


def touch_stop_file(env: dict | None = None) -> None:
    """Create the stop file (if one is agreed on); errors are ignored: the signal still travels."""
    path = stop_file(env)
    if path:
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "a"):
                pass
        except OSError:
            pass


class TaskWarning:
    """The time-limit warning as a SLURM task sees it: its own signal handler (installed on
    construction, so first thing in the task) and the stop file (:data:`STOP_FILE_ENV`, which the job
    script's trap may have created before this process could handle the signal). The training gets
    it too: forwarded to its process group (when the signal came, or when the stop file appears while
    waiting for it), and through the stop file."""

    def __init__(self, env: dict):
        self.env, self.sig = env, stop_signal(env)
        self.received, self.forwarded, self.proc = False, False, None
        self.previous = signal.signal(self.sig, self._handler)

    def _handler(self, signum, frame):  # noqa: ARG002
        self.received = True
        touch_stop_file(self.env)
        self.forward()

    def came(self) -> bool:
        return self.received or stop_file_present(self.env)

    def forward(self) -> None:
        if self.proc is None or self.proc.poll() is not None or self.forwarded:
            return
        self.forwarded = True
        print(f"received the time-limit warning ({self.sig.name}): passed on to the training", flush=True)
        try:
            os.killpg(self.proc.pid, self.sig)  # the training and, under DDP, its worker processes
        except ProcessLookupError:
            pass

    def wait(self, proc: subprocess.Popen) -> int:
        self.proc = proc
        while True:
            try:
                return proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                if self.came():
                    self.forward()
            except KeyboardInterrupt:
                proc.send_signal(signal.SIGINT)

    def close(self) -> None:
        signal.signal(self.sig, self.previous)
