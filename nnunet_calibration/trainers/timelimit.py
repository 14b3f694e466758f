"""Surviving a cluster's time limit: stop at the end of an epoch on a warning signal, with a checkpoint.

nnU-Net writes ``checkpoint_latest.pth`` only every ``save_every`` epochs (50 by default), so a job
killed at its time limit loses up to 50 epochs. SLURM can warn a job before the limit
(``sbatch --signal=B:USR1@600``: ``SIGUSR1`` 600 s before it). :class:`TimeLimitMixin` (mixed into
every trainer of this package through :class:`~nnunet_calibration.trainers.base.nnUNetTrainerHparamsBase`)
reacts to that signal:

1. the handler only sets a flag (training continues undisturbed);
2. at the end of the current epoch (after nnU-Net's own ``on_epoch_end``: logging, periodic and
   best checkpoints) ``checkpoint_latest.pth`` is written with the *next* epoch to run, exactly as
   nnU-Net's periodic checkpoint records it, the data loaders are shut down and the process leaves
   with :data:`TIMELIMIT_EXIT_CODE` (75, ``EX_TEMPFAIL``: "try again later");
3. ``nnUNetv2_train ... --c`` continues from that checkpoint: no epoch is trained twice or lost.

If the signal arrives during the last epoch, nothing special happens: the training finishes
normally (final checkpoint, validation).

Multi-GPU (nnU-Net's DDP, ``-num_gpus N``): the ranks agree at each epoch end (an all-reduce of the
flag) so that every rank stops after the same epoch; rank 0 writes the checkpoint (nnU-Net's rule).
Note that nnU-Net's ``mp.spawn`` parent then exits with its own error status; the SLURM task
(``calib-experiment train-fold``) therefore decides on requeueing by the signal it received itself.

Inert outside SLURM: the handler is installed only when ``SLURM_JOB_ID`` is in the environment (or
:data:`ENABLE_ENV` is ``1``); otherwise ``SIGUSR1`` keeps its default meaning. The signal is
``SIGUSR1`` unless :data:`SIGNAL_ENV` names another one (e.g. ``USR2``).
"""
from __future__ import annotations

import os
import signal
import sys
from os.path import join

import torch

from nnunet_calibration.timelimit import (ENABLE_ENV, SIGNAL_ENV, TIMELIMIT_EXIT_CODE,  # noqa: F401 (re-exported)
                                         handler_wanted, stop_signal)


class TimeLimitMixin:
    """Mixin for nnU-Net trainers: stop after the current epoch on the time-limit signal (see module doc).

    Put it *before* nnU-Net's trainer class in the bases. It overrides ``on_train_start`` (installs
    the handler) and ``on_epoch_end`` (stops if asked), both calling nnU-Net's own first.
    """

    _timelimit_requested: bool = False
    _timelimit_signal = None

    def _timelimit_handler(self, signum, frame):  # noqa: ARG002 (signal handler signature)
        # only set a flag: the epoch in progress finishes normally
        self._timelimit_requested = True

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
        self.print_to_log_file(f"time limit: on {sig.name} the training stops after the current epoch with "
                               f"checkpoint_latest.pth and exit status {TIMELIMIT_EXIT_CODE} (continue with --c)")
        return True

    def timelimit_stop_requested(self) -> bool:
        """Whether to stop now; under DDP every rank gets the same answer (all-reduce of the flags)."""
        flag = bool(self._timelimit_requested)
        if getattr(self, "is_ddp", False) and torch.distributed.is_available() and torch.distributed.is_initialized():
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
            flag = bool(t.item() > 0)
        return flag

    def on_train_start(self):
        super().on_train_start()
        self.install_timelimit_handler()

    def on_epoch_end(self):
        super().on_epoch_end()  # nnU-Net's: logs, periodic/best checkpoints, then current_epoch += 1
        if self._timelimit_signal is None:
            return
        finished_epoch = self.current_epoch - 1
        if finished_epoch >= self.num_epochs - 1:
            return  # the last epoch: finish normally (final checkpoint, validation)
        if not self.timelimit_stop_requested():
            return
        self.stop_for_timelimit(finished_epoch)

    def stop_for_timelimit(self, finished_epoch: int) -> None:
        """Write ``checkpoint_latest.pth`` (next epoch: ``finished_epoch + 1``), shut down, exit 75."""
        # nnU-Net's checkpoint stores current_epoch + 1 as the epoch to continue with (the same
        # adjustment as its on_train_end)
        self.current_epoch = finished_epoch
        self.save_checkpoint(join(self.output_folder, "checkpoint_latest.pth"))
        self.current_epoch = finished_epoch + 1
        self.print_to_log_file(f"time limit: stopped after epoch {finished_epoch} ({self.num_epochs} planned); "
                               f"checkpoint_latest.pth written; continue with --c "
                               f"(exit status {TIMELIMIT_EXIT_CODE})")
        for loader in (getattr(self, "dataloader_train", None), getattr(self, "dataloader_val", None)):
            finish = getattr(loader, "_finish", None)
            if callable(finish):
                try:
                    finish()
                except Exception:  # shutting down background augmenters must not hide the exit status
                    pass
        sys.stdout.flush()
        raise SystemExit(TIMELIMIT_EXIT_CODE)
