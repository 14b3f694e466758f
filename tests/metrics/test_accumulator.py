"""CalibrationAccumulator: single case = the functions, merging = pooling, conventions, ignore label."""
import pickle

import numpy as np
import pytest

from metrics_testlib import (BRATS_REGIONS, CASES, ref_bins, ref_brier, ref_cece, ref_ece, ref_marginal, ref_nll,
                             ref_pece, region_case, rk, softmax_case)
from nnunet_calibration.metrics import (CalibrationAccumulator, boundary_ece, brier, cece, debiased_l2_ece, ece,
                                        marginal_calibration_errors, nll, pece, signed_calibration_error)
from nnunet_calibration.settings import MetricOptions


def _assert_same(a, b, rel=1e-10):
    assert set(a) == set(b)
    for k in a:
        if np.isnan(a[k]):
            assert np.isnan(b[k]), k
        else:
            assert a[k] == pytest.approx(b[k], rel=rel, abs=1e-13), k


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_accumulator_single_case_equals_functions(regions):
    probs, labels = softmax_case((6, 7, 8), 4, 11) if regions is None else region_case((6, 7, 8), 11)
    acc = CalibrationAccumulator(**rk(regions)).update(probs, labels)
    direct = {"ECE": ece(probs, labels, **rk(regions)), "CECE": cece(probs, labels, **rk(regions)),
              "pECE": pece(probs, labels, **rk(regions)), "NLL": nll(probs, labels, **rk(regions)),
              "Brier": brier(probs, labels, **rk(regions))}
    direct.update(marginal_calibration_errors(probs, labels, **rk(regions)))
    sce = signed_calibration_error(probs, labels, **rk(regions))
    direct.update({"SCE": float(np.nanmean(sce)), "debiased-L2-ECE": debiased_l2_ece(probs, labels, **rk(regions)),
                   "boundary-ECE": float("nan")})  # no spacing given: no band
    _assert_same(acc.compute(), direct)
    np.testing.assert_allclose(acc.signed_per_class(), sce, rtol=1e-10)
    spacing = (2.0, 1.0, 0.5)
    with_band = CalibrationAccumulator(**rk(regions)).update(probs, labels, spacing=spacing).compute()
    assert with_band["boundary-ECE"] == pytest.approx(boundary_ece(probs, labels, spacing, **rk(regions)), rel=1e-10)


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_accumulator_adaptive_binning_pools_exactly(regions):
    """binning="adaptive": ECE, CECE, debiased L2 ECE and boundary ECE of merged accumulators equal the
    functions on the concatenated cases (the equal-mass edges depend on all values)."""
    make = softmax_case if regions is None else (lambda shape, c, seed: region_case(shape, seed))
    cases = [make((6, 7, 8), 4, 21), make((5, 7, 8), 4, 22)]
    opts = MetricOptions(binning="adaptive")
    accs = [CalibrationAccumulator(opts, **rk(regions)).update(p, y) for p, y in cases]
    got = (accs[0] + accs[1]).compute()
    p = np.concatenate([c[0].reshape(c[0].shape[0], -1) for c in cases], 1)
    y = np.concatenate([c[1].reshape(-1) for c in cases])
    assert got["ECE"] == pytest.approx(ece(p, y, binning="adaptive", **rk(regions)), rel=1e-10)
    assert got["CECE"] == pytest.approx(cece(p, y, binning="adaptive", **rk(regions)), rel=1e-10)
    assert got["debiased-L2-ECE"] == pytest.approx(debiased_l2_ece(p, y, binning="adaptive", **rk(regions)),
                                                   rel=1e-10)
    assert got["ECE"] != pytest.approx(CalibrationAccumulator(**rk(regions)).update(p, y).compute()["ECE"])
    roundtrip = pickle.loads(pickle.dumps(accs[0] + accs[1])).compute()
    _assert_same(roundtrip, got, rel=0)


@pytest.mark.parametrize("case", ["confident3d", "confident2d", "regions_sharp"])
@pytest.mark.parametrize("opts", [{}, {"cece_threshold": 0.3}, {"n_bins_ace": 4, "n_bins_cece": 7},
                                  {"include_background": True}])
