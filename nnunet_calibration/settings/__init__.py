"""Every setting of nnunet-calibration, typed, in one place (standard library and PyYAML only).

=========================  ======================================================================
:class:`MetricOptions`     the calibration metrics' options (accumulator, evaluator,
                           ``calib-evaluate``, ``evaluation.options``)
:class:`Training`          nnU-Net's training keys a run overrides (experiment ``training``,
                           ``NNUNET_CALIB_HPARAMS`` read by the trainers)
:class:`Report`            ``report:``
:class:`Slurm`             ``slurm:`` (:mod:`.slurm`, with SLURM's time/mem/gres formats)
:class:`Experiment`        the experiment file (with :class:`Evaluation`, :class:`NnunetPaths`,
                           :class:`TrainerEntry`), read by :func:`load_experiment`
=========================  ======================================================================

Each is a frozen dataclass whose fields carry their default, rule and help
(:mod:`._typed`): the keys, checks, defaults and command-line options all derive from the fields.
Nothing here imports nnU-Net, torch or the rest of the package.
"""
from ._typed import Rule, Settings, SettingsError, add_arguments, setting
from .experiment import (DEFAULT_FOLDS, DEFAULT_RANK_METRICS, LABEL_RE, REPORT_METRICS, Evaluation, Experiment, ExperimentError,
                         NnunetPaths, Report, TrainerEntry, dump_yaml, load_experiment, read_yaml)
from .slurm import Slurm, slurm_time_seconds
from .metrics import CONVENTIONS, SDC_CODE_N_BINS_ECE, MetricOptions
from .training import HPARAMS_ENV, Training, check_loss_hparams, hparams_env_value, parse_hparams, split_hparams

__all__ = ["Rule", "Settings", "SettingsError", "add_arguments", "setting", "MetricOptions", "CONVENTIONS",
           "SDC_CODE_N_BINS_ECE", "Training", "HPARAMS_ENV", "parse_hparams", "hparams_env_value",
           "check_loss_hparams", "split_hparams", "Report", "Slurm", "Evaluation", "NnunetPaths", "TrainerEntry",
           "Experiment", "ExperimentError", "REPORT_METRICS", "DEFAULT_RANK_METRICS", "DEFAULT_FOLDS", "LABEL_RE", "load_experiment",
           "read_yaml", "dump_yaml", "slurm_time_seconds"]
