"""The report's tables, statistics, cross-fitting and rendering on small hand-made inputs (no nnU-Net run).

The last tests build a complete experiment folder by hand (references, dataset.json, ``fold_X``
folders with ``.npz`` probabilities, no training) and run :func:`make_report` / ``calib-experiment
report`` on it: the evaluator and the report's code are real, only the "trained network" is made up.
"""
import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import yaml

from nnunet_calibration.experiments import cli
from nnunet_calibration.posthoc import scaling
from nnunet_calibration.settings import ExperimentError, load_experiment
from nnunet_calibration.experiments.report import (METRICS, ExperimentResult, MethodResult, ReportData, build_report,
                                                   gather, make_report, render, tables)
from nnunet_calibration.metrics import CalibrationAccumulator


def _fold_means(**per_metric):
    """{fold: {metric: value}} from metric=[fold values]; other metrics 0.5."""
    n = len(next(iter(per_metric.values())))
    return {f: {m: per_metric.get(m, [0.5] * n)[f] for m in METRICS} for f in range(n)}


def _data():
    a = MethodResult("A", "TrA", folds=[0, 1], fold_means=_fold_means(DSC=[0.8, 0.9], ECE=[0.10, 0.20]),
                     cases={"c1": {m: 0.5 for m in METRICS} | {"fold": 0}}, train_seconds={0: 600.0, 1: 900.0})
    b = MethodResult("B", "TrB", folds=[0, 1], fold_means=_fold_means(DSC=[0.7, 0.7], ECE=[0.05, 0.05]))
    c = MethodResult("C", "TrC", folds=[0], missing_folds=[1], fold_means=_fold_means(DSC=[0.6], ECE=[float("nan")]),
                     missing_info=[{"fold": 1, "status": "not started", "detail": "", "log": ""}])
    e = ExperimentResult(name="e", dataset="Dataset1_X", configuration="2d", plans="P", folds=[0, 1],
                         baseline="A", methods=[a, b, c])
    return ReportData(name="r", experiments=[e], rank_metrics=("DSC", "ECE"))


def test_compute_tables_hand_computed():
    tab = tables.compute_tables(_data())
    assert tab.method_order == ["A", "B", "C"]
    assert tab.mean["A"]["e/DSC"] == pytest.approx(0.85)
    assert tab.std["A"]["e/DSC"] == pytest.approx(np.std([0.8, 0.9], ddof=1))
    assert tab.mean["A"]["e/ECE"] == pytest.approx(0.15)
    assert tab.mean["B"]["e/ECE"] == pytest.approx(0.05) and tab.std["B"]["e/ECE"] == pytest.approx(0.0)
    assert math.isnan(tab.std["C"]["e/DSC"])  # one fold: no spread
    assert math.isnan(tab.mean["C"]["e/ECE"])  # all folds undefined
    assert tab.folds["C"]["e"] == ([0], [1])
    # DSC higher is better: A best, B second; ECE lower is better: B best, A second (C undefined)
    assert tab.mark("A", "e/DSC") == "best" and tab.mark("B", "e/DSC") == "second" and tab.mark("C", "e/DSC") == ""
    assert tab.mark("B", "e/ECE") == "best" and tab.mark("A", "e/ECE") == "second"
    # ranks over DSC and ECE only: C has no ECE -> not ranked; A: (1 + 2) / 2, B: (2 + 1) / 2
    assert tab.avg_rank == {"A": 1.5, "B": 1.5} and tab.position == {"A": 1, "B": 1}
    assert tab.friedman["pvalue"] is None and "at least 3 methods" in tab.friedman["note"]
    assert set(tab.wilcoxon["e"]) == {"B", "C"}  # against the baseline A


