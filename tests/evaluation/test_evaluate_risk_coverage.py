"""calib-evaluate's case-level confidence scores and risk-coverage section (issue 23, "which cases to
distrust"): the scores equal the metric functions called directly on the same arrays, the areas
equal aurc / eaurc / augrc of the per_case.csv values, the NaN convention (excluded and counted),
risk_coverage.png (and none with --no-plots), and --help listing the scores."""
import csv
import json
import math

import numpy as np
import pytest

from nnunet_calibration.evaluation import evaluate_folders
from nnunet_calibration.evaluation.cli import build_parser, main
from nnunet_calibration.evaluation.output import MANIFEST
from nnunet_calibration.evaluation.plots import risk_coverage_figure
from nnunet_calibration.evaluation.scores import RISKS, SCORES, plot_curves, risk_coverage_summary
from nnunet_calibration.metrics import (augrc, aurc, boundary_entropy, eaurc, expected_dice, foreground_entropy,
                                        uncertain_fraction)
from test_evaluate import REGIONS, make_folders

SCORE_NAMES = ("foreground_entropy", "boundary_entropy", "expected_dice", "uncertain_fraction")


def direct_scores(probs, spacing, regions):
    """The four scores from the metric functions on the label map made here (argmax; regions:
    ``seg[p_r > 0.5] = r + 1`` in channel order, nnU-Net's convention)."""
    if regions is None:
        seg, kw = probs.argmax(0).astype(np.int32), {}
    else:
        seg = np.zeros(probs.shape[1:], np.int32)
        for i, c in enumerate([1, 2, 3]):
            seg[probs[i] > 0.5] = c
        kw = {"regions": True, "region_labels": regions}
    return {"foreground_entropy": foreground_entropy(probs, seg, **kw),
            "boundary_entropy": boundary_entropy(probs, seg, spacing, **kw),
            "expected_dice": expected_dice(probs, seg, **kw),
            "uncertain_fraction": uncertain_fraction(probs, seg, **kw)}


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def csv_float(text):
    return math.nan if text == "" else float(text)


def areas_from_csv(rows, score, risk):
    """AURC, e-AURC, AUGRC of the CSV's columns, cases with a NaN score or risk left out."""
    sign = 1.0 if score == "expected_dice" else -1.0
    conf, r = [], []
    for row in rows:
        s = csv_float(row[score])
        v = 1.0 - float(row["DSC_mean"]) if risk == "1-DSC" else float(row["HD95_mean"])
        if not math.isnan(s):
            conf.append(sign * s)
            r.append(v)
    return {"AURC": aurc(conf, r), "e-AURC": eaurc(conf, r), "AUGRC": augrc(conf, r)}, len(conf)


@pytest.mark.parametrize("regions", [False, True])
def test_scores_and_areas_match_direct_computation(tmp_path, regions):
    pred, gt, data = make_folders(tmp_path, n_cases=4, regions=regions, seed=7 + int(regions))
    out = tmp_path / "out"
    summary = evaluate_folders([pred], gt, out_dir=out, progress=False)
    assert tuple(SCORES) == SCORE_NAMES and tuple(RISKS) == ("1-DSC", "HD95")
    rows = read_csv(out / "per_case.csv")
    assert [r["case"] for r in rows] == sorted(data)
    for entry, row in zip(summary["cases"], rows):
        probs, lab, spacing = data[entry["case"]]
        want = direct_scores(probs, spacing, REGIONS if regions else None)
        for k in SCORE_NAMES:
            assert np.isfinite(want[k]), k
            assert entry["scores"][k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), k
            assert float(row[k]) == entry["scores"][k]  # the CSV holds repr(float): exact
    rc = summary["risk_coverage"]
    assert set(rc) == set(SCORE_NAMES)
    for score in SCORE_NAMES:
        assert set(rc[score]) == {"1-DSC", "HD95"}
        for risk in ("1-DSC", "HD95"):
            want, n = areas_from_csv(rows, score, risk)
            got = rc[score][risk]
            assert (got["n_cases"], got["n_excluded"], got["excluded_cases"]) == (4, 0, [])
            for k in ("AURC", "e-AURC", "AUGRC"):
                assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15), (score, risk, k)
            assert got["e-AURC"] >= -1e-12 and got["AUGRC"] <= got["AURC"] + 1e-12
    assert json.loads((out / "summary.json").read_text())["risk_coverage"] == rc
    png = out / "risk_coverage.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert "risk_coverage.png" in json.loads((out / MANIFEST).read_text())["files"]
    assert summary["plots"]["risk_coverage"] is True


