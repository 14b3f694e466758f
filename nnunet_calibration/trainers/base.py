"""Common base of every nnunet-calibration trainer: per-run hyperparameters without editing files.

Hyperparameters
---------------
Each trainer declares its loss hyperparameters (with the defaults of the SDC paper's Table 1) in
the class attribute :attr:`nnUNetTrainerHparamsBase.loss_hparams`. A run may override those and
nnU-Net's training-length settings through ONE environment variable, :data:`HPARAMS_ENV`
(``NNUNET_CALIB_HPARAMS``), either as JSON or as comma-separated ``key=value`` pairs::

    NNUNET_CALIB_HPARAMS="num_epochs=100,alpha=0.2" nnUNetv2_train 1 2d 0 -tr nnUNetTrainerSDC
    NNUNET_CALIB_HPARAMS='{"num_epochs": 100, "alpha": 0.2}' nnUNetv2_train ...

Training keys (:data:`TRAINING_KEYS`): ``num_epochs``, ``num_iterations_per_epoch``,
``num_val_iterations_per_epoch``, ``initial_lr``, ``weight_decay``,
``oversample_foreground_percent``, ``save_every`` and ``batch_size`` (replaces the plans' batch
size; under DDP it is the global batch size). Any other key must be one of the trainer's
``loss_hparams``; unknown keys stop the trainer at start-up with the list of valid keys. Renamed
keys (:attr:`nnUNetTrainerHparamsBase.deprecated_hparams`, e.g. ``num_bins`` -> ``n_bins`` of the
ACE trainers) are still accepted for one release, with a ``DeprecationWarning``.

The values used are written to ``<output_folder>/calibration_hparams.json`` when the trainer is
initialised, next to nnU-Net's own ``debug.json``.

For a permanent variant, subclass and set the attribute instead (nnU-Net's own style)::

    class nnUNetTrainerSDC_alpha02(nnUNetTrainerSDC):
        loss_hparams = {**nnUNetTrainerSDC.loss_hparams, "alpha": 0.2}

Subclasses that define ``__init__`` must keep nnU-Net's exact signature (nnU-Net records its
arguments by introspection).

Renamed classes (one release): ``nnUNetTrainerCalibBase`` is :class:`nnUNetTrainerHparamsBase`
(the same class; importing the old name warns).
"""
from __future__ import annotations

import json
import os
import warnings
from typing import Any

import numpy as np
import torch
from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_calibration.trainers.timelimit import TimeLimitMixin

