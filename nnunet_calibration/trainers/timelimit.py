"""Surviving a cluster: stop cleanly on the time-limit warning, and checkpoints that survive any kill.

Time limit (:class:`TimeLimitMixin`)
------------------------------------
nnU-Net writes ``checkpoint_latest.pth`` only every ``save_every`` epochs (50 by default), so a job
killed at its time limit loses up to 50 epochs. SLURM can warn a job before the limit
(``sbatch --signal=B:USR1@600``: ``SIGUSR1`` 600 s before it). Every trainer of this package (through
:class:`~nnunet_calibration.trainers.base.nnUNetTrainerHparamsBase`) reacts to that warning from the
moment it is constructed until the process ends:

* **start-up** (trainer construction, checkpoint loading, dataset unpacking, data loaders): the
  handler sets a flag; at the end of start-up the process leaves with :data:`TIMELIMIT_EXIT_CODE`
  (75, ``EX_TEMPFAIL``) without training one iteration; checkpoints are left as they were;
* **training**: at the end of the current epoch (after nnU-Net's own ``on_epoch_end``: logging,
  periodic and best checkpoints) ``checkpoint_latest.pth`` is written with the *next* epoch to run,
  exactly as nnU-Net's periodic checkpoint records it, the data loaders are shut down and the process
  leaves with 75; ``nnUNetv2_train ... --c`` continues from there: no epoch is trained twice or lost.
  A warning in the last epoch lets the training finish (``checkpoint_final.pth``) and stops before
  the final validation;
* **final validation** (long for 3d_fullres): the process leaves with 75 at once; the training is
  complete (``checkpoint_final.pth``), and the next run only validates (``nnUNetv2_train ... --val``).

The warning arrives as the signal or as the stop file of :mod:`nnunet_calibration.timelimit` (which
also covers the moments before a handler exists). Multi-GPU (nnU-Net's DDP, ``-num_gpus N``): the
ranks agree before acting (an all-reduce of the flag) so that every rank stops at the same point.
nnU-Net's ``mp.spawn`` parent then exits with its own error status; the SLURM task
(``calib-experiment train-fold``) decides on requeueing by the warning it received itself.

Inert outside SLURM: the handler is installed only when ``SLURM_JOB_ID`` is in the environment (or
:data:`ENABLE_ENV` is ``1``); otherwise ``SIGUSR1`` keeps its default meaning. The signal is
``SIGUSR1`` unless :data:`SIGNAL_ENV` names another one (e.g. ``USR2``).

Checkpoints (:class:`SafeCheckpointMixin`)
------------------------------------------
nnU-Net's ``save_checkpoint`` overwrites its file in place: a kill during the write leaves a corrupt
``checkpoint_latest.pth`` that ``--c`` fails on. Here every checkpoint is written to a temporary file
in the same folder, flushed to disk (fsync) and renamed over the old one, so a reader finds the old
or the new checkpoint, never part of one. Before ``checkpoint_latest.pth`` is replaced, the old one
becomes ``checkpoint_previous.pth`` (a hard link, or a copy where links are not allowed); a resume
whose latest checkpoint cannot be read (a file written by another tool, a damaged disk) falls back to
it, says so in nnU-Net's training log and records it in ``checkpoint_recovery.json`` (shown by
``calib-experiment status``). Under DDP rank 0 writes (nnU-Net's rule) and the other ranks wait at a
barrier until it has. nnU-Net's ``load_checkpoint`` is always given a path (its dict form is broken).
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import secrets
import shutil
import signal
import sys
from os.path import basename, dirname, isfile, join
from pathlib import Path

import torch

from nnunet_calibration.timelimit import (ENABLE_ENV, LATEST_CHECKPOINT, PREVIOUS_CHECKPOINT,  # noqa: F401
                                         RECOVERY_FILE, SIGNAL_ENV, TIMELIMIT_EXIT_CODE, handler_wanted,
                                         stop_file, stop_file_present, stop_signal)
from nnunet_calibration.utils import write_json_atomic


class TimeLimitStop(SystemExit):
    """Leaving the process with :data:`TIMELIMIT_EXIT_CODE` because of the time-limit warning."""

    def __init__(self):
        super().__init__(TIMELIMIT_EXIT_CODE)


def _ddp(trainer) -> bool:
    return bool(getattr(trainer, "is_ddp", False)) and torch.distributed.is_available() \
        and torch.distributed.is_initialized()


class TimeLimitMixin:
    """Mixin for nnU-Net trainers: stop on the time-limit warning (see the module docstring).

    Put it *before* nnU-Net's trainer class in the bases and call :meth:`install_timelimit_handler`
    from ``__init__``. It overrides ``on_train_start`` (end of start-up), ``on_epoch_end`` and
    ``perform_actual_validation``, each calling nnU-Net's own.
    """

    _timelimit_requested: bool = False
    _timelimit_signal = None
    #: "start-up", "training", "validation" or "done"
    _timelimit_phase: str = "start-up"

    def _timelimit_handler(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        self._timelimit_requested = True
        if self._timelimit_phase == "validation":
            raise TimeLimitStop()  # nothing to save: the next run validates again (--val)
        # otherwise only a flag: start-up or the epoch in progress finishes normally

    def install_timelimit_handler(self) -> bool:
        """Install the signal handler if wanted (SLURM) and possible (main thread). Returns whether it did."""
        if not handler_wanted():
            return False
        sig = stop_signal()
        try:
            signal.signal(sig, self._timelimit_handler)
        except ValueError:  # not the main thread: signals cannot be handled here
            return False
        self._timelimit_signal = sig
        return True

    @property
    def timelimit_active(self) -> bool:
        """Whether a warning can come at all (handler installed, or a stop file agreed on)."""
        return self._timelimit_signal is not None or stop_file() is not None

    def timelimit_stop_requested(self) -> bool:
        """Whether to stop now (signal or stop file); under DDP every rank gets the same answer."""
        flag = bool(self._timelimit_requested) or stop_file_present()
        if _ddp(self):
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def on_train_start(self):
        super().on_train_start()
        if not self.timelimit_active:
            return
        name = self._timelimit_signal.name if self._timelimit_signal is not None else "the stop file"
        self.print_to_log_file(f"time limit: on {name} the training stops after the current epoch with "
                               f"checkpoint_latest.pth and exit status {TIMELIMIT_EXIT_CODE} (continue with --c)")
        if self.timelimit_stop_requested():
            self.print_to_log_file(f"time limit: warning during start-up: stopped before training (exit status "
                                   f"{TIMELIMIT_EXIT_CODE}); the checkpoints are unchanged")
            self._shut_down_loaders()
            raise TimeLimitStop()
        self._timelimit_phase = "training"

    def on_epoch_end(self):
        super().on_epoch_end()  # nnU-Net's: logs, periodic/best checkpoints, then current_epoch += 1
        if not self.timelimit_active:
            return
        finished_epoch = self.current_epoch - 1
        if finished_epoch >= self.num_epochs - 1:
            return  # the last epoch: finish the training; a warning stops before the validation
        if not self.timelimit_stop_requested():
            return
        self.stop_for_timelimit(finished_epoch)

    def stop_for_timelimit(self, finished_epoch: int) -> None:
        """Write ``checkpoint_latest.pth`` (next epoch: ``finished_epoch + 1``), shut down, exit 75."""
        # nnU-Net's checkpoint stores current_epoch + 1 as the epoch to continue with (the same
        # adjustment as its on_train_end); its on_epoch_end may have written this very one already
        periodic = (finished_epoch + 1) % self.save_every == 0 and finished_epoch != self.num_epochs - 1
        if not periodic:
            self.current_epoch = finished_epoch
            self.save_checkpoint(join(self.output_folder, LATEST_CHECKPOINT))
            self.current_epoch = finished_epoch + 1
        self.print_to_log_file(f"time limit: stopped after epoch {finished_epoch} ({self.num_epochs} planned); "
                               f"checkpoint_latest.pth {'was just written' if periodic else 'written'}; continue "
                               f"with --c (exit status {TIMELIMIT_EXIT_CODE})")
        self._shut_down_loaders()
        raise TimeLimitStop()

    def perform_actual_validation(self, save_probabilities: bool = False):
        if self.timelimit_active and self.timelimit_stop_requested():
            self.print_to_log_file(f"time limit: warning before the final validation: stopped (exit status "
                                   f"{TIMELIMIT_EXIT_CODE}); the training is complete, the next run only "
                                   f"validates (--val)")
            raise TimeLimitStop()
        self._timelimit_phase = "validation"
        try:
            super().perform_actual_validation(save_probabilities)
        except TimeLimitStop:
            self.print_to_log_file(f"time limit: warning during the final validation: stopped (exit status "
                                   f"{TIMELIMIT_EXIT_CODE}); the next run only validates (--val)")
            raise
        finally:
            self._timelimit_phase = "done"

    def _shut_down_loaders(self) -> None:
        for loader in (getattr(self, "dataloader_train", None), getattr(self, "dataloader_val", None)):
            finish = getattr(loader, "_finish", None)
            if callable(finish):
                try:
                    finish()
                except Exception:  # shutting down background augmenters must not hide the exit status
                    pass
        sys.stdout.flush()


# -- checkpoints ---------------------------------------------------------------------------------
def _fsync_path(path: str, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a folder
        if not directory:
            raise
    finally:
        os.close(fd)


def _temp_name(target: str) -> str:
    return join(dirname(target), f".{basename(target)}.tmp-{os.getpid()}-{secrets.token_hex(4)}")


def remove_stale_temps(target: str) -> list[str]:
    """Remove temporary files of ``target`` left by other processes (a kill during a write): one
    training writes a fold's checkpoints at a time, so any other process's temporary file is dead."""
    rx = re.compile(rf"^\.{re.escape(basename(target))}\.tmp-(\d+)-")
    removed = []
    folder = dirname(target) or "."
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        m = rx.match(name)
        if m and int(m.group(1)) != os.getpid():
            with contextlib.suppress(OSError):
                os.remove(join(folder, name))
                removed.append(join(folder, name))
    return removed


def copy_atomically(src: str, dst: str) -> None:
    """``dst`` becomes ``src``'s content in one rename (a hard link where possible, else a copy)."""
    if os.path.exists(dst) and os.path.samefile(src, dst):
        return  # already the same file (rename() of two links to one file would leave the temporary link)
    tmp = _temp_name(dst)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            _fsync_path(tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_atomically(target: str, write, keep_previous: bool = False) -> None:
    """``write(path)`` into a temporary file beside ``target``, fsync, rename over ``target``; with
    ``keep_previous`` the old ``target`` becomes :data:`PREVIOUS_CHECKPOINT` first. ``target`` always
    exists (old or new) when it existed before."""
    remove_stale_temps(target)
    if keep_previous:
        remove_stale_temps(join(dirname(target), PREVIOUS_CHECKPOINT))
    tmp = _temp_name(target)
    try:
        write(tmp)
        _fsync_path(tmp)
        if keep_previous and isfile(target):
            copy_atomically(target, join(dirname(target), PREVIOUS_CHECKPOINT))
        os.replace(tmp, target)
        _fsync_path(dirname(target) or ".", directory=True)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


class SafeCheckpointMixin:
    """Mixin for nnU-Net trainers: atomic checkpoints, one older ``checkpoint_latest.pth`` kept, and a
    resume that falls back to it (see the module docstring). Put it before nnU-Net's trainer class."""

    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank == 0 and not self.disable_checkpointing:
            write_atomically(filename, super().save_checkpoint, keep_previous=basename(filename) == LATEST_CHECKPOINT)
        else:
            super().save_checkpoint(filename)  # other ranks: nothing; disabled: nnU-Net's message
        if _ddp(self):
            torch.distributed.barrier()  # the other ranks go on only once rank 0 has written

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        path = filename_or_checkpoint
        previous = join(dirname(path), PREVIOUS_CHECKPOINT) if isinstance(path, str) else None
        if previous is None or basename(path) != LATEST_CHECKPOINT or not isfile(previous):
            return super().load_checkpoint(path)
        try:
            return super().load_checkpoint(path)
        except Exception as e:  # unreadable: truncated, not a checkpoint, keys missing
            error = f"{type(e).__name__}: {str(e).strip()[:300]}"
        super().load_checkpoint(previous)
        self._record_fallback(path, previous, error)

    def _record_fallback(self, latest: str, previous: str, error: str) -> None:
        self.print_to_log_file(f"checkpoint: {latest} is unreadable ({error}); resumed from {PREVIOUS_CHECKPOINT} "
                               f"instead (continues with epoch {self.current_epoch})")
        if self.local_rank != 0:
            return
        copy_atomically(previous, latest)  # the unreadable file must never become the 'previous' one
        record = join(dirname(latest), RECOVERY_FILE)
        try:
            events = json.loads(Path(record).read_text()) if isfile(record) else []
        except (OSError, ValueError):
            events = []
        events.append({"time": _dt.datetime.now().isoformat(timespec="seconds"), "unreadable": LATEST_CHECKPOINT,
                       "error": error, "resumed_from": PREVIOUS_CHECKPOINT, "epoch": int(self.current_epoch)})
        write_json_atomic(record, events)

    def on_train_end(self):
        super().on_train_end()  # checkpoint_final.pth written, checkpoint_latest.pth removed
        if self.local_rank == 0:
            with contextlib.suppress(FileNotFoundError):
                os.remove(join(self.output_folder, PREVIOUS_CHECKPOINT))
