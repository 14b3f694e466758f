"""Every key and value of an experiment file is checked before anything runs (no nnU-Net training here).

Each bad value gives an :class:`ExperimentError` naming the file, the key and what is expected;
unknown keys list the valid ones. ``calib-experiment check`` and ``run`` exit with 2 and submit nothing.
Also: the SLURM options built from the settings (``--array ...%N``, ``--signal``, ``--requeue``,
``-num_gpus``) and the time-limit handler being inert outside SLURM.
"""
import json
import signal

import pytest

from experiments_testlib import write_experiment
from nnunet_calibration.experiments import cli
from nnunet_calibration.experiments.nnunet_checks import validate
from nnunet_calibration.settings import (Evaluation, ExperimentError, MetricOptions, NnunetPaths, Report, Slurm, Training,
                                         load_experiment, slurm_time_seconds)

BASE = dict(name="e", dataset=1, trainers=["nnUNetTrainerDiceCE"])


def _bad(tmp_path, cfg, msg):
    f = write_experiment(tmp_path / "bad.yaml", **dict(BASE, **cfg))
    with pytest.raises(ExperimentError) as e:
        load_experiment(f)
    assert str(f) in str(e.value), e.value
    assert msg in str(e.value), e.value
    return str(e.value)


@pytest.mark.parametrize("key, value, what", [
    ("num_epochs", -3, "positive integer"),
    ("num_epochs", 0, "positive integer"),
    ("num_epochs", "ten", "positive integer"),
    ("num_epochs", 1.5, "positive integer"),
    ("num_epochs", True, "positive integer"),
    ("num_iterations_per_epoch", 0, "positive integer"),
    ("num_val_iterations_per_epoch", -1, "positive integer"),
    ("batch_size", 0, "positive integer"),
    ("save_every", 0, "positive integer"),
    ("initial_lr", 0, "positive finite number"),
    ("initial_lr", "fast", "positive finite number"),
    ("initial_lr", float("inf"), "positive finite number"),
    ("weight_decay", -1e-5, "non-negative finite number"),
    ("weight_decay", float("nan"), "non-negative finite number"),
    ("oversample_foreground_percent", 1.5, "number in [0, 1]"),
])
def test_training_values(tmp_path, key, value, what):
    msg = _bad(tmp_path, {"training": {key: value}}, f"training.{key} must be a {what}")
    assert repr(value) in msg
    # the same rules for a trainer entry's hparams
    _bad(tmp_path, {"trainers": [{"name": "nnUNetTrainerSDC", "label": "v", "hparams": {key: value}}]},
         f"trainers[0].hparams.{key} must be a {what}")


