"""``calib-experiment report``: the papers' table, ranks, tests, post-hoc calibration and plots.

For every trainer of the experiment(s) each *finished* fold's ``fold_X/validation`` folder (the
``.npz`` probabilities nnU-Net writes with ``--npz``) is evaluated by
:func:`nnunet_calibration.evaluation.evaluate_folders` against
``nnUNet_preprocessed/DatasetXXX/gt_segmentations`` (the references nnU-Net validates against).

Numbers
-------
- A method's value for a metric = the mean over its folds of the fold's ``summary["mean"][metric]``
  (the evaluator's mean over that fold's cases); its spread = the sample standard deviation over
  folds (``ddof=1``; none with one fold). Metrics: DSC, HD95 (mean over foreground classes per case),
  ECE, CECE, pECE, mL1-ACE, NLL, Brier.
- Best and second best per column: **bold** and <u>underlined</u> in markdown (``best`` /
  ``second`` columns in the CSV); ties share the mark.
- Friedman average rank and test: :mod:`nnunet_calibration.experiments.stats` (blocks = every
  (dataset, metric) column; post-hoc rows "+ TS" are ranked as methods of their own).
- Wilcoxon signed-rank tests (two-sided, ``scipy.stats.wilcoxon``) of every method against the
  baseline (the DiceCE trainer unless the experiment names ``baseline``), per metric, paired over
  **per-case** values of all validation folds (cases both have); per-fold values would give at most
  five pairs, too few for a signed-rank test at the usual levels.
- Missing folds are never dropped silently: the ``Folds`` column shows ``present/expected`` and the
  missing folds, and a section lists each missing fold's status and log.
- Post-hoc calibration and the threshold sweep: :mod:`nnunet_calibration.experiments.posthoc`.

Output (written into a temporary folder next to the target, moved into place at the end):
``README.md`` (the report), ``table.csv``, ``wilcoxon.csv``, ``threshold_sweep.csv``,
``report.json`` (every number), ``reliability*.png``, ``dsc_vs_ece*.png``, ``threshold_sweep*.png``,
and ``evaluation/<experiment>/<method>/fold_X/summary.json`` (the evaluator's summary of that fold).
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np

from nnunet_calibration.experiments import posthoc, stats
from nnunet_calibration.experiments.config import Experiment, ExperimentError, TrainerSpec
from nnunet_calibration.experiments.runner import FINISHED, fold_state, has_npz

METRICS = ("DSC", "HD95", "ECE", "CECE", "pECE", "mL1-ACE", "NLL", "Brier")
#: per-case key in the evaluator's summary for each table metric
CASE_KEYS = {"DSC": "DSC_mean", "HD95": "HD95_mean"}
DECIMALS = {"HD95": 2}
TS_SUFFIX = " + TS"


# -- machine -----------------------------------------------------------------------------------
def machine_info() -> dict:
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
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available"
    except Exception as e:  # pragma: no cover
        info["torch"] = f"not importable ({e})"
    for mod in ("nnunetv2", "numpy", "scipy"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            pass
    try:
        from nnunet_calibration import __version__

        info["nnunet_calibration"] = __version__
    except Exception:
        pass
    return info


# -- reading one case --------------------------------------------------------------------------
class DatasetInfo:
    def __init__(self, exp: Experiment):
        from nnunetv2.utilities.label_handling.label_handling import LabelManager

        pre = exp.nnunet_folder("preprocessed") / exp.dataset_name
        self.dataset_json_path = pre / "dataset.json"
        self.dataset_json = json.loads(self.dataset_json_path.read_text())
        self.gt_folder = pre / "gt_segmentations"
        if not self.gt_folder.is_dir():
            raise ExperimentError(f"reference folder {self.gt_folder} missing (was the dataset preprocessed?)")
        self.file_ending = self.dataset_json["file_ending"]
        lm = LabelManager(self.dataset_json["labels"], self.dataset_json.get("regions_class_order"))
        self.has_regions = lm.has_regions
        self.regions = ([tuple(r) if isinstance(r, (list, tuple)) else (r,) for r in lm.foreground_regions]
                        if lm.has_regions else None)
        self.ignore_label = lm.ignore_label

    def reference(self, case: str, shape: tuple) -> np.ndarray:
        from nnunet_calibration.evaluation.core import EvaluationInputError, load_reference

        f = self.gt_folder / f"{case}{self.file_ending}"
        if not f.is_file():
            raise ExperimentError(f"no reference {f} for case {case}")
        try:
            arr, _ = load_reference(f)
        except EvaluationInputError as e:
            raise ExperimentError(str(e)) from None
        if arr.shape != tuple(shape):
            if arr.size != int(np.prod(shape)):
                raise ExperimentError(f"reference {f} has shape {arr.shape}, probabilities have {tuple(shape)}")
            arr = arr.reshape(shape)
        return arr.astype(np.int16)


def load_probs(npz: Path) -> np.ndarray:
    from nnunet_calibration.evaluation.core import EvaluationInputError, load_probabilities

    try:
        return load_probabilities(npz)
    except EvaluationInputError as e:
        raise ExperimentError(f"cannot read probabilities from {npz}: {e}") from None


# -- gathering ---------------------------------------------------------------------------------
def _evaluate(folder: Path, info: DatasetInfo, out_dir: Path, exp: Experiment, progress: bool = False) -> dict:
    from nnunet_calibration.evaluation import EvaluationInputError, evaluate_folders, validation_cases

    ev = dict(exp.evaluation)
    # the evaluator requires a prediction for every expected case: here the fold's validation cases
    fold_dir = folder.parent if folder.name == "validation" else folder
    splits = info.gt_folder.parent / "splits_final.json"
    try:
        cases = validation_cases(splits, int(fold_dir.name.split("_")[-1])) if splits.is_file() else None
    except (EvaluationInputError, ValueError) as e:
        raise ExperimentError(f"evaluating {folder} failed: {e}") from e
    nproc = int(ev.pop("num_processes", 1))
    options = dict(ev.pop("options", {}) or {})
    options.update(ev)
    try:
        # write=False: the evaluator's per-class PNGs of every fold are not needed here; its summary is kept
        summary = evaluate_folders([str(folder)], str(info.gt_folder), str(info.dataset_json_path), str(out_dir),
                                   num_processes=nproc, progress=progress, write=False, cases=cases,
                                   allow_missing=cases is None, **options)
    except (EvaluationInputError, TypeError) as e:
        raise ExperimentError(f"evaluating {folder} failed: {e}") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _fold_means(summary: dict) -> dict:
    return {m: _float(summary["mean"].get(m)) for m in METRICS}


def _case_values(summary: dict) -> dict:
    out = {}
    for c in summary["cases"]:
        met = c["metrics"]
        out[c["case"]] = {m: _float(met.get(CASE_KEYS.get(m, m))) for m in METRICS}
    return out


def _float(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def _agg(values: list[float]) -> tuple[float, float]:
    v = np.array([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    return float(v.mean()), (float(v.std(ddof=1)) if len(v) > 1 else float("nan"))


def _write_scaled_folder(src: Path, dst: Path, temperature: float, sigmoid: bool) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".npz":
            shutil.copy2(f, dst / f.name)
    for f in sorted(src.glob("*.npz")):
        p = load_probs(f)
        np.savez_compressed(dst / f.name, probabilities=posthoc.scale_probabilities(p, temperature, sigmoid))


def gather_method(exp: Experiment, spec: TrainerSpec, info: DatasetInfo, work: Path, rng_seed: int = 0,
                  progress: bool = True) -> list[dict]:
    """Evaluate one trainer (and its temperature-scaled version). Returns one or two method records."""
    from tqdm import tqdm

    rep = exp.report
    n_bins = int(rep.get("reliability_bins", 15))
    folds_present = [f for f in exp.folds if fold_state(exp, spec, f) == FINISHED and has_npz(exp, spec, f)]
    missing = [f for f in exp.folds if f not in folds_present]
    rec = {"method": spec.label, "trainer": spec.name, "hparams": exp.hparams_for(spec), "posthoc": None,
           "folds": folds_present, "missing_folds": missing, "fold_means": {}, "cases": {},
           "reliability": np.zeros((n_bins, 3)), "sweep_counts": [], "temperature": None}
    if not folds_present:
        return [rec]
    do_ts = bool(rep.get("temperature_scaling", True))
    do_sweep = bool(rep.get("threshold_sweep", True))
    max_vox = int(rep.get("max_fit_voxels", 200_000))
    sigmoid = info.has_regions
    # 1) evaluator per fold
    for f in folds_present:
        val = exp.fold_folder(spec, f) / "validation"
        summ = _evaluate(val, info, work / "evaluation" / exp.name / spec.label / f"fold_{f}", exp)
        rec["fold_means"][f] = _fold_means(summ)
        for case, v in _case_values(summ).items():
            rec["cases"][case] = dict(v, fold=f)
    # 2) one pass over the probabilities: reliability, threshold sweep, temperature-fit sample
    files = [(f, npz) for f in folds_present for npz in sorted((exp.fold_folder(spec, f) / "validation").glob("*.npz"))]
    rng = np.random.default_rng(rng_seed)
    per_case = max(1, max_vox // max(1, len(files)))
    fit_p, fit_y = [], []
    for f, npz in tqdm(files, desc=f"{spec.label}: probabilities", disable=not progress, unit="case"):
        p = load_probs(npz)
        y = info.reference(npz.stem, p.shape[1:])
        rec["reliability"] += posthoc.reliability_counts(p, y, n_bins, info.regions, info.ignore_label)
        if do_sweep:
            valid = y != info.ignore_label if info.ignore_label is not None else np.ones(y.shape, bool)
            rec["sweep_counts"].append(posthoc.threshold_counts(
                posthoc.foreground_probability(p, info.regions)[valid],
                posthoc.foreground_reference(y, info.regions)[valid]))
        if do_ts:
            sp, sy = posthoc.sample_voxels(p, y, per_case, rng, info.regions, info.ignore_label)
            fit_p.append(sp)
            fit_y.append(sy)
    out = [rec]
    if do_ts:
        t = posthoc.fit_temperature(np.concatenate(fit_p), np.concatenate(fit_y), sigmoid=sigmoid)
        rec["temperature"] = t
        ts = {"method": spec.label + TS_SUFFIX, "trainer": spec.name, "hparams": rec["hparams"],
              "posthoc": {"temperature": t, "fitted_on_folds": folds_present,
                          "fit_voxels": int(sum(len(x) for x in fit_p))},
              "folds": folds_present, "missing_folds": missing, "fold_means": {}, "cases": {},
              "reliability": np.zeros((n_bins, 3)), "sweep_counts": [], "temperature": t}
        for f in folds_present:
            scaled = work / ".scaled" / spec.label / f"fold_{f}"
            _write_scaled_folder(exp.fold_folder(spec, f) / "validation", scaled, t, sigmoid)
            summ = _evaluate(scaled, info, work / "evaluation" / exp.name / (spec.label + "+TS") / f"fold_{f}", exp)
            ts["fold_means"][f] = _fold_means(summ)
            for case, v in _case_values(summ).items():
                ts["cases"][case] = dict(v, fold=f)
            for npz in sorted(scaled.glob("*.npz")):
                p = load_probs(npz)
                ts["reliability"] += posthoc.reliability_counts(p, info.reference(npz.stem, p.shape[1:]), n_bins,
                                                                info.regions, info.ignore_label)
            shutil.rmtree(scaled)
        shutil.rmtree(work / ".scaled", ignore_errors=True)  # the temporary scaled copies leave nothing behind
        out.append(ts)
    return out


def missing_details(exp: Experiment, spec: TrainerSpec, folds: list[int]) -> list[dict]:
    from nnunet_calibration.experiments.status import fold_statuses

    if not folds:
        return []
    try:
        rows = fold_statuses(exp)
    except Exception as e:  # status must never hide the table
        return [{"fold": f, "status": "unknown", "detail": str(e), "log": ""} for f in folds]
    return [r for r in rows if r["label"] == spec.label and r["fold"] in folds]


# -- formatting --------------------------------------------------------------------------------
def _fmt(v: float, metric: str, std: float | None = None) -> str:
    if v is None or not math.isfinite(v):
        return "—"
    d = DECIMALS.get(metric, 3)
    s = f"{v:.{d}f}"
    if std is not None and math.isfinite(std):
        s += f" ± {std:.{d}f}"
    return s


def _mark(text: str, method: str, best: set, second: set) -> str:
    if text == "—":
        return text
    if method in best:
        return f"**{text}**"
    if method in second:
        return f"<u>{text}</u>"
    return text


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _fmt_p(p) -> str:
    if p is None:
        return "—"
    return f"{p:.2e}" if p < 1e-3 else f"{p:.3f}"


# -- plots -------------------------------------------------------------------------------------
def _panel_grid(plt, n: int, width: float, height: float):
    """A figure with ``n`` panels in rows of at most 4 (unused panels hidden)."""
    cols = min(4, n)
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    return fig, axes


def _plot_reliability(methods: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = [m for m in methods if m["reliability"][:, 0].sum() > 0]
    if not methods:
        return
    fig, axes = _panel_grid(plt, len(methods), 3.2, 3.2)
    for ax, m in zip(axes.ravel(), methods):
        r = m["reliability"]
        nb = len(r)
        edges = np.linspace(0, 1, nb + 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            acc = np.where(r[:, 0] > 0, r[:, 2] / r[:, 0], np.nan)
            conf = np.where(r[:, 0] > 0, r[:, 1] / r[:, 0], np.nan)
        centres = (edges[:-1] + edges[1:]) / 2
        ax.bar(centres, np.nan_to_num(acc), width=1 / nb, edgecolor="black", color="tab:blue", label="accuracy")
        ax.bar(centres, np.nan_to_num(conf - acc), bottom=np.nan_to_num(acc), width=1 / nb, color="tab:red",
               alpha=0.35, label="gap")
        ax.plot([0, 1], [0, 1], "k--", lw=1)
        ece = np.nansum(np.abs(conf - acc) * r[:, 0]) / r[:, 0].sum()
        ax.set_title(f"{m['method']}\npooled ECE {ece:.3f}", fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
    axes.ravel()[0].legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_dsc_ece(methods: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    for i, m in enumerate(methods):
        if not m["fold_means"]:
            continue
        color = f"C{i % 10}"
        fx = [v["ECE"] for v in m["fold_means"].values()]
        fy = [v["DSC"] for v in m["fold_means"].values()]
        ax.scatter(fx, fy, color=color, alpha=0.3, s=12)
        mx, sx = _agg(fx)
        my, sy = _agg(fy)
        ax.errorbar(mx, my, xerr=0 if not math.isfinite(sx) else sx, yerr=0 if not math.isfinite(sy) else sy,
                    fmt="o", color=color, label=m["method"], capsize=3)
    ax.set_xlabel("ECE (lower is better)")
    ax.set_ylabel("DSC (higher is better)")
    ax.set_title(title + "\nmean over folds ± std; faint: single folds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_sweep(sweeps: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not sweeps:
        return
    fig, axes = _panel_grid(plt, len(sweeps), 3.4, 3.0)
    for ax, (method, rows_) in zip(axes.ravel(), sweeps.items()):
        t = [r["threshold"] for r in rows_]
        for k, c in (("recall", "tab:green"), ("precision", "tab:purple"), ("DSC", "tab:blue")):
            m = np.array([r[k] for r in rows_])
            s = np.array([r[k + "_std"] for r in rows_])
            ax.plot(t, m, color=c, label=k)
            ax.fill_between(t, m - np.nan_to_num(s), m + np.nan_to_num(s), color=c, alpha=0.15)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("softmax threshold on foreground")
        ax.set_title(method, fontsize=9)
    axes.ravel()[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- the report --------------------------------------------------------------------------------
def make_report(experiments: list[Experiment], output_root: str | os.PathLike | None = None,
                command: str | None = None, name: str | None = None, progress: bool = True) -> Path:
    """Gather, evaluate and write the report; returns the report folder."""
    if not experiments:
        raise ExperimentError("no experiment given")
    name = name or experiments[0].name
    target = (Path(output_root).resolve() / name) if output_root is not None else \
        experiments[0].report_dir().parent / name
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    try:
        _build(experiments, work, command, name, progress)
        if target.exists():
            old = target.with_name(target.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
            os.replace(work, target)
            shutil.rmtree(old)
        else:
            os.replace(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return target


def _build(experiments: list[Experiment], work: Path, command: str | None, name: str, progress: bool) -> None:
    multi = len(experiments) > 1
    groups = []  # (experiment, [method records])
    for exp in experiments:
        info = DatasetInfo(exp)
        methods = []
        for spec in exp.trainers:
            recs = gather_method(exp, spec, info, work, progress=progress)
            for r in recs:
                r["missing_info"] = missing_details(exp, spec, r["missing_folds"])
            methods += recs
        groups.append((exp, info, methods))

    # table values: values[method][block]
    method_order = []
    for _, _, methods in groups:
        for m in methods:
            if m["method"] not in method_order:
                method_order.append(m["method"])
    table, spread, fold_counts = {}, {}, {}
    for exp, _, methods in groups:
        for m in methods:
            for metric in METRICS:
                mean, sd = _agg([fm[metric] for fm in m["fold_means"].values()])
                table.setdefault(m["method"], {})[f"{exp.name}/{metric}"] = mean
                spread.setdefault(m["method"], {})[f"{exp.name}/{metric}"] = sd
            fold_counts.setdefault(m["method"], {})[exp.name] = (m["folds"], m["missing_folds"])
    rank_metrics = experiments[0].report.get("rank_metrics", list(METRICS))
    bad = sorted(set(rank_metrics) - set(METRICS))
    if bad:
        raise ExperimentError(f"{experiments[0].path}: report.rank_metrics {bad} unknown; metrics: {list(METRICS)}")
    rank_values = {m: {b: v for b, v in table[m].items() if b.rsplit("/", 1)[-1] in rank_metrics}
                   for m in method_order}
    avg_rank, position, _ = stats.friedman_ranks(rank_values)
    ftest = stats.friedman_test(rank_values)

    # wilcoxon per group vs baseline
    wilcoxon = {}
    for exp, _, methods in groups:
        base = exp.baseline_label
        if base is None:
            continue
        for metric in METRICS:
            per_case = {m["method"]: {c: v[metric] for c, v in m["cases"].items()} for m in methods}
            for meth, r in stats.wilcoxon_vs_baseline(per_case, base, metric).items():
                wilcoxon.setdefault(exp.name, {}).setdefault(meth, {})[metric] = r

    # sweeps
    sweeps = {}
    for exp, _, methods in groups:
        for m in methods:
            if m["sweep_counts"]:
                sweeps.setdefault(exp.name, {})[m["method"]] = posthoc.summarise_sweep(m["sweep_counts"])

    # ---- files ----
    suffix = (lambda e: f"_{e.name}") if multi else (lambda e: "")
    for exp, _, methods in groups:
        title = f"{exp.name}: {exp.dataset_name} {exp.configuration}"
        _plot_reliability(methods, work / f"reliability{suffix(exp)}.png", title + " — reliability (foreground voxels)")
        _plot_dsc_ece(methods, work / f"dsc_vs_ece{suffix(exp)}.png", title)
        if exp.name in sweeps:
            _plot_sweep(sweeps[exp.name], work / f"threshold_sweep{suffix(exp)}.png",
                        title + " — softmax thresholding (DSC++ Fig. 4)")

    # CSV table
    import csv

    with open(work / "table.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        header = ["method"]
        for exp, _, _ in groups:
            header += [f"{exp.name}/folds", f"{exp.name}/missing_folds"]
            for metric in METRICS:
                header += [f"{exp.name}/{metric}", f"{exp.name}/{metric}_std", f"{exp.name}/{metric}_mark"]
        header += ["friedman_rank", "friedman_position"]
        w.writerow(header)
        for meth in method_order:
            row = [meth]
            for exp, _, _ in groups:
                present, missing = fold_counts.get(meth, {}).get(exp.name, ([], list(exp.folds)))
                row += [" ".join(map(str, present)), " ".join(map(str, missing))]
                for metric in METRICS:
                    b = f"{exp.name}/{metric}"
                    best, second = stats.best_two({k: table[k].get(b) for k in method_order}, metric)
                    mark = "best" if meth in best else ("second" if meth in second else "")
                    row += [_csvnum(table[meth].get(b)), _csvnum(spread[meth].get(b)), mark]
            row += [_csvnum(avg_rank.get(meth)), position.get(meth, "")]
            w.writerow(row)

    with open(work / "wilcoxon.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["experiment", "baseline", "method", "metric", "n_cases", "statistic", "pvalue",
                    "median_diff_vs_baseline", "note"])
        for exp, _, _ in groups:
            for meth, per in wilcoxon.get(exp.name, {}).items():
                for metric, r in per.items():
                    w.writerow([exp.name, exp.baseline_label, meth, metric, r["n"], _csvnum(r["statistic"]),
                                _csvnum(r["pvalue"]), _csvnum(r["median_diff"]), r["note"]])

    with open(work / "threshold_sweep.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["experiment", "method", "threshold", "n_cases", "precision", "precision_std", "recall",
                    "recall_std", "DSC", "DSC_std"])
        for ename, per in sweeps.items():
            for meth, rows in per.items():
                for r in rows:
                    w.writerow([ename, meth, f"{r['threshold']:.2f}", r["n_cases"]] +
                               [_csvnum(r[k]) for k in ("precision", "precision_std", "recall", "recall_std", "DSC",
                                                        "DSC_std")])

    machine = machine_info()
    report_json = {
        "name": name, "command": command, "machine": machine, "metrics": list(METRICS),
        "rank_metrics": list(rank_metrics),
        "experiments": [{"name": e.name, "file": str(e.path), "dataset": e.dataset_name,
                         "configuration": e.configuration, "plans": e.plans, "folds": list(e.folds),
                         "baseline": e.baseline_label, "training": e.training,
                         "trainers": [{"label": t.label, "trainer": t.name, "hparams": e.hparams_for(t),
                                       "nnUNet_results": str(e.results_root(t))} for t in e.trainers]}
                        for e, _, _ in groups],
        "table": {m: {"mean": table[m], "std": spread[m],
                      "folds": {k: {"present": v[0], "missing": v[1]} for k, v in fold_counts[m].items()}}
                  for m in method_order},
        "fold_means": {e.name: {m["method"]: {str(f): v for f, v in m["fold_means"].items()} for m in methods}
                       for e, _, methods in groups},
        "friedman": {"average_rank": avg_rank, "position": position, "test": ftest},
        "wilcoxon": wilcoxon,
        "temperature_scaling": {e.name: {m["method"]: m["posthoc"] for m in methods if m["posthoc"]}
                                for e, _, methods in groups},
        "threshold_sweep": sweeps,
        "missing": {e.name: {m["method"]: m["missing_info"] for m in methods if m["missing_folds"]}
                    for e, _, methods in groups},
    }
    (work / "report.json").write_text(json.dumps(report_json, indent=2, default=_json_default))
    (work / "README.md").write_text(_markdown(groups, method_order, table, spread, fold_counts, avg_rank, position,
                                              ftest, wilcoxon, sweeps, machine, command, name, multi, rank_metrics))


def _csvnum(v) -> str:
    if v is None:
        return ""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return str(v)
    return "" if not math.isfinite(f) else repr(f)


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return str(o)


def _markdown(groups, method_order, table, spread, fold_counts, avg_rank, position, ftest, wilcoxon, sweeps,
              machine, command, name, multi, rank_metrics) -> str:
    L = [f"# Calibration report: {name}", ""]
    L += ["Made by `calib-experiment report` (nnunet-calibration).", ""]
    for exp, _, _ in groups:
        if exp.report.get("note"):
            L += [f"> **Note ({exp.name})**: {exp.report['note']}", ""]
    if command:
        L += ["Command:", "", "```", command, "```", ""]
    L += ["Machine: " + "; ".join(f"{k} {v}" for k, v in machine.items()), ""]
    for exp, info, _ in groups:
        L += [f"- **{exp.name}**: {exp.dataset_name}, configuration `{exp.configuration}`, plans `{exp.plans}`, "
              f"folds {list(exp.folds)}, training {exp.training or 'nnU-Net defaults'}, "
              f"baseline `{exp.baseline_label}`, experiment file `{exp.path}`"]
    L += ["", "## Results (validation folds)", "",
          "Mean over folds ± standard deviation over folds (each fold: the evaluator's mean over its cases). "
          "DSC ↑, all other metrics ↓. **Bold**: best, <u>underlined</u>: second best per column. "
          f"Rank: Friedman average rank over {', '.join(rank_metrics)}"
          + (" and experiments" if multi else "") + " (position in brackets). "
          "Rows `+ TS`: the trainer above after temperature scaling fitted on its validation folds.", ""]
    header = ["Method", "Folds"] if not multi else ["Method"]
    for exp, _, _ in groups:
        if multi:
            header.append(f"{exp.name} folds")
        header += [f"{exp.name} {m}" if multi else m for m in METRICS]
    header.append("Rank")
    rows = []
    for meth in method_order:
        row = [meth.replace("|", "/")]
        for exp, _, _ in groups:
            present, missing = fold_counts.get(meth, {}).get(exp.name, ([], list(exp.folds)))
            fc = f"{len(present)}/{len(exp.folds)}"
            if missing:
                fc += f" (missing {', '.join(map(str, missing))})"
            row.append(fc)
            for metric in METRICS:
                b = f"{exp.name}/{metric}"
                best, second = stats.best_two({k: table[k].get(b) for k in method_order}, metric)
                row.append(_mark(_fmt(table[meth].get(b), metric, spread[meth].get(b)), meth, best, second))
        r = avg_rank.get(meth)
        row.append(f"{r:.2f} ({position[meth]})" if r is not None and math.isfinite(r) else "—")
        rows.append(row)
    L += [_md_table(header, rows), ""]
    if ftest["pvalue"] is not None:
        L += [f"Friedman test over {ftest['n_methods']} methods and {ftest['n_blocks']} metric columns: "
              f"χ² = {ftest['statistic']:.3f}, p = {_fmt_p(ftest['pvalue'])} (scipy.stats.friedmanchisquare).", ""]
    else:
        L += [ftest["note"] + ".", ""]
    # missing
    miss_lines = []
    for exp, _, methods in groups:
        for m in methods:
            if m["posthoc"]:
                continue
            for r in m.get("missing_info", []):
                miss_lines.append(f"- {exp.name} / {m['method']} fold {r['fold']}: **{r['status']}** "
                                  f"{r.get('detail', '')} " + (f"log: `{r['log']}`" if r.get("log") else ""))
    if miss_lines:
        L += ["### Missing folds", "", "These folds are not in the means above:", ""] + miss_lines + [""]
    # wilcoxon
    L += ["## Wilcoxon signed-rank tests against the baseline", "",
          "Two-sided, paired over per-case values of all validation folds (cases both methods have); "
          "cell: p-value (median of method − baseline, n cases).", ""]
    for exp, _, _ in groups:
        per = wilcoxon.get(exp.name)
        if not per:
            L += [f"{exp.name}: no baseline trainer (nnUNetTrainerDiceCE) in the experiment; no tests.", ""]
            continue
        if multi:
            L += [f"**{exp.name}** (baseline `{exp.baseline_label}`)", ""]
        rows = []
        for meth, mm in per.items():
            row = [meth]
            for metric in METRICS:
                r = mm[metric]
                if r["pvalue"] is None:
                    row.append(f"— ({r['note']}, n={r['n']})")
                else:
                    row.append(f"{_fmt_p(r['pvalue'])} ({r['median_diff']:+.3g}, n={r['n']})")
            rows.append(row)
        L += [f"Baseline: `{exp.baseline_label}`", "", _md_table(["Method"] + list(METRICS), rows), ""]
    # temperature
    L += ["## Post-hoc temperature scaling", "",
          "One temperature per trainer, fitted on its validation folds by minimising the NLL "
          "(scipy bounded scalar minimisation, T in [0.05, 20]) of softmax(log p / T) (sigmoid(logit p / T) for "
          "regions) on a random voxel sample; the same folds are then evaluated with T applied. "
          "T > 1: the trainer was over-confident.", ""]
    rows = []
    for exp, _, methods in groups:
        for m in methods:
            if m["posthoc"]:
                rows.append([exp.name, m["method"], f"{m['posthoc']['temperature']:.3f}",
                             str(m["posthoc"]["fit_voxels"]), ", ".join(map(str, m["posthoc"]["fitted_on_folds"]))])
    L += [_md_table(["Experiment", "Method", "T", "fit voxels", "folds"], rows) if rows else "(not computed)", ""]
    # sweep
    L += ["## Softmax thresholding (DSC++ paper, Fig. 4)", "",
          "Foreground = 1 − p(background) (regions: largest region probability) ≥ threshold, against the reference "
          "foreground; precision / recall / DSC per case, mean over cases.", ""]
    for exp, _, _ in groups:
        per = sweeps.get(exp.name)
        if not per:
            continue
        ts_shown = [round(x, 2) for x in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)]
        rows = []
        for meth, rs in per.items():
            for k in ("precision", "recall", "DSC"):
                rows.append([meth, k] + [_fmt(r[k], k) for r in rs if round(r["threshold"], 2) in ts_shown])
        if multi:
            L += [f"**{exp.name}**", ""]
        L += [_md_table(["Method", "score"] + [f"{t:.2f}" for t in ts_shown], rows), "",
              f"![threshold sweep](threshold_sweep{('_' + exp.name) if multi else ''}.png)", "",
              "All thresholds 0.05–0.95: `threshold_sweep.csv`.", ""]
    L += ["## Plots", ""]
    for exp, _, _ in groups:
        s = f"_{exp.name}" if multi else ""
        L += [f"![reliability](reliability{s}.png)", "", f"![DSC vs ECE](dsc_vs_ece{s}.png)", ""]
    L += ["Files: `table.csv`, `wilcoxon.csv`, `threshold_sweep.csv`, `report.json` (every number), "
          "`evaluation/` (the evaluator's summary.json per method and fold).", ""]
    return "\n".join(L)
