"""Small helpers to run real nnU-Net v2 commands from tests, benchmarks and experiments.

nnU-Net reads its three folders from the environment (``nnUNet_raw``, ``nnUNet_preprocessed``,
``nnUNet_results``). These helpers build such an environment and run nnU-Net's console scripts as
subprocesses, failing with the tail of the command's output.

Speed settings (:data:`CPU_FRIENDLY_ENV`): on small machines nnU-Net's defaults spawn many worker
processes; ``nnUNet_compile=f nnUNet_def_n_proc=1 nnUNet_npp=0 nnUNet_nps=0`` keeps planning,
preprocessing and prediction in-process, and ``nnUNet_n_proc_DA=0`` (training only: it breaks
planning) keeps data augmentation in-process.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

CPU_FRIENDLY_ENV = {
    "nnUNet_compile": "f",
    "nnUNet_def_n_proc": "1",
    "nnUNet_npp": "0",
    "nnUNet_nps": "0",
}
#: added for ``nnUNetv2_train`` only (nnU-Net's planning crashes with it)
TRAINING_ENV = {"nnUNet_n_proc_DA": "0"}


def nnunet_env(root: str | os.PathLike | None = None, base: Mapping[str, str] | None = None, *,
               cpu_friendly: bool) -> dict:
    """Return an environment dict for nnU-Net commands.

    Parameters
    ----------
    root
        If given, ``nnUNet_raw``, ``nnUNet_preprocessed`` and ``nnUNet_results`` are set to
        ``root/raw``, ``root/preprocessed`` and ``root/results`` (created). Otherwise the values
        already present in ``base`` are kept.
    base
        Starting environment (default: ``os.environ``).
    cpu_friendly
        Add :data:`CPU_FRIENDLY_ENV` (values already set in ``base`` win). No default: every caller says
        whether its nnU-Net commands run on a small CPU machine, so these settings never reach a GPU job
        by omission.
    """
    env = dict(os.environ if base is None else base)
    if root is not None:
        root = Path(root)
        for key, sub in (("nnUNet_raw", "raw"), ("nnUNet_preprocessed", "preprocessed"),
                         ("nnUNet_results", "results")):
            (root / sub).mkdir(parents=True, exist_ok=True)
            env[key] = str(root / sub)
    if cpu_friendly:
        for k, v in CPU_FRIENDLY_ENV.items():
            env.setdefault(k, v)
    return env


def training_env(env: Mapping[str, str]) -> dict:
    """``env`` plus :data:`TRAINING_ENV` (values already set win)."""
    out = dict(env)
    for k, v in TRAINING_ENV.items():
        out.setdefault(k, v)
    return out


def nnunet_command(name: str) -> list[str]:
    """The argv prefix that runs nnU-Net console script ``name`` with *this* interpreter.

    Looks next to ``sys.executable`` first (a virtual environment's ``bin``), then on ``PATH``.
    """
    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return [str(candidate)]
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"nnU-Net command {name!r} not found next to {sys.executable} nor on PATH")
    return [found]


def _kill_group(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM to ``proc``'s process group, SIGKILL after ``grace`` seconds."""
    import signal

    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def run_nnunet(args: Sequence[str], env: Mapping[str, str], cwd: str | os.PathLike | None = None,
               log_path: str | os.PathLike | None = None, tail: int = 60) -> str:
    """Run an nnU-Net command (``args[0]`` is a console-script name or a path) and return its output.

    ``args[0]`` is resolved with :func:`nnunet_command` when it is a bare name. stdout and stderr are
    merged; if ``log_path`` is given the output is written there too. On a non-zero exit a
    :class:`RuntimeError` carries the command and the last ``tail`` lines of output.
    """
    args = [str(a) for a in args]
    if os.sep not in args[0]:
        args = nnunet_command(args[0]) + args[1:]
    if args[0].endswith("nnUNetv2_train"):
        env = training_env(env)
    # its own process group: on an interrupt (Ctrl-C, SIGTERM under cli_main) nnU-Net and any worker
    # processes it started are stopped with it, not left behind
    with subprocess.Popen(args, env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          process_group=0) as proc:
        try:
            out, _ = proc.communicate()
        except BaseException:
            _kill_group(proc)
            raise
    if log_path is not None:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        Path(log_path).write_text(out)
    if proc.returncode != 0:
        last = "\n".join(out.splitlines()[-tail:])
        raise RuntimeError(f"command failed with exit code {proc.returncode}: {' '.join(args)}\n{last}")
    return out
