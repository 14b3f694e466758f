"""The plugin's trainers in the nnU-Net workflows a user runs (issue 24), with real nnU-Net commands on
Dataset901 (tiny synthetic labels, planned once per run by the shared fixtures; 1 epoch of 2 training
iterations each):

* Residual Encoder presets (``-p nnUNetResEncUNetMPlans``, planner ``nnUNetPlannerResEncM``) in 2d and
  3d_fullres, with ``-num_gpus 1``;
* the cascade 3d_lowres -> 3d_cascade_fullres (plans ``nnUNetPlansCascade``, see conftest);
* fine-tuning (``-pretrained_weights``) from a checkpoint of nnU-Net's own ``nnUNetTrainer`` (SDF head
  fresh) and from an SDC checkpoint (SDF head loaded), through nnU-Net's own ``maybe_load_checkpoint``
  in-process (tensor by tensor) and through ``nnUNetv2_train``;
* ``--c`` (resume), ``--val --npz`` (validation only), ``nnUNetv2_find_best_configuration -f 0`` over
  two plugin trainers, ``nnUNetv2_ensemble`` of their predictions;
* nnU-Net's Primus (transformer): SDC's head refuses with a named error, a loss-only trainer builds it.

Every prediction is written with probabilities and evaluated by ``calib-evaluate`` (NLL and Brier
checked against a direct numpy computation, trainers_testlib.calib_evaluate). The plain-plans
3d_fullres cell is tests/trainers/test_trainer_runs.py::test_train_predict_3d_fullres.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

import nnunet_calibration.trainers as T
from nnunet_calibration.nnunet_utils import run_nnunet
from nnunet_calibration.trainers.sdf_head import SDFHeadNetwork, SDFHeadUnsupportedNetworkError, unwrap_network

from testlib import SHORT_TRAINING
from trainers_testlib import (calib_evaluate, check_probabilities, check_trained, make_trainer, nnunet_predict,
                              nnunet_train, training_log)

pytestmark = pytest.mark.nnunet

SDC = "nnUNetTrainerSDC_DC"
MORPH = "nnUNetTrainerNACL_MorphGradient_DC"
DSCPP = "nnUNetTrainerDSCPlusPlus"
ACE = "nnUNetTrainerDiceCE_ACE"

HEAD_FRESH = "SDF head starts fresh (random initialisation): the checkpoint has no SDF head"
HEAD_LOADED = "SDF head loaded from the checkpoint"


def _splits(ds) -> list[str]:
    return ["--cases-from-split", str(ds.preprocessed / "splits_final.json"), "0"]


def _network_class(model: Path, configuration: str) -> str:
    return load_json(str(model / "plans.json"))["configurations"][configuration]["architecture"]["network_class_name"]


# ----------------------------------------------------------------------------------------------
# Residual Encoder presets
# ----------------------------------------------------------------------------------------------
def test_resenc_m_2d_sdc_num_gpus_1_and_finetune_from_sdc(synthetic_labels_workflow_plans, tmp_path):
    """SDC_DC on nnUNetResEncUNetMPlans 2d with ``-num_gpus 1``; prediction and calib-evaluate; then a
    second model fine-tuned from its checkpoint (``-pretrained_weights``): the SDF head is loaded."""
    ds = synthetic_labels_workflow_plans
    plans = ds.resenc_plans
    model, _ = nnunet_train(ds, "2d", "0", SDC, tmp_path / "results", "-num_gpus", "1", plans=plans)
    assert _network_class(model, "2d").endswith(".ResidualEncoderUNet")
    check_trained(SDC, model, "2d")
    weights = torch.load(model / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert any(k.startswith("network.encoder.stem.") for k in weights["network_weights"])  # ResEnc's stem
    assert any(k.startswith("sdf_head.") for k in weights["network_weights"])
    pred = nnunet_predict(ds, "2d", ["0"], SDC, tmp_path / "results", tmp_path / "pred", plans=plans)
    check_probabilities(pred, ds, n_channels=4, regions=False)
    calib_evaluate(pred, ds.raw / "labelsTs")

    ckpt = model / "fold_0" / "checkpoint_final.pth"
    tuned, _ = nnunet_train(ds, "2d", "0", SDC, tmp_path / "results_ft", "-pretrained_weights", ckpt, "--npz",
                            plans=plans)
    check_trained(SDC, tuned, "2d")
    log = training_log(tuned)
    assert f"-pretrained_weights {ckpt} (trainer {SDC})" in log and HEAD_LOADED in log
    calib_evaluate(tuned / "fold_0" / "validation", ds.raw / "labelsTr", *_splits(ds))


def test_resenc_m_3d_fullres_morph_dc(synthetic_labels_workflow_plans, tmp_path):
    """A morphological _DC trainer on nnUNetResEncUNetMPlans 3d_fullres; prediction and calib-evaluate."""
    ds = synthetic_labels_workflow_plans
    plans = ds.resenc_plans
    model, _ = nnunet_train(ds, "3d_fullres", "0", MORPH, tmp_path / "results", plans=plans)
    assert _network_class(model, "3d_fullres").endswith(".ResidualEncoderUNet")
    check_trained(MORPH, model, "3d_fullres")
    pred = nnunet_predict(ds, "3d_fullres", ["0"], MORPH, tmp_path / "results", tmp_path / "pred", plans=plans)
    check_probabilities(pred, ds, n_channels=4, regions=False)
    calib_evaluate(pred, ds.raw / "labelsTs")


# ----------------------------------------------------------------------------------------------
# Cascade
# ----------------------------------------------------------------------------------------------
def test_cascade_3d_lowres_to_3d_cascade_fullres_sdc(synthetic_labels_workflow_plans, tmp_path):
    """SDC_DC through the cascade (nnU-Net finds the previous stage's segmentations by the trainer's
    name, so both stages use one trainer): 3d_lowres on fold ``all`` (its end-of-training validation
    then writes predicted_next_stage for every training case), 3d_cascade_fullres on fold 0 (its input:
    the image plus the one-hot lowres segmentation), prediction of both stages, calib-evaluate.

    Both stages' networks have two resolution stages, so deep supervision has a single output: nnU-Net
    2.8.1's own loss weighting gives it weight 0 / 0 (NaN loss, all-NaN probabilities); the plugin's
    trainers weight it 1 (trainers/base.py), which the finite probabilities below check."""
    ds = synthetic_labels_workflow_plans
    plans, results = ds.cascade_plans, tmp_path / "results"
    configurations = load_json(str(ds.preprocessed / f"{plans}.json"))["configurations"]
    for cfg in ("3d_lowres", "3d_fullres"):
        arch = configurations[cfg]["architecture"]
        assert arch["arch_kwargs"]["n_stages"] == 2, (cfg, arch["arch_kwargs"])
    low, _ = nnunet_train(ds, "3d_lowres", "all", SDC, results, plans=plans)
    check_trained(SDC, low, "3d_lowres", fold="all")
    next_stage = low / "predicted_next_stage" / "3d_cascade_fullres"
    train_cases = {p.name[:-len(".nii.gz")] for p in (ds.raw / "labelsTr").glob("*.nii.gz")}
    assert {p.name.split(".")[0] for p in next_stage.iterdir()} == train_cases  # .b2nd in nnU-Net 2.8
    full, _ = nnunet_train(ds, "3d_cascade_fullres", "0", SDC, results, plans=plans)
    check_trained(SDC, full, "3d_cascade_fullres")
    weights = torch.load(full / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    first_conv = weights["network_weights"]["network.encoder.stages.0.0.convs.0.conv.weight"]
    assert first_conv.shape[1] == 1 + 3  # image + one-hot of the 3 foreground labels of the lowres stage

    low_pred = nnunet_predict(ds, "3d_lowres", ["all"], SDC, results, tmp_path / "pred_low", plans=plans)
    pred = nnunet_predict(ds, "3d_cascade_fullres", ["0"], SDC, results, tmp_path / "pred",
                          "-prev_stage_predictions", low_pred, plans=plans)
    check_probabilities(pred, ds, n_channels=4, regions=False)
    calib_evaluate(pred, ds.raw / "labelsTs")


# ----------------------------------------------------------------------------------------------
# Fine-tuning (-pretrained_weights)
# ----------------------------------------------------------------------------------------------
def _unet_state(trainer) -> dict:
    mod = unwrap_network(trainer.network)
    net = mod.network if isinstance(mod, SDFHeadNetwork) else mod
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def _head_state(trainer) -> dict:
    return {k: v.detach().clone() for k, v in unwrap_network(trainer.network).sdf_head.state_dict().items()}


def _load_like_nnunetv2_train(trainer, checkpoint: Path) -> None:
    """What ``nnUNetv2_train -pretrained_weights`` does after building the trainer (nnU-Net's own code)."""
    from nnunetv2.run.run_training import maybe_load_checkpoint

    maybe_load_checkpoint(trainer, False, False, str(checkpoint))


def _check_unet_loaded(before: dict, after: dict, source: dict) -> None:
    """nnU-Net's rule: every tensor except the segmentation layers' equals the checkpoint's; the
    segmentation layers keep the network's own values."""
    assert before.keys() == after.keys() == source.keys()
    seg = [k for k in after if ".seg_layers." in k]
    assert seg and len(seg) < len(after)
    for k in after:
        expected = before[k] if ".seg_layers." in k else source[k]
        assert torch.equal(after[k], expected), k


def test_pretrained_weights_in_process_every_direction(synthetic_labels, tmp_path):
    """nnU-Net's maybe_load_checkpoint (the -pretrained_weights path of nnUNetv2_train) with real
    checkpoints written by nnU-Net's save_checkpoint: of ``nnUNetTrainer`` itself and of
    nnUNetTrainerSDC_DC; tensors compared one by one with the checkpoint's."""
    from nnunetv2.run import run_training
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    pre = synthetic_labels.preprocessed
    plain = make_trainer(nnUNetTrainer, pre, "2d")
    plain_ckpt = tmp_path / "nnUNetTrainer.pth"
    plain.save_checkpoint(str(plain_ckpt))
    sdc = make_trainer(T.nnUNetTrainerSDC_DC, pre, "2d")
    with torch.no_grad():  # a head that differs from every fresh one
        for p in unwrap_network(sdc.network).sdf_head.parameters():
            p.add_(1.0)
    sdc_ckpt = tmp_path / "sdc.pth"
    sdc.save_checkpoint(str(sdc_ckpt))
    plain_unet, sdc_unet, sdc_head = _unet_state(plain), _unet_state(sdc), _head_state(sdc)

    # the failure of issue 24: nnU-Net's own function cannot load a plain checkpoint into the SDC network
    target = make_trainer(T.nnUNetTrainerSDC_DC, pre, "2d")
    nnunet_own = getattr(run_training.load_pretrained_weights, "nnunet_original")
    with pytest.raises(AssertionError, match="Key network.encoder.stages.0.0.convs.0.conv.weight is missing"):
        nnunet_own(target.network, str(plain_ckpt))

    # plain nnUNetTrainer checkpoint -> SDC: U-Net loaded, head fresh (unchanged), said in the log
    before, head_before = _unet_state(target), _head_state(target)
    _load_like_nnunetv2_train(target, plain_ckpt)
    _check_unet_loaded(before, _unet_state(target), plain_unet)
    assert all(torch.equal(v, head_before[k]) for k, v in _head_state(target).items())
    log = Path(target.log_file).read_text()
    assert f"-pretrained_weights {plain_ckpt} (trainer nnUNetTrainer)" in log and HEAD_FRESH in log

    # SDC checkpoint -> SDC: U-Net and head loaded
    target = make_trainer(T.nnUNetTrainerSDC_DC, pre, "2d")
    before = _unet_state(target)
    _load_like_nnunetv2_train(target, sdc_ckpt)
    _check_unet_loaded(before, _unet_state(target), sdc_unet)
    assert all(torch.equal(v, sdc_head[k]) for k, v in _head_state(target).items())
    assert HEAD_LOADED in Path(target.log_file).read_text()

    # SDC checkpoint -> a trainer without head (DSC++): the U-Net loaded, the head not used
    target = make_trainer(T.nnUNetTrainerDSCPlusPlus, pre, "2d")
    before = _unet_state(target)
    _load_like_nnunetv2_train(target, sdc_ckpt)
    _check_unet_loaded(before, _unet_state(target), sdc_unet)
    assert "the checkpoint's SDF head is not used (this network has none)" in Path(target.log_file).read_text()

    # a checkpoint of another network (3d_fullres into 2d) is an error naming the key, as in nnU-Net
    other = make_trainer(T.nnUNetTrainerSDC_DC, pre, "3d_fullres")
    other_ckpt = tmp_path / "sdc_3d.pth"
    other.save_checkpoint(str(other_ckpt))
    with pytest.raises(RuntimeError, match=r"Key \S+ has shape .* in the pretrained model weights"):
        _load_like_nnunetv2_train(make_trainer(T.nnUNetTrainerSDC_DC, pre, "2d"), other_ckpt)


def test_finetune_sdc_from_nnunettrainer_checkpoint(synthetic_labels, tmp_path):
    """``nnUNetv2_train -tr nnUNetTrainerSDC_DC -pretrained_weights`` with a checkpoint written by nnU-Net's
    own ``nnUNetTrainer`` (issue 24's AssertionError before): trains, the log says the head starts fresh;
    validation with probabilities (--npz) evaluated by calib-evaluate."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    ds = synthetic_labels
    ckpt = tmp_path / "nnUNetTrainer.pth"
    make_trainer(nnUNetTrainer, ds.preprocessed, "2d").save_checkpoint(str(ckpt))
    model, _ = nnunet_train(ds, "2d", "0", SDC, tmp_path / "results", "-pretrained_weights", ckpt, "--npz")
    check_trained(SDC, model, "2d")
    log = training_log(model)
    assert f"-pretrained_weights {ckpt} (trainer nnUNetTrainer)" in log and HEAD_FRESH in log
    calib_evaluate(model / "fold_0" / "validation", ds.raw / "labelsTr", *_splits(ds))


# ----------------------------------------------------------------------------------------------
# --c, --val --npz, find_best_configuration, ensembling
# ----------------------------------------------------------------------------------------------
def test_resume_validation_only_find_best_configuration_and_ensemble(synthetic_labels, tmp_path):
    """DSC++ trained, then ``--val --npz`` (validation only: no training, npz written); mL1-ACE trained
    for 1 epoch, then ``--c --npz`` with 2 epochs (resumes: epoch 0's log kept, epoch 1 trained);
    ``nnUNetv2_find_best_configuration -c 2d -tr DSC++ mL1-ACE -f 0``; both models predict imagesTs with
    probabilities and ``nnUNetv2_ensemble --save_npz`` averages them (checked against the mean of the
    two); calib-evaluate on the ensemble."""
    ds, results = synthetic_labels, tmp_path / "results"
    a, _ = nnunet_train(ds, "2d", "0", DSCPP, results)
    final = a / "fold_0" / "checkpoint_final.pth"
    stamp = final.stat().st_mtime_ns
    assert not list((a / "fold_0" / "validation").glob("*.npz"))
    nnunet_train(ds, "2d", "0", DSCPP, results, "--val", "--npz")
    assert final.stat().st_mtime_ns == stamp  # nothing trained
    assert list((a / "fold_0" / "validation").glob("*.npz"))
    check_trained(DSCPP, a, "2d")

    b, _ = nnunet_train(ds, "2d", "0", ACE, results)
    nnunet_train(ds, "2d", "0", ACE, results, "--c", "--npz", hparams=SHORT_TRAINING.replace("num_epochs=1", "num_epochs=2"))
    ckpt = torch.load(b / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["current_epoch"] == 2 and len(ckpt["logging"]["train_losses"]) == 2
    logged = [line.split(": ", 1)[-1].strip() for line in training_log(b).splitlines()]
    assert logged.count("Epoch 0") == 1 and logged.count("Epoch 1") == 1  # one epoch per run
    check_trained(ACE, b, "2d")

    env = dict(ds.env, nnUNet_results=str(results))
    run_nnunet(["nnUNetv2_find_best_configuration", str(ds.dataset_id), "-c", "2d", "-tr", DSCPP, ACE,
                "-p", "nnUNetPlans", "-f", "0", "-np", "1"], env)
    info = json.loads((results / ds.name / "inference_information.json").read_text())
    assert len(info["all_results"]) == 3  # two models and their ensemble
    assert (results / ds.name / "inference_instructions.txt").is_file()

    pa = nnunet_predict(ds, "2d", ["0"], DSCPP, results, tmp_path / "pred_dscpp")
    pb = nnunet_predict(ds, "2d", ["0"], ACE, results, tmp_path / "pred_ace")
    ens = tmp_path / "ensemble"
    run_nnunet(["nnUNetv2_ensemble", "-i", pa, pb, "-o", ens, "--save_npz", "-np", "1"], env)
    for npz in sorted(pa.glob("*.npz")):
        mean = (np.load(npz)["probabilities"].astype(np.float64)
                + np.load(pb / npz.name)["probabilities"].astype(np.float64)) / 2
        np.testing.assert_allclose(np.load(ens / npz.name)["probabilities"], mean, atol=1e-6)
    check_probabilities(ens, ds, n_channels=4, regions=False)
    calib_evaluate(ens, ds.raw / "labelsTs")


# ----------------------------------------------------------------------------------------------
# Primus (transformer)
# ----------------------------------------------------------------------------------------------
def test_primus_sdc_head_refuses_with_named_error(synthetic_labels):
    """nnU-Net's Primus trainers (2.8.1: nnUNetv2.training.nnUNetTrainer.primus) have no U-Net decoder:
    SDC combined with Primus-S stops when the network is built (in the trainer's initialize and in
    nnUNetv2_predict alike) with SDFHeadUnsupportedNetworkError naming the network; a loss-only trainer
    (DSC++) combined with Primus-S gets nnU-Net's Primus unchanged."""
    primus = pytest.importorskip("nnunetv2.training.nnUNetTrainer.primus.primus_trainers",
                                 reason="this nnU-Net has no Primus trainers")
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    class SDCPrimus(T.nnUNetTrainerSDC_DC, primus.nnUNet_Primus_S_Trainer):
        pass

    class DSCPPPrimus(T.nnUNetTrainerDSCPlusPlus, primus.nnUNet_Primus_S_Trainer):
        pass

    plans = load_json(str(synthetic_labels.preprocessed / "nnUNetPlans.json"))
    plans["configurations"]["3d_fullres"]["patch_size"] = [8, 16, 16]  # Primus needs multiples of 8
    cm = PlansManager(plans).get_configuration("3d_fullres")
    with pytest.raises(SDFHeadUnsupportedNetworkError, match="cannot be attached to Primus"):
        SDCPrimus.build_network_architecture(PlansManager(plans), cm, 1, 4, False)
    net = DSCPPPrimus.build_network_architecture(PlansManager(plans), cm, 1, 4, False)
    assert type(net).__name__ == "Primus"
    with torch.no_grad():
        assert net.eval()(torch.zeros(1, 1, 8, 16, 16)).shape == (1, 4, 8, 16, 16)
