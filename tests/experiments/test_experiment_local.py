"""calib-experiment with the local backend, end to end with real nnU-Net on the tiny synthetic dataset.

Two trainers (nnUNetTrainerDiceCE, nnUNetTrainerLS_DC) x two folds, SHORT training (1 epoch of 2
iterations). The DiceCE fold 0 trained by the ``synthetic_prediction`` fixture with the same
hyperparameters is reused (skipped), the three other folds are trained here.
"""
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from experiments_testlib import SHORT, check_table_against_evaluator, load_json, read_table, write_experiment
from nnunet_calibration.experiments import cli

pytestmark = pytest.mark.nnunet

TRAINERS = ["nnUNetTrainerDiceCE", "nnUNetTrainerLS_DC"]


def _snapshot(results: Path) -> dict:
    """mtime of every checkpoint and training log under the trainers' folders."""
    out = {}
    for t in TRAINERS:
        for p in (results / "Dataset901_SynthLabels" / f"{t}__nnUNetPlans__2d").rglob("*"):
            if p.suffix in (".pth", ".txt") and p.is_file():
                out[str(p)] = p.stat().st_mtime_ns
    return out


@pytest.fixture(scope="module")
def local_run(synthetic_prediction, tmp_path_factory):
    ds = synthetic_prediction.dataset
    tmp = tmp_path_factory.mktemp("exp_local")
    results = Path(ds.env["nnUNet_results"])
    fixture_ckpt = synthetic_prediction.model_folder / "fold_0" / "checkpoint_final.pth"
    fixture_mtime = fixture_ckpt.stat().st_mtime_ns
    exp_file = write_experiment(tmp / "local.yaml", name="local-e2e", dataset=901, configuration="2d", folds=[0, 1],
                                device="cpu", training=SHORT, trainers=TRAINERS,
                                state_dir=str(tmp / "state"), report={"max_fit_voxels": 50000})
    rc = cli.main(["run", str(exp_file), "--output-root", str(tmp / "results"), "--quiet"])
    assert rc == 0
    return SimpleNamespace(tmp=tmp, exp_file=exp_file, report=tmp / "results" / "local-e2e", results=results, ds=ds,
                           fixture_ckpt=fixture_ckpt, fixture_mtime=fixture_mtime)


def test_report_numbers_equal_evaluator(local_run):
    r = local_run
    assert (r.report / "README.md").is_file()
    models = {t: r.results / "Dataset901_SynthLabels" / f"{t}__nnUNetPlans__2d" for t in TRAINERS}
    check_table_against_evaluator("local-e2e", r.report, models, [0, 1], "Dataset901_SynthLabels",
                                  Path(r.ds.env["nnUNet_preprocessed"]), r.tmp / "direct_eval")
    # the fixture's finished DiceCE fold 0 (same hyperparameters) was reused, not trained again
    assert r.fixture_ckpt.stat().st_mtime_ns == r.fixture_mtime