def test_nan_score_excluded_and_counted_and_no_plot_with_no_plots(tmp_path, capsys):
    pred, gt, data = make_folders(tmp_path, n_cases=4, seed=11)
    # case_002: everything predicted background -> no predicted foreground: every score is NaN
    probs = data["case_002"][0].copy()
    probs[0] = 0.97
    probs[1:] = 0.01
    np.savez_compressed(pred / "case_002.npz", probabilities=probs)
    out = tmp_path / "out"
    assert main([str(pred), "--gt", str(gt), "-o", str(out), "--no-plots", "--no-progress"]) == 0
    assert "AURC (1-DSC): foreground_entropy " in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    rows = read_csv(out / "per_case.csv")
    bad = summary["cases"][2]
    assert bad["case"] == "case_002" and bad["metrics"]["DSC_mean"] == 0.0
    assert bad["scores"] == dict.fromkeys(SCORE_NAMES)  # NaN: null in JSON
    assert all(rows[2][k] == "" for k in SCORE_NAMES)  # and empty in the CSV
    for score in SCORE_NAMES:
        for risk in ("1-DSC", "HD95"):
            got = summary["risk_coverage"][score][risk]
            assert (got["n_cases"], got["n_excluded"], got["excluded_cases"]) == (3, 1, ["case_002"])
            want, n = areas_from_csv(rows, score, risk)
            assert n == 3
            for k in ("AURC", "e-AURC", "AUGRC"):
                assert got[k] == pytest.approx(want[k], rel=1e-12, abs=1e-15)
    assert not (out / "risk_coverage.png").exists()
    assert summary["plots"]["risk_coverage"] is False
    assert "risk_coverage.png" not in json.loads((out / MANIFEST).read_text())["files"]


def _case(name, scores, dsc, hd):
    return {"case": name, "scores": scores, "metrics": {"DSC_mean": dsc, "HD95_mean": hd}}


def test_nan_risk_excluded_and_no_case_left_gives_nan():
    s = dict.fromkeys(SCORE_NAMES, 0.5)
    cases = [_case("a", dict(s, expected_dice=0.9), 0.8, 3.0), _case("b", dict(s, expected_dice=0.4), 0.5, math.nan),
             _case("c", dict(s, expected_dice=0.7), 0.6, None), _case("d", dict(s, expected_dice=None), 0.1, 9.0)]
    rc = risk_coverage_summary(cases)
    ed = rc["expected_dice"]
    assert (ed["1-DSC"]["n_cases"], ed["1-DSC"]["excluded_cases"]) == (3, ["d"])
    assert ed["1-DSC"]["AURC"] == pytest.approx(aurc([0.9, 0.4, 0.7], [0.2, 0.5, 0.4]))
    # by hand: accepted in the order a, c, b (risks 0.2, 0.4, 0.5), G linear between the points
    assert ed["1-DSC"]["AURC"] == pytest.approx((1.1 - 0.2 * math.log(2) - 0.4 * math.log(1.5)) / 3)
    assert (ed["HD95"]["n_cases"], ed["HD95"]["excluded_cases"]) == (1, ["b", "c", "d"])
    assert ed["HD95"]["AURC"] == pytest.approx(3.0) and ed["HD95"]["e-AURC"] == pytest.approx(0.0)
    none_left = risk_coverage_summary([_case("x", dict.fromkeys(SCORE_NAMES), 0.5, 1.0)])
    for score in SCORE_NAMES:
        got = none_left[score]["1-DSC"]
        assert got["n_cases"] == 0 and got["n_excluded"] == 1
        assert all(math.isnan(got[k]) for k in ("AURC", "e-AURC", "AUGRC"))


def test_figure_has_one_curve_per_score_and_the_optimal_and_random_ones():
    rng = np.random.default_rng(0)
    cases = [_case(f"c{i}", {k: float(rng.random()) for k in SCORE_NAMES}, float(rng.random()), 1.0)
             for i in range(6)]
    curves = plot_curves(cases)
    fig = risk_coverage_figure(curves, "1-DSC")
    labels = [line.get_label() for line in fig.axes[0].get_lines()]
    assert labels == [*SCORE_NAMES, "optimal", "random"]
    mean_risk = np.mean([1 - c["metrics"]["DSC_mean"] for c in cases])
    assert fig.axes[0].get_lines()[-1].get_ydata()[0] == pytest.approx(mean_risk)
    assert curves["optimal"].selective_risk[-1] == pytest.approx(mean_risk)


def test_help_lists_the_scores_and_the_risk_coverage_output():
    text = build_parser().format_help()
    for word in (*SCORE_NAMES, "AURC", "e-AURC", "AUGRC", "risk_coverage.png", "n_excluded"):
        assert word in text, word
