"""Run-to-run noise floor, verdicts against the baseline and convergence, on hand-made report rows
(no nnU-Net): every number recomputed here from its definition (report/noise.py's docstring)."""
import math

import numpy as np
import pytest

from nnunet_calibration.experiments.report import build_report, noise, tables
from nnunet_calibration.experiments.report.data import METRICS, ExperimentResult, MethodResult, ReportData


def _row(method, fold_dsc, run=1, repeat_of=None, cases=None, history=None):
    fm = {f: {m: (v if m == "DSC" else 0.1 + 0.01 * f) for m in METRICS} for f, v in fold_dsc.items()}
    return MethodResult(method=method, trainer="nnUNetTrainerX", folds=sorted(fold_dsc), fold_means=fm, run=run,
                        repeat_of=repeat_of, cases=cases or {}, history=history or {})


def _cases(values, shift=0.0):
    return {f"c{i}": dict({m: (v + shift if m == "DSC" else 0.1) for m in METRICS}, fold=i % 5)
            for i, v in enumerate(values)}


def _experiment():
    rng = np.random.default_rng(0)
    base_cases = list(rng.uniform(0.7, 0.9, 40))
    base = _row("DiceCE", {0: 0.80, 1: 0.82, 2: 0.84, 3: 0.86, 4: 0.88}, cases=_cases(base_cases))
    rep2 = _row("DiceCE_run2", {0: 0.82, 1: 0.81}, run=2, repeat_of="DiceCE")
    rep3 = _row("DiceCE_run3", {0: 0.78, 1: 0.83}, run=3, repeat_of="DiceCE")
    good = _row("Good", {0: 0.90, 1: 0.92, 2: 0.94, 3: 0.96, 4: 0.98}, cases=_cases(base_cases, 0.10))
    tiny = _row("Tiny", {0: 0.801, 1: 0.821, 2: 0.841, 3: 0.861, 4: 0.881}, cases=_cases(base_cases, 0.001))
    return ExperimentResult(name="e", dataset="D", configuration="2d", plans="p", folds=[0, 1, 2, 3, 4],
                            baseline="DiceCE", methods=[base, rep2, rep3, good, tiny])


def test_noise_floor_is_the_pooled_run_to_run_sd():
    e = _experiment()
    fl = noise.noise_floor(e)
    v0 = np.var([0.80, 0.82, 0.78], ddof=1)
    v1 = np.var([0.82, 0.81, 0.83], ddof=1)
    assert fl["DSC"]["sd_run"] == pytest.approx(math.sqrt((v0 + v1) / 2), rel=1e-12)
    assert fl["DSC"]["pairs"] == 2 and fl["DSC"]["methods"] == ["DiceCE"]
    assert fl["ECE"]["sd_run"] == pytest.approx(0.0, abs=1e-12)  # the same ECE in every run here


def test_verdicts_need_the_test_and_the_noise_floor():
    e = _experiment()
    data = ReportData(name="r", experiments=[e])
    tab = tables.compute_tables(data)
    assert tab.method_order == ["DiceCE", "Good", "Tiny"]  # repeats are not rows of the table
    sd = tab.noise["e"]["DSC"]["sd_run"]
    d = tab.differences["e"]
    assert d["Good"]["DSC"]["diff"] == pytest.approx(0.10)
    assert d["Good"]["DSC"]["noise_floor"] == pytest.approx(2 * sd * math.sqrt(2 / 5))
    assert d["Good"]["DSC"]["p"] < 0.05 and d["Good"]["DSC"]["verdict"] == "better"
    # significant per case (a constant shift) but far below the noise floor: not a finding
    assert d["Tiny"]["DSC"]["p"] < 0.05 and d["Tiny"]["DSC"]["verdict"] == "not distinguishable"


def test_without_repeats_no_verdict(tmp_path):
    e = _experiment()
    e.methods = [m for m in e.methods if m.repeat_of is None]
    tab = tables.compute_tables(ReportData(name="r", experiments=[e]))
    assert tab.noise["e"] == {} and tab.differences["e"]["Good"]["DSC"]["verdict"] == "no noise floor"


def _history(values):
    return {e: {"pseudo_dice": [v, v], "train_loss": -v, "val_loss": None, "time": 1.0, "lr": None}
            for e, v in enumerate(values)}


def test_convergence_of_the_baseline():
    e = _experiment()
    rising = list(np.linspace(0.2, 0.9, 50))
    e.methods[0].history = {0: _history(rising), 1: _history(rising)}
    c = noise.convergence(e)
    assert c["epochs"] == [40, 49] and c["still_rising"]
    assert c["rise"] == pytest.approx(0.7 / 49 * 9, rel=1e-9)
    flat = rising[:40] + [0.9] * 10
    e.methods[0].history = {0: _history(flat), 1: _history(flat)}
    c = noise.convergence(e)
    assert not c["still_rising"] and abs(c["rise"]) < 1e-12
    # the mean over folds of each epoch's class mean
    e.methods[0].history = {0: _history([0.1, 0.2]), 1: {0: {"pseudo_dice": [0.3, float("nan")], "train_loss": 1.0}}}
    cur = noise.curves(e.methods[0])
    assert cur["epochs"] == [0, 1] and cur["pseudo_dice"] == pytest.approx([0.2, 0.2])


def test_report_shows_the_noise_section_and_the_learning_curves(tmp_path):
    e = _experiment()
    e.methods[0].history = {0: _history(list(np.linspace(0.2, 0.9, 30)))}
    build_report(ReportData(name="r", experiments=[e]), tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "## Run-to-run noise, differences to the baseline, convergence" in text
    assert "**better**" in text and "still rising" in text
    assert (tmp_path / "learning_curves.png").is_file() and "![learning curves](learning_curves.png)" in text
