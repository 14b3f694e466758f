"""The experiment file (YAML) and its validation.

Example (every key except ``name``, ``dataset`` and ``trainers`` is optional)::

    name: acdc-calibration            # used for the state folder and results/<name>/
    dataset: 27                       # nnU-Net dataset id or DatasetXXX_Name (must be preprocessed)
    configuration: 2d                 # any configuration of the plans (2d, 3d_fullres, ...)
    plans: nnUNetPlans
    folds: [0, 1, 2, 3, 4]            # default 0-4
    device: auto                      # cpu | cuda | auto (cuda when SLURM gpus > 0 or CUDA is present)
    training:                         # for every trainer, through NNUNET_CALIB_HPARAMS
      num_epochs: 1000                #   (num_epochs, num_iterations_per_epoch, batch_size, ...)
    trainers:
      - nnUNetTrainerDiceCE           # a bare name
      - nnUNetTrainerSDC_DC
      - name: nnUNetTrainerSDC        # a hyperparameter variant: its own label and results folder
        label: SDC_alpha0.2
        hparams: {alpha: 0.2}
    baseline: nnUNetTrainerDiceCE     # label of the Wilcoxon reference (default: the DiceCE trainer)
    evaluation:                       # keyword options of nnunet_calibration.evaluation.evaluate_folders
      num_processes: 1
      options: {}
    report:
      output_root: results            # the report goes to <output_root>/<name>/
      temperature_scaling: true       # cross-fitted + TS rows
      vector_scaling: true            # cross-fitted + VS rows (one temperature per channel)
      threshold_sweep: true
      max_fit_voxels: 200000          # voxels sampled per trainer to fit the temperature
    slurm:
      gpus: 1                         # --gres=gpu:N (0: none); > 1: nnU-Net's multi-GPU mode (-num_gpus N)
      cpus: 8                         # --cpus-per-task
      mem: 32G                        # SLURM's --mem (a number of MB, or with K/M/G/T)
      time: "24:00:00"                # quoted (YAML reads 24:00:00 as a number); MM, HH:MM:SS, D-HH:MM:SS
      partition: gpu
      extra_args: ["--account=myproj"]
      signal_seconds: 600             # SIGUSR1 this long before the limit (--signal=B:USR1@600); 0: none;
                                      #   default 600, at most half of time
      requeue: true                   # on that signal: finish the epoch, checkpoint, requeue the task (--c)
      max_parallel: 4                 # at most this many folds of a trainer at once (--array=...%4); null: no limit
      report_cpus: 4
      report_mem: 16G
      report_time: "04:00:00"
      report_partition: null          # default: partition
    nnunet_paths:                     # default: the nnUNet_raw/_preprocessed/_results environment variables
      raw: /data/nnUNet_raw
      preprocessed: /data/nnUNet_preprocessed
      results: /data/nnUNet_results
    state_dir: .calib_state           # default: <nnUNet_results>/calib_experiments/<name>

Relative paths are taken relative to the experiment file's folder.

Validation (``calib-experiment check``, and ``run`` before anything is submitted): every key at
every level must be known (the error lists the valid keys) and every value of the right type and
range: positive ``num_epochs`` / ``num_iterations_per_epoch`` / ``num_val_iterations_per_epoch`` /
``batch_size`` / ``save_every``, a positive learning rate, ``oversample_foreground_percent`` in
[0, 1]; loss hyperparameters of the type of the trainer's default; ``evaluation.options`` keys of
:func:`nnunet_calibration.evaluation.evaluate_folders`; SLURM counts, memory and time in SLURM's
formats, ``signal_seconds`` shorter than ``time``. :func:`validate` then checks the dataset, plans,
configuration (it must be *preprocessed*: its ``data_identifier`` folder exists), folds and trainers
against nnU-Net. A file that is not UTF-8 text is refused with the byte position.

Where trainings are stored (hyperparameter variants)
---------------------------------------------------
nnU-Net names a training's folder ``<nnUNet_results>/DatasetXXX/<Trainer>__<plans>__<config>/``:
two variants of the same trainer class with different hyperparameters would write into the same
folder. Therefore a trainer entry *with* ``hparams`` trains with ``nnUNet_results`` set to
``<nnUNet_results>/calib_variants/<label>`` (its own nnU-Net results tree; give that folder as
``nnUNet_results`` to ``nnUNetv2_predict`` to use the model), while entries without ``hparams`` use
``<nnUNet_results>`` itself. The common ``training`` settings apply to every entry; a finished
fold whose recorded ``calibration_hparams.json`` disagrees with what the experiment asks for is
refused (it would otherwise be silently reused), with the advice to use a variant label.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from nnunet_calibration.metrics import CONVENTIONS

DEFAULT_FOLDS = (0, 1, 2, 3, 4)
_LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


class ExperimentError(ValueError):
    """An invalid experiment file or set-up; the message names the file and what is wrong."""


@dataclass
class TrainerSpec:
    name: str
    label: str
    hparams: dict = field(default_factory=dict)

    @property
    def is_variant(self) -> bool:
        return bool(self.hparams)


@dataclass
class SlurmSettings:
    gpus: int = 0
    cpus: int = 4
    mem: str | None = "16G"
    time: str | None = "24:00:00"
    partition: str | None = None
    extra_args: list = field(default_factory=list)
    report_cpus: int = 2
    report_mem: str | None = "8G"
    report_time: str | None = "04:00:00"
    report_partition: str | None = None
    #: seconds before the time limit at which SLURM sends SIGUSR1 (``--signal=B:USR1@N``); 0: no signal.
    #: Default 600, at most half of ``time``
    signal_seconds: int = 600
    #: on that signal the fold stops after its epoch with a checkpoint and the task requeues itself
    requeue: bool = True
    #: at most this many tasks of one trainer's array at once (``--array=...%N``); None: no limit
    max_parallel: int | None = None


@dataclass
class Experiment:
    path: Path
    name: str
    dataset: str
    configuration: str = "2d"
    plans: str = "nnUNetPlans"
    folds: tuple = DEFAULT_FOLDS
    device: str = "auto"
    training: dict = field(default_factory=dict)
    trainers: list = field(default_factory=list)
    baseline: str | None = None
    evaluation: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    nnunet_paths: dict = field(default_factory=dict)
    state_dir_opt: str | None = None
    raw: dict = field(default_factory=dict)
    # filled by validate()
    dataset_name: str | None = None

    # -- paths -------------------------------------------------------------------------------
    def _resolve(self, p: str) -> Path:
        p = Path(os.path.expandvars(os.path.expanduser(str(p))))
        return p if p.is_absolute() else (self.path.parent / p).resolve()

    def nnunet_folder(self, key: str) -> Path:
        """``key`` in raw / preprocessed / results: from the file, else the environment."""
        if key in self.nnunet_paths:
            return self._resolve(self.nnunet_paths[key])
        env = os.environ.get(f"nnUNet_{key}")
        if not env:
            raise ExperimentError(f"{self.path}: nnUNet_{key} is not set (set the environment variable or "
                                  f"nnunet_paths: {{{key}: ...}} in the experiment file)")
        return Path(env).resolve()

    def nnunet_env(self, base: dict | None = None) -> dict:
        """Environment for nnU-Net commands of this experiment (nnU-Net folders + CPU-friendly settings)."""
        from nnunet_calibration.nnunet_utils import nnunet_env

        env = with_plugin_trainers(nnunet_env(None, base=base))
        for key in ("raw", "preprocessed", "results"):
            try:
                env[f"nnUNet_{key}"] = str(self.nnunet_folder(key))
            except ExperimentError:
                if key != "raw":  # raw is not needed for training
                    raise
        return env

    @property
    def state_dir(self) -> Path:
        if self.state_dir_opt:
            return self._resolve(self.state_dir_opt)
        return self.nnunet_folder("results") / "calib_experiments" / self.name

    def results_root(self, spec: TrainerSpec) -> Path:
        """The ``nnUNet_results`` used to train ``spec`` (see the module docstring)."""
        base = self.nnunet_folder("results")
        return base / "calib_variants" / spec.label if spec.is_variant else base

    def model_folder(self, spec: TrainerSpec) -> Path:
        return (self.results_root(spec) / self.dataset_name /
                f"{spec.name}__{self.plans}__{self.configuration}")

    def fold_folder(self, spec: TrainerSpec, fold: int) -> Path:
        return self.model_folder(spec) / f"fold_{fold}"

    def hparams_for(self, spec: TrainerSpec) -> dict:
        return {**self.training, **spec.hparams}

    def trainer(self, label: str) -> TrainerSpec:
        for t in self.trainers:
            if t.label == label:
                return t
        raise ExperimentError(f"{self.path}: no trainer labelled {label!r}; labels: {[t.label for t in self.trainers]}")

    @property
    def baseline_label(self) -> str | None:
        if self.baseline:
            return self.baseline
        for t in self.trainers:
            if t.name == "nnUNetTrainerDiceCE" and not t.is_variant:
                return t.label
        for t in self.trainers:
            if t.name in ("nnUNetTrainerDiceCE", "nnUNetTrainer"):
                return t.label
        return None

    def resolve_device(self, slurm: bool = False) -> str:
        if self.device in ("cpu", "cuda"):
            return self.device
        if slurm:
            return "cuda" if self.slurm.gpus > 0 else "cpu"
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    def report_dir(self, output_root: str | os.PathLike | None = None) -> Path:
        root = output_root if output_root is not None else self.report.get("output_root", "results")
        root = Path(root)
        if "output_root" in self.report and output_root is None:
            root = self._resolve(self.report["output_root"])
        return root.resolve() / self.name


def with_plugin_trainers(env: dict) -> dict:
    """Make nnU-Net find nnunet-calibration's trainers (``env`` updated and returned).

    After a normal ``pip install`` they sit inside nnU-Net's trainer folder and nothing is needed.
    With an editable install (the repository checkout) ``nnUNet_extTrainer`` must point at
    ``nnunet_calibration/_nnunet_plugin``; it is appended if missing.
    """
    import nnunetv2

    inside = (Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / "zz_nnunet_calibration"
              / "nnunet_calibration_trainers.py")
    plugin = Path(__file__).resolve().parents[1] / "_nnunet_plugin"
    if inside.is_file() or not plugin.is_dir():
        return env
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(plugin) not in paths:
        env["nnUNet_extTrainer"] = os.pathsep.join(paths + [str(plugin)])
    return env


# -- loading -----------------------------------------------------------------------------------
_TOP_KEYS = {"name", "dataset", "configuration", "plans", "folds", "device", "training", "trainers", "baseline",
             "evaluation", "report", "slurm", "nnunet_paths", "state_dir", "convert"}
_TRAINER_KEYS = {"name", "label", "hparams"}
_EVALUATION_KEYS = {"num_processes", "options"}
#: ``report:`` keys (read by :mod:`nnunet_calibration.experiments.report`) and their checks
_REPORT_KEYS = {"output_root", "temperature_scaling", "threshold_sweep", "max_fit_voxels", "vector_scaling",
                "rank_metrics", "note"}
_NNUNET_PATH_KEYS = {"raw", "preprocessed", "results"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _positive_int(v) -> bool:
    return _is_int(v) and v > 0


#: value rules of the training keys (``training:`` and a trainer's ``hparams``): (check, what is expected)
TRAINING_VALUE_RULES = {
    "num_epochs": (_positive_int, "a positive integer"),
    "num_iterations_per_epoch": (_positive_int, "a positive integer"),
    "num_val_iterations_per_epoch": (_positive_int, "a positive integer"),
    "save_every": (_positive_int, "a positive integer"),
    "batch_size": (_positive_int, "a positive integer"),
    "initial_lr": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "weight_decay": (lambda v: _is_number(v) and v >= 0, "a non-negative number"),
    "oversample_foreground_percent": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
}

#: value rules of ``evaluation.options`` (the keyword options of ``evaluate_folders``)
EVALUATION_OPTION_RULES = {
    "n_bins_ece": (_positive_int, "a positive integer"),
    "n_bins_cece": (_positive_int, "a positive integer"),
    "n_bins_pece": (_positive_int, "a positive integer"),
    "n_bins_ace": (_positive_int, "a positive integer"),
    "fp_weight": (lambda v: _is_number(v) and v > 0, "a positive number"),
    "cece_threshold": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "include_background": (lambda v: isinstance(v, bool), "true or false"),
    "nll_eps": (lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)"),
    "convention": (lambda v: v in CONVENTIONS, f"one of {list(CONVENTIONS)}"),
}

_REPORT_RULES = {
    "output_root": (lambda v: isinstance(v, str) and v.strip() != "", "a folder path"),
    "temperature_scaling": (lambda v: isinstance(v, bool), "true or false"),
    "threshold_sweep": (lambda v: isinstance(v, bool), "true or false"),
    "max_fit_voxels": (_positive_int, "a positive integer"),
    "vector_scaling": (lambda v: isinstance(v, bool), "true or false"),
    "rank_metrics": (lambda v: isinstance(v, list) and bool(v) and all(isinstance(x, str) for x in v),
                     "a non-empty list of metric names"),
    "note": (lambda v: isinstance(v, str), "a text"),
}

_MEM_RE = re.compile(r"^\d+(\.\d+)?[KMGT]?B?$", re.IGNORECASE)
# SLURM's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def slurm_time_seconds(text: str) -> int | None:
    """Seconds of a SLURM ``--time`` value (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``); None if invalid."""
    m = _TIME_RE.match(str(text).strip())
    if not m:
        return None
    if m.group(1) is not None:
        d, h, mi, se = (int(x) if x else 0 for x in m.group(1, 2, 3, 4))
        return ((d * 24 + h) * 60 + mi) * 60 + se
    parts = [int(x) for x in m.group(5, 6, 7) if x is not None]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


def _time_ok(v) -> bool:
    return v is None or (isinstance(v, str) and slurm_time_seconds(v) is not None)


def _mem_ok(v) -> bool:
    return v is None or _positive_int(v) or (isinstance(v, str) and bool(_MEM_RE.match(v.strip())))


def _opt_str(v) -> bool:
    return v is None or (isinstance(v, str) and v.strip() != "")


_TIME_WHAT = ('a quoted SLURM time such as "24:00:00", "1-00:00:00" or "120" (minutes); YAML reads an unquoted '
              '24:00:00 as a number')
#: value rules of ``slurm:`` (keys: the fields of :class:`SlurmSettings`)
SLURM_VALUE_RULES = {
    "gpus": (lambda v: _is_int(v) and v >= 0, "a non-negative integer"),
    "cpus": (_positive_int, "a positive integer"),
    "mem": (_mem_ok, "SLURM's --mem: MB as an integer or a text like 32G"),
    "time": (_time_ok, _TIME_WHAT),
    "partition": (_opt_str, "a partition name"),
    "extra_args": (lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(a, str) for a in v)),
                   "a list of sbatch options (texts)"),
    "report_cpus": (_positive_int, "a positive integer"),
    "report_mem": (_mem_ok, "SLURM's --mem: MB as an integer or a text like 16G"),
    "report_time": (_time_ok, _TIME_WHAT),
    "report_partition": (_opt_str, "a partition name"),
    "signal_seconds": (lambda v: _is_int(v) and v >= 0, "a non-negative integer (seconds; 0: no signal)"),
    "requeue": (lambda v: isinstance(v, bool), "true or false"),
    "max_parallel": (lambda v: v is None or _positive_int(v), "a positive integer or null"),
}


def _err(path, msg) -> ExperimentError:
    return ExperimentError(f"{path}: {msg}")


def _check_keys(path, where: str, given, valid) -> None:
    bad = sorted(map(str, set(given) - set(valid)))
    if bad:
        raise _err(path, f"{where}: unknown key(s) {bad}; valid keys: {sorted(valid)}")


def _check_values(path, where: str, values: dict, rules: dict) -> None:
    for k, v in values.items():
        if k in rules:
            ok, what = rules[k]
            if not ok(v):
                raise _err(path, f"{where}.{k} must be {what}, got {v!r}")


def _mapping(path, raw: dict, key: str) -> dict:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _err(path, f"{key} must be a mapping (key: value), got {value!r}")
    return value


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _err(path, f"is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                         f"save the experiment file as UTF-8") from None


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read the file and check every key and value (not yet against nnU-Net: see :func:`validate`)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {path}")
    try:
        raw = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as e:
        raise _err(path, f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise _err(path, "must be a mapping (key: value) at the top level")
    _check_keys(path, "top level", raw, _TOP_KEYS)
    for k in ("name", "dataset", "trainers"):
        if k not in raw:
            raise _err(path, f"missing required key {k!r}")
    if not isinstance(raw["name"], (str, int)) or isinstance(raw["name"], bool):
        raise _err(path, f"name must be a text, got {raw['name']!r}")
    name = str(raw["name"])
    if not _LABEL_RE.match(name):
        raise _err(path, f"name {name!r} may hold only letters, digits and _ . + -")
    if not (_is_int(raw["dataset"]) or (isinstance(raw["dataset"], str) and raw["dataset"].strip())):
        raise _err(path, f"dataset must be an nnU-Net dataset id or DatasetXXX_Name, got {raw['dataset']!r}")
    for k in ("configuration", "plans", "baseline", "state_dir"):
        if k in raw and not (isinstance(raw[k], str) and raw[k].strip()):
            raise _err(path, f"{k} must be a text, got {raw[k]!r}")
    folds = raw.get("folds", list(DEFAULT_FOLDS))
    if _is_int(folds):
        folds = [folds]
    if not isinstance(folds, list) or not folds or not all(_is_int(f) and f >= 0 for f in folds):
        raise _err(path, f"folds must be a list of non-negative integers, got {folds!r}")
    if len(set(folds)) != len(folds):
        raise _err(path, f"folds repeat: {folds}")
    training = _mapping(path, raw, "training")
    _check_values(path, "training", training, TRAINING_VALUE_RULES)
    trainers = []
    if not isinstance(raw["trainers"], list) or not raw["trainers"]:
        raise _err(path, "trainers must be a non-empty list")
    for i, t in enumerate(raw["trainers"]):
        if isinstance(t, str) and t.strip():
            spec = TrainerSpec(t, t)
        elif isinstance(t, dict) and "name" in t:
            _check_keys(path, f"trainers[{i}]", t, _TRAINER_KEYS)
            if not (isinstance(t["name"], str) and t["name"].strip()):
                raise _err(path, f"trainers[{i}].name must be a trainer class name, got {t['name']!r}")
            hp = t.get("hparams") or {}
            if not isinstance(hp, dict):
                raise _err(path, f"trainers[{i}].hparams must be a mapping")
            _check_values(path, f"trainers[{i}].hparams", hp, TRAINING_VALUE_RULES)
            label = str(t.get("label") or t["name"])
            if hp and "label" not in t:
                label = t["name"] + "_" + "_".join(f"{k}{v}" for k, v in sorted(hp.items()))
            spec = TrainerSpec(str(t["name"]), label, dict(hp))
        else:
            raise _err(path, f"trainers[{i}] must be a trainer name or a mapping with 'name'")
        if not _LABEL_RE.match(spec.label):
            raise _err(path, f"trainers[{i}]: label {spec.label!r} may hold only letters, digits and _ . + -")
        trainers.append(spec)
    labels = [t.label for t in trainers]
    dup = sorted({l for l in labels if labels.count(l) > 1})
    if dup:
        raise _err(path, f"trainer labels repeat: {dup} (give each hyperparameter variant its own label)")
    same_folder = {}
    for t in trainers:
        if not t.is_variant:
            if t.name in same_folder:
                raise _err(path, f"trainer {t.name} is listed twice without hparams: both would train into the "
                                 f"same nnU-Net folder")
            same_folder[t.name] = t
    slurm = _slurm_settings(path, _mapping(path, raw, "slurm"))
    device = raw.get("device", "auto")
    if device not in ("cpu", "cuda", "auto"):
        raise _err(path, f"device must be cpu, cuda or auto, got {device!r}")
    evaluation = _mapping(path, raw, "evaluation")
    _check_keys(path, "evaluation", evaluation, _EVALUATION_KEYS)
    if "num_processes" in evaluation and not _positive_int(evaluation["num_processes"]):
        raise _err(path, f"evaluation.num_processes must be a positive integer, got {evaluation['num_processes']!r}")
    options = _mapping(path, evaluation, "options") if "options" in evaluation else {}
    if evaluation.get("options") is not None and not isinstance(evaluation["options"], dict):
        raise _err(path, f"evaluation.options must be a mapping, got {evaluation['options']!r}")
    _check_keys(path, "evaluation.options", options, EVALUATION_OPTION_RULES)
    _check_values(path, "evaluation.options", options, EVALUATION_OPTION_RULES)
    report = _mapping(path, raw, "report")
    _check_keys(path, "report", report, _REPORT_KEYS)
    _check_values(path, "report", report, _REPORT_RULES)
    nnunet_paths = _mapping(path, raw, "nnunet_paths")
    _check_keys(path, "nnunet_paths", nnunet_paths, _NNUNET_PATH_KEYS)
    for k, v in nnunet_paths.items():
        if not (isinstance(v, str) and v.strip()):
            raise _err(path, f"nnunet_paths.{k} must be a folder path, got {v!r}")
    exp = Experiment(path=path, name=name, dataset=str(raw["dataset"]),
                     configuration=str(raw.get("configuration", "2d")), plans=str(raw.get("plans", "nnUNetPlans")),
                     folds=tuple(folds), device=device, training=dict(training), trainers=trainers,
                     baseline=raw.get("baseline"), evaluation=dict(evaluation),
                     report=dict(report), slurm=slurm,
                     nnunet_paths=dict(nnunet_paths), state_dir_opt=raw.get("state_dir"), raw=raw)
    if exp.baseline is not None and exp.baseline not in labels:
        raise _err(path, f"baseline {exp.baseline!r} is not a trainer label; labels: {labels}")
    return exp


def _slurm_settings(path, slurm_raw: dict) -> SlurmSettings:
    valid = set(SlurmSettings.__dataclass_fields__)
    _check_keys(path, "slurm", slurm_raw, valid)
    _check_values(path, "slurm", slurm_raw, SLURM_VALUE_RULES)
    slurm = SlurmSettings(**slurm_raw)
    if isinstance(slurm.extra_args, str):
        slurm.extra_args = slurm.extra_args.split()
    for k in ("mem", "report_mem"):
        if _is_int(getattr(slurm, k)):
            setattr(slurm, k, str(getattr(slurm, k)))
    limit = slurm_time_seconds(slurm.time) if slurm.time else None
    if "signal_seconds" not in slurm_raw and limit is not None:
        slurm.signal_seconds = min(slurm.signal_seconds, limit // 2)  # default: 600 s, at most half the limit
    if slurm.signal_seconds and limit is not None and slurm.signal_seconds >= limit:
        raise _err(path, f"slurm.signal_seconds ({slurm.signal_seconds} s) must be shorter than slurm.time "
                         f"({slurm.time!r} = {limit} s)")
    return slurm


# -- validation against nnU-Net ----------------------------------------------------------------
def known_trainer_names() -> list[str]:
    """Names of every nnU-Net trainer class nnU-Net itself can find (its folder + nnUNet_extTrainer)."""
    import importlib
    import inspect
    import pkgutil

    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    names = set()

    def collect(module):
        for n, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, nnUNetTrainer):
                names.add(n)

    base = Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer"
    with contextlib.redirect_stdout(io.StringIO()):
        for mod in pkgutil.walk_packages([str(base)], "nnunetv2.training.nnUNetTrainer."):
            try:
                collect(importlib.import_module(mod.name))
            except Exception:  # a broken optional trainer module must not hide the others
                continue
        try:
            import nnunet_calibration.trainers as ours

            collect(ours)
        except Exception:
            pass
    return sorted(names)


def find_trainer_class(name: str, env: dict | None = None):
    """nnU-Net's own by-name lookup; ``None`` if it cannot find ``name``.

    Searches nnU-Net's trainer folder, then the folders of ``nnUNet_extTrainer`` as given in ``env``
    (default: ``os.environ``), with nnU-Net's ``recursive_find_python_class`` in the order
    ``recursive_find_trainer_class_by_name`` uses, without changing the process environment.
    """
    import nnunetv2
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    env = os.environ if env is None else env
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            cls = recursive_find_python_class(os.path.join(nnunetv2.__path__[0], "training", "nnUNetTrainer"),
                                              name, "nnunetv2.training.nnUNetTrainer", nnunetv2.__path__[0])
            for path in ([] if cls is not None else (env.get("nnUNet_extTrainer") or "").split(os.pathsep)):
                if path.strip() and os.path.exists(path):
                    cls = recursive_find_python_class(path, name, None, base_folder=path, verbose=False,
                                                      cleanup_imports_from_base_folder=True)
                    if cls is not None:
                        break
        except (RuntimeError, AssertionError, ImportError):
            return None
    return cls if isinstance(cls, type) and issubclass(cls, nnUNetTrainer) else None


def validate(exp: Experiment, check_trainers: bool = True) -> Experiment:
    """Check dataset, configuration, plans, folds and trainers against nnU-Net before anything runs.

    Raises :class:`ExperimentError` listing the valid names. Sets ``exp.dataset_name``.
    """
    pre = exp.nnunet_folder("preprocessed")
    if not pre.is_dir():
        raise _err(exp.path, f"nnUNet_preprocessed folder {pre} does not exist")
    datasets = sorted(p.name for p in pre.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
    ds = exp.dataset
    if ds.isdigit():
        matches = [d for d in datasets if d.startswith(f"Dataset{int(ds):03d}_")]
    else:
        matches = [d for d in datasets if d == ds]
    if len(matches) != 1:
        why = "is not preprocessed" if not matches else f"is ambiguous ({matches})"
        raise _err(exp.path, f"dataset {ds!r} {why} in {pre}; preprocessed datasets: {datasets or 'none'}")
    exp.dataset_name = matches[0]
    plans_file = pre / exp.dataset_name / f"{exp.plans}.json"
    if not plans_file.is_file():
        found = sorted(p.stem for p in (pre / exp.dataset_name).glob("*.json")
                       if p.stem not in ("dataset", "dataset_fingerprint", "splits_final"))
        raise _err(exp.path, f"plans {exp.plans!r} not found ({plans_file}); plans: {found}")
    plans = json.loads(plans_file.read_text())
    configs = sorted(plans.get("configurations", {}))
    if exp.configuration not in configs:
        raise _err(exp.path, f"configuration {exp.configuration!r} is not in {plans_file.name}; "
                             f"configurations: {configs}")
    _check_preprocessed(exp, plans_file)
    splits = pre / exp.dataset_name / "splits_final.json"
    if splits.is_file():
        n = len(json.loads(splits.read_text()))
        bad = [f for f in exp.folds if f >= n]
        if bad:
            raise _err(exp.path, f"folds {bad} do not exist: {splits} has {n} folds (0-{n - 1})")
    elif max(exp.folds) > 4:
        raise _err(exp.path, f"folds {list(exp.folds)}: nnU-Net makes 5 folds (0-4) when {splits} is absent")
    if check_trainers:
        from nnunet_calibration.trainers.base import TRAINING_KEYS, nnUNetTrainerHparamsBase

        env = exp.nnunet_env()
        unknown = []
        for t in exp.trainers:
            cls = find_trainer_class(t.name, env)
            if cls is None:
                unknown.append(t.name)
                continue
            hp = exp.hparams_for(t)
            if hp and not issubclass(cls, nnUNetTrainerHparamsBase):
                raise _err(exp.path, f"trainer {t.name} does not read NNUNET_CALIB_HPARAMS, so the "
                                     f"hyperparameters {hp} would be ignored; use an nnunet-calibration trainer "
                                     f"(e.g. nnUNetTrainerDiceCE instead of nnUNetTrainer) or drop them")
            if hp:
                valid = set(TRAINING_KEYS) | set(cls.loss_hparams) | set(getattr(cls, "deprecated_hparams", {}))
                bad = sorted(set(hp) - valid)
                if bad:
                    raise _err(exp.path, f"trainer {t.label}: unknown hyperparameter(s) {bad}; "
                                         f"valid for {t.name}: {sorted(valid)}")
                _check_loss_values(exp, t, cls.loss_hparams, hp)
        if unknown:
            raise _err(exp.path, f"unknown trainer(s) {unknown}; known trainers: {', '.join(known_trainer_names())}")
    check_report_settings(exp)
    return exp


def _check_preprocessed(exp: Experiment, plans_file: Path) -> None:
    """The configuration's preprocessed data (its ``data_identifier`` folder) must exist and hold cases."""
    configs = json.loads(plans_file.read_text()).get("configurations", {})
    name, seen, ident = exp.configuration, set(), None
    while ident is None and name in configs and name not in seen:  # nnU-Net's 'inherits_from' chain
        seen.add(name)
        ident = configs[name].get("data_identifier")
        name = configs[name].get("inherits_from")
    if not ident:
        raise _err(exp.path, f"configuration {exp.configuration!r} in {plans_file} has no data_identifier")
    folder = plans_file.parent / ident
    if not folder.is_dir() or not any(folder.iterdir()):
        raise _err(exp.path, f"configuration {exp.configuration!r} of {exp.dataset_name} is not preprocessed "
                             f"({folder} is missing or empty); run: nnUNetv2_preprocess -d {exp.dataset_name} "
                             f"-c {exp.configuration} -plans_name {exp.plans}")