def test_signed_error_and_aurc_columns():
    """SCE: closest to 0 is best (A over-confident +0.10, B under-confident -0.05: B best); its per-class
    columns are in table.csv; AURC: lower is better, mean over folds like every column."""
    d = _data()
    a, b, c = d.experiments[0].methods
    d.experiments[0].classes = ["lv", "rv"]
    for f in (0, 1):
        a.fold_means[f].update(SCE=0.10, AURC=[0.20, 0.30][f], SCE_rv=0.3, SCE_lv=-0.1)
        b.fold_means[f].update(SCE=-0.05, AURC=0.10, SCE_rv=-0.2, SCE_lv=0.0)
    c.fold_means[0].update(SCE=-0.2, AURC=0.4)
    tab = tables.compute_tables(d)
    assert tab.mark("B", "e/SCE") == "best" and tab.mark("A", "e/SCE") == "second"
    assert tab.mean["A"]["e/AURC"] == pytest.approx(0.25) and tab.mark("B", "e/AURC") == "best"
    assert tab.class_columns == {"e": ["SCE_lv", "SCE_rv"]}  # the classes' order
    assert tab.mark("B", "e/SCE_lv") == "best" and tab.mark("B", "e/SCE_rv") == "best"
    assert math.isnan(tab.mean["C"]["e/SCE_lv"])  # C's folds have no per-class values


def test_signed_error_and_aurc_in_the_report_files(tmp_path):
    d = _data()
    a = d.experiments[0].methods[0]
    d.experiments[0].classes = ["lv"]
    for f in (0, 1):
        a.fold_means[f].update(SCE=[0.1, 0.3][f], SCE_lv=[0.1, 0.3][f], AURC=0.2)
    build_report(d, tmp_path)
    with open(tmp_path / "table.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(rows["A"]["e/SCE"]) == pytest.approx(0.2) and float(rows["A"]["e/SCE_lv"]) == pytest.approx(0.2)
    assert float(rows["A"]["e/AURC"]) == pytest.approx(0.2) and rows["C"]["e/SCE_lv"] == ""
    md = (tmp_path / "README.md").read_text()
    assert "| SCE | AURC |" in md and "**> 0 over-confident, < 0 under-confident**" in md
    assert "expected_dice" in md


def test_gather_reads_summaries_written_before_new_keys():
    """A summary of an older evaluator (no binning / SCE / risk_coverage keys) is read with defaults and NaN."""
    from nnunet_calibration.settings import MetricOptions

    old = {"config": {"n_bins_ece": 10, "n_bins_cece": 10, "convention": "default"},
           "mean": {"DSC": 0.8, "HD95": 3.0, "ECE": 0.1}, "cases": []}
    opts = gather.metric_options(old)
    assert opts == MetricOptions(n_bins_ece=10)  # missing keys: defaults; given keys kept
    fm = gather.fold_means(old)
    assert fm["DSC"] == 0.8 and math.isnan(fm["SCE"]) and math.isnan(fm["AURC"])
    with pytest.raises(ExperimentError, match=r"summary.json: config.n_bins_ece must be a positive integer"):
        gather.metric_options({"config": {"n_bins_ece": 0}})
    new = dict(old, risk_coverage={"expected_dice": {"1-DSC": {"AURC": 0.125}}}, mean=dict(old["mean"], SCE=-0.1,
                                                                                             SCE_lv=-0.2))
    fm = gather.fold_means(new)
    assert fm["AURC"] == 0.125 and fm["SCE"] == -0.1 and fm["SCE_lv"] == -0.2


def test_unknown_rank_metric_is_an_error():
    d = _data()
    d.rank_metrics = ("DSC", "ECCE")
    with pytest.raises(ValueError, match="ECCE"):
        tables.compute_tables(d)


def test_markdown_and_csv(tmp_path):
    d = _data()
    build_report(d, tmp_path)
    md = (tmp_path / "README.md").read_text()
    assert "| A | 2/2 | **0.850 ± 0.071** |" in md
    assert "| C | 1/2 (missing 1) |" in md and "fold 1: **not started**" in md
    # dsc_vs_ece has something to draw, reliability and the sweep have not: only existing files are linked
    assert (tmp_path / "dsc_vs_ece.png").is_file() and "(dsc_vs_ece.png)" in md
    assert not (tmp_path / "reliability.png").exists() and "reliability.png" not in md
    assert "threshold_sweep.png" not in md
    with open(tmp_path / "table.csv") as fh:
        rows = {r["method"]: r for r in csv.DictReader(fh)}
    assert float(rows["A"]["e/DSC"]) == pytest.approx(0.85) and rows["A"]["e/DSC_mark"] == "best"
    assert rows["C"]["e/ECE"] == "" and rows["C"]["e/missing_folds"] == "1"
    rep = json.loads((tmp_path / "report.json").read_text())
    assert rep["table"]["C"]["mean"]["e/ECE"] is None  # NaN -> null
    assert render.fmt(float("nan"), "DSC") == "—" and render.fmt(2.345, "HD95", 0.1) == "2.35 ± 0.10"
    # training time: A's two folds took 10 and 15 minutes; B and C have no training log
    assert "## Training time" in md and "| A | 2 | 12.5 | 25.0 |" in md
    assert "Training time of all rows: 25 min (0.4 h)" in md
    assert rep["training_seconds"]["e"] == {"A": {"0": 600.0, "1": 900.0}}


def test_empty_report_is_an_error(tmp_path):
    d = _data()
    for m in d.experiments[0].methods:
        m.fold_means = {}
    with pytest.raises(ExperimentError, match="no finished fold"):
        build_report(d, tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- cross-fitting -------------------------------------------------------------------------------
def _nll_softmax(p, y, t):
    """Mean -log softmax(log p / t)[y] over voxels: p (N, C), y (N,)."""
    z = np.log(np.clip(p, scaling.PROB_FLOOR, 1 - scaling.PROB_FLOOR)) / t
    z -= z.max(1, keepdims=True)
    return float(np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]))