def test_accumulator_shared_pass_matches_reference_on_confident_cases(case, opts):
    """The accumulator shares per-channel work between metrics (voxels above the smaller of the CECE
    threshold and the first ACE edge gathered once, totals reused); on mostly-background data, where
    that path is taken, every metric must still equal the naive reference."""
    if case == "regions_sharp":
        probs, labels = region_case((9, 10, 11), 7, sharpness=30.0)
        R = BRATS_REGIONS
    else:
        probs, labels = CASES[case]()
        R = None
    m = CalibrationAccumulator(MetricOptions(**opts), **rk(R)).update(probs, labels).compute()
    thr = opts.get("cece_threshold", 1e-3)
    assert m["ECE"] == pytest.approx(ref_ece(probs, labels, 15, R), rel=1e-9, abs=1e-12)
    assert m["CECE"] == pytest.approx(ref_cece(probs, labels, opts.get("n_bins_cece", 10), thr, R), rel=1e-9)
    assert m["pECE"] == pytest.approx(ref_pece(probs, labels, 10, 2.0, R), rel=1e-9)
    r = ref_marginal(probs, labels, opts.get("n_bins_ace", 20), include_background=opts.get("include_background", False),
                     regions=R)
    for k in r:
        assert m[k] == pytest.approx(r[k], rel=1e-9)
    assert m["NLL"] == pytest.approx(ref_nll(probs, labels, regions=R), rel=1e-6)
    assert m["Brier"] == pytest.approx(ref_brier(probs, labels, regions=R), rel=1e-9)


@pytest.mark.parametrize("regions", [None, BRATS_REGIONS])
def test_merge_of_two_halves_equals_whole(regions):
    probs, labels = softmax_case((8, 7, 6), 4, 12) if regions is None else region_case((8, 7, 6), 12)
    opts = MetricOptions(n_bins_ece=9, n_bins_cece=6, n_bins_pece=5, n_bins_ace=11, fp_weight=1.5)
    whole = CalibrationAccumulator(opts, **rk(regions)).update(probs, labels)
    a = CalibrationAccumulator(opts, **rk(regions)).update(probs[:, :3], labels[:3])
    b = CalibrationAccumulator(opts, **rk(regions)).update(probs[:, 3:], labels[3:])
    # through pickle, as between processes
    merged = pickle.loads(pickle.dumps(a)) + pickle.loads(pickle.dumps(b))
    assert merged.n_cases == 2
    _assert_same(merged.compute(), whole.compute())
    for k in ("ece", "cece", "pece", "marginal"):
        np.testing.assert_array_equal(merged.stats[k].count, whole.stats[k].count)
    # pooled over two *different* cases = metrics of the concatenated voxels
    p2, l2 = softmax_case((8, 7, 6), 4, 13) if regions is None else region_case((8, 7, 6), 13)
    pooled = CalibrationAccumulator(opts, **rk(regions)).update(probs, labels) + CalibrationAccumulator(
        opts, **rk(regions)).update(p2, l2)
    cat_p, cat_l = np.concatenate([probs, p2], 1), np.concatenate([labels, l2], 0)
    _assert_same(pooled.compute(), CalibrationAccumulator(opts, **rk(regions)).update(cat_p, cat_l).compute())
    # empty accumulator is neutral
    _assert_same((CalibrationAccumulator(opts, **rk(regions)) + whole).compute(), whole.compute())


def test_merge_rejects_different_options():
    probs, labels = softmax_case((4, 4), 3, 1)
    a = CalibrationAccumulator(MetricOptions(n_bins_ace=20)).update(probs, labels)
    b = CalibrationAccumulator(MetricOptions(n_bins_ace=10)).update(probs, labels)
    with pytest.raises(ValueError, match="different options"):
        a + b


