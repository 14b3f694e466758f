"""The uncertainty formulas and the calibrated nonlinearity against direct computations (no nnU-Net
run): softmax and sigmoid regions, several folds."""
from __future__ import annotations

import math

import numpy as np
import torch

from nnunet_calibration.inference.maps import FoldAccumulator, normalised_entropy
from nnunet_calibration.inference.predict import CalibratedNonlin
from nnunet_calibration.posthoc import scaling


def _softmax(z):
    e = np.exp(z - z.max(0, keepdims=True))
    return e / e.sum(0, keepdims=True)


def _sigmoid(z):
    return 1 / (1 + np.exp(-z))


def _h_softmax(p):
    return -sum(np.where(pc > 0, pc * np.log(np.where(pc > 0, pc, 1)), 0) for pc in p) / math.log(len(p))


def _h_regions(p):
    hb = [-(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0)
            + np.where(q < 1, (1 - q) * np.log(np.where(q < 1, 1 - q, 1)), 0)) for q in p]
    return sum(hb) / len(hb) / math.log(2)


def test_calibrated_nonlin_equals_apply_scaling():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 3, size=(4, 5, 7, 6)).astype(np.float32)
    temps = [1.5, 0.8, 2.0, 3.0]
    ours = CalibratedNonlin(temps, regions=False)(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(ours, scaling.apply_scaling(_softmax(z.astype(np.float64)), temps, False), atol=1e-6)
    # one temperature is softmax(z / T)
    np.testing.assert_allclose(CalibratedNonlin([2.5] * 4, False)(torch.from_numpy(z)).numpy(), _softmax(z / 2.5),
                               atol=1e-6)
    zr = z[:3]
    ours = CalibratedNonlin(temps[:3], regions=True)(torch.from_numpy(zr)).numpy()
    t = np.asarray(temps[:3]).reshape(3, 1, 1, 1)
    np.testing.assert_allclose(ours, _sigmoid(zr / t), atol=1e-6)
    np.testing.assert_allclose(ours, scaling.apply_scaling(_sigmoid(zr.astype(np.float64)), temps[:3], True),
                               atol=1e-6)


def test_entropy_and_fold_maps_softmax_and_regions():
    rng = np.random.default_rng(1)
    for regions in (False, True):
        folds = []
        for k in range(3):
            z = rng.normal(0, 2, size=(3, 4, 5, 6))
            folds.append(_sigmoid(z) if regions else _softmax(z))
        folds[0][:, 0, 0, 0] = [1, 0, 0]  # exact 0 and 1: 0 log 0 = 0
        h = _h_regions if regions else _h_softmax
        np.testing.assert_allclose(normalised_entropy(folds[0], regions), h(folds[0]), atol=1e-6)
        assert normalised_entropy(folds[0], regions)[0, 0, 0] == 0
        if regions:
            ens_labels = (folds[0] > 0.5).argmax(0)  # any label map works for the disagreement count
            labels = [(f > 0.5).argmax(0) for f in folds]
        else:
            ens_labels = sum(folds).argmax(0)
            labels = [f.argmax(0) for f in folds]
        acc = FoldAccumulator(ens_labels, regions)
        for f, lab in zip(folds, labels):
            acc.add(f.astype(np.float32), lab)
        maps = acc.maps()
        mi = h(sum(folds) / 3) - sum(h(f) for f in folds) / 3
        assert mi.min() > -1e-9  # Jensen: the mutual information is not negative
        np.testing.assert_allclose(maps["mutual_information"], np.clip(mi, 0, 1), atol=1e-6)
        np.testing.assert_allclose(maps["fold_disagreement"], sum((lab != ens_labels) for lab in labels) / 3)
        assert maps["fold_disagreement"].max() > 0 and maps["mutual_information"].max() > 0.01
