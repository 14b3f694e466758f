"""``calib-plan-small``: the small nnU-Net configuration (issue: trained models on a 2-core CPU).

Unit tests on plans dicts (no nnU-Net run) check what the entry changes and the errors; one real
test adds the configuration to the session's planned tiny dataset, preprocesses it with nnU-Net's
own ``nnUNetv2_preprocess``, trains it with stock ``nnUNetv2_train`` for a couple of iterations and
predicts with stock ``nnUNetv2_predict -c 2d_small``.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

from nnunet_calibration.experiments import small_config as sc
from nnunet_calibration.nnunet_utils import run_nnunet

SHORT = "num_epochs=1,num_iterations_per_epoch=2,num_val_iterations_per_epoch=1"


def _plans_2d(spacing=(1.5625, 1.5625), patch=(256, 224), median=(256.0, 200.5)) -> dict:
    """A plans dict shaped like nnU-Net 2.8's for a 2d configuration (as for the ACDC subset)."""
    arch = {"network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
            "arch_kwargs": {"n_stages": 6, "features_per_stage": [32, 64, 128, 256, 512, 512],
                            "conv_op": "torch.nn.modules.conv.Conv2d", "kernel_sizes": [[3, 3]] * 6,
                            "strides": [[1, 1]] + [[2, 2]] * 5, "n_conv_per_stage": [2] * 6,
                            "n_conv_per_stage_decoder": [2] * 5, "conv_bias": True,
                            "norm_op": "torch.nn.modules.instancenorm.InstanceNorm2d",
                            "norm_op_kwargs": {"eps": 1e-05, "affine": True}, "dropout_op": None,
                            "dropout_op_kwargs": None, "nonlin": "torch.nn.LeakyReLU",
                            "nonlin_kwargs": {"inplace": True}},
            "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"]}
    return {"dataset_name": "Dataset027_ACDC", "plans_name": "nnUNetPlans",
            "configurations": {"2d": {"data_identifier": "nnUNetPlans_2d", "preprocessor_name": "DefaultPreprocessor",
                                      "batch_size": 29, "patch_size": list(patch),
                                      "median_image_size_in_voxels": list(median), "spacing": list(spacing),
                                      "normalization_schemes": ["ZScoreNormalization"],
                                      "use_mask_for_norm": [False], "batch_dice": True, "architecture": arch}}}


