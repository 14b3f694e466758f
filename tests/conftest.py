"""Shared fixtures: tiny synthetic datasets, planned and preprocessed by real nnU-Net, once per session.

- ``nnunet_root``: an environment dict whose nnUNet_raw / nnUNet_preprocessed / nnUNet_results point
  into one temporary folder; applied to ``os.environ`` for the whole session.
- ``synthetic_labels``: Dataset901 (plain labels 0..3), 2d and 3d_fullres preprocessed.
- ``synthetic_regions``: Dataset902 (BraTS-like regions, two channels), 2d and 3d_fullres preprocessed.
- ``synthetic_prediction``: a real short ``nnUNetTrainerDiceCE`` training on 901 (2d, fold 0, --npz)
  and ``nnUNetv2_predict --save_probabilities`` on its imagesTs.

Trainer lookup: after a normal ``pip install .`` our trainers sit inside nnU-Net's trainer folder.
With an editable install they don't, so ``nnUNet_extTrainer`` is pointed at the plugin folder.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from nnunet_calibration.nnunet_utils import nnunet_env, run_nnunet
from nnunet_calibration.synthetic import make_synthetic_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ACDC_SUBSET = SHARED / "data" / "acdc-subset"

#: short training used by every real-training test (via the trainers' hyperparameter variable)
SHORT_TRAINING = "num_epochs=1,num_iterations_per_epoch=2,num_val_iterations_per_epoch=1"


def plugin_installed_in_nnunet() -> bool:
    """True if the wheel's re-export module lies inside nnU-Net's trainer folder (non-editable install)."""
    import nnunetv2

    return (Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / "zz_nnunet_calibration"
            / "nnunet_calibration_trainers.py").is_file()


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("nnunet")
    env = nnunet_env(root)
    if not plugin_installed_in_nnunet():
        env["nnUNet_extTrainer"] = str(REPO / "nnunet_calibration" / "_nnunet_plugin")
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _plan_and_preprocess(env: dict, dataset_id: int, configs=("2d", "3d_fullres")) -> None:
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configs, "-np",
                *["1"] * len(configs), "--verify_dataset_integrity"], env)


@pytest.fixture(scope="session")
def synthetic_labels(nnunet_root):
    raw = make_synthetic_dataset(nnunet_root["nnUNet_raw"], 901, n_train=10, n_test=2, regions=False)
    _plan_and_preprocess(nnunet_root, 901)
    return SimpleNamespace(dataset_id=901, name=raw.name, raw=raw, env=nnunet_root,
                           preprocessed=Path(nnunet_root["nnUNet_preprocessed"]) / raw.name)


@pytest.fixture(scope="session")
def synthetic_regions(nnunet_root):
    raw = make_synthetic_dataset(nnunet_root["nnUNet_raw"], 902, n_train=10, n_test=2, regions=True, seed=1)
    _plan_and_preprocess(nnunet_root, 902)
    return SimpleNamespace(dataset_id=902, name=raw.name, raw=raw, env=nnunet_root,
                           preprocessed=Path(nnunet_root["nnUNet_preprocessed"]) / raw.name)


@pytest.fixture(scope="session")
def synthetic_prediction(synthetic_labels, tmp_path_factory):
    env = dict(synthetic_labels.env, NNUNET_CALIB_HPARAMS=SHORT_TRAINING)
    trainer = "nnUNetTrainerDiceCE"
    run_nnunet(["nnUNetv2_train", str(synthetic_labels.dataset_id), "2d", "0", "-tr", trainer, "--npz",
                "-device", "cpu"], env)
    model = Path(env["nnUNet_results"]) / synthetic_labels.name / f"{trainer}__nnUNetPlans__2d"
    pred = tmp_path_factory.mktemp("pred") / "imagesTs_pred"
    run_nnunet(["nnUNetv2_predict", "-i", synthetic_labels.raw / "imagesTs", "-o", pred, "-d",
                str(synthetic_labels.dataset_id), "-c", "2d", "-f", "0", "-tr", trainer,
                "--save_probabilities", "-device", "cpu", "-npp", "1", "-nps", "1"], env)
    return SimpleNamespace(pred_folder=pred, gt_folder=synthetic_labels.raw / "labelsTs",
                           validation_folder=model / "fold_0" / "validation",
                           gt_folder_train=synthetic_labels.raw / "labelsTr",
                           dataset_json=synthetic_labels.raw / "dataset.json", model_folder=model,
                           trainer=trainer, dataset=synthetic_labels)


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
