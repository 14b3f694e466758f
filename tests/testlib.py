"""Helpers of the whole test suite (the root test-helper module; ``tests/conftest.py`` builds its
session fixtures with them). Every test package has one helper module ``<package>_testlib.py``
beside its tests; all are imported normally (``from testlib import SHORT_TRAINING``), never by file
path: pytest puts ``tests/`` and each test folder on ``sys.path``.

Run-wide sharing: ``shared_dir`` is one folder per pytest run, common to all pytest-xdist workers
(``pytest -n 2``); ``build_once`` fills a sub-folder of it exactly once per run under a file lock,
so a dataset is planned and preprocessed, or a model trained, once however many workers need it.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from filelock import FileLock

#: short training used by every real-training test (via the trainers' hyperparameter variable)
SHORT_TRAINING = "num_epochs=1,num_iterations_per_epoch=2,num_val_iterations_per_epoch=1"

#: ``nnUNetv2_predict`` in the calling process (nnU-Net's sequential path when both are 0): no
#: spawned preprocessing / export workers, each of which would import torch and nnU-Net again
PREDICT_IN_PROCESS = ["-npp", "0", "-nps", "0"]


def shared_dir(tmp_path_factory) -> Path:
    """This run's folder shared by every xdist worker (the parent of the workers' basetemps), or
    the basetemp itself without xdist."""
    base = Path(tmp_path_factory.getbasetemp())
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def build_once(folder: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build(folder)`` once per run, whichever worker gets here first; the others wait on the
    lock and reuse the result. A failed build leaves nothing behind (the next caller tries again
    and fails with the real error) and a folder is used only once ``build`` has returned."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder / ".built"
    with FileLock(str(folder) + ".lock"):
        if not done.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            try:
                build(folder)
            except BaseException:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            done.touch()
    return folder


def copy_tree(src: Path, dst: Path) -> Path:
    """Copy a folder (files with their times, so a reuse check by mtime sees the original's)."""
    shutil.copytree(src, dst, dirs_exist_ok=True)
    return Path(dst)


def sigterm_when_staging_appears(cmd: list, env: dict, folder: Path, prefix: str, timeout: float = 120.0):
    """Start ``cmd``; as soon as a staging folder ``folder/<prefix><pid>-*`` of that process exists,
    send it SIGTERM. Returns ``(returncode, stdout, stderr, staging_seen)``; the process is killed if
    it outlives ``timeout`` (then the test fails on the return code)."""
    import signal
    import subprocess
    import time

    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    try:
        t0 = time.time()
        while time.time() - t0 < timeout and proc.poll() is None:
            seen = [p for p in folder.iterdir() if p.name.startswith(f"{prefix}{proc.pid}-")] if folder.is_dir() else []
            if seen:
                break
            time.sleep(0.02)
        if seen:
            proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, stdout, stderr, bool(seen)
