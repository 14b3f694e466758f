"""Figures of calib-evaluate (and the experiment report): reliability diagrams, dataset
reliability histograms and the risk-coverage curves of the case-level confidence scores. Matplotlib's object API only (``matplotlib.figure.Figure`` saved directly,
no pyplot, no global backend switch), so importing this module changes nothing for the caller.

Reliability diagram convention (:func:`draw_reliability`, used by :func:`reliability_figure` here
and by the report's :mod:`nnunet_calibration.experiments.report.plots`): top, per probability bin
holding at least one value, a bar up to the observed frequency (accuracy), a hatched red bar
from it to the bin's mean predicted probability (confidence), i.e. the gap that ECE/ACE weigh, and
the identity line; bottom, the share of values per bin (Guo et al. 2017, Fig. 1; the ACE paper).
Empty bins draw nothing, in either panel.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure


def draw_reliability(ax, ax_share, edges: np.ndarray, n: np.ndarray, conf: np.ndarray, freq: np.ndarray,
                     legend: bool = True) -> None:
    """Draw one reliability diagram into ``ax`` (top) and the voxel share per bin into ``ax_share``.

    ``edges`` (n_bins + 1,), ``n`` values per bin, ``conf`` mean predicted probability and ``freq``
    observed frequency per bin (NaN / ignored where ``n == 0``). See the module docstring.
    """
    edges, n = np.asarray(edges, float), np.asarray(n, float)
    conf, freq = np.asarray(conf, float), np.asarray(freq, float)
    width = np.diff(edges)
    ne = n > 0
    left = edges[:-1][ne]
    ax.bar(left, freq[ne], width=width[ne], align="edge", color="tab:blue", alpha=0.8, edgecolor="k", lw=0.5,
           label="observed frequency")
    gap = conf[ne] - freq[ne]
    ax.bar(left, gap, bottom=freq[ne], width=width[ne], align="edge", fill=False, hatch="///",
           edgecolor="tab:red", lw=0.5, label="gap to mean confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    if legend:
        ax.legend(loc="upper left", fontsize=7)
    total = n.sum()
    share = n[ne] / total if total > 0 else n[ne]
    ax_share.bar(left, share, width=width[ne], align="edge", color="gray", edgecolor="k", lw=0.5)
    ax_share.set_xlim(0, 1)
    if ne.any():
        ax_share.set_yscale("log")
        ax_share.set_ylim(min(share.min(), 1.0) / 2, 1.0)
    ax_share.set_xlabel("predicted probability (confidence)")
    ax_share.set_ylabel("share", fontsize=8)


def reliability_figure(edges: np.ndarray, n: np.ndarray, conf: np.ndarray, freq: np.ndarray,
                       title: str = "") -> Figure:
    """A :class:`~matplotlib.figure.Figure` with one reliability diagram (see :func:`draw_reliability`)."""
    fig = Figure(figsize=(5, 6))
    ax, axn = fig.subplots(2, 1, sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    draw_reliability(ax, axn, edges, n, conf, freq)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def plot_reliability_diagram(path: Path, edges: np.ndarray, n: np.ndarray, conf: np.ndarray, freq: np.ndarray,
                             title: str = "") -> None:
    """Pooled reliability diagram of one class, saved as PNG (see :func:`draw_reliability`)."""
    reliability_figure(edges, n, conf, freq, title).savefig(path, dpi=100)


def dataset_reliability_counts(edges: np.ndarray, per_case_freq: np.ndarray) -> np.ndarray:
    """Joint histogram of the ACE paper: ``H[k, b, j]`` = number of cases whose observed frequency of
    class k in probability bin b falls into frequency bin j (same edges, ``(lo, hi]``, 0 in the first
    bin); cases where the bin is empty (NaN) are not counted. ``per_case_freq``: (cases, K, bins)."""
    n_cases, n_classes, n_bins = per_case_freq.shape
    n_freq = edges.size - 1
    counts = np.zeros((n_classes, n_bins, n_freq), np.int64)
    for k in range(n_classes):
        for b in range(n_bins):
            f = per_case_freq[:, k, b]
            f = f[~np.isnan(f)]
            j = np.clip(np.searchsorted(edges, f, side="left") - 1, 0, n_freq - 1)
            counts[k, b] += np.bincount(j, minlength=n_freq)
    return counts


def plot_dataset_reliability_histogram(path: Path, edges: np.ndarray, per_case_freq: np.ndarray,
                                       class_names: Sequence[str]) -> None:
    """Dataset reliability histogram (Barfoot et al. 2024, Fig. 2), one panel per class.

    x: predicted probability bin; y: observed frequency of that class in that bin for one case;
    colour: number of cases (white: none). A well calibrated model concentrates along the diagonal.
    """
    counts = dataset_reliability_counts(edges, per_case_freq)
    k = len(class_names)
    fig = Figure(figsize=(4 * k + 1, 4))
    axes = fig.subplots(1, k, squeeze=False)
    vmax = max(int(counts.max()), 1)
    im = None
    for i, name in enumerate(class_names):
        ax = axes[0, i]
        data = np.ma.masked_equal(counts[i].T.astype(float), 0)
        im = ax.pcolormesh(edges, edges, data, cmap="viridis", vmin=0, vmax=vmax, shading="flat")
        ax.plot([0, 1], [0, 1], "r--", lw=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ax.set_title(str(name))
        ax.set_xlabel("predicted probability")
        if i == 0:
            ax.set_ylabel("observed frequency (per case)")
    fig.suptitle(f"Dataset reliability histogram ({per_case_freq.shape[0]} cases)")
    if im is not None:
        fig.colorbar(im, ax=axes[0].tolist(), label="cases", shrink=0.8)
    fig.savefig(path, dpi=100)


def risk_coverage_figure(curves: dict, risk: str) -> Figure:
    """Selective risk against coverage: one curve per score, the optimal ranking (dashed) and the
    random one (dotted: the mean risk at every coverage). ``curves``: :func:`.scores.plot_curves`."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for name, c in curves["scores"].items():
        ax.plot(c.coverage, c.selective_risk, lw=1.5, label=name)
    opt = curves["optimal"]
    if opt is not None:
        ax.plot(opt.coverage, opt.selective_risk, "k--", lw=1, label="optimal")
        ax.axhline(curves["random"], color="gray", ls=":", lw=1, label="random")
    ax.set_xlim(0, 1)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("coverage (cases accepted, most confident first)")
    ax.set_ylabel(f"selective risk ({risk})")
    ax.set_title(f"Risk-coverage ({curves['n_cases']} cases)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_risk_coverage(path: Path, curves: dict, risk: str) -> None:
    """:func:`risk_coverage_figure` saved as PNG."""
    risk_coverage_figure(curves, risk).savefig(path, dpi=100)
