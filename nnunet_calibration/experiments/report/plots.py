"""The report's figures (matplotlib's object API: ``Figure`` objects, no pyplot, no backend switch).

- ``reliability[_<experiment>].png``: one reliability diagram per row (trainer or post-hoc row),
  drawn by :func:`nnunet_calibration.evaluation.plots.draw_reliability` from the metrics
  accumulator's ECE statistics (:attr:`.data.MethodResult.reliability`: foreground voxels,
  confidence = max class probability, correct = argmax equals the reference; regions: voxels inside
  each region, pooled over regions), i.e. exactly the bins of the ECE column, pooled over all
  validation cases; the title gives the pooled ECE. Empty bins draw nothing; beneath, the share of
  voxels per bin.
- ``dsc_vs_ece[_<experiment>].png``: per row the mean ± std over folds of DSC against ECE (faint:
  single folds).
- ``threshold_sweep[_<experiment>].png``: precision, recall and DSC against the softmax threshold
  (DSC++ Fig. 4), mean ± std over cases.
- ``learning_curves[_<experiment>].png``: per trainer the pseudo-Dice and training loss per epoch,
  mean over folds, from nnU-Net's training logs (:func:`.noise.curves`); the window that decides
  whether the baseline still rose is shaded.

Each ``*_figure`` function returns ``None`` when there is nothing to draw; :func:`write_plots`
saves the others and returns which files exist, so the markdown links only those.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from nnunet_calibration.evaluation.plots import draw_reliability
from nnunet_calibration.experiments.report import noise
from nnunet_calibration.experiments.report.data import ExperimentResult, ReportData
from nnunet_calibration.experiments.report.tables import Tables
from nnunet_calibration.metrics import BinStats, bin_edges
from nnunet_calibration.utils import mean_std


def pooled_reliability(stats: BinStats):
    """``(edges, n, mean confidence, observed frequency)`` of the statistics summed over tasks."""
    summed = BinStats(stats.count.sum(0, keepdims=True), stats.conf_sum.sum(0, keepdims=True),
                      stats.total.sum(keepdims=True))
    n, conf, freq = summed.reliability()
    return bin_edges(stats.n_bins, np.float64), n[0], conf[0], freq[0]


def _panels(fig: Figure, n: int, share: bool = False, max_cols: int = 4):
    """``n`` panels in rows of at most ``max_cols``; with ``share`` each has a small axis beneath."""
    cols = min(max_cols, n)
    rows = int(math.ceil(n / cols))
    if not share:
        axes = fig.subplots(rows, cols, squeeze=False).ravel()
        for ax in axes[n:]:
            ax.axis("off")
        return [(ax, None) for ax in axes[:n]]
    gs = fig.add_gridspec(2 * rows, cols, height_ratios=[3, 1] * rows)
    out = []
    for i in range(n):
        r, c = divmod(i, cols)
        top = fig.add_subplot(gs[2 * r, c])
        out.append((top, fig.add_subplot(gs[2 * r + 1, c], sharex=top)))
    return out


def reliability_figure(exp: ExperimentResult, title: str) -> Figure | None:
    methods = [m for m in exp.methods if m.reliability is not None and m.reliability.bin_count.sum() > 0]
    if not methods:
        return None
    cols = min(4, len(methods))
    fig = Figure(figsize=(3.3 * cols, 4.3 * math.ceil(len(methods) / cols)))
    for i, ((ax, axs), m) in enumerate(zip(_panels(fig, len(methods), share=True), methods)):
        draw_reliability(ax, axs, *pooled_reliability(m.reliability), legend=(i == 0))
        ece = m.pooled.get("ECE", float("nan"))
        ax.set_title(f"{m.method}\npooled ECE {ece:.3f}", fontsize=9)
        ax.tick_params(labelbottom=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def dsc_ece_figure(exp: ExperimentResult, title: str) -> Figure | None:
    methods = [m for m in exp.methods if m.fold_means]
    if not methods:
        return None
    fig = Figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for i, m in enumerate(methods):
        color = f"C{i % 10}"
        fx = [v["ECE"] for v in m.fold_means.values()]
        fy = [v["DSC"] for v in m.fold_means.values()]
        ax.scatter(fx, fy, color=color, alpha=0.3, s=12)
        (mx, sx), (my, sy) = mean_std(fx), mean_std(fy)
        ax.errorbar(mx, my, xerr=sx if math.isfinite(sx) else 0, yerr=sy if math.isfinite(sy) else 0,
                    fmt="o", color=color, label=m.method, capsize=3)
    ax.set_xlabel("ECE (lower is better)")
    ax.set_ylabel("DSC (higher is better)")
    ax.set_title(title + "\nmean over folds ± std; faint: single folds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def sweep_figure(sweeps: dict, title: str) -> Figure | None:
    if not sweeps:
        return None
    cols = min(4, len(sweeps))
    fig = Figure(figsize=(3.4 * cols, 3.0 * math.ceil(len(sweeps) / cols)))
    panels = _panels(fig, len(sweeps))
    for (ax, _), (method, rows) in zip(panels, sweeps.items()):
        t = [r["threshold"] for r in rows]
        for k, c in (("recall", "tab:green"), ("precision", "tab:purple"), ("DSC", "tab:blue")):
            m = np.array([r[k] for r in rows])
            s = np.array([r[k + "_std"] for r in rows])
            ax.plot(t, m, color=c, label=k)
            ax.fill_between(t, m - np.nan_to_num(s), m + np.nan_to_num(s), color=c, alpha=0.15)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel("softmax threshold on foreground")
        ax.set_title(method, fontsize=9)
    panels[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_suffix(data: ReportData, exp: ExperimentResult) -> str:
    return f"_{exp.name}" if data.multi else ""


def learning_curve_figure(exp: ExperimentResult, title: str) -> Figure | None:
    """Per trainer row (repeats left out): nnU-Net's pseudo-Dice and training loss per epoch, mean over
    the folds (:func:`.noise.curves`); the convergence window of :func:`.noise.convergence` shaded."""
    rows = [m for m in noise.base_rows(exp) if m.kind == "trainer" and m.history]
    if not rows:
        return None
    fig = Figure(figsize=(12, 4.8))
    ax_d, ax_l = fig.subplots(1, 2)
    for m in rows:
        c = noise.curves(m)
        lw = 2.2 if m.method == exp.baseline else 1.1
        ax_d.plot(c["epochs"], c["pseudo_dice"], lw=lw, label=m.method)
        ax_l.plot(c["epochs"], c["train_loss"], lw=lw, label=m.method)
    conv = noise.convergence(exp)
    if conv is not None:
        ax_d.axvspan(conv["epochs"][0], conv["epochs"][1], color="0.9", zorder=0)
    ax_d.set_xlabel("epoch")
    ax_d.set_ylabel("nnU-Net pseudo-Dice (mean of classes and folds)")
    ax_l.set_xlabel("epoch")
    ax_l.set_ylabel("training loss (mean of folds; each method's own loss)")
    ax_d.legend(fontsize=6, ncol=2)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_plots(data: ReportData, tab: Tables, folder: Path) -> dict:
    """Save every figure there is into ``folder``; returns ``{experiment: {kind: file name}}``."""
    written = {}
    for e in data.experiments:
        title = f"{e.name}: {e.dataset} {e.configuration}"
        s = plot_suffix(data, e)
        figs = {"reliability": reliability_figure(e, title + " — reliability (ECE bins, foreground voxels)"),
                "dsc_vs_ece": dsc_ece_figure(e, title),
                "threshold_sweep": sweep_figure(tab.sweeps.get(e.name, {}),
                                                title + " — softmax thresholding (DSC++ Fig. 4)"),
                "learning_curves": learning_curve_figure(e, title + " — learning curves (nnU-Net's logs)")}
        for kind, fig in figs.items():
            if fig is not None:
                fig.savefig(folder / f"{kind}{s}.png", dpi=110)
                written.setdefault(e.name, {})[kind] = f"{kind}{s}.png"
    return written
