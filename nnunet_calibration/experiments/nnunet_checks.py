"""An experiment checked against nnU-Net: dataset, plans, configuration, folds, trainers and what
existing folds were trained with.

* :func:`validate` (``calib-experiment check``, and ``run`` before anything is submitted): the
  dataset must be preprocessed in the configuration (its ``data_identifier`` folder holds cases),
  the folds must exist in ``splits_final.json``, every trainer must be found by nnU-Net's own
  by-name lookup (:func:`find_trainer_class`) and its hyperparameters must be its own
  (:func:`nnunet_calibration.settings.split_hparams`, the trainers' own check). Returns the
  experiment with its ``dataset_name``.
* :func:`check_recorded_hparams`: a finished or interrupted fold trained otherwise than the
  experiment asks for (another loss, other loss hyperparameters, other training overrides) stops the
  run, naming the folder (:func:`nnunet_calibration.experiments.folds.record_problems`); so does an
  archived entry (:mod:`nnunet_calibration.experiments.report.archive`) made otherwise, by the same rule on
  the records the archive keeps, and for another dataset, configuration, folds or metric options.
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import io
import json
import os
import pkgutil
from pathlib import Path

from nnunet_calibration.experiments.environment import experiment_env
from nnunet_calibration.experiments.folds import FoldStatus, fold_folder, fold_state, read_record, record_problems
from nnunet_calibration.settings import Experiment, ExperimentError, SettingsError, Training, TrainerEntry, split_hparams


def known_trainer_names() -> list[str]:
    """Names of every nnU-Net trainer class nnU-Net itself can find (its folder + our trainers)."""
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


def _dataset_name(exp: Experiment, pre: Path) -> str:
    datasets = sorted(p.name for p in pre.iterdir() if p.is_dir() and p.name.startswith("Dataset"))
    ds = exp.dataset
    matches = ([d for d in datasets if d.startswith(f"Dataset{int(ds):03d}_")] if ds.isdigit()
               else [d for d in datasets if d == ds])
    if len(matches) != 1:
        why = "is not preprocessed" if not matches else f"is ambiguous ({matches})"
        raise ExperimentError(f"{exp.path}: dataset {ds!r} {why} in {pre}; preprocessed datasets: {datasets or 'none'}")
    return matches[0]


def data_identifier(exp: Experiment, plans_file: Path, configs: dict | None = None) -> str:
    """The configuration's ``data_identifier`` (following nnU-Net's ``inherits_from``) in ``plans_file``
    (``configs``: its ``configurations``, if already read)."""
    if configs is None:
        try:
            configs = json.loads(plans_file.read_text())["configurations"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ExperimentError(f"{exp.path}: plans file {plans_file} is not readable ({e})") from None
    name, seen, ident = exp.configuration, set(), None
    while ident is None and name in configs and name not in seen:  # nnU-Net's 'inherits_from' chain
        seen.add(name)
        ident = configs[name].get("data_identifier")
        name = configs[name].get("inherits_from")
    if not ident:
        raise ExperimentError(f"{exp.path}: configuration {exp.configuration!r} in {plans_file} has no data_identifier")
    return ident


def _check_preprocessed(exp: Experiment, plans_file: Path, configs: dict) -> None:
    """The configuration's preprocessed data (its ``data_identifier`` folder) must exist and hold cases."""
    folder = plans_file.parent / data_identifier(exp, plans_file, configs)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ExperimentError(f"{exp.path}: configuration {exp.configuration!r} of {exp.dataset_name} is not "
                              f"preprocessed ({folder} is missing or empty); run: nnUNetv2_preprocess -d "
                              f"{exp.dataset_name} -c {exp.configuration} -plans_name {exp.plans}")


def _check_folds(exp: Experiment, splits: Path) -> None:
    if splits.is_file():
        n = len(json.loads(splits.read_text()))
        bad = [f for f in exp.all_folds if f >= n]
        if bad:
            raise ExperimentError(f"{exp.path}: folds {bad} do not exist: {splits} has {n} folds (0-{n - 1})")
    elif max(exp.all_folds) > 4:
        raise ExperimentError(f"{exp.path}: folds {list(exp.all_folds)}: nnU-Net makes 5 folds (0-4) when {splits} "
                              f"is absent")


