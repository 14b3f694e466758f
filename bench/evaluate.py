"""Benchmark of the evaluation metrics on BraTS-sized cases (4 x 155 x 240 x 240 float32).

Run:  python bench/evaluate.py [--cases 2] [--repeat 3] [--mode softmax|regions|both] [--keep DIR]

Everything is measured in the same run on the same machine; every step of a case (the npz load as
well as the metrics) is timed ``--repeat`` times and the shortest time is kept, because timings on
shared cores vary with the machine's other work:

* ``load``: ``np.load(CASE.npz)["probabilities"]`` of a file written with ``np.savez_compressed``,
  which is what nnU-Net does (``nnunetv2/inference/export_prediction.py``);
* ``ours``: :class:`nnunet_calibration.metrics.CalibrationAccumulator` update + compute (ECE, CECE,
  pECE, mL1-ACE/ECE/MCE, NLL, Brier, SCE, debiased L2 ECE and the boundary-band ECE, spacing 1 mm),
  with equal-width bins and again with ``binning="adaptive"`` (equal mass), separately DSC + HD95 of
  every class/region (the label map made from the probabilities included), and the
  case-level confidence scores (:func:`nnunet_calibration.evaluation.scores.case_scores`: foreground
  and boundary entropy, expected Dice, uncertain fraction; on that label map, which calib-evaluate
  makes once per case);
* ``loop``: the same calibration metrics written the way the papers' code does it: for every
  metric, class and bin a boolean mask ``(p > lo) & (p <= hi)`` over the whole volume, then means of
  the masked values (NLL and Brier with a full one-hot array);
* peak memory of one calib-evaluate worker process (``evaluation.case.evaluate_case``: npz load,
  reference read, input checks, all metrics) relative to the size of one case's probability array,
  measured in a fresh child process with ``tracemalloc`` (numpy reports its buffers to it) and
  with the growth of the resident set's high-water mark (``VmHWM`` in /proc/self/status).

The process uses the allocator settings of calib-evaluate's processes
(:func:`nnunet_calibration.utils.keep_freed_memory`: glibc keeps freed memory for reuse).

Goals (issues 2 and 12): ours >= 5x faster than the loop; metric time <= 50% of the load time, also
with DSC and HD95 (argmax, masks, DSC, HD95 of every class/region, as calib-evaluate does); peak
memory <= 3x one case's array. The script prints the measured ratios and whether each goal is met.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from nnunet_calibration.metrics import CalibrationAccumulator, validate_probabilities
from nnunet_calibration.settings import MetricOptions

SHAPE = (155, 240, 240)
BRATS_REGIONS = [(1, 2, 3), (2, 3), (3,)]
LABELS = {"background": 0, "edema": 1, "necrosis": 2, "enhancing": 3}
REGION_LABELS = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
OPTS = dict(n_bins_ece=15, n_bins_cece=10, n_bins_pece=10, n_bins_ace=20, fp_weight=2.0, cece_threshold=1e-3)


# --------------------------------------------------------------------------------------------------
# synthetic BraTS-like case
# --------------------------------------------------------------------------------------------------
def _smooth_noise(rng, scale):
    """Spatially smooth noise (low-resolution noise, linearly upsampled) plus a little voxel noise:
    network outputs vary smoothly in space, which matters for the surfaces of HD95."""
    from scipy import ndimage

    low = rng.standard_normal((16, 24, 24)).astype(np.float32)
    up = ndimage.zoom(low, [a / b for a, b in zip(SHAPE, low.shape)], order=1)[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    up *= np.float32(scale)
    up += np.float32(0.3) * rng.standard_normal(SHAPE, dtype=np.float32)
    return up


def make_case(seed: int, mode: str):
    """Labels 0..3 in nested ellipsoid shells (BraTS style) and float32 probabilities computed like
    nnU-Net's: softmax over 4 class logits, or sigmoid of 3 region logits (logits = sharpness x
    signed distance to the class's shell + smooth noise)."""
    rng = np.random.default_rng(seed)
    z, y, x = (np.arange(s, dtype=np.float32) for s in SHAPE)
    c = [s / 2 + rng.uniform(-s / 8, s / 8) for s in SHAPE]
    rad = [rng.uniform(25, 40), rng.uniform(35, 55), rng.uniform(35, 55)]
    r = np.sqrt(((z[:, None, None] - c[0]) / rad[0]) ** 2 + ((y[None, :, None] - c[1]) / rad[1]) ** 2
                + ((x[None, None, :] - c[2]) / rad[2]) ** 2).astype(np.float32)
    labels = np.zeros(SHAPE, np.uint8)
    labels[r < 1.0] = 1
    labels[r < 0.6] = 2
    labels[r < 0.35] = 3
    k = np.float32(12.0)
    if mode == "softmax":
        intervals = [(1.0, np.inf), (0.6, 1.0), (0.35, 0.6), (0.0, 0.35)]
        logits = np.empty((4, *SHAPE), np.float32)
        for i, (lo, hi) in enumerate(intervals):
            d = np.maximum(np.float32(lo) - r, 0) + np.maximum(r - np.float32(hi), 0)
            logits[i] = -k * d + _smooth_noise(rng, 1.5)
        logits -= logits.max(0)
        np.exp(logits, out=logits)
        logits /= logits.sum(0)
        return logits, labels
    probs = np.empty((3, *SHAPE), np.float32)
    for i, rr in enumerate((1.0, 0.6, 0.35)):
        probs[i] = k * (np.float32(rr) - r) + _smooth_noise(rng, 1.5)
        np.negative(probs[i], out=probs[i])
        np.exp(probs[i], out=probs[i])
        probs[i] += 1
        np.reciprocal(probs[i], out=probs[i])
    return probs, labels


