"""Rendering: the report's ``README.md``, ``table.csv``, ``wilcoxon.csv``, ``threshold_sweep.csv`` and
``report.json`` from a :class:`~.data.ReportData` and its :class:`~.tables.Tables` (numbers are
computed in :mod:`.tables`; nothing is computed here except formatting).

Formatting: 3 decimals (HD95: 2), ``mean ± std`` over folds, ``—`` for undefined; best **bold**,
second <u>underlined</u> (CSV: ``<block>_mark`` = ``best`` / ``second``); p-values < 0.001 in
scientific notation. CSV numbers are ``repr(float)`` (full precision), empty when undefined; JSON
goes through :func:`nnunet_calibration.utils.json_clean` (NaN -> null).
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np

from nnunet_calibration.experiments.report.data import METRICS, ExperimentResult, ReportData
from nnunet_calibration.experiments.report import noise
from nnunet_calibration.experiments.report.tables import Tables
from nnunet_calibration.evaluation.scores import DEFAULT_SCORE
from nnunet_calibration.utils import json_clean

DECIMALS = {"HD95": 2}
SWEEP_SHOWN = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


# -- formatting ----------------------------------------------------------------------------------
def fmt(v, metric: str, std=None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    d = DECIMALS.get(metric, 3)
    s = f"{v:.{d}f}"
    if std is not None and math.isfinite(std):
        s += f" ± {std:.{d}f}"
    return s


def fmt_p(p) -> str:
    if p is None:
        return "—"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


def fmt_params(params) -> str:
    a = np.atleast_1d(np.asarray(params, dtype=float))
    return ", ".join(f"{x:.3f}" for x in a) if a.size > 1 else f"{a[0]:.3f}"


def csvnum(v) -> str:
    if v is None:
        return ""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "" if not math.isfinite(f) else repr(f)


def md_table(header: list, rows: list) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _marked(text: str, mark: str) -> str:
    if text == "—" or not mark:
        return text
    return f"**{text}**" if mark == "best" else f"<u>{text}</u>"


def folds_cell(present: list, missing: list, n_expected: int) -> str:
    s = f"{len(present)}/{n_expected}"
    return s + (f" (missing {', '.join(map(str, missing))})" if missing else "")


# -- CSV -----------------------------------------------------------------------------------------
def write_csvs(data: ReportData, tab: Tables, folder: Path) -> None:
    with open(folder / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        header = ["method"]
        for e in data.experiments:
            header += [f"{e.name}/folds", f"{e.name}/missing_folds"]
            for metric in list(METRICS) + tab.class_columns.get(e.name, []):
                header += [f"{e.name}/{metric}", f"{e.name}/{metric}_std", f"{e.name}/{metric}_mark"]
        w.writerow(header + ["friedman_rank", "friedman_position"])
        for meth in tab.method_order:
            row = [meth]
            for e in data.experiments:
                present, missing = tab.folds[meth].get(e.name, ([], list(e.folds)))
                row += [" ".join(map(str, present)), " ".join(map(str, missing))]
                for metric in list(METRICS) + tab.class_columns.get(e.name, []):
                    b = f"{e.name}/{metric}"
                    row += [csvnum(tab.mean[meth].get(b)), csvnum(tab.std[meth].get(b)), tab.mark(meth, b)]
            w.writerow(row + [csvnum(tab.avg_rank.get(meth)), tab.position.get(meth, "")])
    with open(folder / "wilcoxon.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["experiment", "baseline", "method", "metric", "n_cases", "statistic", "pvalue",
                    "median_diff_vs_baseline", "note"])
        for e in data.experiments:
            for meth, per in tab.wilcoxon.get(e.name, {}).items():
                for metric, r in per.items():
                    w.writerow([e.name, e.baseline, meth, metric, r["n"], csvnum(r["statistic"]),
                                csvnum(r["pvalue"]), csvnum(r["median_diff"]), r["note"]])
    with open(folder / "threshold_sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["experiment", "method", "threshold", "n_cases", "precision", "precision_std", "recall",
                    "recall_std", "DSC", "DSC_std"])
        for ename, per in tab.sweeps.items():
            for meth, rows in per.items():
                for r in rows:
                    w.writerow([ename, meth, f"{r['threshold']:.2f}", r["n_cases"]] +
                               [csvnum(r[k]) for k in ("precision", "precision_std", "recall", "recall_std", "DSC",
                                                        "DSC_std")])


# -- JSON ----------------------------------------------------------------------------------------
def posthoc_json(e: ExperimentResult) -> dict:
    """Per post-hoc row: method, cross-fitted parameters per fold, in-sample parameters, voxels."""
    out = {}
    for m in e.methods:
        if m.fit is None:
            continue
        f = m.fit
        rec = {"method": f.method, "cross_fitted": f.cross_fitted,
               "per_fold": {str(k): v for k, v in f.per_fold.items()},
               "fit_voxels": {str(k): v for k, v in f.fit_voxels.items()},
               "all_folds_in_sample": f.all_folds, "folds": m.folds, "scope": f.scope}
        if f.method == "temperature":
            rec["temperature"] = f.all_folds  # the single temperature to apply to new predictions
        out[m.method] = rec
    return out


def report_json(data: ReportData, tab: Tables) -> dict:
    return json_clean({
        "name": data.name, "command": data.command, "machine": data.machine, "metrics": list(METRICS),
        "rank_metrics": list(tab.rank_metrics), "class_columns": tab.class_columns,
        "experiments": [{"name": e.name, "file": e.path, "copy": e.copy, "dataset": e.dataset, "configuration": e.configuration,
                         "plans": e.plans, "folds": e.folds, "baseline": e.baseline, "training": e.training,
                         "trainers": e.trainers} for e in data.experiments],
        "table": {m: {"mean": tab.mean[m], "std": tab.std[m],
                      "folds": {k: {"present": v[0], "missing": v[1]} for k, v in tab.folds[m].items()}}
                  for m in tab.method_order},
        "fold_means": {e.name: {m.method: {str(f): v for f, v in m.fold_means.items()} for m in e.methods}
                       for e in data.experiments},
        "training_seconds": {e.name: {m.method: {str(f): v for f, v in m.train_seconds.items()}
                                      for m in e.methods if m.train_seconds} for e in data.experiments},
        "pooled": {e.name: {m.method: m.pooled for m in e.methods if m.pooled} for e in data.experiments},
        "friedman": {"average_rank": tab.avg_rank, "position": tab.position, "test": tab.friedman},
        "wilcoxon": tab.wilcoxon,
        "noise_floor": tab.noise, "differences": tab.differences, "convergence": tab.convergence,
        "temperature_scaling": {e.name: posthoc_json(e) for e in data.experiments},
        "threshold_sweep": tab.sweeps,
        "missing": {e.name: {m.method: m.missing_info for m in e.methods if m.missing_folds and m.kind == "trainer"}
                    for e in data.experiments},
    })


def write_json(data: ReportData, tab: Tables, folder: Path) -> None:
    (folder / "report.json").write_text(json.dumps(report_json(data, tab), indent=2, allow_nan=False))


# -- markdown ------------------------------------------------------------------------------------
def _md_header(data: ReportData) -> list:
    L = [f"# Calibration report: {data.name}", "", "Made by `calib-experiment report` (nnunet-calibration).", ""]
    for e in data.experiments:
        if e.note:
            L += [f"> **Note ({e.name})**: {e.note}", ""]
    if data.command:
        L += ["Command:", "", "```", data.command, "```", ""]
    L += ["Machine: " + "; ".join(f"{k} {v}" for k, v in data.machine.items()), ""]
    for e in data.experiments:
        L.append(f"- **{e.name}**: {e.dataset}, configuration `{e.configuration}`, plans `{e.plans}`, "
                 f"folds {list(e.folds)}, training {e.training or 'nnU-Net defaults'}, "
                 f"baseline `{e.baseline}`, experiment file `{e.path}`"
                 + (f" (copied here as [`{e.copy}`]({e.copy}))" if e.copy else ""))
    return L + [""]


def _md_results(data: ReportData, tab: Tables) -> list:
    multi = data.multi
    L = ["## Results (validation folds)", "",
         "Mean over folds ± standard deviation over folds (each fold: the evaluator's mean over its cases). "
         "DSC ↑, SCE → 0, all other metrics ↓. **Bold**: best, <u>underlined</u>: second best per column. "
         f"Rank: Friedman average rank over {', '.join(tab.rank_metrics)}" + (" and experiments" if multi else "")
         + " (position in brackets). Rows `+ TS` / `+ VS`: the trainer above after temperature / vector "
         "(per-channel temperature) scaling, **cross-fitted**: fold k is scored with the parameters fitted on "
         "the other folds' validation cases (see \"Post-hoc scaling\"); scope **per fold**: fitted on and for "
         "single-fold predictions, not for the fold ensemble. Columns `DSC+PP` / `HD95+PP`: the "
         "same segmentations after nnU-Net's own postprocessing (keep the largest connected component where "
         "`nnUNetv2_determine_postprocessing` finds that it raises the Dice), **cross-fitted** likewise (see "
         "\"Postprocessing\"); every other column is without postprocessing. `SCE`: signed class-wise "
         "calibration error, mean over classes of (mean probability − observed frequency) on CECE's voxels: "
         "**> 0 over-confident, < 0 under-confident**, closest to 0 marked best (per class: `table.csv`). "
         f"`AURC`: area under the risk-coverage curve of the case score `{DEFAULT_SCORE}` against the risk "
         "1 − DSC (lower: the score ranks the bad cases last; summary.json `risk_coverage`).", ""]
    header = ["Method"] if multi else ["Method", "Folds"]
    for e in data.experiments:
        if multi:
            header.append(f"{e.name} folds")
        header += [f"{e.name} {m}" if multi else m for m in METRICS]
    header.append("Rank")
    rows = []
    for meth in tab.method_order:
        row = [meth.replace("|", "/")]
        for e in data.experiments:
            present, missing = tab.folds[meth].get(e.name, ([], list(e.folds)))
            row.append(folds_cell(present, missing, len(e.folds)))
            for metric in METRICS:
                b = f"{e.name}/{metric}"
                row.append(_marked(fmt(tab.mean[meth].get(b), metric, tab.std[meth].get(b)), tab.mark(meth, b)))
        r = tab.avg_rank.get(meth)
        row.append(f"{r:.2f} ({tab.position[meth]})" if r is not None and math.isfinite(r) else "—")
        rows.append(row)
    L += [md_table(header, rows), ""]
    ft = tab.friedman
    if ft["pvalue"] is not None:
        L += [f"Friedman test over {ft['n_methods']} methods and {ft['n_blocks']} metric columns: "
              f"χ² = {ft['statistic']:.3f}, p = {fmt_p(ft['pvalue'])} (scipy.stats.friedmanchisquare).", ""]
    else:
        L += [ft["note"] + ".", ""]
    miss = []
    for e in data.experiments:
        for m in e.methods:
            for r in m.missing_info:
                miss.append(f"- {e.name} / {m.method} fold {r['fold']}: **{r['status']}** "
                            f"{r.get('detail', '')} " + (f"log: `{r['log']}`" if r.get("log") else ""))
    if miss:
        L += ["### Missing folds", "", "These folds are not in the means above:", ""] + miss + [""]
    return L


def _md_wilcoxon(data: ReportData, tab: Tables) -> list:
    L = ["## Wilcoxon signed-rank tests against the baseline", "",
         "Two-sided, paired over per-case values of all validation folds (cases both methods have); "
         "cell: p-value (median of method − baseline, n cases).", ""]
    for e in data.experiments:
        per = tab.wilcoxon.get(e.name)
        if not per:
            L += [f"{e.name}: no baseline trainer with results in the experiment; no tests.", ""]
            continue
        if data.multi:
            L += [f"**{e.name}**", ""]
        rows = []
        for meth, mm in per.items():
            row = [meth]
            for metric in METRICS:
                r = mm[metric]
                row.append(f"— ({r['note']}, n={r['n']})" if r["pvalue"] is None else
                           f"{fmt_p(r['pvalue'])} ({r['median_diff']:+.3g}, n={r['n']})")
            rows.append(row)
        L += [f"Baseline: `{e.baseline}`", "", md_table(["Method"] + list(METRICS), rows), ""]
    return L


def _md_noise(data: ReportData, tab: Tables, plots: dict) -> list:
    """Run-to-run noise, differences to the baseline with their verdict, and convergence (:mod:`.noise`)."""
    L = ["## Run-to-run noise, differences to the baseline, convergence", "",
         "Noise floor: repeated trainings of the same method and fold (entries with `run` > 1, not rows of the "
         "table) give the run-to-run standard deviation `sd_run` of one fold's value; a difference of two "
         f"means over n folds has the noise floor {noise.NOISE_SIGMAS:g} × sd_run × √(2/n). A method is called "
         f"**better** / **worse** only where the paired per-case Wilcoxon test gives p < {noise.ALPHA} *and* "
         "the difference exceeds the noise floor; otherwise *not distinguishable*.", ""]
    for e in data.experiments:
        if data.multi:
            L += [f"**{e.name}**", ""]
        fl = tab.noise.get(e.name) or {}
        if fl:
            some = next(iter(fl.values()))
            L += [f"sd_run from {some['pairs']} (method, fold) pairs of {', '.join(f'`{m}`' for m in some['methods'])}:",
                  "", md_table(list(METRICS), [[fmt(fl.get(m, {}).get("sd_run"), m) for m in METRICS]]), ""]
        else:
            L += ["No repeated runs: no noise floor, so no verdicts (only the tests below).", ""]
        diffs = tab.differences.get(e.name) or {}
        rows = []
        for meth, per in diffs.items():
            row = [meth]
            for metric in METRICS:
                d = per[metric]
                if not math.isfinite(d["diff"]):  # a column the method has not (e.g. +PP of a scaling row)
                    row.append("—")
                    continue
                floor = "" if d["noise_floor"] is None else f" (±{fmt(d['noise_floor'], metric)})"
                row.append(f"{d['diff']:+.3g}{floor} p {fmt_p(d['p'])} **{d['verdict']}**"
                           if d["verdict"] in ("better", "worse") else
                           f"{d['diff']:+.3g}{floor} p {fmt_p(d['p'])} {d['verdict']}")
            rows.append(row)
        if rows:
            L += [f"Difference to `{e.baseline}` (method − baseline; noise floor in brackets):", "",
                  md_table(["Method"] + list(METRICS), rows), ""]
        ok = noise.learned(e)
        if ok:
            L += [f"Did the baseline learn at this budget? `{ok['method']}`'s validation DSC per fold: "
                  + ", ".join(f"fold {f} {v:.3f}" for f, v in ok["folds"].items())
                  + (f": **yes**, every fold reached {ok['threshold']:g}." if ok["learned"] else
                     f": **no**, not every fold reached {ok['threshold']:g}."), ""]
        conv = tab.convergence.get(e.name)
        if conv:
            L += [f"Convergence: `{conv['method']}`'s pseudo-Dice (mean of classes and folds) over its last epochs "
                  f"{conv['epochs'][0]}–{conv['epochs'][1]} went from {conv['start']:.3f} to {conv['end']:.3f} "
                  f"(least-squares rise {conv['rise']:+.3f}): "
                  + ("**still rising** (more than 0.01): the budget ends before the baseline converged."
                     if conv["still_rising"] else "no longer rising (rise ≤ 0.01)."), ""]
        if "learning_curves" in plots.get(e.name, {}):
            L += [f"![learning curves]({plots[e.name]['learning_curves']})", ""]
    return L


def _md_postprocessing(data: ReportData) -> list:
    rows = []
    for e in data.experiments:
        for m in e.methods:
            if m.postprocessing:
                per = "; ".join(f"fold {k}: {', '.join(v) or 'nothing'}" for k, v in sorted(m.postprocessing.items()))
                rows.append([e.name, m.method, "cross-fitted" if m.postprocessing_cross_fitted else
                             "*in-sample* (one fold)", per])
    if not rows:
        return []
    return ["## Postprocessing (the +PP columns)", "",
            "nnU-Net's `determine_postprocessing` run on the validation segmentations of the trainer's *other* "
            "folds, its choice applied to fold k (with one fold: decided on that fold, *in-sample*).", "",
            md_table(["Experiment", "Trainer", "decided", "applied to each fold"], rows), ""]


def _md_posthoc(data: ReportData) -> list:
    L = ["## Post-hoc scaling (cross-fitted)", "",
         "`+ TS`: one temperature T, softmax(log p / T) (regions: sigmoid(logit p / T)); `+ VS`: one temperature per "
         "channel (shown where it can differ from TS: more than one channel). Parameters minimise the NLL on a "
         "random voxel sample (fixed seed). **Cross-fitted**: the parameters applied to fold k are fitted on the "
         "other folds' validation voxels only, so no fold is scored with parameters fitted on itself (with a "
         "single fold there is nothing else to fit on: fitted on that fold, marked *in-sample*). Extra column "
         "*all folds (in-sample)*: fitted on every fold together, the value to apply to new predictions; it is "
         "not used for the table. T > 1: the trainer was over-confident. Column *scope*: which predictions the "
         "parameters are for, as `calib-calibrate fit` names it in `calibration.json`: here always the folds' own "
         "validation predictions (**per fold**); a calibration for the fold ensemble (averaged logits of all folds, "
         "less over-confident) is fitted with `calib-calibrate fit MODEL --predictions ENSEMBLE_PRED --gt GT` and "
         "is not what these rows measure.", ""]
    rows = []
    for e in data.experiments:
        for m in e.methods:
            if m.fit is None:
                continue
            f = m.fit
            per = "; ".join(f"fold {k}: {fmt_params(v)} ({f.fit_voxels[k]} vox)" for k, v in f.per_fold.items())
            rows.append([e.name, m.method, "cross-fitted" if f.cross_fitted else "*in-sample* (one fold)", per,
                         fmt_params(f.all_folds), f.scope])
    L += [md_table(["Experiment", "Row", "fit", "parameters per fold (fit voxels)", "all folds (in-sample)", "scope"],
                   rows)
          if rows else "(not computed)", ""]
    return L


def _md_sweep(data: ReportData, tab: Tables, plots: dict) -> list:
    if not tab.sweeps:
        return []
    L = ["## Softmax thresholding (DSC++ paper, Fig. 4)", "",
         "Foreground = 1 − p(background) (regions: largest region probability) ≥ threshold, against the reference "
         "foreground; precision / recall / DSC per case, mean over cases.", ""]
    shown = [round(x, 2) for x in SWEEP_SHOWN]
    for e in data.experiments:
        per = tab.sweeps.get(e.name)
        if not per:
            continue
        rows = []
        for meth, rs in per.items():
            for k in ("precision", "recall", "DSC"):
                rows.append([meth, k] + [fmt(r[k], k) for r in rs if round(r["threshold"], 2) in shown])
        if data.multi:
            L += [f"**{e.name}**", ""]
        L += [md_table(["Method", "score"] + [f"{t:.2f}" for t in shown], rows), ""]
        if "threshold_sweep" in plots.get(e.name, {}):
            L += [f"![threshold sweep]({plots[e.name]['threshold_sweep']})", ""]
        L += ["All thresholds 0.05–0.95: `threshold_sweep.csv`.", ""]
    return L


def training_time_rows(e: ExperimentResult) -> list:
    """Per trainer row: ``[method, folds with a time, mean minutes per fold, total minutes]``
    from ``MethodResult.train_seconds`` (sum of nnU-Net's logged epoch times per fold)."""
    rows = []
    for m in e.methods:
        if m.kind != "trainer" or not m.train_seconds:
            continue
        secs = list(m.train_seconds.values())
        rows.append([m.method, len(secs), sum(secs) / len(secs) / 60.0, sum(secs) / 60.0])
    return rows


def _md_training_time(data: ReportData) -> list:
    blocks = []
    for e in data.experiments:
        rows = training_time_rows(e)
        if not rows:
            continue
        total = sum(r[3] for r in rows)
        table = md_table(["Method", "folds", "minutes per fold (mean)", "minutes (all folds)"],
                         [[r[0], str(r[1]), f"{r[2]:.1f}", f"{r[3]:.1f}"] for r in rows])
        blocks += ([f"**{e.name}**", ""] if data.multi else []) + [
            table, "", f"Training time of all rows: {total:.0f} min ({total / 60:.1f} h) of process time "
            "(folds run side by side count separately; validation, export and evaluation not included).", ""]
    if not blocks:
        return []
    return ["## Training time", "",
            "Sum of nnU-Net's logged epoch times per fold (`training_log_*.txt`), on the machine above.", ""] + blocks


def _md_plots(data: ReportData, plots: dict) -> list:
    L = ["## Plots", "",
         "Reliability diagrams: the ECE column's bins pooled over all validation cases (foreground voxels; "
         "empty bins are not drawn; beneath: share of voxels per bin).", ""]
    for e in data.experiments:
        p = plots.get(e.name, {})
        for kind, alt in (("reliability", "reliability"), ("dsc_vs_ece", "DSC vs ECE")):
            if kind in p:
                L += [f"![{alt}]({p[kind]})", ""]
    L += ["Files: `table.csv`, `wilcoxon.csv`, `threshold_sweep.csv`, `report.json` (every number), "
          "`evaluation/` (the evaluator's summary.json per row and fold).", ""]
    return L


def markdown(data: ReportData, tab: Tables, plots: dict) -> str:
    """The report's README.md; ``plots``: the files :func:`.plots.write_plots` wrote (only those are linked)."""
    L = (_md_header(data) + _md_results(data, tab) + _md_noise(data, tab, plots) + _md_wilcoxon(data, tab)
         + _md_posthoc(data) + _md_postprocessing(data)
         + _md_sweep(data, tab, plots) + _md_training_time(data) + _md_plots(data, plots))
    return "\n".join(L)


def write_all(data: ReportData, tab: Tables, folder: Path, plots: dict) -> None:
    write_csvs(data, tab, folder)
    write_json(data, tab, folder)
    (folder / "README.md").write_text(markdown(data, tab, plots))
