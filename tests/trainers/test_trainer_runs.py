"""Every trainer through the real ``nnUNetv2_train`` and ``nnUNetv2_predict`` commands (CPU).

Per trainer (Dataset901, 2d, fold 0, 1 epoch of 2 iterations + 1 validation iteration via
``NNUNET_CALIB_HPARAMS``): training ends (including nnU-Net's end-of-training validation), the
final checkpoint loads strictly into the trainer's own ``build_network_architecture``, the
predicted probabilities (``--save_probabilities``) are valid, and ``calibration_hparams.json``
holds the hyperparameters used (defaults, or the per-run override). The model folder is deleted
after each test (checkpoints are ~60 MB). Further: 3d_fullres, region datasets, a loss without
region support failing at start-up, an unknown hyperparameter key, and nnU-Net's by-name lookup.
"""
from __future__ import annotations

import os
import textwrap

import pytest

import nnunet_calibration.trainers as T
from nnunet_calibration.nnunet_utils import run_nnunet

from trainers_testlib import (calib_evaluate, check_checkpoint_loads_strictly, check_probabilities, read_hparams,
                              remove, short_training, train_and_predict)

SHORT = short_training()
#: per-run hyperparameter overrides checked in calibration_hparams.json
OVERRIDES = {"nnUNetTrainerLS": {"alpha": 0.2}, "nnUNetTrainerSDC": {"lambda_sdf": 0.3}}


def _hparams(trainer: str) -> str:
    extra = OVERRIDES.get(trainer, {})
    return ",".join([SHORT] + [f"{k}={v}" for k, v in extra.items()])


def _check_run(trainer: str, dataset, configuration: str, tmp_path, n_channels: int, regions: bool,
               evaluate: bool = False):
    cls = getattr(T, trainer)
    model, pred, _ = train_and_predict(trainer, dataset, configuration, tmp_path, _hparams(trainer))
    try:
        assert (model / "fold_0" / "checkpoint_final.pth").is_file()
        assert (model / "fold_0" / "validation" / "summary.json").is_file()
        check_checkpoint_loads_strictly(cls, model, configuration)
        check_probabilities(pred, dataset, n_channels, regions)
        if evaluate:  # the plain-plans 3d_fullres cell of the workflow matrix (README, issue 24)
            calib_evaluate(pred, dataset.raw / "labelsTs")
        used = read_hparams(model)
        expected = {**cls.loss_hparams, **OVERRIDES.get(trainer, {})}
        assert used["trainer"] == trainer
        assert used["loss_hparams"] == expected
        assert used["training"]["num_epochs"] == 1
        assert used["training"]["num_iterations_per_epoch"] == 2
        assert used["training"]["num_val_iterations_per_epoch"] == 1
        if trainer != "nnUNetTrainerDiceCE":
            assert used["regions"] is regions
    finally:
        remove(model)
        remove(pred)


#: every trainer with its own loss class or wiring runs for real; of the 32 morphological variants, which
#: differ from each other only in the operator (a class attribute of one NACL / SVLS morphological class,
#: each checked in-process by test_trainer_units.test_trainer_loss_is_the_registry_loss and against scipy
#: in tests/losses), one operator per family and form runs here (CI time: each run is a real
#: nnUNetv2_train + nnUNetv2_predict)
MORPH_REPRESENTATIVES = ("nnUNetTrainerNACL_MorphGradient", "nnUNetTrainerNACL_MorphOpening_DC",
                         "nnUNetTrainerSVLS_MorphInternalBoundary", "nnUNetTrainerSVLS_MorphClosing_DC")
REAL_RUNS = [n for n in T.TRAINER_NAMES if "_Morph" not in n] + list(MORPH_REPRESENTATIVES)


def test_real_runs_cover_every_loss_class():
    """A morphological variant defines no code of its own (only class attributes: its loss name and
    operator): what runs is its bases' code, which the representatives run for real."""
    import inspect

    assert set(MORPH_REPRESENTATIVES) <= set(T.TRAINER_NAMES)
    for n in T.TRAINER_NAMES:
        if "_Morph" in n:
            own = {k for k, v in vars(getattr(T, n)).items() if inspect.isfunction(v) or isinstance(v, property)}
            assert not own, (n, own)


@pytest.mark.nnunet
@pytest.mark.parametrize("trainer", REAL_RUNS)
def test_train_predict_2d(trainer, synthetic_labels, tmp_path):
    _check_run(trainer, synthetic_labels, "2d", tmp_path, n_channels=4, regions=False)