@pytest.mark.parametrize("cfg, msg", [
    ({"report": {"temprature_scaling": False}}, "report: unknown key(s) ['temprature_scaling']; valid keys: "),
    ({"report": {"temperature_scaling": "yes"}}, "report.temperature_scaling must be true or false"),
    ({"report": {"max_fit_voxels": 0}}, "report.max_fit_voxels must be a positive integer"),
    ({"report": {"rank_metrics": "ECE"}}, "report.rank_metrics must be a non-empty list"),
    ({"report": ["x"]}, "report must be a mapping"),
    ({"evaluation": {"n_bins_ece": 10}}, "evaluation: unknown key(s) ['n_bins_ece']; valid keys: ['num_processes', "
                                         "'options']"),
    ({"evaluation": {"options": {"bins": 10}}}, "evaluation.options: unknown key(s) ['bins']; valid keys: "),
    ({"evaluation": {"options": {"n_bins_ece": 0}}}, "evaluation.options.n_bins_ece must be a positive integer"),
    ({"evaluation": {"options": {"include_background": 1}}}, "evaluation.options.include_background must be true"),
    ({"evaluation": {"options": [1]}}, "options must be a mapping"),
    ({"evaluation": {"num_processes": 0}}, "evaluation.num_processes must be a positive integer"),
    ({"slurm": {"gpus": "two"}}, "slurm.gpus must be a non-negative integer, got 'two'"),
    ({"slurm": {"gpus": -1}}, "slurm.gpus must be a non-negative integer"),
    ({"slurm": {"cpus": 0}}, "slurm.cpus must be a positive integer"),
    ({"slurm": {"mem": "lots"}}, "slurm.mem must be SLURM's --mem"),
    ({"slurm": {"time": 86400}}, "YAML reads an unquoted"),
    ({"slurm": {"time": "tomorrow"}}, "slurm.time must be a quoted SLURM time"),
    ({"slurm": {"report_time": "1:2:3:4"}}, "slurm.report_time must be"),
    ({"slurm": {"partition": 3}}, "slurm.partition must be a non-empty text or null"),
    ({"slurm": {"extra_args": 5}}, "slurm.extra_args must be a list of sbatch options"),
    ({"slurm": {"signal_seconds": -1}}, "slurm.signal_seconds must be a non-negative integer"),
    ({"slurm": {"requeue": "yes"}}, "slurm.requeue must be true or false"),
    ({"slurm": {"max_parallel": 0}}, "slurm.max_parallel must be a positive integer or null"),
    ({"slurm": {"time": "00:05:00", "signal_seconds": 600}}, "slurm.signal_seconds (600 s) must be shorter than "
                                                              "slurm.time ('00:05:00' = 300 s)"),
    ({"slurm": {"gpu": 1}}, "slurm: unknown key(s) ['gpu']; valid keys: "),
    ({"slurm": {"gres": "a100 x1"}}, 'slurm.gres must be a --gres text like "gpu:a100:1"'),
    ({"slurm": {"gres": "gpu:a100:2", "gpus": 1}}, "gpus (1) and gres ('gpu:a100:2', 2 GPUs) disagree: give one"),
    ({"slurm": {"setup": ["module load x\nmodule load y"]}}, "slurm.setup must be a list of shell lines"),
    ({"slurm": {"report_extra_args": 3}}, "slurm.report_extra_args must be a list of sbatch options"),
    ({"environment": {"nnUNet_results": "/x"}}, "environment must be a mapping of environment variable names"),
    ({"environment": {"bad-name": "1"}}, "environment must be a mapping of environment variable names"),
    ({"environment": ["nnUNet_compile=f"]}, "environment must be a mapping"),
    ({"slurm": "gpu"}, "slurm must be a mapping"),
    ({"nnunet_paths": {"result": "/x"}}, "nnunet_paths: unknown key(s) ['result']; valid keys: "),
    ({"nnunet_paths": {"results": 3}}, "nnunet_paths.results must be a non-empty text or null"),
    ({"trainers": [{"name": "X", "hparam": {}}]}, "trainers[0]: unknown key(s) ['hparam']; valid keys: "),
    ({"trainers": [{"name": 3}]}, "trainers[0].name must be a trainer class name"),
    ({"dataset": [27]}, "dataset must be an nnU-Net dataset id"),
    ({"configuration": 2}, "configuration must be a non-empty text"),
    ({"plans": ""}, "plans must be a non-empty text"),
    ({"report": {"rank_metrics": ["DSC", "AUC"]}}, "report.rank_metrics must be a non-empty list of metric names of"),
    ({"trainers": [{"name": "nnUNetTrainerSDC", "label": "v", "hparams": {"alpha": float("nan")}}],
      "evaluation": {"options": {"fp_weight": float("inf")}}}, "evaluation.options.fp_weight must be a positive finite"),
    ({"training": [1]}, "training must be a mapping"),
    ({"epochs": 3}, "top level: unknown key(s) ['epochs']; valid keys: "),
])
def test_bad_values_and_keys(tmp_path, cfg, msg):
    _bad(tmp_path, cfg, msg)


def test_unknown_keys_list_the_valid_ones(tmp_path):
    msg = _bad(tmp_path, {"slurm": {"signal": 60}}, "slurm: unknown key(s) ['signal']")
    for k in ("signal_seconds", "requeue", "max_parallel", "gpus", "time"):
        assert k in msg
    msg = _bad(tmp_path, {"evaluation": {"options": {"nbins": 3}}}, "evaluation.options")
    for k in MetricOptions.keys():
        assert k in msg


