"""The time-limit protocol shared by the trainers and the experiment runner (no torch, no nnU-Net).

The trainers' side (stop at the end of the epoch on the warning signal, write a checkpoint, exit)
is :mod:`nnunet_calibration.trainers.timelimit`; the SLURM task's side (forward the signal, requeue
on :data:`TIMELIMIT_EXIT_CODE`) is :mod:`nnunet_calibration.experiments.runner`. This module holds
what both must agree on, so that the runner does not import the trainers (and with them nnU-Net's
training code, which switches matplotlib's backend on import).
"""
from __future__ import annotations

import os
import signal

#: exit status of a training stopped by the time-limit signal (sysexits' EX_TEMPFAIL)
TIMELIMIT_EXIT_CODE = 75
#: environment variable naming the warning signal (``USR1`` by default)
SIGNAL_ENV = "NNUNET_CALIB_STOP_SIGNAL"
#: set to ``1`` to install the handler outside SLURM too (``0`` disables it inside SLURM)
ENABLE_ENV = "NNUNET_CALIB_TIMELIMIT"


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
