"""The experiment file (YAML): its schema as frozen dataclasses, and its loader.

Example (every key except ``name``, ``dataset`` and ``trainers`` is optional; the sections' keys are
the fields of :class:`~.training.Training`, :class:`~.metrics.MetricOptions`, :class:`Report`,
:class:`~.slurm.Slurm` and :class:`NnunetPaths`, with their defaults and rules)::

    name: acdc-calibration            # used for the state folder and results/<name>/
    dataset: 27                       # nnU-Net dataset id or DatasetXXX_Name (must be preprocessed)
    configuration: 2d                 # any configuration of the plans (2d, 3d_fullres, ...)
    plans: nnUNetPlans
    folds: [0, 1, 2, 3, 4]            # default 0-4
    device: auto                      # cpu | cuda | auto (cuda when SLURM asks for GPUs or CUDA is present)
    order: folds                      # local backend: folds (fold 0 of every trainer first) | trainers
    training: {num_epochs: 1000}      # for every trainer (Training), through NNUNET_CALIB_HPARAMS
    trainers:
      - nnUNetTrainerDiceCE           # a bare name
      - {name: nnUNetTrainerSDC, label: SDC_alpha0.2, hparams: {alpha: 0.2}}   # a variant: own results folder
    baseline: nnUNetTrainerDiceCE     # label of the Wilcoxon reference (default: the DiceCE trainer)
    evaluation: {num_processes: 1, options: {}}   # options: MetricOptions
    report: {}                        # Report
    slurm: {}                         # Slurm
    environment: {nnUNet_n_proc_DA: 8}   # variables of every training and job, overriding the defaults
    nnunet_paths: {results: /data/nnUNet_results}   # default: the nnUNet_raw/... environment variables
    state_dir: .calib_state           # default: <nnUNet_results>/calib_experiments/<name>

Relative paths are taken relative to the experiment file's folder. The loader
(:func:`load_experiment`) refuses a file that is not UTF-8, not YAML, repeats a key at any level,
names an unknown key (the message lists the valid ones) or holds a value outside its rule (every
float finite). Checks against nnU-Net (dataset, plans, trainers and their loss hyperparameters)
follow in :func:`nnunet_calibration.experiments.nnunet_checks.validate`.

Where trainings are stored (hyperparameter variants): a trainer entry *with* ``hparams`` trains
with ``nnUNet_results`` set to ``<nnUNet_results>/calib_variants/<label>`` (its own nnU-Net results
tree), entries without use ``<nnUNet_results>`` itself; see :mod:`nnunet_calibration.experiments.folds`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from ._typed import (ANY_TEXT, BOOL, OPTIONAL_TEXT, POSITIVE_INT, TEXT, Rule, Settings, SettingsError, is_int,
                     is_number, one_of, setting)
from .metrics import MetricOptions
from .slurm import Slurm
from .training import Training

#: the report's table columns, in order: the evaluator's summary keys (DSC/HD95: mean over foreground
#: classes), then DSC and HD95 after nnU-Net's own postprocessing, cross-fitted ("+PP", report.postprocessing),
#: the signed class-wise calibration error (SCE, mean over classes; + over-, - under-confident) and the AURC
#: of the default case score against the risk 1 - DSC (summary.json "risk_coverage")
REPORT_METRICS = ("DSC", "HD95", "ECE", "CECE", "pECE", "mL1-ACE", "NLL", "Brier", "DSC+PP", "HD95+PP", "SCE",
                  "AURC")
#: the columns the Friedman ranks use unless report.rank_metrics says otherwise (no column counted twice)
DEFAULT_RANK_METRICS = REPORT_METRICS[:8]
DEFAULT_FOLDS = (0, 1, 2, 3, 4)
LABEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
LABEL = Rule(lambda v: isinstance(v, str) and bool(LABEL_RE.match(v)), "a name of letters, digits and _ . + -")


class ExperimentError(SettingsError):
    """An invalid experiment file or set-up; the message names the file and what is wrong."""


_RANK = Rule(lambda v: isinstance(v, (list, tuple)) and bool(v) and all(m in REPORT_METRICS for m in v),
             f"a non-empty list of metric names of {list(REPORT_METRICS)}")


@dataclass(frozen=True)
class Report(Settings):
    """``report:``: what the experiment's report holds."""

    SECTION = "report"

    output_root: str | None = setting(None, OPTIONAL_TEXT, "the report goes to OUTPUT_ROOT/<name>/ (relative to the "
                                                           "experiment file; default: ./results)")
    temperature_scaling: bool = setting(True, BOOL, "cross-fitted + TS rows")
    vector_scaling: bool = setting(True, BOOL, "cross-fitted + VS rows (one temperature per channel)")
    threshold_sweep: bool = setting(True, BOOL, "the softmax-threshold sweep (DSC++ paper, Fig. 4)")
    postprocessing: bool = setting(True, BOOL, "the DSC+PP / HD95+PP columns: nnU-Net's postprocessing "
                                               "(nnUNetv2_determine_postprocessing), cross-fitted over folds")
    max_fit_voxels: int = setting(200_000, POSITIVE_INT, "voxels sampled per trainer to fit the post-hoc scalings")
    rank_metrics: tuple | None = setting(None, _RANK, "metrics of the Friedman ranks (default: every column "
                                                      "but the +PP ones)")
    note: str = setting("", ANY_TEXT, "a note printed at the top of the report")
    learned_dsc: float | None = setting(None, Rule(lambda v: is_number(v) and 0 < v <= 1, "a number in (0, 1]"),
                                        "the report says whether every fold of the baseline reached this validation "
                                        "DSC (did it learn at this budget?); null: not said")
    archive: str | None = setting(None, OPTIONAL_TEXT, "a folder (relative to the experiment file) where each trainer "
                                  "entry's evaluated rows are kept as <label>.json once all its folds are finished; "
                                  "run and report use them where the folds are gone (another machine), see "
                                  "nnunet_calibration.experiments.report.archive; null: no archive")

    @property
    def ranked(self) -> tuple:
        return tuple(self.rank_metrics or DEFAULT_RANK_METRICS)


