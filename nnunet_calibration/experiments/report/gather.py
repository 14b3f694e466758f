"""Gathering: read an experiment's finished folds into a :class:`~.data.ReportData`.

For every trainer each *finished* fold's ``fold_X/validation`` folder (the ``.npz`` probabilities
nnU-Net writes with ``--npz``) is evaluated by :func:`nnunet_calibration.evaluation.evaluate_folders`
against ``nnUNet_preprocessed/DatasetXXX/gt_segmentations`` (the references nnU-Net validates
against); the evaluator's summary of each fold is kept in ``evaluation/<experiment>/<row>/fold_X``.
One more pass over the probabilities fills, per trainer:

- the reliability statistics: a :class:`nnunet_calibration.metrics.CalibrationAccumulator` with the
  evaluator's own options (so the diagram's bins are the ECE column's bins), pooled over all cases;
- the threshold sweep counts (:func:`.posthoc.threshold_counts`);
- per fold, a random voxel sample for the post-hoc fits (:func:`.posthoc.sample_voxels`, at most
  ``report.max_fit_voxels`` voxels per trainer spread evenly over its cases, fixed seed 0).

Post-hoc rows (``report.temperature_scaling``, ``report.vector_scaling``, both default true):
parameters cross-fitted by :func:`nnunet_calibration.posthoc.scaling.crossfit`, applied per fold to a temporary copy of the
probabilities (deleted afterwards) that the evaluator scores like any other folder.

Archived entries (``report.archive``, :mod:`nnunet_calibration.experiments.report.archive`): an entry whose folds
are not all here is read from its archive (:func:`gather_method`); :func:`archive_entry` writes one, and so
does :func:`gather` for every complete entry not archived yet (e.g. in the report job of a SLURM run).
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nnunet_calibration import __version__
from nnunet_calibration.evaluation import (EvaluationInputError, evaluate_folders, label_info, load_probabilities,
                                           load_reference, reader_writer, validation_cases)
from nnunet_calibration.evaluation.scores import default_aurc
from nnunet_calibration.experiments import posthoc
from nnunet_calibration.experiments.report import archive
from nnunet_calibration.experiments.folds import (FoldStatus, archive_file, archived, fold_folder, fold_state, has_npz,
                                                  model_folder, read_record, results_root)
from nnunet_calibration.experiments.report import tables
from nnunet_calibration.experiments.report.postprocessing import PP_COLUMNS, crossfit_postprocessing
from nnunet_calibration.experiments.report.data import (CASE_KEYS, FOLD_ONLY, METRICS, SCE_CLASS_PREFIX, SUFFIX,
                                                        ExperimentResult, MethodResult, PosthocFit, ReportData)
from nnunet_calibration.experiments.status import fold_statuses, training_history, training_progress
from nnunet_calibration.metrics import BinStats, CalibrationAccumulator
from nnunet_calibration.posthoc import scaling
from nnunet_calibration.posthoc.model import per_fold_scope
from nnunet_calibration.settings import Experiment, ExperimentError, MetricOptions, SettingsError, TrainerEntry


# -- machine -------------------------------------------------------------------------------------
def machine_info() -> dict:
    """Date, platform, CPU, and versions of torch, nnU-Net, numpy, scipy and this package."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpu_count": os.cpu_count()}
    for mod, key in (("torch", "torch"), ("nnunetv2", "nnunetv2"), ("numpy", "numpy"), ("scipy", "scipy"),
                     ("nnunet-calibration", "nnunet_calibration")):
        try:
            info[key] = version(mod)
        except PackageNotFoundError:
            pass
    info.setdefault("nnunet_calibration", __version__)  # not installed (a checkout on PYTHONPATH)
    try:
        import torch  # deferred on purpose: heavy, and only for the GPU name

        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    except Exception as e:  # pragma: no cover - torch is a dependency
        info["cuda"] = f"unknown ({e})"
    return info


