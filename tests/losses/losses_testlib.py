"""Independent numpy/scipy re-computations of the losses, written from the formulas (float64).

Neighbourhood operations use explicit offset loops with clamped ("replicate") indices, morphology
uses scipy.ndimage; nothing here calls nnunet_calibration.
"""
from __future__ import annotations

import itertools

import numpy as np
from scipy import ndimage as ndi


def softmax(z):
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def log_softmax(z):
    m = z.max(1, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(1, keepdims=True))


def onehot(labels, c):
    """labels (B, *sp) -> (B, C, *sp)"""
    return np.stack([(labels == k).astype(np.float64) for k in range(c)], 1)


def vmean(values, valid):
    """mean of values (B, *sp) over valid voxels (all if valid is None)."""
    if valid is None:
        return float(values.mean())
    n = valid.sum()
    return float(values[valid].sum() / n) if n else 0.0


def gather(logp, labels):
    return np.take_along_axis(logp, labels[:, None], 1)[:, 0]


def ce_vox(z, labels):
    return -gather(log_softmax(z), labels)


# ----------------------------------------------------------------- neighbourhood helpers
def shifted(arr, offset):
    """arr (B, C, *sp) read at index + offset with clamped (replicate) indices."""
    sp = arr.shape[2:]
    idx = [np.clip(np.arange(n) + o, 0, n - 1) for n, o in zip(sp, offset)]
    return arr[(slice(None), slice(None)) + np.ix_(*idx)]


def weighted_window_mean(x, weights, valid=None):
    """sum_o w_o x(i+o) v(i+o) / sum_o w_o v(i+o) with replicate indices; weights: dict offset->w."""
    v = np.ones((x.shape[0], 1) + x.shape[2:]) if valid is None else valid[:, None].astype(np.float64)
    num = np.zeros_like(x)
    den = np.zeros_like(v)
    for off, w in weights.items():
        num += w * shifted(x * v, off)
        den += w * shifted(v, off)
    return num / np.maximum(den, 1e-300) * (den > 0)


def box_weights(ndim, k=3):
    r = k // 2
    return {off: 1.0 for off in itertools.product(range(-r, r + 1), repeat=ndim)}


def svls_weights(ndim, sigma):
    w = {off: np.exp(-sum(o * o for o in off) / (2 * sigma ** 2))
         for off in itertools.product((-1, 0, 1), repeat=ndim)}
    tot = sum(w.values())
    w = {k: v / tot for k, v in w.items()}
    centre = (0,) * ndim
    w[centre] = sum(v for k, v in w.items() if k != centre)
    tot = sum(w.values())
    return {k: v / tot for k, v in w.items()}


def np_morph(y, op, valid=None):
    """channel-wise binary morphology of y (B, C, *sp) with scipy, full 3^n element, border neutral."""
    out = np.zeros_like(y)
    for b in range(y.shape[0]):
        for c in range(y.shape[1]):
            x = y[b, c] > 0.5
            st = np.ones((3,) * x.ndim, bool)
            v = None if valid is None else valid[b]

            def er(a):
                a = a.copy() if v is None else np.where(v, a, True)
                return ndi.binary_erosion(a, st, border_value=1)

            def di(a):
                a = a.copy() if v is None else np.where(v, a, False)
                return ndi.binary_dilation(a, st, border_value=0)

            res = {
                "none": lambda: x,
                "erosion": lambda: er(x),
                "dilation": lambda: di(x),
                "opening": lambda: di(er(x)),
                "closing": lambda: er(di(x)),
                "gradient": lambda: di(x) & ~er(x),
                "internal_boundary": lambda: x & ~er(x),
                "external_boundary": lambda: di(x) & ~x,
            }[op]()
            out[b, c] = res
    return out


def local_target(y, op, weights, valid=None, fallback="onehot"):
    m = np_morph(y, op, valid)
    t = weighted_window_mean(m, weights, valid)
    s = t.sum(1, keepdims=True)
    out = np.where(s > 0, t / np.where(s > 0, s, 1), 0.0)
    if fallback == "onehot":
        out = np.where(s > 0, out, y)
    return out


# ----------------------------------------------------------------- losses (labels mode)
def focal_vox(z, labels, gamma):
    lp = gather(log_softmax(z), labels)
    return -((1 - np.exp(lp)) ** gamma) * lp


def ref_ce(z, labels, valid=None):
    return vmean(ce_vox(z, labels), valid)


def ref_focal(z, labels, gamma=3.0, valid=None):
    return vmean(focal_vox(z, labels, gamma), valid)


def ref_ecp(z, labels, lam=0.1, valid=None):
    p = softmax(z)
    ent = (-p * np.log(p)).mean(1)
    return vmean(ce_vox(z, labels) - lam * ent, valid)


def ref_ls(z, labels, alpha=0.1, valid=None):
    c = z.shape[1]
    q = (1 - alpha) * onehot(labels, c) + alpha / c
    return vmean(-(q * log_softmax(z)).sum(1), valid)


def ref_svls(z, labels, sigma=2.0, op="none", valid=None):
    c = z.shape[1]
    q = local_target(onehot(labels, c), op, svls_weights(z.ndim - 2, sigma), valid)
    return vmean(-(q * log_softmax(z)).sum(1), valid)


def ref_mbls(z, labels, m=10.0, alpha=0.1, valid=None):
    d = z.max(1, keepdims=True) - z
    return vmean(ce_vox(z, labels) + alpha * np.maximum(d - m, 0).mean(1), valid)