def test_report_contents(local_run):
    r = local_run
    table = read_table(r.report)
    rep = load_json(r.report / "report.json")
    assert set(table) == {"nnUNetTrainerDiceCE", "nnUNetTrainerDiceCE + TS", "nnUNetTrainerDiceCE + VS",
                          "nnUNetTrainerLS_DC", "nnUNetTrainerLS_DC + TS", "nnUNetTrainerLS_DC + VS"}
    for t in TRAINERS:
        # temperature scaling keeps the argmax: DSC and HD95 unchanged
        assert float(table[t + " + TS"]["local-e2e/DSC"]) == pytest.approx(float(table[t]["local-e2e/DSC"]))
        assert float(table[t + " + TS"]["local-e2e/HD95"]) == pytest.approx(float(table[t]["local-e2e/HD95"]))
        ts = rep["temperature_scaling"]["local-e2e"][t + " + TS"]
        assert 0.05 <= ts["temperature"] <= 20
        # cross-fitted: fold 0 scored with the temperature fitted on fold 1 and vice versa
        assert ts["cross_fitted"] and set(ts["per_fold"]) == {"0", "1"}
        assert all(0.05 <= v <= 20 for v in ts["per_fold"].values())
        assert len(rep["temperature_scaling"]["local-e2e"][t + " + VS"]["per_fold"]["0"]) == 4  # one T per channel (labels 0..3)
    # one best and one second best per column, marked in the markdown
    md = (r.report / "README.md").read_text()
    assert md.count("**") >= 2 * 8 and "<u>" in md
    for col in ("DSC", "ECE"):
        marks = [row[f"local-e2e/{col}_mark"] for row in table.values()]
        assert "best" in marks
    # ranks: 4 methods ranked, positions 1..4 used, Friedman test computed (>= 3 methods)
    fr = rep["friedman"]
    assert len(fr["average_rank"]) == 6 and fr["test"]["pvalue"] is not None
    assert "Friedman test over 6 methods" in md
    # Wilcoxon against the DiceCE baseline, per case (4 validation cases in folds 0 and 1)
    w = rep["wilcoxon"]["local-e2e"]["nnUNetTrainerLS_DC"]["ECE"]
    assert w["n"] == 4
    # threshold sweep: 19 thresholds per trainer, recall falls as the threshold rises
    sweep = rep["threshold_sweep"]["local-e2e"]["nnUNetTrainerDiceCE"]
    assert [round(s["threshold"], 2) for s in sweep] == [round(0.05 * i, 2) for i in range(1, 20)]
    rec = [s["recall"] for s in sweep]
    assert all(a >= b - 1e-12 for a, b in zip(rec, rec[1:]))
    for png in ("reliability.png", "dsc_vs_ece.png", "threshold_sweep.png"):
        assert (r.report / png).stat().st_size > 1000
    assert "torch" in rep["machine"] and rep["command"].startswith("calib-experiment run")
    # training time read from nnU-Net's training logs: every trainer and fold, positive
    assert set(rep["training_seconds"]["local-e2e"]) == set(TRAINERS)
    assert all(set(v) == {"0", "1"} and all(s > 0 for s in v.values())
               for v in rep["training_seconds"]["local-e2e"].values())
    assert "## Training time" in md


def test_rerun_trains_nothing_and_resumes_interrupted(local_run):
    r = local_run
    before = _snapshot(r.results)
    rc = cli.main(["run", str(r.exp_file), "--output-root", str(r.tmp / "results"), "--quiet", "--no-report"])
    assert rc == 0
    assert _snapshot(r.results) == before  # no checkpoint or training log touched
    # interrupt LS_DC fold 1 the way a killed job leaves it: latest checkpoint, no final, no validation summary
    fold = r.results / "Dataset901_SynthLabels" / "nnUNetTrainerLS_DC__nnUNetPlans__2d" / "fold_1"
    shutil.move(fold / "checkpoint_final.pth", fold / "checkpoint_latest.pth")
    (fold / "validation" / "summary.json").unlink()
    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.settings import load_experiment
    from nnunet_calibration.experiments.status import fold_statuses

    exp = validate(load_experiment(r.exp_file), check_trainers=False)
    st = {(s["label"], s["fold"]): s["status"] for s in fold_statuses(exp)}
    assert st[("nnUNetTrainerLS_DC", 1)] == "interrupted"
    before = {k: v for k, v in _snapshot(r.results).items() if "LS_DC__nnUNetPlans__2d/fold_1" not in k}
    rc = cli.main(["run", str(r.exp_file), "--output-root", str(r.tmp / "results"), "--quiet", "--no-report"])
    assert rc == 0
    log = (exp.state_folder / "logs" / "nnUNetTrainerLS_DC_fold1.log").read_text()
    assert "resumed (--c)" in log and " --c" in log
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "validation" / "summary.json").is_file()
    after = {k: v for k, v in _snapshot(r.results).items() if "LS_DC__nnUNetPlans__2d/fold_1" not in k}
    assert after == before  # the other folds untouched
    st = {(s["label"], s["fold"]): s["status"] for s in fold_statuses(exp)}
    assert set(st.values()) == {"finished"}


def test_missing_fold_is_reported(local_run, capsys):
    r = local_run
    exp_file = write_experiment(r.tmp / "missing.yaml", name="missing-fold", dataset=901, configuration="2d",
                                folds=[0, 1, 2], device="cpu", training=SHORT, trainers=TRAINERS,
                                state_dir=str(r.tmp / "state_missing"),
                                report={"temperature_scaling": False, "threshold_sweep": False})
    rc = cli.main(["report", str(exp_file), "--output-root", str(r.tmp / "results"), "--quiet"])
    assert rc == 0
    rep_dir = r.tmp / "results" / "missing-fold"
    table = read_table(rep_dir)
    for t in TRAINERS:
        assert table[t]["missing-fold/folds"] == "0 1"
        assert table[t]["missing-fold/missing_folds"] == "2"
    md = (rep_dir / "README.md").read_text()
    assert "| nnUNetTrainerDiceCE | 2/3 (missing 2) |" in md
    assert "### Missing folds" in md and "fold 2: **not started**" in md
    # status shows it too
    rc = cli.main(["status", str(exp_file)])
    out = capsys.readouterr().out
    assert "not started" in out and "finished" in out