@dataclass(frozen=True)
class Evaluation(Settings):
    """``evaluation:``: how finished folds are scored."""

    SECTION = "evaluation"

    num_processes: int = setting(1, POSITIVE_INT, "cases evaluated in parallel processes")
    options: MetricOptions = setting(MetricOptions(), None, "the metrics' options")


@dataclass(frozen=True)
class NnunetPaths(Settings):
    """``nnunet_paths:``: nnU-Net's folders (default: the environment variables ``nnUNet_raw`` ...)."""

    SECTION = "nnunet_paths"

    raw: str | None = setting(None, OPTIONAL_TEXT, "nnUNet_raw")
    preprocessed: str | None = setting(None, OPTIONAL_TEXT, "nnUNet_preprocessed")
    results: str | None = setting(None, OPTIONAL_TEXT, "nnUNet_results")


_OPTIONAL_FOLDS = Rule(lambda v: v is None or (isinstance(v, tuple) and bool(v) and all(is_int(f) and f >= 0 for f in v)
                                               and len(set(v)) == len(v)),
                       "a list of distinct non-negative integers, or null")


@dataclass(frozen=True)
class TrainerEntry(Settings):
    """One entry of ``trainers:``: a trainer class, its label (row name, variant folder), overrides, and
    for repeated trainings the run index and its own folds."""

    SECTION = "trainers[]"

    name: str = setting("", TEXT, "nnU-Net trainer class name")
    label: str = setting("", LABEL, "row name (default: the class name; with hparams the class name and values; "
                                    "with run > 1 '_run<N>' appended)")
    hparams: dict = setting(dict, None, "overrides of Training keys and of the trainer's loss hyperparameters")
    run: int = setting(1, POSITIVE_INT, "repeat index of an otherwise identical training (run-to-run noise): run > 1 "
                                        "trains into its own results tree; the report pools such runs into the noise "
                                        "floor instead of ranking them")
    folds: tuple | None = setting(None, _OPTIONAL_FOLDS, "this entry's folds (default: the experiment's)")

    @property
    def is_variant(self) -> bool:
        """Whether the entry trains into its own results tree (hyperparameter overrides, or a repeat)."""
        return bool(self.hparams) or self.run > 1

    @classmethod
    def read(cls, item, where: str) -> "TrainerEntry":
        if isinstance(item, str) and item.strip():
            return cls(item, item)
        if not isinstance(item, dict) or "name" not in item:
            raise SettingsError(f"{where} must be a trainer name or a mapping with 'name'")
        hp = item.get("hparams") or {}
        if not isinstance(hp, dict):
            raise SettingsError(f"{where}.hparams must be a mapping")
        # the Training keys are checked now; the loss keys against the trainer class (nnunet_checks.validate)
        Training.from_mapping({k: v for k, v in hp.items() if k in Training.keys()}, f"{where}.hparams")
        name = item["name"]
        if not (isinstance(name, str) and name.strip()):
            raise SettingsError(f"{where}.name must be a trainer class name, got {name!r}")
        label = item.get("label") or (name + "_" + "_".join(f"{k}{v}" for k, v in sorted(hp.items())) if hp else name)
        run = item.get("run", 1)
        if "label" not in item and is_int(run) and run > 1:
            label = f"{label}_run{run}"
        return cls.from_mapping(dict(item, label=str(label), hparams=dict(hp)), where)


