"""``calib-experiment report``: the papers' table, ranks, tests, post-hoc scaling and plots.

:func:`make_report` runs four steps, one module each (where a report column is...):

=====================  ====================================================================
:mod:`.gather`         ...read: every finished fold's ``fold_X/validation`` scored by the
                       evaluator (:func:`nnunet_calibration.evaluation.evaluate_folders`),
                       reliability statistics (:class:`~nnunet_calibration.metrics.CalibrationAccumulator`),
                       sweep counts, fit samples, and the cross-fitted ``+ TS`` / ``+ VS`` rows
                       -> a typed :class:`.data.ReportData`
:mod:`.tables`         ...computed (pure functions): means/std over folds, best marks, Friedman
                       ranks and test, Wilcoxon tests, sweep summaries; the cross-fitting and the
                       one place where the post-hoc fit is chosen (:data:`.tables.SCALINGS`)
:mod:`.render`         ...rendered: ``README.md``, ``table.csv``, ``wilcoxon.csv``,
                       ``threshold_sweep.csv``, ``report.json``
:mod:`.plots`          ...plotted: ``reliability*.png``, ``dsc_vs_ece*.png``, ``threshold_sweep*.png``
:mod:`.archive`        ...kept: each finished trainer entry's rows and summaries as exact JSON
                       (``report.archive``), read back by :mod:`.gather` where the folds are gone
=====================  ====================================================================

Missing folds are never dropped silently: the ``Folds`` column shows ``present/expected``, and a
section lists each missing fold's status and log. A report without any finished fold is an error
(:class:`~nnunet_calibration.settings.ExperimentError`), and nothing is written.

Everything is written into a temporary folder next to the target and moved into place at the end
(:func:`nnunet_calibration.utils.atomic_dir`), so the report folder holds only what the report
writes, listed in its manifest (``.calib_report_manifest.json``); an existing folder is replaced only
when it holds nothing else (:func:`check_replaceable`: someone's files there stop the report); ``evaluation/<experiment>/<row>/fold_X/summary.json`` keeps the evaluator's summary of every
fold, and a copy of each experiment file (``experiment.yaml``, or ``experiment_<name>.yaml`` for a
combined report) records what was run. An experiment file kept inside its own report folder thus
survives a new report (as that copy); any other file there stops the report instead of being lost.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path

from nnunet_calibration.experiments.report import gather, plots, render, tables
from nnunet_calibration.experiments.report.data import (METRICS, ExperimentResult, MethodResult, PosthocFit,
                                                        ReportData)
from nnunet_calibration.settings import Experiment, ExperimentError
from nnunet_calibration.utils import atomic_dir, write_json_atomic

__all__ = ["make_report", "build_report", "ReportData", "ExperimentResult", "MethodResult", "PosthocFit",
           "METRICS"]


def build_report(data: ReportData, folder: Path) -> None:
    """Write the tables, plots and markdown of ``data`` into ``folder`` (no nnU-Net involved).

    Raises :class:`ExperimentError` when no row has a finished fold.
    """
    if not tables.has_results(data):
        lines = [f"{e.name}: {m.method} has no finished fold with validation probabilities (folds {e.folds})"
                 for e in data.experiments for m in e.methods]
        raise ExperimentError("nothing to report, no finished fold:\n  " + "\n  ".join(lines)
                              + "\n(see calib-experiment status)")
    tab = tables.compute_tables(data)
    written = plots.write_plots(data, tab, folder)
    render.write_all(data, tab, folder, written)


def make_report(experiments: list[Experiment], output_root: str | os.PathLike | None = None,
                command: str | None = None, name: str | None = None, progress: bool = True) -> Path:
    """Gather, evaluate and write the report; returns the report folder (``OUTPUT_ROOT/<name>``)."""
    if not experiments:
        raise ExperimentError("no experiment given")
    name = name or experiments[0].name
    target = (Path(output_root).resolve() / name) if output_root is not None else \
        experiments[0].report_dir().parent / name
    copies = experiment_copy_names([exp.name for exp in experiments])
    check_replaceable(target, set(copies.values()))
    with atomic_dir(target) as work:
        data = gather.gather(experiments, work, name, command=command, progress=progress)
        for e, exp in zip(data.experiments, experiments):
            e.copy = copies[exp.name]
            relative_paths(e, target)
        build_report(data, work)
        for exp in experiments:
            shutil.copyfile(exp.path, work / copies[exp.name])
        write_manifest(work)
    return target


#: the list of files a report wrote (in the report folder); only a folder whose every file is listed is replaced
MANIFEST = ".calib_report_manifest.json"
#: what a report wrote before it kept a manifest (reports made by earlier versions): top-level files, and the
#: evaluator's summaries at any depth below ``evaluation/`` (``evaluation/<experiment>/<method>/fold_<k>/``)
_LEGACY = ("README.md", "table.csv", "wilcoxon.csv", "threshold_sweep.csv", "report.json", "*.png", "experiment*.yaml")


def _legacy_report_file(rel: Path) -> bool:
    if rel.parts[0] == "evaluation":
        return rel.name == "summary.json"
    return len(rel.parts) == 1 and any(fnmatch.fnmatchcase(rel.name, g) for g in _LEGACY)


def write_manifest(folder: Path) -> None:
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    write_json_atomic(folder / MANIFEST, {"written_by": "calib-experiment report", "files": files})


def check_replaceable(target: Path, copies) -> None:
    """The report replaces its folder as a whole, so it only ever replaces a folder that holds nothing but
    what an earlier report wrote: every file listed in that report's manifest (or, for a report of an
    earlier version without one, a file of the report's own layout). Anything else there (someone's
    files) stops the report with an error naming them, and nothing is touched."""
    if not target.exists():
        return
    if not target.is_dir():
        raise ExperimentError(f"report folder {target} exists and is not a folder")
    files = [p for p in target.rglob("*") if p.is_file() and p.relative_to(target).as_posix() not in copies]
    if not files:
        return
    manifest = target / MANIFEST
    if manifest.is_file():
        try:
            owned = set(json.loads(manifest.read_text())["files"]) | {MANIFEST}
        except (OSError, ValueError, KeyError, TypeError):
            owned = set()
        foreign = [p for p in files if p.relative_to(target).as_posix() not in owned]
    elif (target / "report.json").is_file():
        foreign = [p for p in files if not _legacy_report_file(p.relative_to(target))]
    else:
        foreign = files
    if foreign:
        shown = ", ".join(str(p) for p in sorted(foreign)[:5]) + (" ..." if len(foreign) > 5 else "")
        raise ExperimentError(f"report folder {target} holds files no report wrote ({shown}); the report replaces "
                              f"its folder as a whole, so choose another --output-root or name, or move them")


def relative_paths(result: ExperimentResult, report_dir: Path) -> None:
    """Record the experiment file and the trainers' ``nnUNet_results`` relative to the report folder
    (a report names no path of the machine it was made on)."""
    result.path = os.path.relpath(result.path, report_dir)
    for t in result.trainers:
        t["nnUNet_results"] = os.path.relpath(t["nnUNet_results"], report_dir)


def experiment_copy_names(names: list[str]) -> dict:
    """File name of each experiment file's copy in the report, by experiment name: ``experiment.yaml``
    for a single experiment, ``experiment_<name>.yaml`` for each of a combined report."""
    if len(names) == 1:
        return {names[0]: "experiment.yaml"}
    return {name: f"experiment_{name}.yaml" for name in names}


def check_report_folder(target: Path, names: list[str]) -> None:
    """:func:`check_replaceable` for the report of the experiments ``names`` (before any training, e.g.
    by ``calib-demo``)."""
    check_replaceable(target, set(experiment_copy_names(names).values()))
