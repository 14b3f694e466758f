"""Case-level confidence scores against direct per-voxel formulas (loops over classes, explicit
entropies, Dice of every pair and class) and their documented directions."""
import numpy as np
import pytest

from metrics_testlib import BRATS_REGIONS, blobs, ref_band, region_case, rk, softmax_case
from nnunet_calibration.metrics import (boundary_entropy, dice, expected_dice, foreground_entropy, mean_pairwise_dice,
                                        uncertain_fraction)


def ref_entropy_map(probs, regions=None):
    p = probs.astype(np.float64)
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0.0)
    if regions is None:
        return -plogp.sum(0) / np.log(p.shape[0])
    q = 1 - p
    qlogq = np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0.0)
    return -(plogp + qlogq).mean(0) / np.log(2)


def pred_of(probs, regions=None):
    if regions is None:
        return probs.argmax(0)
    pred = np.zeros(probs.shape[1:], np.int64)  # nnU-Net's region -> label conversion: later regions win
    for r, reg in enumerate(regions):
        pred[probs[r] > 0.5] = reg[-1]
    return pred


def structured_case(shape, seed, regions=None):
    """Probabilities around blob-shaped labels (so that the prediction has few, smooth boundaries)."""
    rng = np.random.default_rng(seed)
    labels = blobs(shape, seed, n_labels=4)
    if regions is None:
        logits = rng.normal(size=(4, *shape)) + 5.0 * np.stack([labels == c for c in range(4)])
        p = np.exp(logits - logits.max(0))
        return (p / p.sum(0)).astype(np.float32)
    z = [rng.normal(size=shape) + 5.0 * (2 * np.isin(labels, r) - 1) for r in regions]
    return (1 / (1 + np.exp(-np.stack(z)))).astype(np.float32)


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_entropies_match_direct_formula(regions):
    probs = structured_case((9, 10, 11), 3, regions)
    pred = pred_of(probs, regions)
    h = ref_entropy_map(probs, regions)
    assert foreground_entropy(probs, pred, **rk(regions)) == pytest.approx(h[pred != 0].mean(), rel=1e-6)
    sp = (1.0, 0.6, 0.8)
    for k in (None, 0.9):
        band = ref_band(pred, np.array(sp), 2 * max(sp) if k is None else k)
        assert 0.1 < band.mean() < 0.9
        assert boundary_entropy(probs, pred, sp, k_mm=k, **rk(regions)) == pytest.approx(h[band].mean(), rel=1e-6)


def test_entropy_extremes_and_direction():
    labels = blobs((12, 13), 1)
    onehot = np.stack([labels == c for c in range(3)]).astype(np.float32)
    assert foreground_entropy(onehot, labels) == 0.0
    assert foreground_entropy(np.full((3, 12, 13), 1 / 3, np.float32), labels) == pytest.approx(1.0, rel=1e-6)
    assert np.isnan(foreground_entropy(onehot, np.zeros_like(labels)))
    assert np.isnan(boundary_entropy(onehot, np.zeros_like(labels)))
    soft, _ = softmax_case((12, 13), 3, 0, temperature=0.5)
    sharp, _ = softmax_case((12, 13), 3, 0, temperature=4.0)
    assert foreground_entropy(sharp, sharp.argmax(0)) < foreground_entropy(soft, soft.argmax(0))


def ref_expected_dice(probs, pred, regions=None):
    vals = []
    for t in (range(1, probs.shape[0]) if regions is None else range(len(regions))):
        m = pred == t if regions is None else np.isin(pred, regions[t])
        if m.any():
            p = probs[t].astype(np.float64)
            vals.append(2 * (p * m).sum() / (p.sum() + m.sum()))
    return float(np.mean(vals)) if vals else float("nan")


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_expected_dice_matches_direct_formula(regions):
    probs, _ = softmax_case((6, 7, 8), 4, 5) if regions is None else region_case((6, 7, 8), 5)
    pred = pred_of(probs, regions)
    assert expected_dice(probs, pred, **rk(regions)) == pytest.approx(ref_expected_dice(probs, pred, regions),
                                                                      rel=1e-9)


def test_expected_dice_is_close_to_the_mean_dice_of_references_drawn_from_the_model():
    rng = np.random.default_rng(0)
    labels = blobs((40, 40, 30), 2, n_labels=2)
    p1 = np.where(labels == 1, rng.uniform(0.6, 1.0, labels.shape), rng.uniform(0.0, 0.2, labels.shape))
    probs = np.stack([1 - p1, p1]).astype(np.float32)
    pred = probs.argmax(0)
    drawn = [dice(pred == 1, rng.random(p1.shape) < p1) for _ in range(50)]
    assert expected_dice(probs, pred) == pytest.approx(np.mean(drawn), abs=0.005)
    onehot = np.stack([pred == 0, pred == 1]).astype(np.float32)
    assert expected_dice(onehot, pred) == 1.0
    assert np.isnan(expected_dice(probs, np.zeros_like(pred)))


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
@pytest.mark.parametrize("thr", [0.9, 0.6])
def test_uncertain_fraction_matches_direct_count(regions, thr):
    probs, _ = softmax_case((6, 7, 8), 4, 6) if regions is None else region_case((6, 7, 8), 6)
    pred = pred_of(probs, regions)
    if regions is None:
        unc = probs.max(0) < np.float32(thr)
    else:
        unc = (np.maximum(probs, 1 - probs) < np.float32(thr)).any(0)
    got = uncertain_fraction(probs, pred, threshold=thr, **rk(regions))
    assert got == pytest.approx(unc.sum() / (pred != 0).sum(), rel=1e-12)
    with pytest.raises(ValueError, match="threshold"):
        uncertain_fraction(probs, pred, threshold=0.2, **rk(regions))


def test_mean_pairwise_dice_matches_dice_of_every_pair_and_label():
    maps = [blobs((10, 11, 12), s, n_labels=4) for s in (1, 2, 3, 4)]
    maps[3][maps[3] == 2] = 0  # label 2 missing from one map: still counted where the other has it
    ref = []
    for i in range(4):
        for j in range(i + 1, 4):
            present = [c for c in (1, 2, 3) if (maps[i] == c).any() or (maps[j] == c).any()]
            ref.append(np.mean([dice(maps[i] == c, maps[j] == c) for c in present]))
    assert mean_pairwise_dice(maps) == pytest.approx(np.mean(ref), rel=1e-12)
    regs = [(1, 2, 3), (2, 3), (3,)]
    ref = [np.mean([dice(np.isin(maps[i], r), np.isin(maps[j], r)) for r in regs
                    if np.isin(maps[i], r).any() or np.isin(maps[j], r).any()])
           for i in range(4) for j in range(i + 1, 4)]
    assert mean_pairwise_dice(maps, region_labels=regs) == pytest.approx(np.mean(ref), rel=1e-12)
    assert mean_pairwise_dice([maps[0], maps[0].copy()]) == 1.0
    empty = np.zeros((3, 4), np.int64)
    assert mean_pairwise_dice([empty, empty, empty]) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_dice([empty])
