"""Independent references and test data of the calibration metrics' tests.

The reference implementations are deliberately naive: explicit per-bin masks with ``lo < v <= hi``
(the papers' loops), Python loops over classes, one-hot arrays.
"""
import itertools

import numpy as np

BRATS_REGIONS = [(1, 2, 3), (2, 3), (3,)]


# ----------------------------------------------------------------------------------------------
# independent references
# ----------------------------------------------------------------------------------------------
def ref_bins(v, n_bins, zero_in_first=True):
    """List of boolean masks, one per bin (lo, hi]; v == 0 into the first bin if zero_in_first."""
    edges = np.linspace(0, 1, n_bins + 1).astype(v.dtype)
    masks = []
    for k in range(n_bins):
        m = (v > edges[k]) & (v <= edges[k + 1])
        if k == 0 and zero_in_first:
            m |= v == 0
        masks.append(m)
    return masks


def ref_binary_ece(v, y, n_bins):
    v = v.ravel()
    y = y.ravel().astype(np.float64)
    total = 0.0
    for m in ref_bins(v, n_bins):
        if m.sum() == 0:
            continue
        total += m.sum() / v.size * abs(v[m].astype(np.float64).mean() - y[m].mean())
    return total


def rk(region_labels):
    """Keyword arguments of the public metrics for softmax (``None``) or the given region label tuples."""
    return {} if region_labels is None else {"regions": True, "region_labels": region_labels}


def ref_ece(probs, labels, n_bins, regions=None):
    if regions is None:
        fg = labels != 0
        conf = probs.max(0)[fg]
        acc = probs.argmax(0)[fg] == labels[fg]
        return ref_binary_ece(conf, acc, n_bins)
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(labels, reg)
        if not y.any():
            continue
        p = probs[r][y]
        vals.append(ref_binary_ece(np.maximum(p, 1 - p), p > 0.5, n_bins))
    return float(np.mean(vals))


def ref_cece(probs, labels, n_bins, thr, regions=None):
    vals = []
    chans = range(probs.shape[0]) if regions is not None else range(1, probs.shape[0])
    for c in chans:
        y = np.isin(labels, regions[c]) if regions is not None else labels == c
        keep = probs[c] > thr
        if keep.sum() == 0:
            continue
        vals.append(ref_binary_ece(probs[c][keep], y[keep], n_bins))
    return float(np.mean(vals)) if vals else float("nan")


def ref_pece(probs, labels, n_bins, fp_weight, regions=None):
    """Algorithm 1 of the SDC paper, line by line."""
    p = (probs.max(0) if regions is not None else 1 - probs[0]).ravel()
    y = (labels != 0).ravel().astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1).astype(p.dtype)
    total = p.size
    out = 0.0
    for i in range(1, n_bins + 1):
        gamma = (edges[i - 1] < p) & (p <= edges[i])
        eta = gamma.sum()
        if eta > 0:
            p_hat = p[gamma].astype(np.float64).mean()
            a_hat = y[gamma].mean()
            fp = gamma & (y == 0)
            p_fp = p[fp].astype(np.float64).mean() if fp.sum() > 0 else 0.0
            out += eta / total * abs((p_hat - a_hat) + fp_weight * p_fp)
    return out


def ref_marginal(probs, labels, n_bins, include_background=False, regions=None):
    if regions is not None:
        chans = range(probs.shape[0])
    else:
        chans = range(0 if include_background else 1, probs.shape[0])
    aces, eces, mces = [], [], []
    for c in chans:
        y = (np.isin(labels, regions[c]) if regions is not None else labels == c).ravel().astype(np.float64)
        p = probs[c].ravel()
        gaps, weights = [], []
        for m in ref_bins(p, n_bins):
            if m.sum() == 0:
                continue
            gaps.append(abs(y[m].mean() - p[m].astype(np.float64).mean()))
            weights.append(m.sum() / p.size)
        aces.append(np.mean(gaps))
        eces.append(np.dot(gaps, weights))
        mces.append(np.max(gaps))
    return {"mL1-ACE": np.mean(aces), "mL1-ECE": np.mean(eces), "mL1-MCE": np.mean(mces)}


def ref_nll(probs, labels, eps=1e-7, regions=None):
    if regions is None:
        onehot = np.stack([labels == c for c in range(probs.shape[0])])
        return float(np.mean(-np.log(np.maximum((probs * onehot).sum(0).astype(np.float64), eps))))
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(labels, reg)
        p = probs[r].astype(np.float64)
        vals.append(-(y * np.log(np.maximum(p, eps)) + (1 - y) * np.log(np.maximum(1 - p, eps))))
    return float(np.mean(vals))


def ref_brier(probs, labels, regions=None):
    if regions is None:
        onehot = np.stack([labels == c for c in range(probs.shape[0])]).astype(np.float64)
    else:
        onehot = np.stack([np.isin(labels, reg) for reg in regions]).astype(np.float64)
    return float(np.mean(np.mean((probs.astype(np.float64) - onehot) ** 2, axis=0)))


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
def softmax_case(shape, n_classes, seed, temperature=2.0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_classes, shape)
    logits = rng.normal(size=(n_classes, *shape)) * temperature
    logits += 2.5 * np.stack([labels == c for c in range(n_classes)])  # informative but imperfect
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    return p.astype(dtype), labels