# --------------------------------------------------------------------------------------------------
# baseline: per-bin masking loops (the papers' style)
# --------------------------------------------------------------------------------------------------
def _loop_binary_ece(conf, y, n_bins):
    edges = np.linspace(0, 1, n_bins + 1).astype(conf.dtype)
    out, n = 0.0, conf.size
    for i in range(n_bins):
        m = (conf > edges[i]) & (conf <= edges[i + 1])
        if i == 0:
            m |= conf == 0
        if m.any():
            out += m.sum() / n * abs(float(conf[m].mean(dtype=np.float64)) - float(y[m].mean(dtype=np.float64)))
    return out


def _loop_marginal(p, y, n_bins):
    edges = np.linspace(0, 1, n_bins + 1).astype(p.dtype)
    gaps, w = [], []
    for i in range(n_bins):
        m = (p > edges[i]) & (p <= edges[i + 1])
        if i == 0:
            m |= p == 0
        if m.any():
            gaps.append(abs(float(y[m].mean(dtype=np.float64)) - float(p[m].mean(dtype=np.float64))))
            w.append(m.sum() / p.size)
    return np.mean(gaps), float(np.dot(gaps, w)), np.max(gaps)


def _loop_pece(p, y, n_bins, fp_weight):
    edges = np.linspace(0, 1, n_bins + 1).astype(p.dtype)
    total, out = p.size, 0.0
    for i in range(n_bins):
        m = (edges[i] < p) & (p <= edges[i + 1])
        eta = int(m.sum())
        if eta:
            fp = m & ~y
            p_fp = float(p[fp].mean(dtype=np.float64)) if fp.any() else 0.0
            out += eta / total * abs(float(p[m].mean(dtype=np.float64)) - float(y[m].mean()) + fp_weight * p_fp)
    return out


