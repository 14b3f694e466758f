"""``calib-experiment status``: per fold state, epoch / total, last pseudo-Dice, mean epoch time, ETA, log.

Checked against a real nnU-Net training (the session's ``synthetic_prediction`` fold): the values
read from nnU-Net's training log must equal those nnU-Net recorded in its own final checkpoint
(``logging``: per-class pseudo-Dice, epoch start/end timestamps), up to the log's rounding
(4 decimals for the Dice, 2 for the epoch time). The requeue test in ``test_experiment_slurm.py``
checks a fold interrupted and continued under SLURM the same way.
"""
import io
import os
import shutil

import numpy as np
import pytest
import torch

from experiments_testlib import SHORT, write_experiment
from nnunet_calibration.experiments import cli
from nnunet_calibration.experiments.nnunet_checks import validate
from nnunet_calibration.settings import load_experiment
from nnunet_calibration.experiments.status import (NNUNET_DEFAULT_EPOCHS, fold_statuses, format_statuses,
                                                   training_progress, watch)


@pytest.mark.nnunet
def test_status_against_a_real_training_log(synthetic_prediction, tmp_path, capsys):
    pred = synthetic_prediction
    # a results tree of its own holding only the fixture's fold 0 (other tests may train fold 1 of the same
    # trainer into the shared results folder, in any order)
    results = tmp_path / "results"
    model = results / pred.model_folder.parent.name / pred.model_folder.name
    shutil.copytree(pred.model_folder / "fold_0", model / "fold_0")
    for name in ("plans.json", "dataset.json", "dataset_fingerprint.json"):
        if (pred.model_folder / name).is_file():
            shutil.copy2(pred.model_folder / name, model / name)
    fold = model / "fold_0"
    f = write_experiment(tmp_path / "st.yaml", name="status-real", dataset=pred.dataset.dataset_id,
                         configuration="2d", folds=[0, 1], device="cpu", training=SHORT,
                         trainers=[pred.trainer], state_dir=str(tmp_path / "state"),
                         nnunet_paths={"results": str(results)})
    exp = validate(load_experiment(f), check_trainers=False)
    rows = fold_statuses(exp, use_slurm=False)
    assert [(r["fold"], r["status"]) for r in rows] == [(0, "finished"), (1, "not started")]
    p = rows[0]["progress"]
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)["logging"]
    n = len(ckpt["epoch_end_timestamps"])
    assert n == SHORT["num_epochs"]
    assert (p["epoch"], p["total"], p["current"], p["eta"]) == (n, SHORT["num_epochs"], None, 0)
    last = np.asarray(ckpt["dice_per_class_or_region"][-1], dtype=float)
    assert p["pseudo_dice_per_class"] == pytest.approx(list(last), abs=1e-4)
    assert p["pseudo_dice"] == pytest.approx(float(np.nanmean(last)), abs=1e-4)
    durations = np.array(ckpt["epoch_end_timestamps"]) - np.array(ckpt["epoch_start_timestamps"])
    assert p["epoch_time"] == pytest.approx(float(durations.mean()), abs=0.01)
    assert p["log"] and os.path.dirname(p["log"]) == str(fold) and "training_log_" in p["log"]
    assert rows[1]["progress"]["epoch"] == 0 and rows[1]["progress"]["log"] is None

    table = format_statuses(rows)
    line0 = next(l for l in table.splitlines() if " finished " in l)
    assert f"{n}/{n}" in line0 and f"{p['pseudo_dice']:.4f}" in line0 and p["log"] in line0
    assert f"{p['epoch_time']:.1f}" in line0

    # --watch: one table per round; stops by itself once every fold is finished or failed
    buf = io.StringIO()
    watch(exp, interval=0.01, rounds=2, stream=buf, use_slurm=False)
    assert buf.getvalue().count("trainer ") == 2 and "status-real" in buf.getvalue()
    assert cli.main(["status", str(f)]) == 0
    out = capsys.readouterr().out
    assert f"{n}/{n}" in out and "not started" in out