def _grid_temperature(p, y):
    grid = np.linspace(0.05, 6, 11901)  # step 5e-4
    return float(grid[np.argmin([_nll_softmax(p, y, t) for t in grid])])


def test_crossfit_temperatures_equal_hand_computation():
    rng = np.random.default_rng(0)
    per_fold, raw = {}, {}
    for k, scale in enumerate((3.0, 1.0, 0.5)):  # over-, well- and under-confident folds
        y = rng.integers(0, 3, 400)
        logits = rng.normal(0, 1, (400, 3)) + 1.5 * np.eye(3)[y]
        p = np.exp(scale * logits)
        p /= p.sum(1, keepdims=True)
        raw[k] = (p, y)
        per_fold[k] = (scaling.log_probabilities(p, False), y)
    params, cross = scaling.crossfit(per_fold, False, tables.SCALINGS["TS"].method)
    assert cross
    for k in range(3):
        p = np.concatenate([raw[f][0] for f in range(3) if f != k])
        y = np.concatenate([raw[f][1] for f in range(3) if f != k])
        assert params[k] == pytest.approx(_grid_temperature(p, y), abs=2e-3)
    assert len({round(v, 2) for v in params.values()}) == 3  # the folds really differ


# -- a complete hand-made experiment (no training) -----------------------------------------------
FOLD_SCALES = {0: 3.0, 1: 1.0, 2: 0.6}
CASES_PER_FOLD = 2
SHAPE = (1, 8, 8)


def _make_layout(root: Path, finished: bool = True) -> tuple[Path, dict]:
    """nnU-Net-like folders of a 2-class 2D dataset with three folds; returns (experiment file, cases)."""
    rng = np.random.default_rng(1)
    pre = root / "pre" / "Dataset950_Hand"
    (pre / "gt_segmentations").mkdir(parents=True)
    (pre / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "fg": 1}, "file_ending": ".nii.gz",
                                                  "channel_names": {"0": "x"}, "numTraining": 6}))
    model = root / "res" / "Dataset950_Hand" / "nnUNetTrainerDiceCE__nnUNetPlans__2d"
    cases = {}
    for fold, scale in FOLD_SCALES.items():
        val = model / f"fold_{fold}" / "validation"
        val.mkdir(parents=True)
        if finished:
            (model / f"fold_{fold}" / "checkpoint_final.pth").write_bytes(b"not a real checkpoint")
            (val / "summary.json").write_text("{}")
        for i in range(CASES_PER_FOLD):
            case = f"case_{fold}{i}"
            y = (rng.random(SHAPE) < 0.4).astype(np.uint8)
            logit = rng.normal(0, 1, SHAPE) + 1.0 * (2 * y.astype(float) - 1)
            p1 = 1 / (1 + np.exp(-scale * logit))
            probs = np.stack([1 - p1, p1]).astype(np.float32)
            np.savez(val / f"{case}.npz", probabilities=probs)
            sitk.WriteImage(sitk.GetImageFromArray(y), str(pre / "gt_segmentations" / f"{case}.nii.gz"))
            cases[case] = (fold, probs, y)
    exp_file = root / "hand.yaml"
    exp_file.write_text(yaml.safe_dump({
        "name": "hand", "dataset": "Dataset950_Hand", "configuration": "2d", "folds": [0, 1, 2],
        "trainers": ["nnUNetTrainerDiceCE"], "state_dir": str(root / "state"),
        "nnunet_paths": {"preprocessed": str(root / "pre"), "results": str(root / "res")},
        "report": {"max_fit_voxels": 10 ** 6, "threshold_sweep": False, "postprocessing": False}}))
    return exp_file, cases


