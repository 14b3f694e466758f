"""calib-evaluate's options for the metrics of issue 23: adaptive binning (``--binning``), the signed
class-wise calibration error (always on), the debiased L2 ECE with its bootstrap interval
(``--bootstrap``) and the boundary-band ECE (``--boundary-k-mm``). The evaluator's pooled (data set)
values are checked against an independent computation on the concatenated voxels of all cases: the
metric functions for ECE, CECE, SCE and the debiased L2 ECE; for the boundary band a band made here
with scipy's EDT on the whole volume and a naive binned ECE (equal-width bins, or np.array_split of
the sorted confidences for equal mass); for the bootstrap the replicates recomputed on concatenated
resampled cases with the same draws."""
import json
import math

import numpy as np
import pytest
from scipy import ndimage

from nnunet_calibration.evaluation import evaluate_folders
from nnunet_calibration.evaluation.cli import build_parser, main
from nnunet_calibration.metrics import cece, debiased_l2_ece, ece, signed_calibration_error
from test_evaluate import REGIONS, make_folders, rk

CLASSES = ["a", "b", "c"]
REGION_NAMES = ["whole", "core", "enhancing"]


def concat(data):
    """All cases' voxels side by side: probabilities (C, N) and labels (N,)."""
    probs = np.concatenate([p.reshape(p.shape[0], -1) for p, _, _ in data.values()], 1)
    labels = np.concatenate([lab.reshape(-1) for _, lab, _ in data.values()])
    return probs, labels


def naive_ece(conf, correct, n_bins, binning):
    """sum_b n_b/N |mean conf_b - mean correct_b|: equal-width bins (lo, hi] (0 in the first), or equal-mass
    bins (np.array_split of the confidences sorted ascending; no ties in these random float32 values)."""
    conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
    if conf.size == 0:
        return math.nan
    if binning == "adaptive":
        order = np.argsort(conf, kind="stable")
        parts = np.array_split(order, n_bins)
    else:
        edges = np.linspace(0, 1, n_bins + 1)
        idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
        parts = [np.flatnonzero(idx == b) for b in range(n_bins)]
    return sum(p.size / conf.size * abs(conf[p].mean() - correct[p].mean()) for p in parts if p.size)


def band_here(target, spacing, k_mm):
    """Voxels within k_mm of a face-neighbour label change (EDT of the whole volume)."""
    edge = np.zeros(target.shape, bool)
    for ax in range(target.ndim):
        d = np.diff(target.astype(np.int64), axis=ax) != 0
        lo = [slice(None)] * target.ndim
        hi = [slice(None)] * target.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    if not edge.any():
        return edge
    return ndimage.distance_transform_edt(~edge, sampling=spacing) <= k_mm * (1 + 1e-9)


def boundary_ece_here(data, regions, n_bins, binning, k_mm=None):
    """Pooled boundary-band ECE of all cases: per task the band voxels of every case, binned together."""
    n_tasks = 1 if regions is None else len(regions)
    conf, correct = [[] for _ in range(n_tasks)], [[] for _ in range(n_tasks)]
    for probs, lab, spacing in data.values():
        k = 2 * max(spacing) if k_mm is None else k_mm
        if regions is None:
            band = band_here(lab, spacing, k)
            conf[0].append(probs.max(0)[band])
            correct[0].append((probs.argmax(0) == lab)[band])
        else:
            for r, region in enumerate(regions):
                t = np.isin(lab, region)
                band = band_here(t, spacing, k)
                pr = probs[r][band]
                conf[r].append(np.maximum(pr, 1 - pr))
                correct[r].append((pr > 0.5) == t[band])
    per = [naive_ece(np.concatenate(c), np.concatenate(y), n_bins, binning) for c, y in zip(conf, correct)]
    return float(np.nanmean(per))


@pytest.mark.parametrize("regions,binning", [(False, "uniform"), (False, "adaptive"), (True, "adaptive"),
                                             (True, "uniform")])
def test_pooled_values_equal_the_functions_on_the_concatenated_cases(tmp_path, regions, binning):
    pred, gt, data = make_folders(tmp_path, n_cases=4, regions=regions, seed=3 + int(regions))
    R = REGIONS if regions else None
    summary = evaluate_folders([pred], gt, write=False, progress=False, binning=binning, bootstrap=0)
    pooled = summary["pooled"]
    probs, labels = concat(data)
    assert pooled["ECE"] == pytest.approx(ece(probs, labels, binning=binning, **rk(R)), rel=1e-9)
    assert pooled["CECE"] == pytest.approx(cece(probs, labels, binning=binning, **rk(R)), rel=1e-9)
    assert pooled["debiased-L2-ECE"] == pytest.approx(debiased_l2_ece(probs, labels, binning=binning, **rk(R)),
                                                      rel=1e-9)
    sce = signed_calibration_error(probs, labels, **rk(R))
    names = REGION_NAMES if regions else CLASSES
    assert summary["calibration_classes"] == names
    for name, v in zip(names, sce):
        assert pooled[f"SCE_{name}"] == pytest.approx(v, rel=1e-9, abs=1e-15)
    assert pooled["SCE"] == pytest.approx(np.nanmean(sce), rel=1e-9, abs=1e-15)
    # by hand: the signed error is mean probability minus frequency over the kept voxels (p_c > 1e-3)
    p1 = probs[0] if regions else probs[1]
    y1 = np.isin(labels, REGIONS[0]) if regions else labels == 1
    keep = p1 > np.float32(1e-3)
    assert pooled[f"SCE_{names[0]}"] == pytest.approx(p1[keep].astype(np.float64).mean() - y1[keep].mean(), rel=1e-6)
    assert pooled["boundary-ECE"] == pytest.approx(boundary_ece_here(data, R, 15, binning), rel=1e-9)
    # per case: the functions on the case; the data set mean: the mean over cases
    for entry in summary["cases"]:
        p, lab, spacing = data[entry["case"]]
        m = entry["metrics"]
        assert m["ECE"] == pytest.approx(ece(p, lab, binning=binning, **rk(R)), rel=1e-9)
        sc = signed_calibration_error(p, lab, **rk(R))
        assert [m["SCE_classes"][n] for n in names] == pytest.approx(sc.tolist(), rel=1e-9, abs=1e-15)
        assert m["boundary-ECE"] == pytest.approx(boundary_ece_here({0: (p, lab, spacing)}, R, 15, binning), rel=1e-9)
    for name in names:
        assert summary["mean"][f"SCE_{name}"] == pytest.approx(
            np.mean([c["metrics"]["SCE_classes"][name] for c in summary["cases"]]))
    assert summary["config"]["binning"] == binning and summary["bootstrap"] == {
        "n_resamples": 0, "confidence": 0.95, "seed": 0, "unit": "case"}