def test_one_list_of_keys_and_defaults():
    """Each section's keys, defaults and rules are its settings class's fields: the defaults pass their own
    rules, calib-evaluate's metric options are exactly MetricOptions' fields, and nnU-Net's training keys the
    trainers accept are Training's."""
    from nnunet_calibration.evaluation.cli import build_parser

    for cls in (Training, MetricOptions, Report, Slurm, Evaluation, NnunetPaths):
        cls()  # checked when made
    options = {a.dest for a in build_parser()._actions}
    assert set(MetricOptions.keys()) <= options
    assert Training.keys() == ("num_epochs", "num_iterations_per_epoch", "num_val_iterations_per_epoch", "initial_lr",
                               "weight_decay", "oversample_foreground_percent", "save_every", "batch_size")


def test_good_file_and_defaults(tmp_path):
    f = write_experiment(tmp_path / "ok.yaml", **dict(
        BASE, training={"num_epochs": 3, "initial_lr": 0.01, "oversample_foreground_percent": 0.33},
        slurm={"gpus": 2, "mem": 32000, "time": "1-00:00:00", "signal_seconds": 900, "max_parallel": 2,
               "extra_args": "--account=x --qos=y"},
        evaluation={"num_processes": 2, "options": {"n_bins_ece": 10, "include_background": True}},
        report={"temperature_scaling": False, "rank_metrics": ["DSC", "ECE"]}))
    exp = load_experiment(f)
    assert exp.slurm.gpus == 2 and exp.slurm.mem == "32000" and exp.slurm.max_parallel == 2
    assert exp.slurm.extra_args == ("--account=x", "--qos=y") and exp.slurm.requeue is True
    assert exp.evaluation.options == MetricOptions(n_bins_ece=10, include_background=True)
    assert exp.report.ranked == ("DSC", "ECE")
    d = Slurm()
    assert (d.signal_seconds, d.requeue, d.max_parallel) == (600, True, None)
    # cluster environments: typed GPUs count as gpus, one setup line as a text, YAML values as the shell writes them
    gpu = write_experiment(tmp_path / "gpu.yaml", **dict(BASE, slurm={"gres": "gpu:a100:2", "setup": "module load x"},
                                                         environment={"nnUNet_compile": True, "nnUNet_n_proc_DA": 8}))
    exp = load_experiment(gpu)
    assert exp.slurm.gpu_count == 2 and exp.slurm.setup == ("module load x",)
    assert exp.environment == {"nnUNet_compile": "true", "nnUNet_n_proc_DA": "8"}
    # the default warning is at most half of a short limit; an explicit one must be shorter than the limit
    short = write_experiment(tmp_path / "short.yaml", **dict(BASE, slurm={"time": "00:10:00"}))
    assert load_experiment(short).slurm.signal_seconds == 300


@pytest.mark.parametrize("text, seconds", [
    ("120", 7200), ("30:15", 1815), ("24:00:00", 86400), ("1-00:00:00", 86400), ("2-12", 216000),
    ("1-02:03", 93780), ("0-00:01:30", 90), ("abc", None), ("1:2:3:4", None), ("-5", None),
])
def test_slurm_time_formats(text, seconds):
    assert slurm_time_seconds(text) == seconds


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\u00e9\ndataset: 1\ntrainers: [A]\n".encode("latin-1"))
    with pytest.raises(ExperimentError) as e:
        load_experiment(f)
    assert str(f) in str(e.value) and "not UTF-8" in str(e.value) and "byte 9" in str(e.value)
    assert cli.main(["check", str(f)]) == 2


def _preprocessed(tmp_path, with_data: bool):
    """A hand-made nnU-Net preprocessed folder: plans with a 2d configuration, its data folder or not."""
    pre = tmp_path / "pre"
    ds = pre / "Dataset123_Tiny"
    ds.mkdir(parents=True)
    plans = {"dataset_name": "Dataset123_Tiny", "plans_name": "nnUNetPlans",
             "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d"},
                                "3d_fullres": {"data_identifier": "nnUNetPlans_3d_fullres"}}}
    (ds / "nnUNetPlans.json").write_text(json.dumps(plans))
    if with_data:
        (ds / "nnUNetPlans_2d").mkdir()
        (ds / "nnUNetPlans_2d" / "case_000.b2nd").write_bytes(b"x")
    return pre