def region_case(shape, seed, dtype=np.float32, sharpness=3.0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, shape)
    if sharpness > 5:  # mostly background, like real outputs
        labels[rng.random(shape) < 0.8] = 0
    chans = []
    for reg in BRATS_REGIONS:
        y = np.isin(labels, reg)
        chans.append(1 / (1 + np.exp(-(rng.normal(size=shape) * 2 + sharpness * (2 * y - 1)))))
    return np.stack(chans).astype(dtype), labels


def confident_case(shape, n_classes, seed):
    """Realistic segmentation output: most voxels background with p_background == 1 exactly or
    foreground probabilities far below 0.1 (exercises the first-bin fast path, and pECE's p = 0)."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int64)
    labels[tuple(slice(s // 3, s // 3 + max(s // 3, 1)) for s in shape)] = 1
    labels[rng.random(shape) < 0.05] = rng.integers(1, n_classes)
    logits = rng.normal(size=(n_classes, *shape)) * 2
    logits += 12 * np.stack([labels == c for c in range(n_classes)])
    p = np.exp(logits - logits.max(0)).astype(np.float32)
    p /= p.sum(0)
    p[:, rng.random(shape) < 0.3] = np.eye(n_classes, dtype=np.float32)[0][:, None]  # exact 1 / 0
    return p, labels


CASES = {
    "confident3d": lambda: confident_case((8, 9, 10), 4, 0),
    "confident2d": lambda: confident_case((30, 31), 3, 1),
    "softmax3d": lambda: softmax_case((6, 7, 8), 4, 0),
    "softmax2d": lambda: softmax_case((17, 13), 3, 1),
    "softmax3d_f64": lambda: softmax_case((5, 6, 7), 3, 2, dtype=np.float64),
}


# ----------------------------------------------------------------------------------------------
# equal-mass ("adaptive") bins, written out
# ----------------------------------------------------------------------------------------------
def ref_equal_mass_masks(v, n_bins):
    """Bins of the sorted values cut like np.array_split; each part's largest value is an upper edge;
    bins are (previous edge, edge] by value (ties go to the lower bin)."""
    v = np.asarray(v).ravel()
    masks, lo = [], -np.inf
    for part in np.array_split(np.sort(v), n_bins):
        if part.size:
            masks.append((v > lo) & (v <= part[-1]))
            lo = part[-1]
    return masks


def ref_masked_ece(v, y, masks):
    v = np.asarray(v).ravel().astype(np.float64)
    y = np.asarray(y).ravel().astype(np.float64)
    return sum(m.sum() / v.size * abs(v[m].mean() - y[m].mean()) for m in masks if m.any())


def ref_adaptive_ece(probs, labels, n_bins, regions=None):
    """ECE (foreground, top-label; regions: per region) with equal-mass bins."""
    if regions is None:
        fg = labels != 0
        if not fg.any():
            return float("nan")
        conf, acc = probs.max(0)[fg], probs.argmax(0)[fg] == labels[fg]
        return ref_masked_ece(conf, acc, ref_equal_mass_masks(conf, n_bins))
    vals = []
    for r, reg in enumerate(regions):
        y = np.isin(labels, reg)
        if y.any():
            p = probs[r][y]
            conf = np.maximum(p, 1 - p)
            vals.append(ref_masked_ece(conf, p > 0.5, ref_equal_mass_masks(conf, n_bins)))
    return float(np.mean(vals))


def ref_adaptive_cece(probs, labels, n_bins, thr, regions=None):
    vals = []
    for c in (range(probs.shape[0]) if regions is not None else range(1, probs.shape[0])):
        y = np.isin(labels, regions[c]) if regions is not None else labels == c
        keep = probs[c] > thr
        if keep.any():
            vals.append(ref_masked_ece(probs[c][keep], y[keep], ref_equal_mass_masks(probs[c][keep], n_bins)))
    return float(np.mean(vals)) if vals else float("nan")


# ----------------------------------------------------------------------------------------------
# boundary band, written out; blob-shaped label maps
# ----------------------------------------------------------------------------------------------
def ref_band(labels, spacing, k):
    labels = np.asarray(labels)
    shape = labels.shape
    edge = []
    for idx in itertools.product(*map(range, shape)):
        for ax in range(labels.ndim):
            for step in (-1, 1):
                nb = list(idx)
                nb[ax] += step
                if 0 <= nb[ax] < shape[ax] and labels[tuple(nb)] != labels[idx]:
                    edge.append(idx)
    band = np.zeros(shape, bool)
    if not edge:
        return band
    edge_mm = np.array(edge, float) * spacing
    for idx in itertools.product(*map(range, shape)):
        d = np.sqrt((((np.array(idx, float) * spacing) - edge_mm) ** 2).sum(1)).min()
        band[idx] = d <= k * (1 + 1e-9)
    return band


def blobs(shape, seed, n_labels=3):
    rng = np.random.default_rng(seed)
    lab = np.zeros(shape, np.int64)
    grid = np.indices(shape).astype(float)
    for v in range(1, n_labels):
        centre = rng.uniform(0, np.array(shape) - 1)
        radius = rng.uniform(1.0, max(shape) / 3)
        lab[((grid - centre.reshape(-1, *([1] * len(shape)))) ** 2).sum(0) <= radius ** 2] = v
    return lab