def _without_posthoc(exp):
    """The experiment as validate() would give it, without the post-hoc rows."""
    report = dataclasses.replace(exp.report, temperature_scaling=False, vector_scaling=False)
    return dataclasses.replace(exp, report=report).with_dataset_name("Dataset950_Hand")


def _nll_case(probs, y, params):
    """The evaluator's NLL of one case after scaling with ``params``: mean -log max(q[y], 1e-7)."""
    q = scaling.apply_scaling(probs, params, False)
    qy = np.where(y == 1, q[1], q[0])
    return float(np.mean(-np.log(np.maximum(qy.astype(np.float64), 1e-7))))


def test_cross_fitted_rows_equal_hand_computation(tmp_path):
    exp_file, cases = _make_layout(tmp_path)
    exp = load_experiment(exp_file).with_dataset_name("Dataset950_Hand")  # what validate() sets (needs nnU-Net plans)
    out = make_report([exp], tmp_path / "out", progress=False)
    rep = json.loads((out / "report.json").read_text())
    with open(out / "table.csv") as fh:
        table = {r["method"]: r for r in csv.DictReader(fh)}
    assert set(table) == {"nnUNetTrainerDiceCE", "nnUNetTrainerDiceCE + TS", "nnUNetTrainerDiceCE + VS"}
    ts = rep["temperature_scaling"]["hand"]["nnUNetTrainerDiceCE + TS"]
    assert ts["cross_fitted"] is True
    # the + TS row says which calibration it is (issue 22): per fold, in calibration.json's words
    assert ts["scope"] == "folds 0 1 2 validation (per fold: each case predicted by the fold that did not train on it)"
    assert ts["scope"] in (out / "README.md").read_text()
    # by hand: fold k's temperature from the other folds' voxels (grid search), the fold's NLL the mean over
    # its cases, the table value the mean over folds
    fold_nll = []
    for k in FOLD_SCALES:
        others = [(p, y) for (f, p, y) in cases.values() if f != k]
        p = np.concatenate([o[0].reshape(2, -1).T for o in others])
        y = np.concatenate([o[1].reshape(-1) for o in others]).astype(int)
        t = _grid_temperature(p, y)
        assert ts["per_fold"][str(k)] == pytest.approx(t, abs=2e-3)
        assert ts["fit_voxels"][str(k)] == y.size
        fold_nll.append(np.mean([_nll_case(pp, yy, ts["per_fold"][str(k)]) for (f, pp, yy) in cases.values()
                                 if f == k]))
        assert rep["fold_means"]["hand"]["nnUNetTrainerDiceCE + TS"][str(k)]["NLL"] == pytest.approx(fold_nll[-1],
                                                                                                     rel=1e-5)
    assert float(table["nnUNetTrainerDiceCE + TS"]["hand/NLL"]) == pytest.approx(np.mean(fold_nll), rel=1e-5)
    # the in-sample temperature (all folds) is reported, not used for the table
    p_all = np.concatenate([c[1].reshape(2, -1).T for c in cases.values()])
    y_all = np.concatenate([c[2].reshape(-1) for c in cases.values()]).astype(int)
    assert ts["temperature"] == pytest.approx(_grid_temperature(p_all, y_all), abs=2e-3)
    # TS keeps the argmax: DSC unchanged
    assert float(table["nnUNetTrainerDiceCE + TS"]["hand/DSC"]) == pytest.approx(
        float(table["nnUNetTrainerDiceCE"]["hand/DSC"]))
    # VS: fold k's two temperatures, applied to fold k, give the row's fold NLL; they minimise the other
    # folds' NLL (a small step in any direction makes it worse)
    vs = rep["temperature_scaling"]["hand"]["nnUNetTrainerDiceCE + VS"]
    for k in FOLD_SCALES:
        tk = np.array(vs["per_fold"][str(k)])
        assert tk.shape == (2,)
        want = np.mean([_nll_case(pp, yy, tk) for (f, pp, yy) in cases.values() if f == k])
        assert rep["fold_means"]["hand"]["nnUNetTrainerDiceCE + VS"][str(k)]["NLL"] == pytest.approx(want, rel=1e-5)
        others = [(p, y) for (f, p, y) in cases.values() if f != k]
        p = np.concatenate([o[0].reshape(2, -1).T for o in others])
        y = np.concatenate([o[1].reshape(-1) for o in others]).astype(int)
        base = _nll_softmax(p, y, tk[None, :])
        for d in ([1, 0], [0, 1], [-1, 0], [0, -1]):
            assert _nll_softmax(p, y, (tk * np.exp(0.02 * np.array(d)))[None, :]) >= base - 1e-9
    md = (out / "README.md").read_text()
    assert "cross-fitted" in md and "(reliability.png)" in md and (out / "reliability.png").is_file()
    # AURC column: per fold the AURC of expected_dice against 1 - DSC, by hand from the evaluator's per-case
    # values: most confident first, G(k/N) = sum of the first k risks / N, linear between the points,
    # AURC = integral of G(c)/c (constant R on the first segment; a ln(c1/c0) + b (c1 - c0) on the others)
    aurcs = []
    for k in FOLD_SCALES:
        summ = json.loads((out / "evaluation" / "hand" / "nnUNetTrainerDiceCE" / f"fold_{k}" / "summary.json").read_text())
        order = sorted(summ["cases"], key=lambda c: -c["scores"]["expected_dice"])
        risk = [1 - c["metrics"]["DSC_mean"] for c in order]
        n = len(risk)
        g = np.cumsum(risk) / n
        area = risk[0] / n
        for i in range(1, n):
            c0, c1 = i / n, (i + 1) / n
            b = (g[i] - g[i - 1]) / (c1 - c0)
            area += (g[i - 1] - b * c0) * np.log(c1 / c0) + b * (c1 - c0)
        aurcs.append(area)
        assert rep["fold_means"]["hand"]["nnUNetTrainerDiceCE"][str(k)]["AURC"] == pytest.approx(aurcs[-1])
    assert float(table["nnUNetTrainerDiceCE"]["hand/AURC"]) == pytest.approx(np.mean(aurcs))
    # SCE column (and its per-class column SCE_fg): per case mean probability of class 1 minus its frequency
    # over the voxels with p_1 > 1e-3, mean over the fold's cases, then over folds
    fold_sce = []
    for k in FOLD_SCALES:
        per_case = []
        for f, p, y in cases.values():
            keep = p[1] > np.float32(1e-3)
            if f == k:
                per_case.append(p[1][keep].astype(np.float64).mean() - (y[keep] == 1).mean())
        fold_sce.append(np.mean(per_case))
    for col in ("hand/SCE", "hand/SCE_fg"):
        assert float(table["nnUNetTrainerDiceCE"][col]) == pytest.approx(np.mean(fold_sce), rel=1e-6)