def trainer_class(exp: Experiment, entry: TrainerEntry, env: dict | None = None):
    """The entry's trainer class, its hyperparameters checked (the trainer's own rule); errors name the file."""
    from nnunet_calibration.trainers import RENAMED, nnUNetTrainerHparamsBase

    cls = find_trainer_class(entry.name, experiment_env(exp) if env is None else env)
    if cls is None:
        if entry.name in RENAMED:
            raise ExperimentError(f"{exp.path}: trainer {entry.name} was renamed to {RENAMED[entry.name]}")
        raise ExperimentError(f"{exp.path}: unknown trainer {entry.name!r}; known trainers: "
                              f"{', '.join(known_trainer_names())}")
    hp = exp.hparams_for(entry)
    if hp and not issubclass(cls, nnUNetTrainerHparamsBase):
        raise ExperimentError(f"{exp.path}: trainer {entry.name} does not read NNUNET_CALIB_HPARAMS, so the "
                              f"hyperparameters {hp} would be ignored; use an nnunet-calibration trainer "
                              f"(e.g. nnUNetTrainerDiceCE instead of nnUNetTrainer) or drop them")
    if hp:
        try:
            split_hparams(hp, cls.loss_hparams, f"trainer {entry.label}")
        except SettingsError as e:
            raise ExperimentError(f"{exp.path}: {e}") from None
    return cls


def validate(exp: Experiment, check_trainers: bool = True) -> Experiment:
    """Check the experiment against nnU-Net (see the module docstring); returns it with ``dataset_name``."""
    pre = exp.nnunet_folder("preprocessed")
    if not pre.is_dir():
        raise ExperimentError(f"{exp.path}: nnUNet_preprocessed folder {pre} does not exist")
    exp = exp.with_dataset_name(_dataset_name(exp, pre))
    plans_file = pre / exp.dataset_name / f"{exp.plans}.json"
    if not plans_file.is_file():
        found = sorted(p.stem for p in (pre / exp.dataset_name).glob("*.json")
                       if p.stem not in ("dataset", "dataset_fingerprint", "splits_final"))
        raise ExperimentError(f"{exp.path}: plans {exp.plans!r} not found ({plans_file}); plans: {found}")
    configs = json.loads(plans_file.read_text()).get("configurations", {})
    if exp.configuration not in configs:
        raise ExperimentError(f"{exp.path}: configuration {exp.configuration!r} is not in {plans_file.name}; "
                              f"configurations: {sorted(configs)}")
    _check_preprocessed(exp, plans_file, configs)
    _check_folds(exp, pre / exp.dataset_name / "splits_final.json")
    if check_trainers:
        env = experiment_env(exp)
        for entry in exp.trainers:
            trainer_class(exp, entry, env)
    return exp


def expected_record(exp: Experiment, entry: TrainerEntry, cls) -> dict:
    """What a fold of ``entry`` must have recorded (see :func:`~.folds.record_problems`)."""
    hp = exp.hparams_for(entry)
    training, loss = split_hparams(hp, cls.loss_hparams, f"trainer {entry.label}")
    keys = Training.model_keys()  # when checkpoints were written does not matter
    return {"trainer": entry.name, "loss": cls.registry_name(), "loss_hparams": {**cls.loss_hparams, **loss},
            "loss_fixed": dict(getattr(cls, "loss_fixed", {})),
            "training_overrides": {k: v for k, v in training.overrides().items() if k in keys},
            "training_keys": keys}


def check_recorded_hparams(exp: Experiment) -> None:
    """Refuse to reuse a fold trained otherwise than the experiment asks for (see the module docstring)."""
    from nnunet_calibration.trainers import nnUNetTrainerHparamsBase

    from nnunet_calibration.experiments.report import archive

    env = experiment_env(exp)
    for entry in exp.trainers:
        states = {f: fold_state(exp, entry, f) for f in exp.folds_for(entry)}
        folds = [f for f, st in states.items() if st not in (FoldStatus.NOT_STARTED, FoldStatus.ARCHIVED)]
        if not folds and FoldStatus.ARCHIVED not in states.values():
            continue
        cls = trainer_class(exp, entry, env)
        ours = issubclass(cls, nnUNetTrainerHparamsBase)  # nnU-Net's own trainers record nothing of ours
        want = expected_record(exp, entry, cls) if ours else None
        if FoldStatus.ARCHIVED in states.values():
            problems = archive.archive_problems(exp, entry, archive.read_archive(exp, entry), want)
            if problems:
                raise ExperimentError(
                    f"{exp.path}: the archive {archive.archive_file(exp, entry)} of {entry.label} was made otherwise "
                    f"than this experiment asks for: {'; '.join(problems)}. It would be reused as is: restore its folds "
                    f"and delete the archive file to evaluate them again, or give the entry another label.")
        if not ours:
            continue
        for fold in folds:
            folder = fold_folder(exp, entry, fold)
            record = read_record(folder)
            problems = (["it has no calibration_hparams.json"] if record is None else record_problems(record, want))
            if problems:
                raise ExperimentError(
                    f"{exp.path}: {folder} was trained otherwise than this experiment asks for {entry.label}: "
                    f"{'; '.join(problems)}. It would be reused as is: give the entry its own label with 'hparams' "
                    f"(own results folder), use other nnunet_paths.results, or move that folder away.")
