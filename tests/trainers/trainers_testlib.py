"""Helpers of the trainer tests: in-process trainers on the session's preprocessed datasets, the
train + predict round trip with real nnU-Net commands, and the checks applied to its results."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_calibration.nnunet_utils import run_nnunet
from nnunet_calibration.trainers.sdf_head import SDFHeadLoss
from testlib import PREDICT_IN_PROCESS, SHORT_TRAINING


def short_training() -> str:
    """The suite's short training (:data:`testlib.SHORT_TRAINING`) as an ``NNUNET_CALIB_HPARAMS`` value."""
    return SHORT_TRAINING


def make_trainer(cls, preprocessed: Path, configuration: str = "2d", initialize: bool = True):
    """Construct (and initialise) trainer class ``cls`` on CPU for fold 0 of a preprocessed dataset."""
    plans = load_json(str(Path(preprocessed) / "nnUNetPlans.json"))
    plans["continue_training"] = False  # nnU-Net 2.8's run_training adds this key
    dataset_json = load_json(str(Path(preprocessed) / "dataset.json"))
    trainer = cls(plans, configuration, 0, dataset_json, device=torch.device("cpu"))
    if initialize:
        trainer.initialize()
    return trainer


def ddp_rank_trainer(cls, preprocessed, port: str, rank: int, world: int):
    """Rank ``rank`` of a ``world``-process gloo DDP group on this machine (port ``port``), with trainer
    ``cls`` built (:func:`make_trainer`) *before* the process group (nnU-Net's own DDP set-up assumes CUDA
    devices) and marked ``is_ddp`` (nnU-Net's DDP deep-supervision weights). For the DDP test scripts."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    trainer = make_trainer(cls, preprocessed, "2d")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    trainer.is_ddp = True
    return trainer


def ds_wrapper(loss):
    """The DeepSupervisionWrapper inside a trainer's loss (SDC's loss adapter unwrapped)."""
    return loss.loss if isinstance(loss, SDFHeadLoss) else loss


def random_targets(outputs, has_regions: bool, ignore_label=None, seed: int = 0):
    """Targets matching a list of network outputs, nearest-downsampled from one full-resolution map
    like nnU-Net's deep-supervision targets (labels ``(B,1,...)`` or regions ``(B,R,...)``)."""
    g = torch.Generator().manual_seed(seed)
    full = outputs[0]
    b, c = full.shape[:2]
    sp = full.shape[2:]
    if has_regions:
        base = (torch.rand((b, c, *sp), generator=g) > 0.5).float()
    else:
        n = c + (1 if ignore_label is not None else 0)
        # blocky labels so that neighbourhoods contain boundaries and uniform areas
        coarse = torch.randint(0, n, (b, 1, *[max(1, s // 4) for s in sp]), generator=g).float()
        base = torch.nn.functional.interpolate(coarse, size=sp, mode="nearest")
    out = []
    for o in outputs:
        out.append(torch.nn.functional.interpolate(base, size=o.shape[2:], mode="nearest"))
    return out


def model_folder(env: dict, dataset_name: str, trainer: str, configuration: str, plans: str = "nnUNetPlans") -> Path:
    return Path(env["nnUNet_results"]) / dataset_name / f"{trainer}__{plans}__{configuration}"


def train_and_predict(trainer: str, dataset, configuration: str, out_dir: Path, hparams: str,
                      fold: str = "0") -> tuple[Path, Path, str]:
    """Run ``nnUNetv2_train`` then ``nnUNetv2_predict --save_probabilities`` on imagesTs.

    The model is trained into ``out_dir/results`` (this test's own nnUNet_results), so no other
    test's model folder (e.g. the ``synthetic_prediction`` fixture's) is overwritten, whatever the
    order or the xdist worker. Prediction runs in-process (``-npp 0 -nps 0``).

    Returns (model folder, prediction folder, training output)."""
    env = dict(dataset.env, NNUNET_CALIB_HPARAMS=hparams, nnUNet_results=str(Path(out_dir) / "results"))
    out = run_nnunet(["nnUNetv2_train", str(dataset.dataset_id), configuration, fold, "-tr", trainer,
                      "-device", "cpu"], env)
    model = model_folder(env, dataset.name, trainer, configuration)
    pred = Path(out_dir) / f"pred_{trainer}_{configuration}"
    run_nnunet(["nnUNetv2_predict", "-i", dataset.raw / "imagesTs", "-o", pred, "-d",
                str(dataset.dataset_id), "-c", configuration, "-f", fold, "-tr", trainer,
                "--save_probabilities", "-device", "cpu", *PREDICT_IN_PROCESS], env)
    return model, pred, out


def check_probabilities(pred: Path, dataset, n_channels: int, regions: bool) -> None:
    """Every imagesTs case has a segmentation and an npz whose probabilities are finite, in [0, 1],
    sum to 1 over classes (softmax; not for region sigmoids) and have the reference's shape."""
    cases = sorted(p.name[:-len("_0000.nii.gz")] for p in (dataset.raw / "imagesTs").glob("*_0000.nii.gz"))
    assert cases, "no test images"
    for case in cases:
        assert (pred / f"{case}.nii.gz").is_file(), f"no segmentation for {case}"
        npz = np.load(pred / f"{case}.npz")
        probs = npz["probabilities"].astype(np.float64)
        ref = sitk.GetArrayFromImage(sitk.ReadImage(str(dataset.raw / "labelsTs" / f"{case}.nii.gz")))
        assert probs.shape == (n_channels, *ref.shape), (probs.shape, ref.shape)
        assert np.isfinite(probs).all()
        assert probs.min() >= 0 and probs.max() <= 1 + 1e-6
        if not regions:
            np.testing.assert_allclose(probs.sum(0), 1.0, atol=2e-3)
        seg = sitk.GetArrayFromImage(sitk.ReadImage(str(pred / f"{case}.nii.gz")))
        assert seg.shape == ref.shape


def check_checkpoint_loads_strictly(trainer_cls, model: Path, configuration: str, fold: str = "0") -> None:
    """The final checkpoint loads with ``strict=True`` into the trainer's own static
    ``build_network_architecture`` (what ``nnUNetv2_predict`` does)."""
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    plans = load_json(str(model / "plans.json"))
    dataset_json = load_json(str(model / "dataset.json"))
    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    n_in = determine_num_input_channels(pm, cm, dataset_json)
    n_out = pm.get_label_manager(dataset_json).num_segmentation_heads
    ckpt = torch.load(model / f"fold_{fold}" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["trainer_name"] == trainer_cls.__name__
    for ds in (False, True):
        net = trainer_cls.build_network_architecture(pm, cm, n_in, n_out, enable_deep_supervision=ds)
        missing, unexpected = net.load_state_dict(ckpt["network_weights"], strict=True)
        assert not missing and not unexpected


def read_hparams(model: Path, fold: str = "0") -> dict:
    with open(model / f"fold_{fold}" / "calibration_hparams.json") as f:
        return json.load(f)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# nnU-Net workflows (tests/trainers/test_workflows.py)
# ----------------------------------------------------------------------------------------------
def nnunet_train(dataset, configuration: str, fold: str, trainer: str, results: Path, *extra: str,
                 plans: str = "nnUNetPlans", hparams: str = SHORT_TRAINING) -> tuple[Path, str]:
    """``nnUNetv2_train DATASET CONFIGURATION FOLD -tr TRAINER -p PLANS -device cpu EXTRA`` into the
    nnUNet_results folder ``results``; returns (model folder, output)."""
    env = dict(dataset.env, NNUNET_CALIB_HPARAMS=hparams, nnUNet_results=str(results))
    out = run_nnunet(["nnUNetv2_train", str(dataset.dataset_id), configuration, fold, "-tr", trainer, "-p", plans,
                      "-device", "cpu", *extra], env)
    return model_folder(env, dataset.name, trainer, configuration, plans), out


def nnunet_predict(dataset, configuration: str, folds: list[str], trainer: str, results: Path, out_dir: Path,
                   *extra: str, plans: str = "nnUNetPlans") -> Path:
    """``nnUNetv2_predict --save_probabilities`` (CPU, in-process) of imagesTs into ``out_dir``."""
    env = dict(dataset.env, nnUNet_results=str(results))
    run_nnunet(["nnUNetv2_predict", "-i", dataset.raw / "imagesTs", "-o", out_dir, "-d", str(dataset.dataset_id),
                "-c", configuration, "-f", *folds, "-tr", trainer, "-p", plans, "--save_probabilities",
                "-device", "cpu", *PREDICT_IN_PROCESS, *extra], env)
    return Path(out_dir)


def calib_evaluate(folder: Path, gt: Path, *extra: str) -> dict:
    """``calib-evaluate FOLDER --gt GT`` (its entry point, in this process; output in nnU-Net's default
    FOLDER/calibration_evaluation); returns summary.json after checking it against a direct numpy
    computation, independent of the package's metric code: per case and pooled over the cases, the
    NLL ``mean -log max(p_label, 1e-7)`` and the Brier score ``mean (1/C) sum_c (p_c - onehot_c)^2``
    (softmax outputs, background included)."""
    from nnunet_calibration.evaluation.cli import main

    folder = Path(folder)
    assert main([str(folder), "--gt", str(gt), "--no-progress", "--no-plots", *map(str, extra)]) == 0
    summary = json.loads((folder / "calibration_evaluation" / "summary.json").read_text())
    assert summary["cases"], summary
    nll_sum = brier_sum = n = 0.0
    for entry in summary["cases"]:
        probs = np.load(folder / f"{entry['case']}.npz")["probabilities"].astype(np.float64)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(Path(gt) / f"{entry['case']}.nii.gz"))).astype(int)
        assert probs.shape[1:] == lab.shape
        onehot = np.stack([lab == c for c in range(probs.shape[0])]).astype(np.float64)
        p_true = np.take_along_axis(probs, lab[None], 0)[0]
        nll = -np.log(np.maximum(p_true, 1e-7))
        brier = ((probs - onehot) ** 2).mean(0)
        assert entry["metrics"]["NLL"] == pytest.approx(nll.mean(), rel=1e-5)
        assert entry["metrics"]["Brier"] == pytest.approx(brier.mean(), rel=1e-5)
        nll_sum, brier_sum, n = nll_sum + nll.sum(), brier_sum + brier.sum(), n + lab.size
    assert summary["pooled"]["NLL"] == pytest.approx(nll_sum / n, rel=1e-5)
    assert summary["pooled"]["Brier"] == pytest.approx(brier_sum / n, rel=1e-5)
    for key in ("ECE", "CECE", "pECE", "mL1-ACE"):
        assert np.isfinite(summary["pooled"][key]), (key, summary["pooled"])
    return summary


def training_log(model: Path, fold: str = "0") -> str:
    """All of nnU-Net's training logs of a fold (one file per run), oldest first."""
    return "\n".join(p.read_text() for p in sorted((Path(model) / f"fold_{fold}").glob("training_log_*.txt")))


def check_trained(trainer: str, model: Path, configuration: str, fold: str = "0") -> None:
    """Training finished (final checkpoint, nnU-Net's validation summary) and the checkpoint loads
    strictly into the trainer's own network (what nnUNetv2_predict builds)."""
    from nnunet_calibration import trainers as T

    assert (model / f"fold_{fold}" / "checkpoint_final.pth").is_file()
    assert (model / f"fold_{fold}" / "validation" / "summary.json").is_file()
    check_checkpoint_loads_strictly(getattr(T, trainer), model, configuration, fold)