def loop_metrics(probs, labels, regions):
    C = probs.shape[0]
    if regions is None:
        targets = [labels == c for c in range(C)]
        fg = labels != 0
        ece = _loop_binary_ece(probs.max(0)[fg], probs.argmax(0)[fg] == labels[fg], OPTS["n_bins_ece"])
        chans = range(1, C)
        pfg = 1 - probs[0]
    else:
        targets = [np.isin(labels, r) for r in regions]
        eces = []
        for r in range(C):
            p = probs[r][targets[r]]
            eces.append(_loop_binary_ece(np.maximum(p, 1 - p), p > 0.5, OPTS["n_bins_ece"]))
        ece = float(np.mean(eces))
        chans = range(C)
        pfg = probs.max(0)
    cls = []
    for c in chans:
        keep = probs[c] > OPTS["cece_threshold"]
        cls.append(_loop_binary_ece(probs[c][keep], targets[c][keep], OPTS["n_bins_cece"]))
    marg = np.array([_loop_marginal(probs[c], targets[c], OPTS["n_bins_ace"]) for c in chans]).mean(0)
    out = {"ECE": ece, "CECE": float(np.mean(cls)),
           "pECE": _loop_pece(pfg, labels != 0, OPTS["n_bins_pece"], OPTS["fp_weight"]),
           "mL1-ACE": marg[0], "mL1-ECE": marg[1], "mL1-MCE": marg[2]}
    onehot = np.stack(targets).astype(np.float32)
    if regions is None:
        out["NLL"] = float(-np.log(np.maximum((probs * onehot).sum(0), 1e-7)).mean(dtype=np.float64))
    else:
        q = np.where(onehot > 0, probs, 1 - probs)
        out["NLL"] = float(-np.log(np.maximum(q, 1e-7)).mean(dtype=np.float64))
    out["Brier"] = float(((probs - onehot) ** 2).mean(dtype=np.float64))
    return out


# --------------------------------------------------------------------------------------------------
# ours
# --------------------------------------------------------------------------------------------------
def our_calibration(probs, labels, regions, binning="uniform", spacing=(1.0, 1.0, 1.0)):
    """The accumulator as calib-evaluate runs it: every metric, the boundary-band ECE included (the case's
    spacing given), with ``binning`` for ECE, CECE, debiased L2 ECE and boundary ECE."""
    return CalibrationAccumulator(MetricOptions(**OPTS, binning=binning), regions=regions is not None,
                                  region_labels=regions).update(probs, labels, spacing=spacing).compute()


def label_setup(regions):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    lm = LabelManager(REGION_LABELS, [1, 2, 3]) if regions else LabelManager(LABELS, None)
    names = list(REGION_LABELS)[1:] if regions else list(LABELS)[1:]
    return lm, names


def our_label_map(probs, regions):
    """nnU-Net's label map of the probabilities, as calib-evaluate makes it (once per case)."""
    from nnunet_calibration.evaluation.segmentation import probabilities_to_segmentation
    from nnunet_calibration.metrics.calibration import SOFTMAX_SUM_TOLERANCE

    lm, _ = label_setup(regions)
    return probabilities_to_segmentation(probs, lm, sum_tolerance=SOFTMAX_SUM_TOLERANCE)


def our_scores(probs, seg, regions, spacing=(1.0, 1.0, 1.0)):
    """The case-level confidence scores calib-evaluate computes per case, on the label map it made for DSC
    and HD95 (evaluation.case.evaluate_case makes it once; its time is in the DSC+HD95 column)."""
    from nnunet_calibration.evaluation.scores import case_scores

    return case_scores(probs, seg, spacing, regions)


def our_segmentation(probs, labels, regions, spacing=(1.0, 1.0, 1.0)):
    """What calib-evaluate does per case for DSC/HD95 (evaluation.segmentation's own functions)."""
    from nnunet_calibration.evaluation.segmentation import probabilities_to_segmentation, segmentation_metrics

    from nnunet_calibration.metrics.calibration import SOFTMAX_SUM_TOLERANCE

    lm, names = label_setup(regions)
    seg = probabilities_to_segmentation(probs, lm, sum_tolerance=SOFTMAX_SUM_TOLERANCE)  # sums checked before
    return segmentation_metrics(seg, labels, lm, names, spacing)