def test_configuration_must_be_preprocessed(tmp_path):
    pre = _preprocessed(tmp_path, with_data=False)
    cfg = dict(BASE, dataset=123, nnunet_paths={"preprocessed": str(pre), "results": str(tmp_path / "res")})
    f = write_experiment(tmp_path / "e.yaml", **cfg)
    with pytest.raises(ExperimentError) as e:
        validate(load_experiment(f), check_trainers=False)
    assert "configuration '2d' of Dataset123_Tiny is not preprocessed" in str(e.value)
    assert "nnUNetv2_preprocess -d Dataset123_Tiny -c 2d" in str(e.value)
    (pre / "Dataset123_Tiny" / "nnUNetPlans_2d").mkdir()
    (pre / "Dataset123_Tiny" / "nnUNetPlans_2d" / "case_000.b2nd").write_bytes(b"x")
    assert validate(load_experiment(f), check_trainers=False).dataset_name == "Dataset123_Tiny"
    f3 = write_experiment(tmp_path / "e3.yaml", **dict(cfg, configuration="3d_fullres"))
    with pytest.raises(ExperimentError, match="configuration '3d_fullres' of Dataset123_Tiny is not preprocessed"):
        validate(load_experiment(f3), check_trainers=False)


@pytest.mark.parametrize("trainer, msg", [
    ({"name": "nnUNetTrainerSDC", "label": "a", "hparams": {"alpha": "big"}},
     "trainer a: hyperparameter alpha must be a finite number (default 0.1), got 'big'"),
    ({"name": "nnUNetTrainerSDC", "label": "a", "hparams": {"alpha": float("nan")}},
     "trainer a: hyperparameter alpha must be a finite number (default 0.1), got nan"),
    ({"name": "nnUNetTrainerSDC", "label": "a", "hparams": {"alpah": 0.2}},
     "trainer a: unknown hyperparameter(s) ['alpah']; valid: "),
    ({"name": "nnUNetTrainerNACL_mean", "label": "a"}, "trainer nnUNetTrainerNACL_mean was renamed to nnUNetTrainerNACL"),
])
def test_loss_hparams_checked_against_the_trainer(tmp_path, trainer, msg):
    pre = _preprocessed(tmp_path, with_data=True)
    f = write_experiment(tmp_path / "e.yaml", **dict(BASE, dataset=123, trainers=[trainer], nnunet_paths={
        "preprocessed": str(pre), "results": str(tmp_path / "res")}))
    with pytest.raises(ExperimentError) as e:
        validate(load_experiment(f))
    assert msg in str(e.value)


def test_check_and_run_refuse_before_submitting(tmp_path, capsys):
    f = write_experiment(tmp_path / "e.yaml", **dict(BASE, training={"num_epochs": -3},
                                                     state_dir=str(tmp_path / "state")))
    assert cli.main(["check", str(f)]) == 2
    assert cli.main(["run", str(f), "--backend", "slurm"]) == 2
    err = capsys.readouterr().err
    assert "training.num_epochs must be a positive integer, got -3" in err and str(f) in err
    assert not (tmp_path / "state").exists()  # nothing written, nothing submitted


# -- SLURM options and the training command built from the settings ----------------------------
def test_sbatch_options_from_settings(tmp_path):
    from nnunet_calibration.experiments.runner import train_command
    from nnunet_calibration.experiments.slurm import array_spec, fold_num_gpus, timelimit_opts

    assert array_spec([0, 1, 2, 3, 4], 2) == "0,1,2,3,4%2"
    assert array_spec([3], None) == "3"
    assert timelimit_opts(Slurm()) == ["--signal=B:USR1@600", "--requeue"]
    assert timelimit_opts(Slurm(signal_seconds=0, requeue=False)) == ["--no-requeue"]

    f = write_experiment(tmp_path / "e.yaml", **dict(BASE, slurm={"gpus": 4}, nnunet_paths={
        "results": str(tmp_path / "res")}))
    exp = load_experiment(f).with_dataset_name("Dataset001_X")
    spec = exp.trainers[0]
    assert fold_num_gpus(exp, "cuda") == 4 and fold_num_gpus(exp, "cpu") == 1
    cmd = train_command(exp, spec, 0, "cuda", fold_num_gpus(exp, "cuda"))
    assert cmd[cmd.index("-num_gpus") + 1] == "4" and cmd[cmd.index("-device") + 1] == "cuda"
    assert "-num_gpus" not in train_command(exp, spec, 0, "cuda", 1)
    assert "-num_gpus" not in train_command(exp, spec, 0, "cpu", fold_num_gpus(exp, "cpu"))