def ref_margin_eq2(z, labels, op, weights, alpha=0.1, valid=None):
    """SDC paper Eq. 2 as the authors' code computes it: CE on the ORIGINAL labels +
    alpha * mean over voxels and classes of |softmax(z) - y~_m|, y~_m = filter(M(y)) divided by its
    class sum, all-zero where the sum is 0."""
    c = z.shape[1]
    t = local_target(onehot(labels, c), op, weights, valid, fallback="zero")
    return vmean(ce_vox(z, labels) + alpha * np.abs(softmax(z) - t).mean(1), valid)


def ref_margin_eq2_literal(z, labels, op, weights, alpha=0.1, valid=None):
    """SDC paper Eq. 2 literally: the CE against the transformed mask y_m = M(y) / sum_c M(y) (0 where no
    class survives) + the same margin term as :func:`ref_margin_eq2`."""
    c = z.shape[1]
    m = np_morph(onehot(labels, c), op, valid)
    s = m.sum(1, keepdims=True)
    y_m = np.where(s > 0, m / np.where(s > 0, s, 1), 0.0)
    t = local_target(onehot(labels, c), op, weights, valid, fallback="zero")
    return vmean(-(y_m * log_softmax(z)).sum(1) + alpha * np.abs(softmax(z) - t).mean(1), valid)


def ref_nacl(z, labels, alpha=0.1, kernel="mean", op="none", valid=None, k=3):
    c = z.shape[1]
    y = onehot(labels, c)
    if kernel == "mean":
        t = local_target(y, op, box_weights(z.ndim - 2, k), valid)
    else:  # explicit window minimum over valid labels (replicate == window restricted to image)
        lab = labels.astype(np.float64)
        if valid is not None:
            lab = np.where(valid, lab, np.inf)
        mn = np.full(lab.shape, np.inf)
        r = k // 2
        for off in itertools.product(range(-r, r + 1), repeat=z.ndim - 2):
            mn = np.minimum(mn, shifted(lab[:, None], off)[:, 0])
        t = onehot(np.where(np.isfinite(mn), mn, -1), c)
    return vmean(ce_vox(z, labels) + alpha * np.abs(t - z).mean(1), valid)


def ref_fcl(z, labels, gamma=3.0, lam=0.1, valid=None):
    c = z.shape[1]
    brier = ((softmax(z) - onehot(labels, c)) ** 2).sum(1)
    return vmean(focal_vox(z, labels, gamma) + lam * brier, valid)


def ref_sdf(fg):
    """scipy reference SDF of binary masks (B, K, *sp)."""
    out = np.zeros(fg.shape)
    for b in range(fg.shape[0]):
        for k in range(fg.shape[1]):
            m = fg[b, k] > 0.5
            if not m.any():
                out[b, k] = 1.0
                continue
            bd = m & ~ndi.binary_erosion(m, np.ones((3,) * m.ndim, bool), border_value=1)
            if not bd.any():
                out[b, k] = -1.0
                continue
            d = ndi.distance_transform_edt(~bd)
            s = np.where(m, -d, d)
            out[b, k] = s / np.abs(s).max()
    return out


def ref_sdc(z, labels, sdf_pred=None, alpha=0.1, lam=0.1, valid=None):
    c = z.shape[1]
    y = onehot(labels, c)
    t = local_target(y, "gradient", box_weights(z.ndim - 2), valid, fallback="zero")
    loss = vmean(ce_vox(z, labels) + alpha * np.abs(softmax(z) - t).mean(1), valid)
    if sdf_pred is not None:
        fg = y[:, 1:] if valid is None else y[:, 1:] * valid[:, None]
        s = ref_sdf(fg)
        loss += lam * vmean(np.abs(sdf_pred - s).mean(1), valid)
    return loss


def ref_dscpp(p, y, gamma=2.0, eps=1e-7, valid=None):
    """p, y (B, K, *sp) probabilities and one-hot; per-(b, k) Dice++ averaged."""
    m = np.ones((p.shape[0], 1) + p.shape[2:]) if valid is None else valid[:, None].astype(float)
    res = []
    for b in range(p.shape[0]):
        for k in range(p.shape[1]):
            pp, yy, mm = p[b, k], y[b, k], m[b, 0]
            tp = (yy * pp * mm).sum()
            fn = (((yy * (1 - pp)) ** gamma) * mm).sum()
            fp = ((((1 - yy) * pp) ** gamma) * mm).sum()
            res.append(1 - (2 * tp + eps) / (2 * tp + fn + fp + eps))
    return float(np.mean(res))


def ref_ace(p, y, valid=None, bins=20):
    """explicit loops: per (b, k) bins (lo, hi] (first [0, hi]), mean over non-empty bins."""
    vals = []
    for b in range(p.shape[0]):
        for k in range(p.shape[1]):
            pp = p[b, k].ravel()
            yy = y[b, k].ravel()
            if valid is not None:
                keep = valid[b].ravel()
                pp, yy = pp[keep], yy[keep]
            if pp.size == 0:
                continue
            gaps = []
            for mbin in range(bins):
                lo, hi = mbin / bins, (mbin + 1) / bins
                sel = (pp > lo) & (pp <= hi) if mbin > 0 else (pp <= hi)
                if mbin == bins - 1:
                    sel = pp > lo
                if sel.any():
                    gaps.append(abs(pp[sel].mean() - yy[sel].mean()))
            vals.append(np.mean(gaps))
    return float(np.mean(vals)) if vals else 0.0