def _check_loss_values(exp: Experiment, spec: TrainerSpec, defaults: dict, hp: dict) -> None:
    """Loss hyperparameters must have the type of the trainer's default (the trainer's own rule)."""
    for k, v in hp.items():
        if k not in defaults:
            continue
        d = defaults[k]
        if isinstance(d, bool):
            ok, what = isinstance(v, bool), "true or false"
        elif _is_number(d):
            ok, what = _is_number(v), "a number"
        elif isinstance(d, str):
            ok, what = isinstance(v, str), "a text"
        else:
            continue
        if not ok:
            raise _err(exp.path, f"trainer {spec.label}: hyperparameter {k} must be {what} (default {d!r}), "
                                 f"got {v!r}")


def check_report_settings(exp: Experiment) -> None:
    """``report.rank_metrics`` must name metrics of the report's table."""
    # deferred on purpose: the report module (matplotlib, the evaluator) imports this module
    from nnunet_calibration.experiments.report import METRICS

    bad = sorted(set(exp.report.get("rank_metrics", [])) - set(METRICS))
    if bad:
        raise _err(exp.path, f"report.rank_metrics: unknown metric(s) {bad}; metrics: {list(METRICS)}")


def hparams_env_value(hp: dict) -> str | None:
    return json.dumps(hp, sort_keys=True) if hp else None


def recorded_hparams(fold_folder: Path) -> dict | None:
    """The overrides a finished/interrupted fold was trained with (``calibration_hparams.json``), if recorded."""
    f = fold_folder / "calibration_hparams.json"
    if not f.is_file():
        return None
    try:
        return (json.loads(f.read_text()).get("overrides") or {}).get("parsed") or {}
    except (OSError, json.JSONDecodeError):
        return None


def yaml_dump(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False)