_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_OWN_ENV = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "NNUNET_CALIB_HPARAMS")
_ENVIRONMENT = Rule(lambda v: isinstance(v, dict) and all(isinstance(k, str) and _ENV_NAME.match(k) and k not in _OWN_ENV
                                                          and isinstance(x, str) for k, x in v.items()),
                    f"a mapping of environment variable names to texts or numbers (not {', '.join(_OWN_ENV)}: "
                    f"nnunet_paths and training set those)")
_DEVICE = one_of(("cpu", "cuda", "auto"))
_FOLDS = Rule(lambda v: isinstance(v, tuple) and bool(v) and all(is_int(f) and f >= 0 for f in v)
              and len(set(v)) == len(v), "a list of distinct non-negative integers")
_DATASET = Rule(lambda v: isinstance(v, str) and v.strip() != "", "an nnU-Net dataset id or DatasetXXX_Name")


@dataclass(frozen=True)
class Experiment(Settings):
    """One experiment file, checked (frozen). ``path``: the file; ``dataset_name``: the
    ``DatasetXXX_Name`` folder, filled by :func:`nnunet_calibration.experiments.nnunet_checks.validate`."""

    name: str = setting("", LABEL, "used for the state folder and results/<name>/")
    dataset: str = setting("", _DATASET, "nnU-Net dataset id or DatasetXXX_Name")
    trainers: tuple = setting((), Rule(lambda v: isinstance(v, tuple) and bool(v), "a non-empty list"), "trainers")
    configuration: str = setting("2d", TEXT, "a configuration of the plans")
    plans: str = setting("nnUNetPlans", TEXT, "plans identifier")
    folds: tuple = setting(DEFAULT_FOLDS, _FOLDS, "folds to train")
    device: str = setting("auto", _DEVICE, "cpu, cuda or auto")
    order: str = setting("folds", one_of(("folds", "trainers")), "local backend's order: folds = every trainer's "
                         "fold 0, then every trainer's fold 1, ...; trainers = every fold of the first trainer, then "
                         "the next (with report.archive each trainer is archived as soon as possible)")
    training: Training = setting(Training(), None, "training settings of every trainer")
    baseline: str | None = setting(None, OPTIONAL_TEXT, "label of the Wilcoxon reference")
    evaluation: Evaluation = setting(Evaluation(), None, "how folds are scored")
    report: Report = setting(Report(), None, "the report")
    slurm: Slurm = setting(Slurm(), None, "the SLURM backend")
    nnunet_paths: NnunetPaths = setting(NnunetPaths(), None, "nnU-Net's folders")
    state_dir: str | None = setting(None, OPTIONAL_TEXT, "state and logs (default <nnUNet_results>/calib_experiments/<name>)")
    environment: dict = setting(dict, _ENVIRONMENT, "environment variables of every training and job (nnU-Net's "
                                                    "nnUNet_compile, nnUNet_n_proc_DA, ...): they override the defaults")
    path: Path | None = field(default=None, metadata={"file": False})
    dataset_name: str | None = field(default=None, metadata={"file": False})

    def check(self) -> None:
        labels = [t.label for t in self.trainers]
        dup = sorted({l for l in labels if labels.count(l) > 1})
        if dup:
            raise SettingsError(f"trainer labels repeat: {dup} (give each hyperparameter variant its own label)")
        plain = [t.name for t in self.trainers if not t.is_variant]
        twice = sorted({n for n in plain if plain.count(n) > 1})
        if twice:
            raise SettingsError(f"trainer {twice[0]} is listed twice without hparams: both would train into the same "
                                f"nnU-Net folder")
        if self.baseline is not None and self.baseline not in labels:
            raise SettingsError(f"baseline {self.baseline!r} is not a trainer label; labels: {labels}")

    @classmethod
    def prepare(cls, data: dict) -> dict:
        if "name" in data and is_int(data["name"]):
            data["name"] = str(data["name"])
        if "dataset" in data and is_int(data["dataset"]):
            data["dataset"] = str(data["dataset"])
        if is_int(data.get("folds")):
            data["folds"] = [data["folds"]]
        if isinstance(data.get("environment"), dict):  # YAML numbers and booleans as the shell would write them
            data["environment"] = {k: (str(v).lower() if isinstance(v, bool) else str(v) if is_int(v) or
                                       (isinstance(v, float) and v == v) else v) for k, v in data["environment"].items()}
        return data

    # -- what the file's values mean ------------------------------------------------------------
    def resolve(self, p: str) -> Path:
        """A path of the file: ``~`` and ``$VARS`` expanded, relative to the file's folder."""
        p = Path(os.path.expandvars(os.path.expanduser(str(p))))
        base = self.path.parent if self.path is not None else Path.cwd()
        return p if p.is_absolute() else (base / p).resolve()

    def nnunet_folder(self, key: str) -> Path:
        """``key`` in raw / preprocessed / results: from the file, else the environment."""
        given = getattr(self.nnunet_paths, key)
        if given:
            return self.resolve(given)
        env = os.environ.get(f"nnUNet_{key}")
        if not env:
            raise ExperimentError(f"{self.path}: nnUNet_{key} is not set (set the environment variable or "
                                  f"nnunet_paths: {{{key}: ...}} in the experiment file)")
        return Path(env).resolve()

    @property
    def state_folder(self) -> Path:
        """Where the experiment keeps its state and logs."""
        if self.state_dir:
            return self.resolve(self.state_dir)
        return self.nnunet_folder("results") / "calib_experiments" / self.name

    def report_dir(self, output_root: str | os.PathLike | None = None) -> Path:
        if output_root is not None:
            return Path(output_root).resolve() / self.name
        if self.report.output_root is not None:
            return self.resolve(self.report.output_root) / self.name
        return Path("results").resolve() / self.name

    def folds_for(self, entry: TrainerEntry) -> tuple:
        """The folds ``entry`` trains: its own ``folds``, else the experiment's."""
        return entry.folds if entry.folds is not None else self.folds

    @property
    def all_folds(self) -> tuple:
        """Every fold some entry trains, sorted."""
        return tuple(sorted({f for t in self.trainers for f in self.folds_for(t)}))

    def hparams_for(self, entry: TrainerEntry) -> dict:
        """What a trainer entry trains with: the common ``training`` keys, then the entry's overrides."""
        return {**self.training.overrides(), **entry.hparams}

    def trainer(self, label: str) -> TrainerEntry:
        for t in self.trainers:
            if t.label == label:
                return t
        raise ExperimentError(f"{self.path}: no trainer labelled {label!r}; labels: {[t.label for t in self.trainers]}")

    @property
    def baseline_label(self) -> str | None:
        if self.baseline:
            return self.baseline
        for names in (("nnUNetTrainerDiceCE",), ("nnUNetTrainerDiceCE", "nnUNetTrainer")):
            for t in self.trainers:
                if t.name in names and (len(names) > 1 or not t.is_variant):
                    return t.label
        return None

    def with_dataset_name(self, name: str) -> "Experiment":
        return replace(self, dataset_name=name)