def test_report_reliability_is_the_accumulators_ece_binning(tmp_path):
    """The report's reliability statistics are the metrics accumulator's ECE bins (one binning)."""
    exp_file, cases = _make_layout(tmp_path)
    exp = load_experiment(exp_file).with_dataset_name("Dataset950_Hand")
    info = gather.DatasetInfo(exp)
    rows = gather.gather_method(exp, exp.trainers[0], info, tmp_path / "work", progress=False)
    acc = CalibrationAccumulator()
    for _, p, y in cases.values():
        acc.update(p, y)
    np.testing.assert_array_equal(rows[0].reliability.count, acc.stats["ece"].count)
    assert rows[0].pooled["ECE"] == pytest.approx(acc.compute()["ECE"])
    # and by hand for one bin: foreground voxels whose confidence is in (14/15, 1]
    p = np.concatenate([c[1].reshape(2, -1) for c in cases.values()], 1)
    y = np.concatenate([c[2].reshape(-1) for c in cases.values()])
    conf = p.max(0)[y != 0]
    assert rows[0].reliability.bin_count[0, -1] == np.count_nonzero(conf > np.float32(14 / 15))


def test_report_without_posthoc_rows(tmp_path):
    exp_file, _ = _make_layout(tmp_path)
    exp = _without_posthoc(load_experiment(exp_file))
    out = make_report([exp], tmp_path / "out", progress=False)
    with open(out / "table.csv") as fh:
        assert [r["method"] for r in csv.DictReader(fh)] == ["nnUNetTrainerDiceCE"]
    assert "(not computed)" in (out / "README.md").read_text()