def test_chunking_does_not_change_results(monkeypatch):
    probs, labels = softmax_case((7, 9, 11), 4, 21)
    full = CalibrationAccumulator().update(probs, labels).compute()
    from nnunet_calibration.metrics import _chunk

    monkeypatch.setattr(_chunk, "CHUNK_VOXELS", 37)  # where the chunked passes read it
    assert len(list(_chunk._chunks(probs, labels))) == -(-labels.size // 37)
    _assert_same(CalibrationAccumulator().update(probs, labels).compute(), full, rel=1e-9)


def test_reliability_data_from_accumulator():
    probs, labels = softmax_case((6, 7, 8), 3, 22)
    acc = CalibrationAccumulator(MetricOptions(n_bins_ace=5)).update(probs, labels)
    edges, n, conf, freq = acc.reliability()
    assert n.shape == (2, 5)
    for k, c in enumerate((1, 2)):
        for b, m in enumerate(ref_bins(probs[c], 5)):
            assert n[k, b] == m.sum()
            if m.sum():
                assert conf[k, b] == pytest.approx(probs[c][m].astype(np.float64).mean())
                assert freq[k, b] == pytest.approx((labels[m] == c).mean())


# ----------------------------------------------------------------------------------------------
# convention="sdc-code": the SDC authors' evaluation code, transcribed here from its formulas
# ----------------------------------------------------------------------------------------------
def sdc_binary_ece(conf, y, n_bins):
    """sum over bins (lo, hi] of n_b / N * |mean conf_b - mean y_b|, N = all values (0 in no bin)."""
    conf = conf.reshape(-1).astype(np.float64)
    y = y.reshape(-1).astype(np.float64)
    edges = np.linspace(0, 1, n_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            total += m.sum() / conf.size * abs(conf[m].mean() - y[m].mean())
    return total


def sdc_code_metrics(probs, labels, thr=1e-3, n_bins=10):
    fg_p = 1.0 - probs[0]
    ece_ = sdc_binary_ece(fg_p, labels != 0, n_bins)
    per_class = []
    for c in range(probs.shape[0]):  # background included
        keep = probs[c] > thr
        if keep.any():
            per_class.append(sdc_binary_ece(probs[c][keep], (labels == c)[keep], n_bins))
    return ece_, (float(np.mean(per_class)) if per_class else 0.0)


@pytest.mark.parametrize("seed", range(3))
def test_sdc_code_convention_matches_transcription(seed):
    probs, labels = softmax_case((7, 9, 11), 4, seed)
    probs[:, 0, 0, :4] = np.array([1, 0, 0, 0], np.float32)[:, None]  # p_fg = 0: in no bin, counted in N
    acc = CalibrationAccumulator(MetricOptions(convention="sdc-code", n_bins_ece=10)).update(probs, labels).compute()
    e, c = sdc_code_metrics(probs, labels)
    assert acc["ECE"] == pytest.approx(e, rel=1e-9)
    assert acc["CECE"] == pytest.approx(c, rel=1e-9)
    default = CalibrationAccumulator().update(probs, labels).compute()
    assert acc["pECE"] == default["pECE"] and acc["NLL"] == default["NLL"]  # the rest is unchanged
    assert acc["ECE"] != pytest.approx(default["ECE"])
    # pooled over two cases = the transcription on the concatenated voxels
    p2, l2 = softmax_case((5, 9, 11), 4, seed + 10)
    both = (CalibrationAccumulator(MetricOptions(convention="sdc-code", n_bins_ece=10)).update(probs, labels)
            + CalibrationAccumulator(MetricOptions(convention="sdc-code", n_bins_ece=10)).update(p2, l2)).compute()
    e, c = sdc_code_metrics(np.concatenate([probs.reshape(4, -1), p2.reshape(4, -1)], 1),
                            np.concatenate([labels.reshape(-1), l2.reshape(-1)]))
    assert both["ECE"] == pytest.approx(e, rel=1e-9) and both["CECE"] == pytest.approx(c, rel=1e-9)
    with pytest.raises(ValueError, match="convention"):
        CalibrationAccumulator(MetricOptions(convention="paper"))


def test_ignore_index_removes_voxels():
    probs, labels = softmax_case((6, 7, 8), 3, 4)
    labels = labels.copy()
    labels[np.random.default_rng(1).random(labels.shape) < 0.3] = 7
    keep = labels != 7
    acc = CalibrationAccumulator(ignore_index=7).update(probs, labels, validate_args=True).compute()
    direct = CalibrationAccumulator().update(probs[:, keep], labels[keep]).compute()
    _assert_same(acc, direct, rel=1e-12)


def test_boundary_ece_with_ignore_label():
    """The band is that of the reference with the ignore label as one more label (EDT of the whole volume
    here); ignored voxels are then left out: the ECE of the remaining band voxels, computed here."""
    from scipy import ndimage

    probs, labels = softmax_case((6, 9, 10), 3, 8)
    labels = labels.copy()
    labels[:, :3, :] = 7
    sp = (2.0, 1.0, 0.7)
    got = CalibrationAccumulator(ignore_index=7).update(probs, labels, spacing=sp).compute()["boundary-ECE"]
    edge = np.zeros(labels.shape, bool)
    for ax in range(3):
        d = np.diff(labels, axis=ax) != 0
        lo, hi = [slice(None)] * 3, [slice(None)] * 3
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    band = (ndimage.distance_transform_edt(~edge, sampling=sp) <= 4.0 * (1 + 1e-9)) & (labels != 7)
    conf = probs.max(0)[band].astype(np.float64)
    correct = (probs.argmax(0) == labels)[band]
    b = np.clip(np.ceil(conf * 15).astype(int) - 1, 0, 14)
    want = sum((b == i).sum() / conf.size * abs(conf[b == i].mean() - correct[b == i].mean())
               for i in range(15) if (b == i).any())
    assert got == pytest.approx(want, rel=1e-6)
