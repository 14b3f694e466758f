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


def _floor_free(p: np.ndarray) -> np.ndarray:
    """Voxels where apply's 1e-7 floor changes nothing (every probability >= 1e-7)."""
    return np.all(p >= 1e-7, axis=0)


@pytest.mark.parametrize("method,params", [("temperature", 2.5), ("vector", [1.5, 0.8, 2.0, 3.0])])
def test_calibrated_equals_apply(synthetic_prediction, tmp_path, method, params):
    sp = synthetic_prediction
    model = _model_copy(sp, tmp_path / "model")
    _write_calibration(model, method, params, sp.gt_folder_train)
    out = tmp_path / "out"
    assert _predict(model, sp, out, "-f", "0", "--save_probabilities") == 0
    applied = tmp_path / "applied"
    apply_calibration(sp.pred_folder, model, applied, progress=False)
    n_checked = 0
    for case in _cases(sp.pred_folder):
        p = np.load(out / f"{case}.npz")["probabilities"]
        q = np.load(applied / f"{case}.npz")["probabilities"]
        raw = np.load(sp.pred_folder / f"{case}.npz")["probabilities"]
        ok = _floor_free(raw)
        assert p.shape == q.shape and ok.mean() > 0.5
        np.testing.assert_allclose(p[:, ok], q[:, ok], rtol=0, atol=1e-6)  # measured: 6e-8
        assert not np.array_equal(p, raw)  # the calibration was applied
        np.testing.assert_allclose(p.sum(0), 1, atol=1e-5)
        seg = _read(out / f"{case}.nii.gz")[0]
        assert np.array_equal(seg, _read(applied / f"{case}.nii.gz")[0])
        n_checked += int(ok.sum())
        with open(out / f"{case}.pkl", "rb") as f:
            assert posthoc_model.PKL_MARK in pickle.load(f)
    assert n_checked > 0
    rec = json.loads((out / "calibration.json").read_text())
    assert rec["method"] == method and "applied_to" in rec


def _entropy(p: np.ndarray) -> np.ndarray:
    """Normalised softmax entropy written out: -sum p log p / log C (0 log 0 = 0)."""
    p = p.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(p > 0, p * np.log(p), 0.0)
    return -t.sum(0) / math.log(p.shape[0])


def test_uncertainty_maps_match_numpy(synthetic_prediction, tmp_path):
    sp = synthetic_prediction
    model = _model_copy(sp, tmp_path / "model", perturbed_fold_1=True)
    _write_calibration(model, "vector", [1.5, 0.8, 2.0, 3.0], sp.gt_folder_train)
    out = tmp_path / "out"
    assert _predict(model, sp, out, "-f", "0", "1", "--save_probabilities", "--uncertainty",
                    "--save_fold_probabilities") == 0
    any_mi = False
    for case in _cases(out):
        seg, geo = _read(out / f"{case}.nii.gz")
        p = np.load(out / f"{case}.npz")["probabilities"]
        folds = [np.load(out / "fold_probabilities" / f"fold_{k}" / f"{case}.npz")["probabilities"] for k in (0, 1)]
        maps = {}
        for name in ("entropy", "mutual_information", "fold_disagreement"):
            arr, g = _read(out / "uncertainty" / f"{case}_{name}.nii.gz")
            assert arr.dtype == np.float32 and arr.shape == seg.shape and g == geo
            maps[name] = arr.astype(np.float64)
        np.testing.assert_allclose(maps["entropy"], _entropy(p).reshape(seg.shape), atol=1e-6)
        mi = _entropy((folds[0] + folds[1]) / 2) - (_entropy(folds[0]) + _entropy(folds[1])) / 2
        np.testing.assert_allclose(maps["mutual_information"], np.clip(mi, 0, 1).reshape(seg.shape), atol=1e-6)
        # argmax with the first channel winning ties, as nnU-Net decides
        dis = sum((f.argmax(0).reshape(seg.shape) != seg).astype(float) for f in folds) / 2
        np.testing.assert_array_equal(maps["fold_disagreement"], dis)
        any_mi |= bool(maps["mutual_information"].max() > 1e-3)
        assert 0 <= maps["entropy"].min() and maps["entropy"].max() <= 1
    assert any_mi, "the perturbed fold never disagrees with fold 0: the maps are not exercised"


def test_missing_or_mismatched_calibration_is_a_named_error(synthetic_prediction, tmp_path, capsys):
    sp = synthetic_prediction
    model = _model_copy(sp, tmp_path / "model")
    out = tmp_path / "out"
    assert _predict(model, sp, out, "-f", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(model / "calibration.json") in err[0] and "not found" in err[0], err
    rec = _write_calibration(model, "temperature", 2.0, sp.gt_folder_train)
    rec["channels"] = rec["channels"][:3]
    rec["labels"] = {k: v for k, v in rec["labels"].items() if v != 3}
    write_json_atomic(model / "calibration.json", rec)
    assert _predict(model, sp, out, "-f", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration.json" in err[0] and "differ" in err[0], err
    rec = _write_calibration(model, "vector", [1.0, 1.0, 1.0, 1.0], sp.gt_folder_train)
    rec["channels"] = rec["channels"] + ["extra"]
    rec["parameters"] = {"temperatures": [1.0] * 5, "channels": rec["channels"]}
    write_json_atomic(model / "calibration.json", rec)
    assert _predict(model, sp, out, "-f", "0") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "calibration.json" in err[0] and "5 channels" in err[0], err
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