def test_timelimit_handler_inert_outside_slurm():
    from nnunet_calibration.trainers.timelimit import ENABLE_ENV, SIGNAL_ENV, handler_wanted, stop_signal

    assert not handler_wanted({})
    assert handler_wanted({"SLURM_JOB_ID": "12"})
    assert not handler_wanted({"SLURM_JOB_ID": "12", ENABLE_ENV: "0"})
    assert handler_wanted({ENABLE_ENV: "1"})
    assert stop_signal({}) is signal.SIGUSR1
    assert stop_signal({SIGNAL_ENV: "usr2"}) is signal.SIGUSR2
    with pytest.raises(ValueError, match="not a signal name"):
        stop_signal({SIGNAL_ENV: "NOPE"})


def test_a_fold_trained_with_another_loss_is_never_reused(tmp_path):
    """The rename trap: ``nnUNetTrainerNACL`` once meant the min kernel. A fold folder whose record names another
    loss (or other loss hyperparameters, or none at all) than the trainer computes now stops the run."""
    from nnunet_calibration.experiments.folds import fold_folder
    from nnunet_calibration.experiments.nnunet_checks import check_recorded_hparams

    pre = _preprocessed(tmp_path, with_data=True)
    f = write_experiment(tmp_path / "e.yaml", **dict(BASE, dataset=123, trainers=["nnUNetTrainerNACL"], folds=[0],
                                                     training={"num_epochs": 5},
                                                     nnunet_paths={"preprocessed": str(pre),
                                                                   "results": str(tmp_path / "res")}))
    exp = validate(load_experiment(f))
    fold = fold_folder(exp, exp.trainers[0], 0)
    (fold / "validation").mkdir(parents=True)
    (fold / "checkpoint_final.pth").write_bytes(b"")
    (fold / "validation" / "summary.json").write_text("{}")

    def record(**changes):
        rec = {"trainer": "nnUNetTrainerNACL", "loss": "nacl", "loss_fixed": {},
               "loss_hparams": {"alpha": 0.1, "kernel_size": 3, "kernel": "mean"},
               "overrides": {"parsed": {"num_epochs": 5}}}
        import nnunet_calibration.trainers as T

        rec["loss_hparams"] = dict(T.nnUNetTrainerNACL.loss_hparams)
        rec.update(changes)
        (fold / "calibration_hparams.json").write_text(json.dumps(rec))

    record()
    check_recorded_hparams(exp)  # the same training: reused
    record(overrides={"parsed": {"num_epochs": 5, "save_every": 2}})
    check_recorded_hparams(exp)  # checkpointed more often: the same model, reused
    for changes, what in (({"loss": "nacl_min"}, "loss 'nacl_min'"),
                          ({"loss_hparams": {"alpha": 0.2}}, "loss_hparams"),
                          ({"overrides": {"parsed": {"num_epochs": 7}}}, "training_overrides"),
                          ({"loss": None}, "loss None")):
        record(**changes)
        with pytest.raises(ExperimentError, match="trained otherwise than this experiment asks for") as e:
            check_recorded_hparams(exp)
        assert what in str(e.value) and str(fold) in str(e.value)
    rec = json.loads((fold / "calibration_hparams.json").read_text())
    del rec["loss"]
    (fold / "calibration_hparams.json").write_text(json.dumps(rec))
    with pytest.raises(ExperimentError, match="does not name the loss"):
        check_recorded_hparams(exp)
