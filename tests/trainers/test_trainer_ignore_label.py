"""nnU-Net's ignore label through every trainer.

Dataset903 is the synthetic label dataset with a fifth label ``"ignore": 4`` (dataset.json) painted
on a band of every training case that crosses the objects' boundaries; planned and preprocessed
(2d only) by real nnU-Net in this module's fixture.

* Unit level, every trainer: the trainer's loss (nnU-Net's deep-supervision lists, targets
  containing the ignore label at every resolution) has exactly zero gradient on ignored voxels and
  does not change when the logits there change; for SDC also the SDF prediction's gradient is zero
  there.
* End to end: one trainer (SDC + Dice: SDF head, local target, Dice term) trains and predicts.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

import nnunet_calibration.trainers as T
from nnunet_calibration.nnunet_utils import run_nnunet
from nnunet_calibration.synthetic import make_synthetic_dataset
from nnunet_calibration.trainers.sdf_head import SDFHeadLoss, unwrap_network

from trainers_testlib import (check_checkpoint_loads_strictly, check_probabilities, ds_wrapper,
                              make_trainer, random_targets, remove, short_training, train_and_predict)

IGNORE = 4


@pytest.fixture(scope="module")
def ignore_dataset(nnunet_root):
    raw = make_synthetic_dataset(nnunet_root["nnUNet_raw"], 903, name="SynthIgnore", n_train=6, n_test=1, seed=3)
    for f in sorted((raw / "labelsTr").glob("*.nii.gz")):
        im = sitk.ReadImage(str(f))
        lab = sitk.GetArrayFromImage(im)
        y = lab.shape[1]
        lab[:, y // 2 - 3: y // 2 + 3, :] = IGNORE  # a horizontal band through the objects
        out = sitk.GetImageFromArray(lab)
        out.CopyInformation(im)
        sitk.WriteImage(out, str(f), useCompression=True)
    dj = json.loads((raw / "dataset.json").read_text())
    dj["labels"]["ignore"] = IGNORE
    (raw / "dataset.json").write_text(json.dumps(dj, indent=2))
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", "903", "-c", "2d", "-np", "1",
                "-npfp", "1", "--verify_dataset_integrity"], nnunet_root)
    return SimpleNamespace(dataset_id=903, name=raw.name, raw=raw, env=nnunet_root,
                           preprocessed=Path(nnunet_root["nnUNet_preprocessed"]) / raw.name)


@pytest.mark.nnunet
def test_label_manager_sees_ignore_label(ignore_dataset):
    tr = make_trainer(T.nnUNetTrainerSDC, ignore_dataset.preprocessed, initialize=False)
    assert tr.label_manager.ignore_label == IGNORE
    assert tr.label_manager.num_segmentation_heads == 4
    assert ignore_dataset.preprocessed.joinpath("nnUNetPlans.json").is_file()


@pytest.mark.nnunet
@pytest.mark.parametrize("trainer", T.TRAINER_NAMES)
def test_ignored_voxels_do_not_affect_the_loss(trainer, ignore_dataset):
    cls = getattr(T, trainer)
    tr = make_trainer(cls, ignore_dataset.preprocessed, "2d")
    torch.manual_seed(0)
    x = torch.randn(2, tr.num_input_channels, *tr.configuration_manager.patch_size)
    net = unwrap_network(tr.network).eval()
    with torch.no_grad():
        base = net(x)
    tgt = random_targets(base, False, ignore_label=IGNORE, seed=2)
    assert all((t == IGNORE).any() and (t != IGNORE).any() for t in tgt)
    out = [o.clone().requires_grad_(True) for o in base]
    sdf = None
    if isinstance(tr.loss, SDFHeadLoss):
        # feed an SDF prediction (as the head would in training) to exercise the SDF term too
        sdf = torch.tanh(torch.randn(2, 4, *base[0].shape[2:])).requires_grad_(True)
        tr.loss._sdf_source = lambda: sdf
    loss = tr.loss(out, tgt)
    assert torch.isfinite(loss)
    loss.backward()
    weights = ds_wrapper(tr.loss).weight_factors
    for w, o, t in zip(weights, out, tgt):
        if w == 0:  # nnU-Net's lowest resolution does not enter the loss
            assert o.grad is None
            continue
        ign = (t == IGNORE).expand_as(o)
        assert o.grad[ign].abs().max() == 0, trainer
        assert o.grad[~ign].abs().max() > 0, trainer
    if sdf is not None:
        ign = (tgt[0] == IGNORE).expand_as(sdf)
        assert sdf.grad[ign].abs().max() == 0
        assert sdf.grad[~ign].abs().max() > 0
    # changing the logits on ignored voxels leaves the loss unchanged
    with torch.no_grad():
        changed = [torch.where(t == IGNORE, o + 5 * torch.randn_like(o), o) for o, t in zip(base, tgt)]
        loss2 = tr.loss(changed, tgt)
        loss1 = tr.loss([o.detach() for o in out], tgt)
    torch.testing.assert_close(loss2, loss1)


@pytest.mark.nnunet
def test_train_predict_with_ignore_label(ignore_dataset, tmp_path):
    trainer = "nnUNetTrainerSDC_DC"
    model, pred, _ = train_and_predict(trainer, ignore_dataset, "2d", tmp_path, short_training())
    try:
        check_checkpoint_loads_strictly(T.nnUNetTrainerSDC_DC, model, "2d")
        # four output channels: the ignore label gets none
        check_probabilities(pred, ignore_dataset, n_channels=4, regions=False)
        used = json.loads((model / "fold_0" / "calibration_hparams.json").read_text())
        assert used["ignore_label"] == IGNORE
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(next(pred.glob("*.nii.gz")))))
        assert set(np.unique(seg)) <= {0, 1, 2, 3}
    finally:
        remove(model)
        remove(pred)