HPARAMS_ENV = "NNUNET_CALIB_HPARAMS"
TRAINING_KEYS = {
    "num_epochs": int,
    "num_iterations_per_epoch": int,
    "num_val_iterations_per_epoch": int,
    "initial_lr": float,
    "weight_decay": float,
    "oversample_foreground_percent": float,
    "save_every": int,
    "batch_size": int,
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_hparams(text: str | None) -> dict:
    """Parse the value of :data:`HPARAMS_ENV` (JSON object or ``k=v,k=v``) into a dict."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{HPARAMS_ENV} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise ValueError(f"{HPARAMS_ENV} must be a JSON object, got {type(value).__name__}")
        return value
    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise ValueError(f"{HPARAMS_ENV}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v.strip())
    return out


class nnUNetTrainerHparamsBase(TimeLimitMixin, nnUNetTrainer):
    """Common base: nnU-Net's trainer plus per-run hyperparameters (see the module docstring).

    Also survives cluster time limits (:class:`~nnunet_calibration.trainers.timelimit.TimeLimitMixin`:
    on SLURM's warning signal, stop after the current epoch with ``checkpoint_latest.pth``, exit 75).

    It keeps nnU-Net's default loss (Dice + CE, or Dice + BCE for regions; nnU-Net's own classes);
    the runnable form is :class:`nnUNetTrainerDiceCE`, the DiceCE baseline of the papers' tables
    with the same configurable training length as the calibration trainers. The calibration
    trainers derive from ``nnunet_calibration.trainers.calibration.nnUNetTrainerCalibLossBase``.
    """

    #: loss hyperparameters and their defaults; subclasses override
    loss_hparams: dict = {}
    #: renamed hyperparameter keys still accepted (old -> new), with a DeprecationWarning
    deprecated_hparams: dict = {}

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        super().__init__(plans, configuration, fold, dataset_json, device)
        overrides = parse_hparams(os.environ.get(HPARAMS_ENV))
        for old, new in self.deprecated_hparams.items():
            if old in overrides:
                warnings.warn(f"{HPARAMS_ENV}: key {old!r} of {self.__class__.__name__} is deprecated, "
                              f"use {new!r}", DeprecationWarning, stacklevel=2)
                if new in overrides:
                    raise ValueError(f"{HPARAMS_ENV}: both {old!r} and its new name {new!r} given")
                overrides[new] = overrides.pop(old)
        valid = sorted(set(TRAINING_KEYS) | set(self.loss_hparams))
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise ValueError(f"{HPARAMS_ENV}: unknown key(s) {unknown} for {self.__class__.__name__}; "
                             f"valid keys: {valid}")
        self.hparams_overrides = dict(overrides)
        self.loss_hparams = dict(self.loss_hparams)
        self.batch_size_override = None
        for k, v in overrides.items():
            if k in TRAINING_KEYS:
                try:
                    v = TRAINING_KEYS[k](v)
                except (TypeError, ValueError):
                    raise ValueError(f"{HPARAMS_ENV}: {k} must be {TRAINING_KEYS[k].__name__}, got {v!r}") from None
                if k == "batch_size":
                    self.batch_size_override = v
                else:
                    setattr(self, k, v)
            else:
                default = type(self).loss_hparams[k]
                if isinstance(default, bool) and not isinstance(v, bool):
                    raise ValueError(f"{HPARAMS_ENV}: {k} must be true/false, got {v!r}")
                if isinstance(default, (int, float)) and not isinstance(default, bool):
                    if not isinstance(v, (int, float)) or isinstance(v, bool):
                        raise ValueError(f"{HPARAMS_ENV}: {k} must be a number, got {v!r}")
                    v = type(default)(v) if isinstance(default, float) else v
                self.loss_hparams[k] = v

    # -- batch size ---------------------------------------------------------------------------
    def _set_batch_size_and_oversample(self):
        if self.batch_size_override is not None:
            # nnU-Net reads the global batch size from the configuration; DDP splitting stays its own
            self.configuration_manager.configuration["batch_size"] = self.batch_size_override
        super()._set_batch_size_and_oversample()

    # -- record what was used -----------------------------------------------------------------
    def registry_name(self) -> str:
        """The loss's one name: nnU-Net's own default loss is registry ``ce_dc``'s equal."""
        return "ce_dc"

    def used_hparams(self) -> dict:
        return {
            "trainer": self.__class__.__name__,
            "loss": self.registry_name(),
            "loss_hparams": self.loss_hparams,
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
            with open(os.path.join(self.output_folder, "calibration_hparams.json"), "w") as f:
                json.dump(self.used_hparams(), f, indent=2, default=str)
            self.print_to_log_file(f"nnunet-calibration hyperparameters: {json.dumps(self.used_hparams(), default=str)}")

    # -- deep supervision, exactly as nnU-Net wraps its default loss ----------------------------
    def _wrap_deep_supervision(self, loss: torch.nn.Module) -> torch.nn.Module:
        """Wrap ``loss`` as nnU-Net's ``_build_loss`` wraps its default loss (same weights, DDP quirk)."""
        if not self.enable_deep_supervision:
            return loss
        deep_supervision_scales = self._get_deep_supervision_scales()
        weights = np.array([1 / (2 ** i) for i in range(len(deep_supervision_scales))])
        if self.is_ddp and not self._do_i_compile():
            weights[-1] = 1e-6
        else:
            weights[-1] = 0
        weights = weights / weights.sum()
        return DeepSupervisionWrapper(loss, weights)


class nnUNetTrainerDiceCE(nnUNetTrainerHparamsBase):
    """The DiceCE baseline: nnU-Net's default loss, with per-run hyperparameters.

    Identical in loss and training to ``nnUNetTrainer`` (which stays untouched); use it in
    experiments so that the baseline gets the same training length as the calibration trainers.
    """


#: renamed classes of this module (old name -> new class), importable for one release with a warning
_RENAMED = {"nnUNetTrainerCalibBase": nnUNetTrainerHparamsBase}


def __getattr__(name: str):
    if name in _RENAMED:
        new = _RENAMED[name]
        warnings.warn(f"{name} is deprecated, use {new.__name__} (same class)", DeprecationWarning, stacklevel=2)
        return new
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