# -- reading one case ----------------------------------------------------------------------------
class DatasetInfo:
    """The preprocessed dataset's references and label layout (through the evaluator's ``label_info``)."""

    def __init__(self, exp: Experiment):
        pre = exp.nnunet_folder("preprocessed") / exp.dataset_name
        self.dataset_json_path = pre / "dataset.json"
        try:
            self.dataset_json = json.loads(self.dataset_json_path.read_text())
            lm, self.class_names, regions = label_info(self.dataset_json, str(self.dataset_json_path))
        except (OSError, ValueError) as e:
            raise ExperimentError(f"cannot read {self.dataset_json_path}: {e}") from None
        self.gt_folder = pre / "gt_segmentations"
        if not self.gt_folder.is_dir():
            raise ExperimentError(f"reference folder {self.gt_folder} missing (was the dataset preprocessed?)")
        self.file_ending = self.dataset_json["file_ending"]
        self.regions = [tuple(r) for r in regions] if regions else None
        self.has_regions = self.regions is not None
        self.ignore_label = lm.ignore_label
        self.label_manager = lm
        try:
            self.reader = reader_writer(self.dataset_json)
        except EvaluationInputError as e:
            raise ExperimentError(f"{self.dataset_json_path}: {e}") from None

    def reference(self, case: str, shape: tuple) -> np.ndarray:
        f = self.gt_folder / f"{case}{self.file_ending}"
        if not f.is_file():
            raise ExperimentError(f"no reference {f} for case {case}")
        try:
            arr, _ = load_reference(f, self.reader)
        except EvaluationInputError as e:
            raise ExperimentError(str(e)) from None
        if tuple(shape) == (1, *arr.shape):  # nnU-Net stores a 2D image's probabilities as (C, 1, y, x)
            arr = arr[None]
        if arr.shape != tuple(shape):  # never reshaped: another axis order with the same size is an error
            raise ExperimentError(f"reference {f} has shape {arr.shape}, its probabilities have {tuple(shape)}")
        return arr.astype(np.int16)


def load_probs(npz: Path) -> np.ndarray:
    try:
        return load_probabilities(npz)
    except EvaluationInputError as e:
        raise ExperimentError(f"cannot read probabilities from {npz}: {e}") from None


# -- evaluating one folder -----------------------------------------------------------------------
def evaluate(folder: Path, info: DatasetInfo, out_dir: Path, exp: Experiment) -> dict:
    """The evaluator's summary of one folder (also written to ``out_dir/summary.json``)."""
    # the evaluator requires a prediction for every expected case: here the fold's validation cases
    fold_dir = folder.parent if folder.name == "validation" else folder
    splits = info.gt_folder.parent / "splits_final.json"
    try:
        cases = validation_cases(splits, int(fold_dir.name.split("_")[-1])) if splits.is_file() else None
        # write=False: the evaluator's per-class PNGs of every fold are not needed here; its summary is kept
        summary = evaluate_folders([str(folder)], str(info.gt_folder), str(info.dataset_json_path), str(out_dir),
                                   num_processes=exp.evaluation.num_processes, progress=False, write=False,
                                   cases=cases, allow_missing=cases is None, options=exp.evaluation.options)
    except (EvaluationInputError, TypeError, ValueError) as e:
        raise ExperimentError(f"evaluating {folder} failed: {e}") from e
    _write_summary(out_dir, summary)
    return summary