def _vm_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def _child_memory(npz, ref, regions, q):
    """Runs calib-evaluate's real per-case worker (evaluation.case.evaluate_case) on one case."""
    import SimpleITK  # noqa: F401  (imports first: only the case's memory is measured)
    import nnunetv2.evaluation.evaluate_predictions  # noqa: F401

    from nnunet_calibration.evaluation.case import evaluate_case
    from nnunet_calibration.utils import keep_freed_memory

    keep_freed_memory()  # as in calib-evaluate's worker processes
    lm, names = label_setup(regions)
    job = {"case": "bench", "folder": str(Path(npz).parent), "npz": npz, "reference": ref}
    rss0 = _vm_kb("VmRSS")
    tracemalloc.start()
    evaluate_case(job, lm, names, regions, MetricOptions(**OPTS))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm = _vm_kb("VmHWM")
    with np.load(npz) as z:
        nbytes = z["probabilities"].nbytes
    q.put((peak, (hwm - rss0) * 1024, nbytes))


def measure_memory(npz, ref, regions):
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_memory, args=(str(npz), str(ref), regions, q))
    p.start()
    res = q.get()
    p.join()
    return res


# --------------------------------------------------------------------------------------------------
def _timed(f, repeat: int):
    """``(shortest wall time of `repeat` calls, last result)``: the minimum is the estimate least
    disturbed by other work on shared cores; load and metrics are timed alike."""
    best, out = np.inf, None
    for _ in range(max(1, repeat)):
        t0 = time.perf_counter()
        out = f()
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(mode: str, n_cases: int, tmp: Path, loop_cases: int, repeat: int = 3):
    import SimpleITK as sitk
    import nnunetv2.evaluation.evaluate_predictions  # noqa: F401  (import time is not metric time)
    import nnunet_calibration.evaluation.folders  # noqa: F401

    from nnunet_calibration.utils import keep_freed_memory

    # calib-evaluate's processes (its workers, and the main process with -np 1) reuse freed memory
    # instead of returning it to the OS after every chunk; measured without it, the first cases of
    # a fresh process ran up to 1.5x slower (page faults on every chunk's temporaries)
    allocator = keep_freed_memory()
    regions = None if mode == "softmax" else BRATS_REGIONS
    print(f"\n=== {mode}: {n_cases} case(s) of shape ({4 if regions is None else 3}, {', '.join(map(str, SHAPE))}) "
          f"float32, np.savez_compressed like nnU-Net; glibc keeps freed memory as in calib-evaluate: "
          f"{'yes' if allocator else 'no (not glibc)'} ===")
    t_load, t_val, t_cal, t_ada, t_seg, t_sc, t_loop, mem = [], [], [], [], [], [], [], None
    for i in range(n_cases):
        written, labels = make_case(i, mode)
        npz = tmp / f"{mode}_{i:03d}.npz"
        ref_path = tmp / f"{mode}_{i:03d}_ref.nii.gz"
        np.savez_compressed(npz, probabilities=written)
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(ref_path), useCompression=True)
        size_mb = written.nbytes / 2 ** 20
        del written

        def load():
            with np.load(npz) as z:
                return z["probabilities"]

        tl, probs = _timed(load, repeat)
        t_load.append(tl)
        t_val.append(_timed(lambda: validate_probabilities(probs, regions is not None), repeat)[0])
        tc, ours = _timed(lambda: our_calibration(probs, labels, regions), repeat)
        t_cal.append(tc)
        t_ada.append(_timed(lambda: our_calibration(probs, labels, regions, "adaptive"), repeat)[0])
        t_seg.append(_timed(lambda: our_segmentation(probs, labels, regions), repeat)[0])
        seg = our_label_map(probs, regions)
        t_sc.append(_timed(lambda: our_scores(probs, seg, regions), repeat)[0])
        if i < loop_cases:
            t0 = time.perf_counter()
            ref = loop_metrics(probs, labels, regions)
            t_loop.append(time.perf_counter() - t0)
            diff = max(abs(ours[k] - ref[k]) for k in ref)
            print(f"case {i}: ours vs loop, largest difference over the loop's {len(ref)} metrics: {diff:.2e}")
        print(f"case {i}: array {size_mb:.0f} MB, npz {npz.stat().st_size / 2 ** 20:.0f} MB; load {t_load[-1]:.2f} s, "
              f"input checks {t_val[-1]:.2f} s, calibration {t_cal[-1]:.2f} s (adaptive bins {t_ada[-1]:.2f} s), "
              f"DSC+HD95 {t_seg[-1]:.2f} s, "
              f"case scores {t_sc[-1]:.2f} s"
              + (f", loop {t_loop[-1]:.2f} s" if i < loop_cases else ""))
        probs = None  # free the case before the next one
        if mem is None:
            mem = measure_memory(npz, ref_path, regions)
    load, val, cal, seg, sc = np.mean(t_load), np.mean(t_val), np.mean(t_cal), np.mean(t_seg), np.mean(t_sc)
    ada = np.mean(t_ada)
    peak, hwm, nbytes = mem
    allm = val + cal + seg + sc
    all_ada = val + ada + seg + sc
    print(f"seconds per case: npz load {load:.2f} | ours: input checks {val:.2f}, calibration {cal:.2f} "
          f"(adaptive bins {ada:.2f}), DSC+HD95 {seg:.2f}, case scores {sc:.2f}, all {allm:.2f} (adaptive "
          f"{all_ada:.2f})" + (f" | loop (calibration only) {np.mean(t_loop):.2f}" if t_loop else ""))
    if t_loop:
        speedup = np.mean(t_loop) / cal
        print(f"RESULT speed-up of the calibration metrics vs per-bin masking loop: {speedup:.1f}x  "
              f"(goal >= 5x: {'met' if speedup >= 5 else 'NOT met'})")
    frac_cal, frac_all, frac_ada = (val + cal) / load, allm / load, all_ada / load
    print(f"RESULT metric time / npz load time: calibration metrics incl. input checks {frac_cal:.0%} "
          f"(goal <= 50%: {'met' if frac_cal <= 0.5 else 'NOT met'}); all (with DSC+HD95 and case scores) {frac_all:.0%} "
          f"({'met' if frac_all <= 0.5 else 'NOT met'}); all with --binning adaptive {frac_ada:.0%} "
          f"({'met' if frac_ada <= 0.5 else 'NOT met'})")
    print(f"RESULT peak memory of one calib-evaluate worker (evaluate_case: load, checks, all metrics): "
          f"tracemalloc {peak / nbytes:.2f}x, VmHWM growth {hwm / nbytes:.2f}x one case's array "
          f"({nbytes / 2 ** 20:.0f} MB)  (goal <= 3x: {'met' if max(peak, hwm) / nbytes <= 3 else 'NOT met'})")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3,
                    help="time every step (npz load included) this many times per case and keep the shortest")
    ap.add_argument("--loop-cases", type=int, default=1, help="cases also run through the slow loop baseline")
    ap.add_argument("--mode", choices=["softmax", "regions", "both"], default="both")
    ap.add_argument("--keep", default=None, help="folder for the npz files (default: a temp folder, removed)")
    args = ap.parse_args(argv)
    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench_evaluate_"))
    tmp.mkdir(parents=True, exist_ok=True)
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}, files in {tmp}")
    try:
        for mode in (["softmax", "regions"] if args.mode == "both" else [args.mode]):
            run(mode, args.cases, tmp, args.loop_cases, args.repeat)
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