@pytest.mark.nnunet
@pytest.mark.parametrize("trainer", ["nnUNetTrainerSDC", "nnUNetTrainerSVLS_MorphGradient",
                                     "nnUNetTrainerNACL_MorphOpening_DC"])
def test_train_predict_3d_fullres(trainer, synthetic_labels, tmp_path):
    _check_run(trainer, synthetic_labels, "3d_fullres", tmp_path, n_channels=4, regions=False, evaluate=True)


@pytest.mark.nnunet
@pytest.mark.parametrize("trainer", ["nnUNetTrainerSDC", "nnUNetTrainerNACL_DC", "nnUNetTrainerDiceCE_ACE"])
def test_train_predict_regions(trainer, synthetic_regions, tmp_path):
    # three regions (whole, core, enhancing): sigmoid probabilities, one channel per region
    _check_run(trainer, synthetic_regions, "2d", tmp_path, n_channels=3, regions=True)


@pytest.mark.nnunet
def test_loss_without_region_support_fails_at_start(synthetic_regions, tmp_path):
    """A trainer whose loss cannot do regions stops nnUNetv2_train on a region dataset with a clear error.

    All shipped losses support regions, so the trainer (and its loss) is an external trainer
    defined here, found through nnU-Net's ``nnUNet_extTrainer`` next to ours."""
    ext = tmp_path / "ext_trainers"
    ext.mkdir()
    (ext / "labels_only_trainer.py").write_text(textwrap.dedent('''
        from nnunet_calibration.losses import LOSSES, CrossEntropy
        from nnunet_calibration.trainers import nnUNetTrainerCalibLossBase

        class LabelsOnlyCE(CrossEntropy):
            supports_regions = False
            name = "labels_only_ce"

        LOSSES.setdefault("labels_only_ce", LabelsOnlyCE)

        class nnUNetTrainerTestLabelsOnly(nnUNetTrainerCalibLossBase):
            """test trainer: a loss without region support"""
            loss_key = "labels_only_ce"
    '''))
    env = dict(synthetic_regions.env, NNUNET_CALIB_HPARAMS=SHORT)
    env["nnUNet_extTrainer"] = os.pathsep.join(p for p in (env.get("nnUNet_extTrainer"), str(ext)) if p)
    with pytest.raises(RuntimeError) as err:
        run_nnunet(["nnUNetv2_train", str(synthetic_regions.dataset_id), "2d", "0", "-tr",
                    "nnUNetTrainerTestLabelsOnly", "-device", "cpu"], env)
    msg = str(err.value)
    assert "nnUNetTrainerTestLabelsOnly" in msg and "labels_only_ce" in msg
    assert "does not support region-based training" in msg
    # it failed in the constructor: no network was built, nothing was trained
    folder = os.path.join(env["nnUNet_results"], synthetic_regions.name, "nnUNetTrainerTestLabelsOnly__nnUNetPlans__2d")
    assert not os.path.exists(os.path.join(folder, "fold_0", "checkpoint_final.pth"))
    remove(folder)


@pytest.mark.nnunet
def test_unknown_hparam_key_fails_clearly(synthetic_labels):
    env = dict(synthetic_labels.env, NNUNET_CALIB_HPARAMS=SHORT + ",alpah=0.2")
    with pytest.raises(RuntimeError) as err:
        run_nnunet(["nnUNetv2_train", str(synthetic_labels.dataset_id), "2d", "0", "-tr", "nnUNetTrainerSDC",
                    "-device", "cpu"], env)
    msg = str(err.value)
    assert "NNUNET_CALIB_HPARAMS" in msg and "alpah" in msg and "lambda_sdf" in msg  # names the valid keys
    remove(os.path.join(env["nnUNet_results"], synthetic_labels.name, "nnUNetTrainerSDC__nnUNetPlans__2d"))


@pytest.mark.nnunet
@pytest.mark.parametrize("trainer", T.TRAINER_NAMES)
def test_nnunet_finds_trainer_by_name(trainer, nnunet_root):
    """nnU-Net's own lookup (used by nnUNetv2_train / nnUNetv2_predict) returns our class object:
    through the wheel's module inside nnU-Net's trainer folder when installed non-editable, through
    ``nnUNet_extTrainer`` (set by the root conftest) in an editable install."""
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    assert recursive_find_trainer_class_by_name(trainer) is getattr(T, trainer)



