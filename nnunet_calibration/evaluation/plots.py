"""Matplotlib (Agg) figures of calib-evaluate: reliability diagrams and dataset reliability histograms."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def plot_reliability_diagram(path: Path, edges: np.ndarray, n: np.ndarray, conf: np.ndarray, freq: np.ndarray,
                             title: str = "") -> None:
    """Pooled reliability diagram of one class.

    Top: observed frequency per probability bin (bars over the bin), the mean predicted
    probability of the bin (dots) and the identity line; the gap between them is what the ACE/ECE
    measure. Bottom: number of voxels per bin (log scale). Empty bins are left blank.
    """
    plt = _plt()
    fig, (ax, axn) = plt.subplots(2, 1, figsize=(5, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    width = np.diff(edges)
    ne = n > 0
    ax.bar(edges[:-1][ne], freq[ne], width=width[ne], align="edge", color="tab:blue", alpha=0.7,
           edgecolor="k", label="observed frequency")
    ax.plot(conf[ne], conf[ne], "o", color="tab:red", ms=4, label="mean predicted probability")
    ax.plot([0, 1], [0, 1], "k--", lw=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("observed frequency")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    axn.bar(edges[:-1][ne], n[ne], width=width[ne], align="edge", color="gray", edgecolor="k")
    if ne.any():
        axn.set_yscale("log")
    axn.set_xlabel("predicted probability")
    axn.set_ylabel("voxels")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


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
    plt = _plt()
    counts = dataset_reliability_counts(edges, per_case_freq)
    k = len(class_names)
    fig, axes = plt.subplots(1, k, figsize=(4 * k + 1, 4), squeeze=False)
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
    plt.close(fig)