def _no_paths(v):
    """``v`` without its absolute file paths (where a summary was made)."""
    if isinstance(v, dict):
        return {k: _no_paths(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_no_paths(x) for x in v]
    return "<path>" if isinstance(v, str) and v.startswith("/") else v


def test_archive_outlives_the_folds(local_run, capsys):
    """report.archive: the finished entries are kept as their evaluated rows; with one trainer's folds gone (a
    new machine) status says archived, run trains nothing, and the report is the one made from the folds."""
    import json

    r = local_run
    arch = r.tmp / "kept"
    cfg = dict(name="archive-e2e", dataset=901, configuration="2d", folds=[0, 1], device="cpu", training=SHORT,
               trainers=TRAINERS, state_dir=str(r.tmp / "state_archive"), order="trainers",
               report={"max_fit_voxels": 50000, "archive": str(arch)})
    exp_file = write_experiment(r.tmp / "archive.yaml", **cfg)
    assert cli.main(["archive", str(exp_file), "--quiet"]) == 0
    assert "nnUNetTrainerLS_DC: archived now" in capsys.readouterr().out
    assert sorted(p.name for p in arch.iterdir()) == [t + ".json" for t in TRAINERS]  # nothing else left there
    assert cli.main(["report", str(exp_file), "--output-root", str(r.tmp / "from_folds"), "--quiet"]) == 0
    model = r.results / "Dataset901_SynthLabels" / "nnUNetTrainerLS_DC__nnUNetPlans__2d"
    away = r.tmp / "LS_DC_elsewhere"
    shutil.move(model, away)  # the trainings of LS_DC are gone; DiceCE's are still here
    try:
        assert cli.main(["status", str(exp_file)]) == 0
        out = capsys.readouterr().out
        assert out.count("archived") >= 2 and "kept/nnUNetTrainerLS_DC.json" in out
        assert cli.main(["run", str(exp_file), "--quiet", "--no-report"]) == 0
        out = capsys.readouterr().out
        assert "nnUNetTrainerLS_DC fold 0: skipped (archived)" in out
        assert "nnUNetTrainerDiceCE fold 1: skipped (finished)" in out
        assert not model.exists()  # nothing trained
        assert cli.main(["report", str(exp_file), "--output-root", str(r.tmp / "from_archive"), "--quiet"]) == 0
        a, b = r.tmp / "from_folds" / "archive-e2e", r.tmp / "from_archive" / "archive-e2e"
        assert read_table(a) == read_table(b)  # every number of every row, + TS / + VS included
        for summ in (a / "evaluation").rglob("summary.json"):  # the same but for the folders they were made in
            assert _no_paths(load_json(summ)) == _no_paths(load_json(b / summ.relative_to(a)))
        assert {p.relative_to(a) for p in (a / "evaluation").rglob("*")} == \
            {p.relative_to(b) for p in (b / "evaluation").rglob("*")}
        ra, rb = load_json(a / "report.json"), load_json(b / "report.json")
        assert ra["temperature_scaling"] == rb["temperature_scaling"]
        # an archive made otherwise is refused, naming the file and the difference
        f = arch / "nnUNetTrainerLS_DC.json"
        data = json.loads(f.read_text())
        data["identity"]["hparams"] = {"alpha": 0.5}
        f.write_text(json.dumps(data))
        for cmd in (["check", str(exp_file)], ["report", str(exp_file), "--output-root", str(r.tmp / "x")]):
            assert cli.main(cmd) == 2
            err = capsys.readouterr().err
            assert str(f) in err and "hparams {'alpha': 0.5}" in err
        assert not (r.tmp / "x" / "archive-e2e").exists()  # no report written
    finally:
        shutil.move(away, model)


@pytest.mark.parametrize("change, expect", [
    ({"trainers": ["nnUNetTrainerDiceCE", "nnUNetTrainerDoesNotExist"]}, ["unknown trainer", "nnUNetTrainerSDC",
                                                                          "nnUNetTrainerDiceCE"]),
    ({"dataset": 987}, ["dataset '987' is not preprocessed", "Dataset901_SynthLabels"]),
    ({"configuration": "4d_superres"}, ["configuration '4d_superres'", "3d_fullres", "2d"]),
    ({"trainers": [{"name": "nnUNetTrainerLS_DC", "label": "LS_bad", "hparams": {"betaa": 1}}]},
     ["unknown hyperparameter", "alpha"]),
])
def test_unknown_names_refused_before_anything_runs(synthetic_labels, tmp_path, capsys, change, expect):
    cfg = dict(name="bad", dataset=901, configuration="2d", folds=[0], device="cpu", training=SHORT,
               trainers=["nnUNetTrainerDiceCE"], state_dir=str(tmp_path / "state"))
    cfg.update(change)
    exp_file = write_experiment(tmp_path / "bad.yaml", **cfg)
    for backend in ("local", "slurm"):
        rc = cli.main(["run", str(exp_file), "--backend", backend, "--output-root", str(tmp_path / "results")])
        err = capsys.readouterr().err
        assert rc == 2
        for e in expect:
            assert e in err, err
    assert not (tmp_path / "state").exists() and not (tmp_path / "results").exists()


def test_regions_dataset_end_to_end(synthetic_regions, tmp_path):
    """BraTS-like sigmoid regions: training, evaluation, temperature scaling (sigmoid) and sweep."""
    ds = synthetic_regions
    exp_file = write_experiment(tmp_path / "regions.yaml", name="regions-e2e", dataset=ds.dataset_id,
                                configuration="2d", folds=[0], device="cpu", training=SHORT,
                                trainers=["nnUNetTrainerDiceCE"], state_dir=str(tmp_path / "state"),
                                report={"max_fit_voxels": 20000, "archive": "kept"})
    assert cli.main(["run", str(exp_file), "--output-root", str(tmp_path / "results"), "--quiet"]) == 0
    # report.archive: run archived the entry as soon as its (only) fold finished
    from nnunet_calibration.experiments.report.archive import decode

    kept = load_json(tmp_path / "kept" / "nnUNetTrainerDiceCE.json")
    rows = {r.method: r for r in map(decode, kept["rows"])}
    assert kept["identity"]["folds"] == [0] and set(kept["records"]) == {"0"}
    report = tmp_path / "results" / "regions-e2e"
    model = Path(ds.env["nnUNet_results"]) / ds.name / "nnUNetTrainerDiceCE__nnUNetPlans__2d"
    check_table_against_evaluator("regions-e2e", report, {"nnUNetTrainerDiceCE": model}, [0], ds.name,
                                  Path(ds.env["nnUNet_preprocessed"]), tmp_path / "direct")
    rep = load_json(report / "report.json")
    ts = rep["temperature_scaling"]["regions-e2e"]["nnUNetTrainerDiceCE + TS"]
    assert 0.05 <= ts["temperature"] <= 20
    assert ts["cross_fitted"] is False  # one fold: nothing else to fit on, and the report says so
    assert "*in-sample* (one fold)" in (report / "README.md").read_text()
    table = read_table(report)
    for method, row in rows.items():  # the archived rows are the report's
        assert row.fold_means[0]["ECE"] == pytest.approx(float(table[method]["regions-e2e/ECE"]), rel=1e-9)
    assert set(rows) == {m for m in table}
    assert float(table["nnUNetTrainerDiceCE + TS"]["regions-e2e/DSC"]) == pytest.approx(
        float(table["nnUNetTrainerDiceCE"]["regions-e2e/DSC"]))
    assert len(rep["threshold_sweep"]["regions-e2e"]["nnUNetTrainerDiceCE"]) == 19
    # several sigmoid regions: a + VS row with one temperature per region (sigmoid vector scaling end to end),
    # so three rows are ranked (the "needs at least 3 methods" note is tested in test_report_tables.py)
    n_regions = np.load(next((model / "fold_0" / "validation").glob("*.npz")))["probabilities"].shape[0]
    vs = rep["temperature_scaling"]["regions-e2e"]["nnUNetTrainerDiceCE + VS"]
    assert n_regions > 1 and len(vs["per_fold"]["0"]) == n_regions
    assert all(0.05 <= v <= 20 for v in vs["per_fold"]["0"])
    assert "Friedman test over 3 methods" in (report / "README.md").read_text()