# -- loading -------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (YAML keeps the last silently)."""


def _construct_mapping(loader, node, deep=False):
    seen = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice (lines {seen[key] + 1} and {key_node.start_mark.line + 1})",
                key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return yaml.SafeLoader.construct_mapping(loader, node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def read_yaml(path: Path):
    """The YAML content of a UTF-8 file, refusing repeated keys; errors name the file."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ExperimentError(f"{path}: is not UTF-8 text (byte {e.start}: {data[e.start:e.start + 1]!r}); "
                              f"save the experiment file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        raise ExperimentError(f"{path}: not valid YAML: {e}") from None


def load_experiment(path: str | os.PathLike) -> Experiment:
    """Read and check an experiment file (every key and value; not yet against nnU-Net)."""
    path = Path(path).resolve()
    if not path.is_file():
        raise ExperimentError(f"experiment file not found: {path}")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ExperimentError(f"{path}: must be a mapping (key: value) at the top level")
    for k in ("name", "dataset", "trainers"):
        if k not in raw:
            raise ExperimentError(f"{path}: missing required key {k!r}")
    try:
        data = dict(raw)
        if isinstance(data["trainers"], list):
            data["trainers"] = [TrainerEntry.read(t, f"trainers[{i}]") for i, t in enumerate(data["trainers"])]
        elif not isinstance(data["trainers"], tuple):
            raise SettingsError(f"trainers must be a non-empty list, got {data['trainers']!r}")
        return Experiment.from_mapping(data, "top level", path=path)
    except ExperimentError:
        raise
    except SettingsError as e:
        raise ExperimentError(f"{path}: {e}") from None


def dump_yaml(data) -> str:
    return yaml.safe_dump(data, sort_keys=False)
