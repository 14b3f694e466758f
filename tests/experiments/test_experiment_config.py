"""The experiment file: parsing, variant labels and results folders, errors naming the file (no nnU-Net runs)."""
import pytest

from experiments_testlib import write_experiment
from nnunet_calibration.experiments.folds import model_folder, results_root
from nnunet_calibration.settings import ExperimentError, load_experiment


def test_defaults_variants_and_results_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    f = write_experiment(tmp_path / "e.yaml", name="e1", dataset=27, training={"num_epochs": 5},
                         trainers=["nnUNetTrainerDiceCE",
                                   {"name": "nnUNetTrainerSDC", "hparams": {"alpha": 0.2}},
                                   {"name": "nnUNetTrainerSDC", "label": "SDC_a03", "hparams": {"alpha": 0.3}}])
    exp = load_experiment(f)
    assert exp.folds == (0, 1, 2, 3, 4) and exp.configuration == "2d" and exp.plans == "nnUNetPlans"
    labels = [t.label for t in exp.trainers]
    assert labels == ["nnUNetTrainerDiceCE", "nnUNetTrainerSDC_alpha0.2", "SDC_a03"]
    exp = exp.with_dataset_name("Dataset027_ACDC")
    # plain trainers train into nnUNet_results itself, each variant into its own nnU-Net results tree
    assert results_root(exp, exp.trainers[0]) == (tmp_path / "res").resolve()
    a, b = (model_folder(exp, t) for t in exp.trainers[1:])
    assert a != b and a.name == b.name == "nnUNetTrainerSDC__nnUNetPlans__2d"
    assert exp.hparams_for(exp.trainers[2]) == {"num_epochs": 5, "alpha": 0.3}
    assert exp.baseline_label == "nnUNetTrainerDiceCE"
    assert exp.state_folder == (tmp_path / "res" / "calib_experiments" / "e1").resolve()


@pytest.mark.parametrize("cfg, msg", [
    ({"trainers": ["A", "A"]}, "labels repeat"),
    ({"trainers": ["A", {"name": "A", "label": "A2"}]}, "listed twice without hparams"),
    ({"trainers": []}, "non-empty list"),
    ({"folds": [0, 0]}, "folds must be a list of distinct non-negative integers"),
    ({"folds": ["x"]}, "non-negative integers"),
    ({"epochs": 3}, "unknown key(s) ['epochs']"),
    ({"slurm": {"gpu": 1}}, "slurm: unknown key(s) ['gpu']"),
    ({"device": "tpu"}, "device must be"),
    ({"order": "random"}, "order must be"),
    ({"report": {"archive": ""}}, "report.archive must be"),
    ({"baseline": "nope"}, "baseline 'nope' is not a trainer label"),
])
def test_bad_files_name_the_file(tmp_path, cfg, msg):
    base = dict(name="e", dataset=1, trainers=["A"])
    base.update(cfg)
    f = write_experiment(tmp_path / "bad.yaml", **base)
    with pytest.raises(ExperimentError) as e:
        load_experiment(f)
    assert str(f) in str(e.value) and msg in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ExperimentError, match="not found"):
        load_experiment(tmp_path / "none.yaml")
    (tmp_path / "x.yaml").write_text("name: [unclosed")
    with pytest.raises(ExperimentError, match="not valid YAML"):
        load_experiment(tmp_path / "x.yaml")


def test_repeated_keys_and_non_finite_numbers_are_refused(tmp_path):
    """YAML keeps the last of two equal keys silently; the loader refuses them, at any level, naming
    the lines. Every float must be finite (.nan / .inf are refused)."""
    f = tmp_path / "dup.yaml"
    f.write_text("name: e\ndataset: 1\ntrainers: [A]\ntraining:\n  num_epochs: 3\n  num_epochs: 5\n")
    with pytest.raises(ExperimentError, match=r"'num_epochs' is given twice \(lines 5 and 6\)"):
        load_experiment(f)
    f.write_text("name: e\ndataset: 1\ntrainers: [A]\ntrainers: [B]\n")
    with pytest.raises(ExperimentError, match="'trainers' is given twice"):
        load_experiment(f)
    for key in ("initial_lr: .inf", "weight_decay: .inf", "initial_lr: .nan"):
        f.write_text(f"name: e\ndataset: 1\ntrainers: [A]\ntraining:\n  {key}\n")
        with pytest.raises(ExperimentError, match=f"training.{key.split(':')[0]} must be a .*finite number"):
            load_experiment(f)


def test_training_order_and_archive_place(tmp_path, monkeypatch):
    """order: folds (default, every trainer's fold 0 first) or trainers (every fold of one trainer, then the
    next); report.archive is resolved next to the experiment file, one <label>.json per entry."""
    from nnunet_calibration.experiments.folds import archive_file, archived, fold_state
    from nnunet_calibration.experiments.runner import training_order

    monkeypatch.setenv("nnUNet_results", str(tmp_path / "res"))
    trainers = ["A", "B", {"name": "A", "run": 2, "folds": [1]}]
    by_fold = load_experiment(write_experiment(tmp_path / "f.yaml", name="f", dataset=27, folds=[0, 1], trainers=trainers))
    assert by_fold.order == "folds" and by_fold.report.archive is None
    assert [(e.label, f) for e, f in training_order(by_fold)] == [("A", 0), ("B", 0), ("A", 1), ("B", 1), ("A_run2", 1)]
    exp = load_experiment(write_experiment(tmp_path / "sub" / "t.yaml", name="t", dataset=27, folds=[0, 1],
                                           trainers=trainers, order="trainers", report={"archive": "../kept"}))
    assert [(e.label, f) for e, f in training_order(exp)] == [("A", 0), ("A", 1), ("B", 0), ("B", 1), ("A_run2", 1)]
    exp = exp.with_dataset_name("Dataset027_ACDC")
    a = exp.trainers[0]
    assert archive_file(exp, a) == (tmp_path / "kept" / "A.json").resolve() and archive_file(by_fold, a) is None
    assert not archived(exp, a) and str(fold_state(exp, a, 0)) == "not started"
    archive_file(exp, a).parent.mkdir()
    archive_file(exp, a).write_text("{}")
    # an archived entry's folds are "archived" wherever they are not finished here (whether the archive
    # matches is checked by calib-experiment check / run: test_experiment_local.py)
    assert archived(exp, a) and str(fold_state(exp, a, 0)) == "archived"
    assert str(fold_state(exp, exp.trainers[1], 0)) == "not started"