def _write_summary(out_dir: Path, summary: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def fold_means(summary: dict) -> dict:
    """The fold's table values: the evaluator's means over its cases (a key the summary lacks, e.g. ``SCE``
    in a summary written before it existed: NaN), the ``AURC`` (:func:`~nnunet_calibration.evaluation.scores.default_aurc`)
    and the per-class ``SCE_<class>`` means."""
    mean = summary["mean"]
    out = {m: _float(mean.get(m)) for m in METRICS if m not in PP_COLUMNS and m not in FOLD_ONLY}
    out["AURC"] = default_aurc(summary)
    out.update({k: _float(v) for k, v in mean.items() if k.startswith(SCE_CLASS_PREFIX)})
    return out


def case_values(summary: dict, fold: int) -> dict:
    return {c["case"]: dict({m: _float(c["metrics"].get(CASE_KEYS.get(m, m))) for m in METRICS
                             if m not in PP_COLUMNS and m not in FOLD_ONLY}, fold=fold)
            for c in summary["cases"]}


def metric_options(summary: dict, where: str = "summary.json") -> MetricOptions:
    """The options the evaluator used, read back from its summary's ``config`` (never re-defaulted). A key
    the summary lacks (written before that option existed) takes its default, which is what the evaluator
    of that time computed; a value out of range is an error naming ``where``."""
    config = summary.get("config") or {}
    try:
        return MetricOptions.from_mapping({k: config[k] for k in MetricOptions.keys() if k in config},
                                          f"{where}: config")
    except SettingsError as e:
        raise ExperimentError(str(e)) from None


def _accumulator(summary: dict, info: DatasetInfo) -> CalibrationAccumulator:
    """An accumulator with the options the evaluator used (:func:`metric_options`)."""
    return CalibrationAccumulator(metric_options(summary), regions=info.has_regions, region_labels=info.regions,
                                  ignore_index=info.ignore_label)


def _finish(rec: MethodResult, acc: CalibrationAccumulator) -> None:
    """The row's pooled metrics and reliability statistics (the ECE column's equal-width bins; with
    ``binning: adaptive`` none, so no reliability diagram: equal-mass bins have no common edges)."""
    if acc.stats is not None:
        rec.reliability = acc.stats["ece"] if isinstance(acc.stats["ece"], BinStats) else None
        rec.pooled = acc.compute()


# -- one trainer ---------------------------------------------------------------------------------
def _validation_npz(exp: Experiment, spec: TrainerEntry, fold: int) -> list[Path]:
    return sorted((fold_folder(exp, spec, fold) / "validation").glob("*.npz"))


def _evaluation_name(spec: TrainerEntry, kind: str) -> str:
    """Folder of a row's evaluator summaries below ``evaluation/<experiment>/``: the label, ``<label>+TS`` ..."""
    return spec.label if kind == "trainer" else f"{spec.label}+{kind}"


def _evaluation_dir(work: Path, exp: Experiment, name: str, fold: int) -> Path:
    """Where the summary of fold ``fold`` of the row whose :func:`_evaluation_name` is ``name`` is kept."""
    return work / "evaluation" / exp.name / name / f"fold_{fold}"


def _evaluate_folds(exp: Experiment, spec: TrainerEntry, info: DatasetInfo, rec: MethodResult, work: Path) -> dict:
    """Step 1: the evaluator on each present fold; fills the row's fold means, cases and training times."""
    summaries = {}
    for f in rec.folds:
        summaries[f] = evaluate(fold_folder(exp, spec, f) / "validation", info,
                                _evaluation_dir(work, exp, _evaluation_name(spec, "trainer"), f), exp)
        rec.fold_means[f] = fold_means(summaries[f])
        rec.cases.update(case_values(summaries[f], f))
        prog = training_progress(fold_folder(exp, spec, f))
        if prog["epoch_time"] is not None:
            rec.train_seconds[f] = prog["epoch_time"] * prog["epoch"]
        rec.history[f] = training_history(fold_folder(exp, spec, f))
    return summaries


def _postprocessed(exp: Experiment, spec: TrainerEntry, info: DatasetInfo, rec: MethodResult, work: Path) -> None:
    """The +PP columns of a trainer row (:mod:`.postprocessing`): per case, and per fold the mean over its cases."""
    segs = {f: sorted((fold_folder(exp, spec, f) / "validation").glob(f"*{info.file_ending}")) for f in rec.folds}
    per_case, chosen, cross = crossfit_postprocessing(segs, info, model_folder(exp, spec) / "plans.json", work)
    for case, vals in per_case.items():
        rec.cases.setdefault(case, {"fold": vals["fold"]}).update({k: vals[k] for k in PP_COLUMNS})
    for f in rec.folds:
        for col in PP_COLUMNS:
            rec.fold_means[f][col] = float(np.mean([v[col] for v in per_case.values() if v["fold"] == f]))
    rec.postprocessing, rec.postprocessing_cross_fitted = chosen, cross


def _probability_pass(exp: Experiment, spec: TrainerEntry, info: DatasetInfo, rec: MethodResult, acc, fit: bool,
                      rng_seed: int, progress: bool) -> tuple[dict, int]:
    """Step 2: one pass over the probabilities: reliability statistics, threshold-sweep counts and (``fit``)
    the voxel samples per fold. Returns ``({fold: (log_probs, targets)}, number of channels)``."""
    files = [(f, npz) for f in rec.folds for npz in _validation_npz(exp, spec, f)]
    rng = np.random.default_rng(rng_seed)
    per_case = max(1, exp.report.max_fit_voxels // max(1, len(files)))
    samples = {f: ([], []) for f in rec.folds}
    n_channels = 0
    for f, npz in tqdm(files, desc=f"{spec.label}: probabilities", disable=not progress, unit="case"):
        p = load_probs(npz)
        n_channels = p.shape[0]
        y = info.reference(npz.stem, p.shape[1:])
        acc.update(p, y)
        if exp.report.threshold_sweep:
            valid = y != info.ignore_label if info.ignore_label is not None else np.ones(y.shape, bool)
            rec.sweep_counts.append(posthoc.threshold_counts(
                posthoc.foreground_probability(p, info.regions)[valid],
                posthoc.foreground_reference(y, info.regions)[valid]))
        if fit:
            sp, sy = posthoc.sample_voxels(p, y, per_case, rng, info.regions, info.ignore_label)
            samples[f][0].append(scaling.log_probabilities(sp, bool(info.regions)))
            samples[f][1].append(sy)
    _finish(rec, acc)
    per_fold = {f: (np.concatenate(lp), np.concatenate(y)) for f, (lp, y) in samples.items()} if fit else {}
    return per_fold, n_channels


def _posthoc_row(exp: Experiment, spec: TrainerEntry, info: DatasetInfo, rec: MethodResult, kind: str,
                 per_fold: dict, summary: dict, work: Path, progress: bool) -> MethodResult:
    """Step 3: a ``+ TS`` / ``+ VS`` row: cross-fitted parameters applied fold by fold to temporary copies
    of the probabilities (removed afterwards), scored by the evaluator."""
    method = tables.SCALINGS[kind].method
    params, cross = scaling.crossfit(per_fold, info.has_regions, method)
    n_fit = {k: int(sum(len(per_fold[f][1]) for f in per_fold if f != k or not cross)) for k in params}
    fit = PosthocFit(method=method, per_fold=params, all_folds=scaling.fit_all(per_fold, info.has_regions, method),
                     fit_voxels=n_fit, cross_fitted=cross, scope=per_fold_scope(sorted(per_fold)))
    row = MethodResult(method=spec.label + SUFFIX[kind], trainer=spec.name, kind=kind, hparams=rec.hparams,
                       folds=rec.folds, missing_folds=rec.missing_folds, fit=fit)
    acc = _accumulator(summary, info)
    scaled_root = work / ".scaled"
    try:
        for f in rec.folds:
            scaled = scaled_root / spec.label / kind / f"fold_{f}"
            scaled.mkdir(parents=True, exist_ok=True)
            for npz in tqdm(_validation_npz(exp, spec, f), disable=not progress, desc=f"{row.method}: fold {f}",
                            unit="case"):
                q = scaling.apply_scaling(load_probs(npz), params[f], info.has_regions)
                np.savez(scaled / npz.name, probabilities=q)
                if npz.with_suffix(".pkl").is_file():  # nnU-Net's properties: the evaluator checks geometry
                    shutil.copy2(npz.with_suffix(".pkl"), scaled / npz.with_suffix(".pkl").name)
                acc.update(q, info.reference(npz.stem, q.shape[1:]))
            summ = evaluate(scaled, info, _evaluation_dir(work, exp, _evaluation_name(spec, kind), f), exp)
            row.fold_means[f] = fold_means(summ)
            row.cases.update(case_values(summ, f))
    finally:
        shutil.rmtree(scaled_root, ignore_errors=True)  # the scaled copies leave nothing behind
    _finish(row, acc)
    return row


def repeat_of(exp: Experiment, spec: TrainerEntry) -> str | None:
    """For a repeated run (``run`` > 1): the label of the run-1 entry with the same trainer and
    hyperparameters (the method it repeats); None otherwise."""
    if spec.run == 1:
        return None
    for t in exp.trainers:
        if t.run == 1 and t.name == spec.name and exp.hparams_for(t) == exp.hparams_for(spec):
            return t.label
    raise ExperimentError(f"{exp.path}: trainer {spec.label} is run {spec.run} of {spec.name} with "
                          f"{exp.hparams_for(spec)}, but no entry is its run 1")


def _present(exp: Experiment, spec: TrainerEntry) -> list[int]:
    """The entry's folds finished here with their validation probabilities."""
    return [f for f in exp.folds_for(spec) if fold_state(exp, spec, f) == FoldStatus.FINISHED and has_npz(exp, spec, f)]


def gather_method(exp: Experiment, spec: TrainerEntry, info: DatasetInfo, work: Path, rng_seed: int = 0,
                  progress: bool = True) -> list[MethodResult]:
    """Evaluate one trainer and its post-hoc rows. Returns the trainer's row, then ``+ TS`` / ``+ VS``.

    An entry whose folds are not all here but which is archived (``report.archive``) is read from its
    archive instead: its rows, and the evaluator's summaries written to ``work/evaluation/``."""
    present = _present(exp, spec)
    if len(present) < len(exp.folds_for(spec)) and archived(exp, spec):
        rows, evaluations = archive.load_rows(exp, spec)
        for name, per_fold in evaluations.items():
            for f, summ in per_fold.items():
                _write_summary(_evaluation_dir(work, exp, name, f), summ)
        return rows
    rec = MethodResult(method=spec.label, trainer=spec.name, hparams=exp.hparams_for(spec), folds=present,
                       missing_folds=[f for f in exp.folds_for(spec) if f not in present], run=spec.run,
                       repeat_of=repeat_of(exp, spec))
    if not present:
        return [rec]
    summaries = _evaluate_folds(exp, spec, info, rec, work)
    if rec.repeat_of is not None:  # a repeated run measures the noise: its fold values are all that is used
        return [rec]
    kinds = [k for k, on in (("TS", exp.report.temperature_scaling), ("VS", exp.report.vector_scaling)) if on]
    if exp.report.postprocessing:
        _postprocessed(exp, spec, info, rec, work)
    per_fold, n_channels = _probability_pass(exp, spec, info, rec, _accumulator(summaries[present[0]], info),
                                             bool(kinds), rng_seed, progress)
    if "VS" in kinds and not tables.vector_scaling_differs(n_channels):
        kinds.remove("VS")
    return [rec] + [_posthoc_row(exp, spec, info, rec, kind, per_fold, summaries[present[0]], work, progress)
                    for kind in kinds]


def write_entry_archive(exp: Experiment, spec: TrainerEntry, rows: list, work: Path) -> Path:
    """Write the archive of ``spec`` (:mod:`nnunet_calibration.experiments.report.archive`) from its gathered ``rows``
    and the evaluator's summaries :func:`gather_method` wrote below ``work``; returns the file."""
    evaluations = {}
    for row in rows:
        name = _evaluation_name(spec, row.kind)
        for f in row.folds:
            summ = _evaluation_dir(work, exp, name, f) / "summary.json"
            evaluations.setdefault(name, {})[f] = json.loads(summ.read_text())
    records = {f: read_record(fold_folder(exp, spec, f)) for f in exp.folds_for(spec)}
    return archive.write_archive(exp, spec, rows, evaluations, {f: r for f, r in records.items() if r})


def _complete_here(exp: Experiment, spec: TrainerEntry) -> bool:
    return len(_present(exp, spec)) == len(exp.folds_for(spec))


def archive_entry(exp: Experiment, spec: TrainerEntry, progress: bool = False) -> Path:
    """Evaluate ``spec`` (every fold finished here) as the report does and write its archive; returns the file."""
    missing = [f for f in exp.folds_for(spec) if f not in _present(exp, spec)]
    if missing:
        raise ExperimentError(f"{spec.label}: folds {missing} are not finished here (with --npz probabilities): "
                              f"nothing to archive yet")
    folder = archive_file(exp, spec).parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".calib_archive_", dir=folder) as tmp:
        rows = gather_method(exp, spec, DatasetInfo(exp), Path(tmp), progress=progress)
        return write_entry_archive(exp, spec, rows, Path(tmp))


def archive_finished(exp: Experiment, labels=None, force: bool = False, progress: bool = False) -> dict:
    """Archive every entry (or those of ``labels``) whose folds are all finished here and that is not
    archived yet (``force``: again). Returns ``{label: archive file}``; nothing without ``report.archive``."""
    out = {}
    if not exp.report.archive:
        return out
    for spec in exp.trainers:
        if labels is not None and spec.label not in labels:
            continue
        if (force or not archived(exp, spec)) and _complete_here(exp, spec):
            out[spec.label] = archive_entry(exp, spec, progress)
    return out


def missing_details(exp: Experiment, spec: TrainerEntry, folds: list[int]) -> list[dict]:
    """Status and log of each missing fold (``calib-experiment status``)."""
    if not folds:
        return []
    try:
        rows = fold_statuses(exp)
    except Exception as e:  # status must never hide the table
        return [{"fold": f, "status": "unknown", "detail": str(e), "log": ""} for f in folds]
    return [r for r in rows if r["label"] == spec.label and r["fold"] in folds]


# -- everything ----------------------------------------------------------------------------------
def gather(experiments: list[Experiment], work: Path, name: str, command: str | None = None,
           progress: bool = True) -> ReportData:
    """Evaluate every experiment's trainers into a :class:`ReportData` (evaluator summaries into ``work``)."""
    rank_metrics = experiments[0].report.ranked
    results = []
    for exp in experiments:
        info = DatasetInfo(exp)
        methods = []
        for spec in exp.trainers:
            recs = gather_method(exp, spec, info, work, progress=progress)
            if exp.report.archive and not archived(exp, spec) and _complete_here(exp, spec):
                write_entry_archive(exp, spec, recs, work)  # e.g. the report job of a SLURM run
            recs[0].missing_info = missing_details(exp, spec, recs[0].missing_folds)
            methods += recs
        results.append(ExperimentResult(
            name=exp.name, dataset=exp.dataset_name, configuration=exp.configuration, plans=exp.plans,
            folds=list(exp.folds), baseline=exp.baseline_label, methods=methods, path=str(exp.path),
            training=exp.training.overrides(), note=exp.report.note, regions=info.has_regions,
            learned_dsc=exp.report.learned_dsc, classes=list(info.class_names),
            trainers=[{"label": t.label, "trainer": t.name, "hparams": exp.hparams_for(t),
                       "nnUNet_results": str(results_root(exp, t))} for t in exp.trainers]))
    return ReportData(name=name, experiments=results, rank_metrics=rank_metrics, command=command,
                      machine=machine_info())