def test_bootstrap_interval_and_boundary_width_by_hand(tmp_path):
    """The bootstrap interval recomputed on the concatenated resampled cases with the evaluator's draws
    (numpy's default_rng(0).integers(0, n, (N, n))); --boundary-k-mm changes the band."""
    pred, gt, data = make_folders(tmp_path, n_cases=4, seed=5)
    n_res = 25
    summary = evaluate_folders([pred], gt, write=False, progress=False, bootstrap=n_res, boundary_k_mm=1.0)
    cases = [data[c["case"]] for c in summary["cases"]]
    draws = np.random.default_rng(0).integers(0, len(cases), size=(n_res, len(cases)))
    reps_d, reps_e = [], []
    for row in draws:
        p, lab = concat({i: cases[j] for i, j in enumerate(row)})
        reps_d.append(debiased_l2_ece(p, lab))
        reps_e.append(ece(p, lab))
    boot = summary["bootstrap"]
    assert boot["n_resamples"] == n_res and boot["confidence"] == 0.95
    for key, reps, fn in (("debiased-L2-ECE", reps_d, debiased_l2_ece), ("ECE", reps_e, ece)):
        low, high = np.percentile(reps, [2.5, 97.5])
        assert boot[key]["low"] == pytest.approx(low, rel=1e-9) and boot[key]["high"] == pytest.approx(high, rel=1e-9)
        assert boot[key]["estimate"] == pytest.approx(fn(*concat(data)), rel=1e-9)
        assert boot[key]["n_valid"] == n_res and low <= boot[key]["estimate"] <= high
    assert summary["pooled"]["boundary-ECE"] == pytest.approx(boundary_ece_here(data, None, 15, "uniform", 1.0),
                                                              rel=1e-9)
    assert summary["config"]["boundary_k_mm"] == 1.0


def test_cli_options_and_their_errors(tmp_path, capsys):
    pred, gt, _ = make_folders(tmp_path, n_cases=2, seed=9)
    out = tmp_path / "out"
    assert main([str(pred), "--gt", str(gt), "-o", str(out), "--binning", "adaptive", "--boundary-k-mm", "2.5",
                 "--bootstrap", "10", "--no-plots", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "boundary-ECE" in text and "SCE" in text and "95% bootstrap interval (10 resamples" in text
    s = json.loads((out / "summary.json").read_text())
    assert (s["config"]["binning"], s["config"]["boundary_k_mm"], s["config"]["bootstrap"]) == ("adaptive", 2.5, 10)
    header = (out / "per_case.csv").read_text().splitlines()[0].split(",")
    assert {"SCE", "debiased-L2-ECE", "boundary-ECE", "SCE_a", "SCE_b", "SCE_c"} <= set(header)
    for bad, msg in ((["--boundary-k-mm", "-1"], "--boundary-k-mm must be a non-negative finite number"),
                     (["--binning", "adaptive", "--convention", "sdc-code"], "binning 'adaptive' is for the default"),
                     (["--bootstrap", "-3"], "--bootstrap must be a non-negative integer")):
        assert main([str(pred), "--gt", str(gt), "-o", str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
        assert not (tmp_path / "bad").exists()


def test_bootstrap_default_depends_on_the_binning():
    """1000 resamples with equal-width bins; none with equal-mass bins unless given (their cost)."""
    from nnunet_calibration.settings import MetricOptions

    assert MetricOptions.from_mapping({}).bootstrap == 1000
    assert MetricOptions.from_mapping({"binning": "adaptive"}).bootstrap == 0
    assert MetricOptions.from_mapping({"binning": "adaptive", "bootstrap": 50}).bootstrap == 50
    args = build_parser().parse_args(["p", "--gt", "g", "--binning", "adaptive"])
    assert MetricOptions.from_cli(args).bootstrap == 0


def test_help_lists_the_new_options_and_metrics():
    text = build_parser().format_help()
    for word in ("--binning", "{uniform,adaptive}", "--boundary-k-mm", "--bootstrap", "SCE", "debiased-L2-ECE",
                 "boundary-ECE", "over-", "under-confident", "expected_dice", "boundary_entropy"):
        assert word in text, word