def test_entry_inherits_from_2d_and_changes_only_what_makes_it_cheap():
    plans = _plans_2d()
    entry = sc.small_configuration(plans, spacing_factor=2.0, fov_factor=1.0, base_features=16, max_features=256,
                                   max_stages=5, batch_size=12)
    assert entry["inherits_from"] == "2d"
    assert entry["data_identifier"] == "nnUNetPlans_2d_small"
    assert entry["spacing"] == [3.125, 3.125]
    assert entry["median_image_size_in_voxels"] == [128.0, 100.25]
    assert entry["patch_size"] == [128, 112]  # 256/2, 224/2, both divisible by 2**4
    kw = entry["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 5
    assert kw["features_per_stage"] == [16, 32, 64, 128, 256]
    assert kw["strides"] == [[1, 1], [2, 2], [2, 2], [2, 2], [2, 2]]
    assert kw["kernel_sizes"] == [[3, 3]] * 5
    assert len(kw["n_conv_per_stage"]) == 5 and len(kw["n_conv_per_stage_decoder"]) == 4
    # the parent's architecture is not modified, and what is not overridden is inherited
    assert plans["configurations"]["2d"]["architecture"]["arch_kwargs"]["n_stages"] == 6
    for key in ("normalization_schemes", "preprocessor_name", "batch_dice"):
        assert key not in entry
    # nnU-Net's own plans manager resolves the inheritance
    full = copy.deepcopy(plans)
    full["configurations"]["2d_small"] = entry
    cm = PlansManager(full).get_configuration("2d_small")
    assert cm.batch_size == 12 and list(cm.patch_size) == [128, 112] and list(cm.spacing) == [3.125, 3.125]
    assert cm.normalization_schemes == ["ZScoreNormalization"] and cm.batch_dice is True
    assert cm.data_identifier == "nnUNetPlans_2d_small"


def test_features_capped_and_stages_limited():
    entry = sc.small_configuration(_plans_2d(), spacing_factor=1.0, fov_factor=1.0, base_features=32, max_features=64,
                                   max_stages=4)
    kw = entry["architecture"]["arch_kwargs"]
    assert kw["n_stages"] == 4 and kw["features_per_stage"] == [32, 64, 64, 64]
    # with the resolution kept, the patch is the parent's (already divisible by 2**3)
    assert entry["patch_size"] == [256, 224]


@pytest.mark.parametrize("key,value", [("spacing_factor", 0), ("base_features", 0), ("batch_size", 0),
                                       ("max_stages", 1)])
def test_invalid_settings_are_refused(key, value):
    with pytest.raises(sc.SmallConfigError, match=key):
        sc.small_configuration(_plans_2d(), **{key: value})


def _write_dataset(pre: Path, plans: dict | None) -> Path:
    folder = pre / "Dataset027_ACDC"
    folder.mkdir(parents=True)
    if plans is not None:
        (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    return folder


def test_unplanned_dataset_and_missing_2d_are_clear_errors(tmp_path):
    with pytest.raises(sc.SmallConfigError, match=r"dataset 27 is not in nnUNet_preprocessed.*nnUNetv2_plan_and_preprocess"):
        sc.add_small_configuration(27, tmp_path)
    folder = _write_dataset(tmp_path, None)
    with pytest.raises(sc.SmallConfigError, match=r"nnUNetPlans.json does not exist.*Dataset027_ACDC.*-c 2d"):
        sc.add_small_configuration(27, tmp_path)
    plans = _plans_2d()
    plans["configurations"] = {"3d_fullres": plans["configurations"]["2d"]}
    (folder / "nnUNetPlans.json").write_text(json.dumps(plans))
    before = (folder / "nnUNetPlans.json").read_bytes()
    with pytest.raises(sc.SmallConfigError, match=r"no '2d' configuration"):
        sc.add_small_configuration("Dataset027_ACDC", tmp_path)
    assert (folder / "nnUNetPlans.json").read_bytes() == before


def test_existing_configuration_needs_overwrite_and_writes_are_atomic(tmp_path):
    folder = _write_dataset(tmp_path, _plans_2d())
    plans_file, entry = sc.add_small_configuration(27, tmp_path)
    assert plans_file == folder / "nnUNetPlans.json"
    written = json.loads(plans_file.read_text())
    assert written["configurations"]["2d_small"] == entry and "2d" in written["configurations"]
    before = plans_file.read_bytes()
    with pytest.raises(sc.SmallConfigError, match="already has a configuration '2d_small'.*--overwrite"):
        sc.add_small_configuration(27, tmp_path, batch_size=3)
    assert plans_file.read_bytes() == before
    sc.add_small_configuration(27, tmp_path, batch_size=3, overwrite=True)
    assert json.loads(plans_file.read_text())["configurations"]["2d_small"]["batch_size"] == 3
    assert sorted(p.name for p in folder.iterdir()) == ["nnUNetPlans.json"]  # no temporary file left


def test_plans_without_2d_spacing_is_a_named_error():
    """Issue 21: a '2d' entry without ``spacing`` is a SmallConfigError naming the key, not a KeyError."""
    plans = _plans_2d()
    del plans["configurations"]["2d"]["spacing"]
    with pytest.raises(sc.SmallConfigError, match=r"'2d' configuration lacks \['spacing'\]"):
        sc.small_configuration(plans)


def test_too_few_stages_are_refused():
    # a 24x24 2d patch at half resolution leaves 12x12: one pooling, 2 stages, no deep-supervision weight left
    plans = _plans_2d(spacing=(1.0, 1.0), patch=(24, 24), median=(24.0, 24.0))
    with pytest.raises(sc.SmallConfigError, match="only 2 U-Net stages.*smaller --spacing-factor.*larger --fov-factor"):
        sc.small_configuration(plans, spacing_factor=2.0, fov_factor=1.0)
    assert sc.small_configuration(plans, spacing_factor=1.5, fov_factor=1.0)["architecture"]["arch_kwargs"]["n_stages"] == 3
    with pytest.raises(sc.SmallConfigError, match="only 2 U-Net stages"):  # the default: half the field of view
        sc.small_configuration(plans, spacing_factor=1.5)


def test_defaults_are_the_measured_choice():
    """calib-plan-small's defaults: the 2d spacing, half the 2d field of view (ACDC: 128 x 112), 16-256 features."""
    entry = sc.small_configuration(_plans_2d())
    assert entry["spacing"] == [1.5625, 1.5625] and entry["patch_size"] == [128, 112]
    assert entry["architecture"]["arch_kwargs"]["features_per_stage"] == [16, 32, 64, 128, 256]
    assert entry["batch_size"] == 4 and entry["calib_small_config"]["fov_factor"] == 0.5


def test_cli_errors_exit_2_with_message(tmp_path):
    env = dict(os.environ, nnUNet_preprocessed=str(tmp_path), nnUNet_raw=str(tmp_path), nnUNet_results=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "nnunet_calibration.experiments.small_config", "27"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert "calib-plan-small: error: dataset 27 is not in nnUNet_preprocessed" in r.stderr


@pytest.mark.nnunet
def test_small_configuration_trains_and_predicts_with_stock_nnunet(synthetic_labels, tmp_path):
    ds = synthetic_labels
    env = dict(ds.env)
    name = "2d_small"
    # the tiny 24x24 slices: x1.5 spacing gives 16x16 patches, 3 stages (x2 would leave 2: refused, see below)
    r = subprocess.run([sys.executable, "-m", "nnunet_calibration.experiments.small_config", str(ds.dataset_id),
                        "-c", name, "--spacing-factor", "1.5", "--fov-factor", "1", "--batch-size", "2", "--overwrite"],
                       env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    plans = json.loads((ds.preprocessed / "nnUNetPlans.json").read_text())
    entry = plans["configurations"][name]
    parent = plans["configurations"]["2d"]
    assert entry["inherits_from"] == "2d"
    assert entry["spacing"] == pytest.approx([1.5 * s for s in parent["spacing"]])
    assert entry["architecture"]["arch_kwargs"]["n_stages"] >= 3
    # nnU-Net's own preprocessing filled the configuration's own folder
    pre_folder = ds.preprocessed / f"nnUNetPlans_{name}"
    assert pre_folder.is_dir() and len(list(pre_folder.iterdir())) > 0
    results = tmp_path / "results"
    env.update(nnUNet_results=str(results), NNUNET_CALIB_HPARAMS=SHORT)
    try:
        run_nnunet(["nnUNetv2_train", str(ds.dataset_id), name, "0", "-tr", "nnUNetTrainerDiceCE", "-device", "cpu"],
                   env)
        model = results / ds.name / f"nnUNetTrainerDiceCE__nnUNetPlans__{name}"
        assert (model / "fold_0" / "checkpoint_final.pth").is_file()
        used = json.loads((model / "fold_0" / "calibration_hparams.json").read_text())
        assert used["training"]["batch_size"] == 2
        pred = tmp_path / "pred"
        run_nnunet(["nnUNetv2_predict", "-i", ds.raw / "imagesTs", "-o", pred, "-d", str(ds.dataset_id), "-c", name,
                    "-f", "0", "-tr", "nnUNetTrainerDiceCE", "--save_probabilities", "-device", "cpu"], env)
        cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (ds.raw / "imagesTs").glob("*_0000.nii.gz"))
        assert cases
        for case in cases:
            probs = np.load(pred / f"{case}.npz")["probabilities"]
            image = sitk.ReadImage(str(ds.raw / "imagesTs" / f"{case}_0000.nii.gz"))
            # back on the original grid despite the coarser training spacing
            assert probs.shape[1:] == sitk.GetArrayFromImage(image).shape
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=1e-4)
            seg = sitk.ReadImage(str(pred / f"{case}.nii.gz"))
            assert seg.GetSize() == image.GetSize()
            assert np.allclose(seg.GetSpacing(), image.GetSpacing())
    finally:
        shutil.rmtree(results, ignore_errors=True)
