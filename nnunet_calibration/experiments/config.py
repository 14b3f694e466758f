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
      temperature_scaling: true
      threshold_sweep: true
      max_fit_voxels: 200000          # voxels sampled per trainer to fit the temperature
    slurm:
      gpus: 1                         # --gres=gpu:N (0: none)
      cpus: 8                         # --cpus-per-task
      mem: 32G
      time: "24:00:00"
      partition: gpu
      extra_args: ["--account=myproj"]
      report_cpus: 4
      report_mem: 16G
      report_time: "04:00:00"
    nnunet_paths:                     # default: the nnUNet_raw/_preprocessed/_results environment variables
      raw: /data/nnUNet_raw
      preprocessed: /data/nnUNet_preprocessed
      results: /data/nnUNet_results
    state_dir: .calib_state           # default: <nnUNet_results>/calib_experiments/<name>

Relative paths are taken relative to the experiment file's folder.

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


def _err(path, msg) -> ExperimentError:
    return ExperimentError(f"{path}: {msg}")


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read and check the file's structure (not yet against nnU-Net: see :func:`validate`)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise _err(path, f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise _err(path, "must be a mapping (key: value) at the top level")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise _err(path, f"unknown key(s) {unknown}; valid keys: {sorted(_TOP_KEYS)}")
    for k in ("name", "dataset", "trainers"):
        if k not in raw:
            raise _err(path, f"missing required key {k!r}")
    name = str(raw["name"])
    if not _LABEL_RE.match(name):
        raise _err(path, f"name {name!r} may hold only letters, digits and _ . + -")
    folds = raw.get("folds", list(DEFAULT_FOLDS))
    if isinstance(folds, int):
        folds = [folds]
    if (not isinstance(folds, list) or not folds or
            not all(isinstance(f, int) and not isinstance(f, bool) and f >= 0 for f in folds)):
        raise _err(path, f"folds must be a list of non-negative integers, got {folds!r}")
    if len(set(folds)) != len(folds):
        raise _err(path, f"folds repeat: {folds}")
    training = raw.get("training") or {}
    if not isinstance(training, dict):
        raise _err(path, "training must be a mapping of hyperparameters")
    trainers = []
    if not isinstance(raw["trainers"], list) or not raw["trainers"]:
        raise _err(path, "trainers must be a non-empty list")
    for i, t in enumerate(raw["trainers"]):
        if isinstance(t, str):
            spec = TrainerSpec(t, t)
        elif isinstance(t, dict) and "name" in t:
            extra = sorted(set(t) - {"name", "label", "hparams"})
            if extra:
                raise _err(path, f"trainers[{i}]: unknown key(s) {extra}; valid: name, label, hparams")
            hp = t.get("hparams") or {}
            if not isinstance(hp, dict):
                raise _err(path, f"trainers[{i}].hparams must be a mapping")
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
    slurm_raw = raw.get("slurm") or {}
    if not isinstance(slurm_raw, dict):
        raise _err(path, "slurm must be a mapping")
    valid_slurm = set(SlurmSettings.__dataclass_fields__)
    bad = sorted(set(slurm_raw) - valid_slurm)
    if bad:
        raise _err(path, f"slurm: unknown key(s) {bad}; valid: {sorted(valid_slurm)}")
    slurm = SlurmSettings(**slurm_raw)
    if isinstance(slurm.extra_args, str):
        slurm.extra_args = slurm.extra_args.split()
    device = str(raw.get("device", "auto"))
    if device not in ("cpu", "cuda", "auto"):
        raise _err(path, f"device must be cpu, cuda or auto, got {device!r}")
    for k in ("evaluation", "report", "nnunet_paths"):
        if not isinstance(raw.get(k) or {}, dict):
            raise _err(path, f"{k} must be a mapping")
    bad = sorted(set(raw.get("nnunet_paths") or {}) - {"raw", "preprocessed", "results"})
    if bad:
        raise _err(path, f"nnunet_paths: unknown key(s) {bad}; valid: raw, preprocessed, results")
    exp = Experiment(path=path, name=name, dataset=str(raw["dataset"]),
                     configuration=str(raw.get("configuration", "2d")), plans=str(raw.get("plans", "nnUNetPlans")),
                     folds=tuple(folds), device=device, training=dict(training), trainers=trainers,
                     baseline=raw.get("baseline"), evaluation=dict(raw.get("evaluation") or {}),
                     report=dict(raw.get("report") or {}), slurm=slurm,
                     nnunet_paths=dict(raw.get("nnunet_paths") or {}), state_dir_opt=raw.get("state_dir"), raw=raw)
    if exp.baseline is not None and exp.baseline not in labels:
        raise _err(path, f"baseline {exp.baseline!r} is not a trainer label; labels: {labels}")
    return exp


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


def find_trainer_class(name: str):
    """nnU-Net's own by-name lookup; ``None`` if it cannot find ``name``."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    with contextlib.redirect_stdout(io.StringIO()):
        try:
            return recursive_find_trainer_class_by_name(name)
        except (RuntimeError, AssertionError):
            return None


def _with_env(env: dict):
    @contextlib.contextmanager
    def cm():
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update({k: v for k, v in env.items() if v is not None})
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    return cm()


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
    splits = pre / exp.dataset_name / "splits_final.json"
    if splits.is_file():
        n = len(json.loads(splits.read_text()))
        bad = [f for f in exp.folds if f >= n]
        if bad:
            raise _err(exp.path, f"folds {bad} do not exist: {splits} has {n} folds (0-{n - 1})")
    elif max(exp.folds) > 4:
        raise _err(exp.path, f"folds {list(exp.folds)}: nnU-Net makes 5 folds (0-4) when {splits} is absent")
    if check_trainers:
        from nnunet_calibration.trainers.base import TRAINING_KEYS, nnUNetTrainerCalibBase

        with _with_env(exp.nnunet_env()):
            unknown = []
            for t in exp.trainers:
                cls = find_trainer_class(t.name)
                if cls is None:
                    unknown.append(t.name)
                    continue
                hp = exp.hparams_for(t)
                if hp and not issubclass(cls, nnUNetTrainerCalibBase):
                    raise _err(exp.path, f"trainer {t.name} does not read NNUNET_CALIB_HPARAMS, so the "
                                         f"hyperparameters {hp} would be ignored; use an nnunet-calibration trainer "
                                         f"(e.g. nnUNetTrainerDiceCE instead of nnUNetTrainer) or drop them")
                if hp:
                    valid = set(TRAINING_KEYS) | set(cls.loss_hparams)
                    bad = sorted(set(hp) - valid)
                    if bad:
                        raise _err(exp.path, f"trainer {t.label}: unknown hyperparameter(s) {bad}; "
                                             f"valid for {t.name}: {sorted(valid)}")
            if unknown:
                raise _err(exp.path, f"unknown trainer(s) {unknown}; known trainers: {', '.join(known_trainer_names())}")
    return exp


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
