"""calib-predict on the session's real tiny nnU-Net model (``synthetic_prediction``: DiceCE on
Dataset901, 2d, fold 0, and its ``nnUNetv2_predict --save_probabilities`` output).

* ``--no-calibration`` equals nnUNetv2_predict bit for bit (segmentations and npz arrays);
* calibrated (a temperature and a vector scaling written into a copy of the model folder) equals
  ``calib-calibrate apply`` on the nnUNetv2_predict output where no probability is below apply's floor;
* the uncertainty maps equal the formulas written out here with numpy from the saved (fold)
  probabilities; two folds: the model's fold 0 and a "fold 1" whose checkpoint is fold 0's with
  its weights perturbed (seeded), so that the two folds really disagree somewhere;
* errors: no calibration.json, a calibration whose channels do not fit the model.
"""
from __future__ import annotations

import json
import math
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from nnunet_calibration.inference import cli
from nnunet_calibration.posthoc import model as posthoc_model
from nnunet_calibration.posthoc.apply import apply_calibration
from nnunet_calibration.utils import write_json_atomic

pytestmark = pytest.mark.nnunet
CPU = ["-device", "cpu", "-npp", "0", "-nps", "0", "--disable_progress_bar"]


def _images(sp) -> Path:
    return sp.dataset.raw / "imagesTs"


def _read(path: Path):
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), (img.GetSpacing(), img.GetOrigin(), img.GetDirection())


def _cases(folder: Path) -> list[str]:
    return sorted(p.name[:-len(".nii.gz")] for p in folder.glob("*.nii.gz"))


def _model_copy(sp, dst: Path, perturbed_fold_1: bool = False) -> Path:
    """A copy of the trained model folder (dataset.json, plans.json, fold_0); optionally a fold_1
    whose checkpoint is fold 0's with every float weight + 0.3 x its tensor's std x N(0, 1) (seed 0)."""
    dst.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(sp.model_folder / name, dst / name)
    shutil.copytree(sp.model_folder / "fold_0", dst / "fold_0")
    if perturbed_fold_1:
        (dst / "fold_1").mkdir()
        chk = torch.load(dst / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
        g = torch.Generator().manual_seed(0)
        for k, w in chk["network_weights"].items():
            if w.is_floating_point() and w.numel() > 1:
                chk["network_weights"][k] = w + 0.3 * w.std() * torch.randn(w.shape, generator=g)
        torch.save(chk, dst / "fold_1" / "checkpoint_final.pth")
    return dst


def _write_calibration(folder: Path, method: str, params, gt: Path) -> dict:
    """calibration.json with the given parameters: a real fit's record (so every field the package
    writes is there) whose parameters are replaced."""
    rec = posthoc_model.fit_model(folder, [0], method=method, max_voxels=2000, gt_folder=gt, write=False,
                                  progress=False)
    if method == "temperature":
        rec["parameters"] = {"temperature": float(params)}
    else:
        rec["parameters"] = {"temperatures": [float(t) for t in params], "channels": rec["channels"]}
    write_json_atomic(folder / posthoc_model.CALIBRATION_FILE, rec)
    return rec


def _predict(model: Path, sp, out: Path, *extra) -> int:
    return cli.main(["-i", str(_images(sp)), "-o", str(out), "-m", str(model), *CPU, *extra])


def test_no_calibration_is_nnunet_bit_for_bit(synthetic_prediction, tmp_path):
    sp = synthetic_prediction
    out = tmp_path / "out"
    assert _predict(sp.model_folder, sp, out, "-f", "0", "--save_probabilities", "--no-calibration") == 0
    cases = _cases(sp.pred_folder)
    assert cases and _cases(out) == cases
    for case in cases:
        ours, geo = _read(out / f"{case}.nii.gz")
        theirs, geo_ref = _read(sp.pred_folder / f"{case}.nii.gz")
        assert ours.dtype == theirs.dtype and np.array_equal(ours, theirs) and geo == geo_ref
        p, q = np.load(out / f"{case}.npz")["probabilities"], np.load(sp.pred_folder / f"{case}.npz")["probabilities"]
        assert p.dtype == q.dtype and np.array_equal(p, q)
        with open(out / f"{case}.pkl", "rb") as f, open(sp.pred_folder / f"{case}.pkl", "rb") as g:
            assert pickle.load(f).keys() == pickle.load(g).keys()
    assert not (out / "calibration.json").exists() and not (out / "uncertainty").exists()
    for name in ("dataset.json", "plans.json"):
        assert json.loads((out / name).read_text()) == json.loads((sp.pred_folder / name).read_text())


def test_two_folds_no_calibration_ensemble_is_nnunets(synthetic_prediction, tmp_path):
    """With per-fold outputs on, the ensemble (our fold loop) equals nnU-Net's own predictor's."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    sp = synthetic_prediction
    model = _model_copy(sp, tmp_path / "model", perturbed_fold_1=True)
    out = tmp_path / "out"
    assert _predict(model, sp, out, "-f", "0", "1", "--save_probabilities", "--no-calibration", "--uncertainty",
                    "--save_fold_probabilities") == 0
    ref = tmp_path / "nnunet"
    ref.mkdir()
    pred = nnUNetPredictor(device=torch.device("cpu"), allow_tqdm=False)
    pred.initialize_from_trained_model_folder(str(model), (0, 1), "checkpoint_final.pth")
    pred.predict_from_files_sequential(str(_images(sp)), str(ref), save_probabilities=True, overwrite=True)
    for case in _cases(ref):
        assert np.array_equal(_read(out / f"{case}.nii.gz")[0], _read(ref / f"{case}.nii.gz")[0])
        assert np.array_equal(np.load(out / f"{case}.npz")["probabilities"],
                              np.load(ref / f"{case}.npz")["probabilities"])
