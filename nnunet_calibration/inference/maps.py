"""Uncertainty maps of one case from probabilities (numpy only; no nnU-Net, no torch).

Conventions
-----------
Probabilities are nnU-Net's channel-first arrays ``(C, ...)`` (the ``probabilities`` of a ``CASE.npz``).

* **softmax** (``regions=False``, labels): channel ``c`` is label ``c``, background included, the
  channels sum to 1. Entropy ``H(p) = -sum_c p_c log p_c`` (natural log, ``0 log 0 = 0``),
  normalised by ``log C``: 0 = certain, 1 = uniform over the ``C`` labels.
* **sigmoid regions** (``regions=True``): each channel is its own binary problem. Entropy is the
  binary entropy ``h(p_r) = -p_r log p_r - (1 - p_r) log(1 - p_r)`` of each region, averaged over
  the ``R`` regions and normalised by ``log 2``: 0 = every region certain, 1 = every region at 0.5.

Maps (float32, the case's voxel grid ``(...)``, values in [0, 1]):

* :func:`normalised_entropy`: total uncertainty of one probability array (``calib-predict``: of the
  ensemble output, i.e. nnU-Net's softmax / sigmoid of the fold-averaged, calibrated logits);
* :class:`FoldAccumulator` (several folds ``k = 1..K`` with probabilities ``p_k``):
  ``mutual_information = H(mean_k p_k) - mean_k H(p_k)``, both terms normalised as above (regions:
  per region, then averaged over regions), clipped at 0 against rounding: the epistemic part, how
  much the folds disagree in their probabilities (BALD; the mean of the folds' *probabilities*,
  not nnU-Net's mean of logits); ``fold_disagreement``: the fraction of the ``K`` folds whose label
  map (nnU-Net's decision of that fold alone) differs from the ensemble's label map.

Memory: :class:`FoldAccumulator` holds one float64 array of the case's probabilities, one float64
map and one count map; folds are added one at a time.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

__all__ = ["normalised_entropy", "FoldAccumulator", "MAP_NAMES"]

#: the maps written by ``calib-predict --uncertainty`` (file name ``CASE_<name><file_ending>``)
MAP_NAMES = ("entropy", "mutual_information", "fold_disagreement")


def _xlogx(p: np.ndarray) -> np.ndarray:
    """``p log p`` with ``0 log 0 = 0`` (float64)."""
    p = np.asarray(p, dtype=np.float64)
    out = np.zeros_like(p)
    pos = p > 0
    out[pos] = p[pos] * np.log(p[pos])
    return out


def _entropy64(probs: np.ndarray, regions: bool) -> np.ndarray:
    """Normalised entropy in float64 (module docstring)."""
    probs = np.asarray(probs, dtype=np.float64)
    c = probs.shape[0]
    if regions:
        q = np.clip(probs, 0.0, 1.0)
        h = -(_xlogx(q) + _xlogx(1.0 - q))
        return h.mean(axis=0) / math.log(2.0)
    if c < 2:
        raise ValueError(f"softmax probabilities need at least 2 channels, got {c}")
    return -_xlogx(probs).sum(axis=0) / math.log(c)


def normalised_entropy(probs: np.ndarray, regions: bool) -> np.ndarray:
    """Normalised entropy map ``(...)`` float32 of ``probs`` ``(C, ...)`` (module docstring)."""
    return np.clip(_entropy64(probs, regions), 0.0, 1.0).astype(np.float32)


class FoldAccumulator:
    """Mutual information and fold disagreement of one case, the folds added one at a time.

    ``ensemble_labels``: the ensemble's label map (nnU-Net's segmentation of the case).
    :meth:`add` takes one fold's probabilities ``(C, ...)`` and its label map; :meth:`maps` returns
    ``{"mutual_information": ..., "fold_disagreement": ...}`` (float32, module docstring)."""

    def __init__(self, ensemble_labels: np.ndarray, regions: bool):
        self.labels = np.asarray(ensemble_labels)
        self.regions = regions
        self.n = 0
        self.sum_p: Optional[np.ndarray] = None
        self.sum_h = np.zeros(self.labels.shape, dtype=np.float64)
        self.differ = np.zeros(self.labels.shape, dtype=np.int32)

    def add(self, probs: np.ndarray, labels: np.ndarray) -> None:
        probs = np.asarray(probs)
        if probs.shape[1:] != self.labels.shape or np.shape(labels) != self.labels.shape:
            raise ValueError(f"fold probabilities {probs.shape} / labels {np.shape(labels)} do not match the "
                             f"ensemble's label map {self.labels.shape}")
        if self.sum_p is None:
            self.sum_p = np.zeros(probs.shape, dtype=np.float64)
        self.sum_p += probs
        self.sum_h += _entropy64(probs, self.regions)
        self.differ += np.asarray(labels) != self.labels
        self.n += 1

    def maps(self) -> dict:
        if self.n == 0:
            raise ValueError("no fold added")
        mean_p = self.sum_p / self.n
        mi = _entropy64(mean_p, self.regions) - self.sum_h / self.n
        return {"mutual_information": np.clip(mi, 0.0, 1.0).astype(np.float32),
                "fold_disagreement": (self.differ / self.n).astype(np.float32)}
