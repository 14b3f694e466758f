"""Training settings: nnU-Net's training length and optimiser keys (:class:`Training`) and the loss
hyperparameters, as a run gives them (the experiment file's ``training`` / ``hparams``, or the
environment variable :data:`HPARAMS_ENV` that the trainers read).

* :class:`Training`: each field ``None`` means nnU-Net's own default (given in the help).
* Loss hyperparameters are a trainer's own (``loss_hparams`` of the trainer class, with the papers'
  defaults): :func:`check_loss_hparams` checks given values against those defaults (known key, the
  default's type, numbers finite).
* :func:`split_hparams`: one mapping of overrides -> ``(Training, loss hyperparameters)``, used by the
  trainers and by the experiment's validation alike.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Mapping

from ._typed import (NON_NEGATIVE, POSITIVE, POSITIVE_INT, UNIT_INTERVAL, Settings, SettingsError, is_number,
                     setting)

#: the environment variable that carries a run's overrides to the trainer (JSON or ``k=v,k=v``)
HPARAMS_ENV = "NNUNET_CALIB_HPARAMS"


@dataclass(frozen=True)
class Training(Settings):
    """nnU-Net's training settings a run may override (``None``: nnU-Net's default)."""

    SECTION = "training"
    #: keys that decide when checkpoints are written, not what is learned: a finished fold is reused
    #: whatever they were (a study may checkpoint more often to survive kills)
    BOOKKEEPING = ("save_every",)

    num_epochs: int | None = setting(None, POSITIVE_INT, "epochs (nnU-Net: 1000)")
    num_iterations_per_epoch: int | None = setting(None, POSITIVE_INT, "training iterations per epoch (nnU-Net: 250)")
    num_val_iterations_per_epoch: int | None = setting(None, POSITIVE_INT,
                                                       "validation iterations per epoch (nnU-Net: 50)")
    initial_lr: float | None = setting(None, POSITIVE, "initial learning rate (nnU-Net: 1e-2)")
    weight_decay: float | None = setting(None, NON_NEGATIVE, "weight decay (nnU-Net: 3e-5)")
    oversample_foreground_percent: float | None = setting(None, UNIT_INTERVAL,
                                                          "share of patches centred on foreground (nnU-Net: 0.33)")
    save_every: int | None = setting(None, POSITIVE_INT, "epochs between checkpoints (nnU-Net: 50)")
    batch_size: int | None = setting(None, POSITIVE_INT, "batch size (the plans'; under DDP the global one)")

    def overrides(self) -> dict:
        """The keys that were set (not ``None``)."""
        return {k: v for k, v in self.to_dict().items() if v is not None}

    @classmethod
    def model_keys(cls) -> tuple[str, ...]:
        """The keys that change the trained model (all but :attr:`BOOKKEEPING`)."""
        return tuple(k for k in cls.keys() if k not in cls.BOOKKEEPING)


def parse_hparams(text: str | None) -> dict:
    """The value of :data:`HPARAMS_ENV` (a JSON object or ``k=v,k=v``) as a dict (values JSON-decoded
    where they parse, else texts)."""
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            raise SettingsError(f"{HPARAMS_ENV} is not valid JSON: {e}") from None
        if not isinstance(value, dict):
            raise SettingsError(f"{HPARAMS_ENV} must be a JSON object, got {type(value).__name__}")
        return value
    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if "=" not in item:
            raise SettingsError(f"{HPARAMS_ENV}: expected key=value, got {item!r}")
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = json.loads(v.strip())
        except json.JSONDecodeError:
            out[k.strip()] = v.strip()
    return out


def hparams_env_value(hparams: Mapping) -> str | None:
    """The :data:`HPARAMS_ENV` value carrying ``hparams`` (None when there is nothing to override)."""
    return json.dumps(dict(hparams), sort_keys=True) if hparams else None


def check_loss_hparams(defaults: Mapping, given: Mapping, where: str) -> dict:
    """Loss hyperparameters ``given`` checked against a trainer's ``defaults``: each of the default's
    kind (true/false, a finite number, a text); a number given for a float default becomes a float.
    Keys without a default are left to the caller. Returns the converted values."""
    out = {}
    for k, v in given.items():
        if k not in defaults:
            continue
        d = defaults[k]
        if isinstance(d, bool):
            ok, what = isinstance(v, bool), "true or false"
        elif isinstance(d, (int, float)):
            ok, what = is_number(v), "a finite number"
            if ok and isinstance(d, float):
                v = float(v)
        elif isinstance(d, str):
            ok, what = isinstance(v, str), "a text"
        else:
            ok, what = True, ""
        if not ok:
            raise SettingsError(f"{where}: hyperparameter {k} must be {what} (default {d!r}), got {v!r}")
        out[k] = v
    return out


def split_hparams(given: Mapping, loss_defaults: Mapping, where: str) -> tuple[Training, dict]:
    """One run's overrides -> ``(Training, loss hyperparameters)``.

    Every key must be a :class:`Training` key or one of ``loss_defaults`` (else an error listing the
    valid keys); values are checked by :class:`Training`'s rules and :func:`check_loss_hparams`."""
    valid = set(Training.keys()) | set(loss_defaults)
    unknown = sorted(str(k) for k in given if k not in valid)
    if unknown:
        raise SettingsError(f"{where}: unknown hyperparameter(s) {unknown}; valid: {sorted(valid)}")
    training = Training.from_mapping({k: v for k, v in given.items() if k in Training.keys()}, where)
    loss = check_loss_hparams(loss_defaults, {k: v for k, v in given.items() if k not in Training.keys()}, where)
    return training, loss