def _write_log(path, lines):
    path.write_text("\n".join(f"2026-01-{d:02d} 10:00:{s:02d}.123456: {m} " for d, s, m in lines) + "\n")


def test_progress_of_a_resumed_fold(tmp_path):
    """Two runs (the first stopped inside epoch 2, the second continued from epoch 2 with --c):
    epochs done, epoch in progress, ETA = remaining epochs x mean epoch time; names with an unpadded
    date are ordered by their numbers (nnU-Net's ``training_log_%d_%d_%d_...``)."""
    fold = tmp_path / "fold_0"
    fold.mkdir()
    _write_log(fold / "training_log_2026_1_9_10_00_00.txt", [
        (9, 0, "Epoch 0"), (9, 1, "Pseudo dice [np.float32(0.5), np.float32(0.7)]"), (9, 2, "Epoch time: 10.0 s"),
        (9, 3, "Epoch 1"), (9, 4, "Pseudo dice [np.float32(0.6), np.float32(nan)]"), (9, 5, "Epoch time: 12.0 s"),
        (9, 6, "Epoch 2")])
    _write_log(fold / "training_log_2026_1_10_9_00_00.txt", [
        (10, 0, "Epoch 2"), (10, 1, "Pseudo dice [0.8, 0.9]"), (10, 2, "Epoch time: 14.0 s"), (10, 3, "Epoch 3")])
    p = training_progress(fold, total_epochs=10)
    assert (p["epoch"], p["current"], p["last_epoch"]) == (3, 3, 2)
    assert p["pseudo_dice_per_class"] == [0.8, 0.9] and p["pseudo_dice"] == pytest.approx(0.85)
    assert p["epoch_time"] == pytest.approx(12.0) and p["eta"] == pytest.approx(7 * 12.0)
    assert p["log"].endswith("training_log_2026_1_10_9_00_00.txt")
    # a NaN class (no foreground in the validation batches) is left out of the mean, as nnU-Net's mean_fg_dice
    (fold / "training_log_2026_1_10_9_00_00.txt").unlink()
    p = training_progress(fold)
    assert p["pseudo_dice"] == pytest.approx(0.6) and p["total"] == NNUNET_DEFAULT_EPOCHS
    assert p["current"] == 2 and p["epoch"] == 2


def test_fold_with_log_but_no_checkpoint(tmp_path):
    """nnU-Net writes its first checkpoint only after 50 epochs: a fold whose log shows epochs but
    that has no checkpoint is 'in progress' while the log is fresh and 'stopped' once it is silent."""
    from nnunet_calibration.experiments.status import RECENT_LOG_SECONDS, _without_checkpoint

    fold = tmp_path / "fold_0"
    fold.mkdir()
    log = fold / "training_log_2026_1_9_10_00_00.txt"
    _write_log(log, [(9, 0, "Epoch 0"), (9, 2, "Epoch time: 20.0 s"), (9, 3, "Epoch 1")])
    p = training_progress(fold, total_epochs=40)
    mtime = os.path.getmtime(log)
    assert _without_checkpoint(p, now=mtime + 10)["status"] == "in progress"
    late = _without_checkpoint(p, now=mtime + RECENT_LOG_SECONDS + 1)
    assert late["status"] == "stopped" and "starts this fold again" in late["detail"]
    # slow epochs: 5 epoch times of grace
    p["epoch_time"] = 100.0
    assert _without_checkpoint(p, now=mtime + 450)["status"] == "in progress"
    assert _without_checkpoint(p, now=mtime + 501)["status"] == "stopped"


