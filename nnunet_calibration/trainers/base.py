"""Common base of every nnunet-calibration trainer: per-run hyperparameters without editing files.

Hyperparameters
---------------
Each trainer declares its loss hyperparameters (with the defaults of the SDC paper's Table 1) in
the class attribute :attr:`nnUNetTrainerHparamsBase.loss_hparams`. A run may override those and
nnU-Net's training settings (the fields of :class:`nnunet_calibration.settings.Training`:
``num_epochs``, ``num_iterations_per_epoch``, ``num_val_iterations_per_epoch``, ``initial_lr``,
``weight_decay``, ``oversample_foreground_percent``, ``save_every``, ``batch_size``; the latter
replaces the plans' batch size, under DDP the global one) through ONE environment variable,
``NNUNET_CALIB_HPARAMS`` (:data:`nnunet_calibration.settings.HPARAMS_ENV`), as JSON or as
comma-separated ``key=value`` pairs::

    NNUNET_CALIB_HPARAMS="num_epochs=100,alpha=0.2" nnUNetv2_train 1 2d 0 -tr nnUNetTrainerSDC
    NNUNET_CALIB_HPARAMS='{"num_epochs": 100, "alpha": 0.2}' nnUNetv2_train ...

Keys and values are checked by :func:`nnunet_calibration.settings.split_hparams` (the same check the
experiment file gets): an unknown key or a bad value stops the trainer at start-up, naming the valid
keys. What was used is written to ``<output_folder>/calibration_hparams.json`` when the trainer is
initialised (next to nnU-Net's ``debug.json``): the trainer, its loss (:meth:`registry_name`), the
loss hyperparameters in full, nnU-Net's training settings and the overrides as given.

For a permanent variant, subclass and set the attribute instead (nnU-Net's own style)::

    class nnUNetTrainerSDC_alpha02(nnUNetTrainerSDC):
        loss_hparams = {**nnUNetTrainerSDC.loss_hparams, "alpha": 0.2}

Subclasses that define ``__init__`` must keep nnU-Net's exact signature (nnU-Net records its
arguments by introspection).
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_calibration.settings import HPARAMS_ENV, parse_hparams, split_hparams
from nnunet_calibration.trainers.sdf_head import install_pretrained_loader
from nnunet_calibration.trainers.timelimit import SafeCheckpointMixin, TimeLimitMixin
from nnunet_calibration.utils import write_json_atomic


class nnUNetTrainerHparamsBase(TimeLimitMixin, SafeCheckpointMixin, nnUNetTrainer):
    """Common base: nnU-Net's trainer plus per-run hyperparameters (see the module docstring).

    Also survives clusters (:mod:`nnunet_calibration.trainers.timelimit`): on SLURM's time-limit warning,
    from construction to exit, it stops cleanly with exit status 75 (after the current epoch with
    ``checkpoint_latest.pth``, or before training / during the final validation), and it writes
    checkpoints atomically, keeping one older ``checkpoint_latest.pth`` to resume from if needed.

    It keeps nnU-Net's default loss (Dice + CE, or Dice + BCE for regions; nnU-Net's own classes);
    the runnable form is :class:`nnUNetTrainerDiceCE`, the DiceCE baseline of the papers' tables
    with the same configurable training length as the calibration trainers. The calibration
    trainers derive from ``nnunet_calibration.trainers.calibration.nnUNetTrainerCalibLossBase``.
    """

    #: loss hyperparameters and their defaults; subclasses override
    loss_hparams: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        self.install_timelimit_handler()  # first: a warning during start-up is not lost
        super().__init__(plans, configuration, fold, dataset_json, device)
        overrides = parse_hparams(os.environ.get(HPARAMS_ENV))
        training, loss = split_hparams(overrides, type(self).loss_hparams,
                                       f"{HPARAMS_ENV} for {self.__class__.__name__}")
        self.hparams_overrides = dict(overrides)
        self.loss_hparams = {**type(self).loss_hparams, **loss}
        given = training.overrides()
        self.batch_size_override = given.pop("batch_size", None)
        for k, v in given.items():
            setattr(self, k, v)

    # -- batch size ---------------------------------------------------------------------------
    def _set_batch_size_and_oversample(self):
        if self.batch_size_override is not None:
            # nnU-Net reads the global batch size from the configuration; DDP splitting stays its own
            self.configuration_manager.configuration["batch_size"] = self.batch_size_override
        super()._set_batch_size_and_oversample()

    # -- record what was used -----------------------------------------------------------------
    @classmethod
    def registry_name(cls) -> str:
        """The loss's one name: nnU-Net's own default loss is registry ``ce_dc``'s equal."""
        return "ce_dc"

    #: constructor arguments that define the loss variant (not overridable per run)
    loss_fixed: dict = {}

    def used_hparams(self) -> dict:
        return {
            "trainer": self.__class__.__name__,
            "loss": self.registry_name(),
            "loss_hparams": self.loss_hparams,
            "loss_fixed": dict(self.loss_fixed),
            "training": {
                "num_epochs": self.num_epochs,
                "num_iterations_per_epoch": self.num_iterations_per_epoch,
                "num_val_iterations_per_epoch": self.num_val_iterations_per_epoch,
                "initial_lr": self.initial_lr,
                "weight_decay": self.weight_decay,
                "oversample_foreground_percent": self.oversample_foreground_percent,
                "save_every": self.save_every,
                "batch_size": self.configuration_manager.batch_size,
                "enable_deep_supervision": self.enable_deep_supervision,
            },
            "overrides": {"env": HPARAMS_ENV, "value": os.environ.get(HPARAMS_ENV), "parsed": self.hparams_overrides},
        }

    def initialize(self):
        super().initialize()
        if self.local_rank == 0 and self.output_folder is not None:
            os.makedirs(self.output_folder, exist_ok=True)
            write_json_atomic(os.path.join(self.output_folder, "calibration_hparams.json"),
                              json.loads(json.dumps(self.used_hparams(), default=str)))
            self.print_to_log_file(f"nnunet-calibration hyperparameters: {json.dumps(self.used_hparams(), default=str)}")
        # nnUNetv2_train -pretrained_weights: checkpoints with or without SDC's SDF head fit every
        # trainer of this package (see nnunet_calibration.trainers.sdf_head, "Fine-tuning")
        install_pretrained_loader(self.print_to_log_file)

    # -- deep supervision, exactly as nnU-Net wraps its default loss ----------------------------
    def _wrap_deep_supervision(self, loss: torch.nn.Module) -> torch.nn.Module:
        """Wrap ``loss`` as nnU-Net's ``_build_loss`` wraps its default loss (same weights, DDP quirk),
        except that a single output (a two-stage network, e.g. a small 3d_lowres) keeps weight 1: nnU-Net
        2.8.1 zeroes the lowest-resolution weight even when it is the only one and normalises 0 / 0 (NaN)."""
        if not self.enable_deep_supervision:
            return loss
        deep_supervision_scales = self._get_deep_supervision_scales()
        weights = np.array([1 / (2 ** i) for i in range(len(deep_supervision_scales))])
        if len(weights) > 1:
            weights[-1] = 1e-6 if self.is_ddp and not self._do_i_compile() else 0
        weights = weights / weights.sum()
        return DeepSupervisionWrapper(loss, weights)


class nnUNetTrainerDiceCE(nnUNetTrainerHparamsBase):
    """The DiceCE baseline: nnU-Net's default loss, with per-run hyperparameters.

    Identical in loss and training to ``nnUNetTrainer`` (which stays untouched); use it in
    experiments so that the baseline gets the same training length as the calibration trainers.
    """