def test_calib_experiment_report_without_finished_fold_exits_nonzero(tmp_path, capsys):
    exp_file, _ = _make_layout(tmp_path, finished=False)
    # check_trainers=False skips nnU-Net's trainer lookup; validate still needs the plans file
    plans = tmp_path / "pre" / "Dataset950_Hand" / "nnUNetPlans.json"
    plans.write_text(json.dumps({"configurations": {"2d": {"data_identifier": "nnUNetPlans_2d"}}}))
    (plans.parent / "nnUNetPlans_2d").mkdir(exist_ok=True)
    (plans.parent / "nnUNetPlans_2d" / "case.b2nd").write_bytes(b"")  # "preprocessed" for validate()
    rc = cli.main(["report", str(exp_file), "--output-root", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "no finished fold" in err, err
    assert not (tmp_path / "out" / "hand").exists()
    assert not [p for p in (tmp_path / "out").iterdir()] if (tmp_path / "out").exists() else True


def test_report_keeps_a_copy_of_the_experiment_file_even_when_it_lives_in_the_report_folder(tmp_path):
    """The report folder is replaced as a whole; the experiment file is copied into it, so a study whose
    experiment file sits inside its own report folder (``results/<name>/experiment.yaml``) keeps it."""
    exp_file, _ = _make_layout(tmp_path)
    inside = tmp_path / "out" / "hand" / "experiment.yaml"
    inside.parent.mkdir(parents=True)
    text = exp_file.read_text()
    inside.write_text(text)
    (inside.parent / "stray.txt").write_text("somebody's notes")

    def load():
        return _without_posthoc(load_experiment(inside))

    # a file no report wrote stops the report: the folder is replaced as a whole, nothing of the user's is lost
    with pytest.raises(ExperimentError, match=r"holds files no report wrote .*stray.txt"):
        make_report([load()], tmp_path / "out", progress=False)
    assert (inside.parent / "stray.txt").read_text() == "somebody's notes" and inside.read_text() == text
    (inside.parent / "stray.txt").unlink()
    out = make_report([load()], tmp_path / "out", progress=False)
    assert out == inside.parent
    assert inside.read_text() == text  # the same bytes, now the report's copy
    manifest = json.loads((out / ".calib_report_manifest.json").read_text())["files"]
    assert "experiment.yaml" in manifest and "README.md" in manifest
    rep = json.loads((out / "report.json").read_text())
    assert rep["experiments"][0]["copy"] == "experiment.yaml"
    # paths are recorded relative to the report folder: a report names no path of the machine it was made on
    assert rep["experiments"][0]["file"] == "experiment.yaml"
    assert str(tmp_path) not in (out / "report.json").read_text() and str(tmp_path) not in (out / "README.md").read_text()
    assert "copied here as [`experiment.yaml`](experiment.yaml)" in (out / "README.md").read_text()
    # a second report from that very file works again
    make_report([load()], tmp_path / "out", progress=False)
    assert inside.read_text() == text


def test_a_report_of_an_earlier_version_is_replaced_but_nothing_else(tmp_path):
    """A report folder from before the manifest (as committed in ``results/``, e.g. the nested
    ``evaluation/<experiment>/<method>/fold_<k>/summary.json``) may be replaced; a file of any other kind
    in it may not."""
    from nnunet_calibration.experiments.report import check_replaceable

    old = tmp_path / "old"
    for rel in ("README.md", "table.csv", "report.json", "reliability.png", "experiment.yaml",
                "evaluation/acdc-subset-demo/nnUNetTrainerDiceCE+TS/fold_0/summary.json"):
        (old / rel).parent.mkdir(parents=True, exist_ok=True)
        (old / rel).write_text("x")
    check_replaceable(old, {})
    for stray in ("evaluation/acdc-subset-demo/notes.txt", "sub/table.csv"):
        (old / stray).parent.mkdir(parents=True, exist_ok=True)
        (old / stray).write_text("mine")
        with pytest.raises(ExperimentError, match=f"holds files no report wrote .*{stray}"):
            check_replaceable(old, {})
        (old / stray).unlink()