def test_progress_counts_from_the_resumed_checkpoint(tmp_path):
    """A run that logged epochs 0-6, crashed, and was resumed (--c) from the checkpoint of epoch 4: the
    epochs 4-6 of the dead run are gone, so 5 epochs are done after the resumed run's epoch 4, and the
    pseudo-Dice is the resumed run's, not the dead epoch 6's; the history keeps one entry per epoch."""
    from nnunet_calibration.experiments.status import training_history

    fold = tmp_path / "fold_0"
    fold.mkdir()
    first = []
    for e in range(7):
        first += [(9, 0, f"Epoch {e}"), (9, 1, "train_loss -0.1"), (9, 1, "val_loss -0.2"),
                  (9, 1, f"Pseudo dice [{0.1 * e:.1f}, 0.5]"), (9, 2, "Epoch time: 10.0 s")]
    _write_log(fold / "training_log_2026_1_9_10_00_00.txt", first + [(9, 3, "Epoch 7")])
    _write_log(fold / "training_log_2026_1_10_9_00_00.txt", [
        (10, 0, "Epoch 4"), (10, 1, "Pseudo dice [0.9, 0.9]"), (10, 2, "Epoch time: 20.0 s"), (10, 3, "Epoch 5")])
    p = training_progress(fold, total_epochs=10)
    assert (p["epoch"], p["current"], p["last_epoch"]) == (5, 5, 4)
    assert p["pseudo_dice_per_class"] == [0.9, 0.9]
    assert p["epoch_time"] == pytest.approx((4 * 10.0 + 20.0) / 5)
    h = training_history(fold)
    assert sorted(h) == [0, 1, 2, 3, 4]
    assert h[3] == {"time": 10.0, "train_loss": -0.1, "val_loss": -0.2, "pseudo_dice": [0.3, 0.5], "lr": None}
    assert h[4]["pseudo_dice"] == [0.9, 0.9] and h[4]["train_loss"] is None


@pytest.mark.nnunet
def test_fold_with_checkpoint_is_in_progress_only_while_its_training_runs(synthetic_prediction, tmp_path):
    """A fold with a checkpoint and no validation is 'interrupted' (run again to continue) unless an
    nnUNetv2_train of that fold runs on this machine: then 'in progress' with its pid, never 'run again' (which
    would start it a second time). Real processes named nnUNetv2_train (a script that sleeps) with nnU-Net's
    arguments and nnUNet_results; another trainer's process for the same fold does not count."""
    import subprocess
    import sys
    import time

    pred = synthetic_prediction
    results = tmp_path / "results"
    model = results / pred.model_folder.parent.name / pred.model_folder.name
    (model / "fold_1").mkdir(parents=True)
    shutil.copy2(pred.model_folder / "fold_0" / "checkpoint_final.pth", model / "fold_1" / "checkpoint_latest.pth")
    f = write_experiment(tmp_path / "run.yaml", name="status-running", dataset=pred.dataset.dataset_id,
                         configuration="2d", folds=[1], device="cpu", training=SHORT, trainers=[pred.trainer],
                         state_dir=str(tmp_path / "state"), nnunet_paths={"results": str(results)})
    exp = validate(load_experiment(f), check_trainers=False)

    def row():
        return fold_statuses(exp, use_slurm=False)[0]

    assert row()["status"] == "interrupted" and "(--c)" in row()["detail"]
    script = tmp_path / "bin" / "nnUNetv2_train"
    script.parent.mkdir()
    script.write_text("import time\ntime.sleep(120)\n")

    def start(trainer):
        argv = [sys.executable, str(script), exp.dataset_name, "2d", "1", "-tr", trainer, "-p", "nnUNetPlans",
                "--c", "--npz", "-device", "cpu"]
        return subprocess.Popen(argv, env=dict(os.environ, nnUNet_results=str(results)))

    other = start("nnUNetTrainerSomethingElse")
    ours = None
    try:
        time.sleep(0.5)
        assert row()["status"] == "interrupted"  # another trainer's training of fold 1
        ours = start(pred.trainer)
        time.sleep(0.5)
        r = row()
        assert r["status"] == "in progress" and f"pid {ours.pid}" in r["detail"], r
        assert "do not start it a second time" in r["detail"]
    finally:
        for proc in (other, ours):
            if proc is not None:
                proc.kill()
                proc.wait()
    assert row()["status"] == "interrupted"
