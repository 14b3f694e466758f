"""calib-calibrate fit (issue 22): unbiased fit on float32 npz probabilities, ignore labels (softmax on the
session's real DiceCE model, sigmoid regions on a model folder written here), each fitted temperature
checked against a direct minimisation of the NLL written out in the test."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.optimize import minimize_scalar

from nnunet_calibration.posthoc import cli, model, scaling


def write_model_folder(root: Path, dataset_json: dict, cases: list, name: str = "Dataset998_Fit",
                       model_name: str = "Trainer__Plans__3d_fullres") -> tuple[Path, Path]:
    """``(model folder, reference folder)``: ``cases`` = ``[(probabilities (C, z, y, x), labels (z, y, x))]``
    written as nnU-Net does: ``fold_0/validation/case_NNN.npz`` (``np.savez_compressed``, key
    ``probabilities``, float32) and ``gt/case_NNN.nii.gz`` (SimpleITK); dataset.json and a plans.json
    holding nnU-Net's ``dataset_name`` / ``plans_name``. No CASE.pkl (the geometry check is skipped)."""
    folder = root / name / model_name
    val = folder / "fold_0" / "validation"
    gt = root / "gt"
    val.mkdir(parents=True)
    gt.mkdir()
    (folder / "dataset.json").write_text(json.dumps(dataset_json))
    (folder / "plans.json").write_text(json.dumps({"dataset_name": name, "plans_name": model_name.split("__")[1]}))
    for i, (p, lab) in enumerate(cases):
        np.savez_compressed(val / f"case_{i:03d}.npz", probabilities=p.astype(np.float32))
        sitk.WriteImage(sitk.GetImageFromArray(lab.astype(np.uint8)), str(gt / f"case_{i:03d}.nii.gz"))
    return folder, gt


def direct_temperature(nll_of_t) -> float:
    """The minimiser of a directly written NLL(T) within the fit's bounds [0.05, 20]: a grid on log T, then
    scipy's bounded search around it (a barely trained model may put it on the upper bound)."""
    lo, hi = scaling.T_BOUNDS
    grid = np.exp(np.linspace(np.log(lo), np.log(hi), 400))
    t0 = grid[np.argmin([nll_of_t(t) for t in grid])]
    return float(minimize_scalar(nll_of_t, bounds=(max(lo, t0 / 1.02), min(hi, t0 * 1.02)), method="bounded",
                                 options={"xatol": 1e-7}).x)


def _log_softmax(z, axis=0):
    m = z.max(axis=axis, keepdims=True)
    return z - m - np.log(np.exp(z - m).sum(axis=axis, keepdims=True))


def test_fit_recovers_known_temperature_from_float32_npz(tmp_path, capsys):
    """Data: logits z ~ N(0, 25) per voxel and channel (3 channels, a very confident model); reference
    labels sampled from softmax(z / 4), so the true temperature is 4; the npz hold softmax(z) as float32
    (nnU-Net's dtype; a third of the probabilities are below 1e-7, some underflow to 0). The fit on
    every voxel recovers T = 4 to 2% (the old 1e-7 floor fitted about 3.2)."""
    rng = np.random.default_rng(22)
    cases = []
    for _ in range(6):
        z = rng.normal(0, 25, (3, 8, 50, 50))
        q = np.exp(_log_softmax(z / 4.0))
        lab = (q.cumsum(0) > rng.random(q.shape[1:])).argmax(0)
        cases.append((np.exp(_log_softmax(z)), lab))
    folder, gt = write_model_folder(tmp_path, {"labels": {"background": 0, "a": 1, "b": 2},
                                               "file_ending": ".nii.gz", "channel_names": {"0": "x"}}, cases)
    p32 = np.stack([np.load(f)["probabilities"] for f in sorted((folder / "fold_0" / "validation").glob("*.npz"))])
    assert p32.dtype == np.float32 and np.mean(p32 < 1e-7) > 0.3 and np.any(p32 == 0)
    assert cli.main(["fit", str(folder), "--gt", str(gt), "--max-voxels", "0", "--no-progress"]) == 0
    cal = json.loads((folder / model.CALIBRATION_FILE).read_text())
    t = cal["parameters"]["temperature"]
    print(f"known T = 4 from float32 npz: fitted {t:.4f}")
    assert t == pytest.approx(4.0, rel=0.02)
    assert cal["voxels"]["used"] == 6 * 8 * 50 * 50 and cal["prob_floor"] == 2.0 ** -149 and cal["version"] == 2


def test_fit_softmax_ignore_label_on_the_real_model(synthetic_prediction, tmp_path):
    """The session's DiceCE model with an ``ignore`` label (4) added to dataset.json and the first two
    slices of every reference set to it: the fit (before issue 22 an error: label 4 is no channel) leaves
    those voxels out, and its T is the direct NLL minimiser of the remaining voxels."""
    sp = synthetic_prediction
    folder = tmp_path / sp.dataset.name / sp.model_folder.name
    folder.mkdir(parents=True)
    shutil.copy2(sp.model_folder / "plans.json", folder / "plans.json")
    shutil.copytree(sp.model_folder / "fold_0" / "validation", folder / "fold_0" / "validation")
    dj = json.loads((sp.model_folder / "dataset.json").read_text())
    dj["labels"]["ignore"] = 4
    (folder / "dataset.json").write_text(json.dumps(dj))
    gt = tmp_path / "gt"
    shutil.copytree(model.reference_folder(sp.model_folder), gt)
    logp, ys = [], []
    for npz in sorted((folder / "fold_0" / "validation").glob("*.npz")):
        ref_path = gt / f"{npz.name[:-4]}.nii.gz"
        img = sitk.ReadImage(str(ref_path))
        lab = sitk.GetArrayFromImage(img)
        lab[:2] = 4
        out = sitk.GetImageFromArray(lab)
        out.CopyInformation(img)
        sitk.WriteImage(out, str(ref_path))
        p = np.load(npz)["probabilities"].astype(np.float64)
        keep = lab.reshape(p.shape[1:]) != 4
        logp.append(np.log(np.maximum(p[:, keep].T, 2.0 ** -149)))
        ys.append(lab.reshape(p.shape[1:])[keep])
    logp, y = np.concatenate(logp), np.concatenate(ys)

    def nll(t):
        z = logp / t
        return float(np.mean(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(y)), y]))

    assert cli.main(["fit", str(folder), "--gt", str(gt), "--max-voxels", "0", "--no-progress"]) == 0
    cal = json.loads((folder / model.CALIBRATION_FILE).read_text())
    assert cal["ignore_label"] == 4 and cal["voxels"]["available"] == cal["voxels"]["used"] == len(y)
    assert cal["parameters"]["temperature"] == pytest.approx(direct_temperature(nll), rel=1e-4)


def test_fit_regions_ignore_label(tmp_path):
    """Two sigmoid regions, ``whole`` = labels {1, 2} and ``core`` = {2}, and an ``ignore`` label 3. Data: a
    label drawn per voxel from q = softmax(z), z ~ N(0, 2.5) over labels 0, 1, 2; the model's region
    probabilities are exactly calibrated, P(whole) = q1 + q2 and P(core) = q2 (float32), so the true T
    is 1. Then a random 40% of the voxels are set to the ignore label. Fitted on the remaining voxels T
    is 1 (to 5%, the sampling error) and equals the direct NLL minimiser (mean binary cross-entropy over
    voxels and both regions); counting the ignored voxels as negatives of both regions (what the fit did
    before issue 22) gives a clearly different T."""
    rng = np.random.default_rng(5)
    cases, xs, ys, ign = [], [], [], []
    for _ in range(4):
        q = np.exp(_log_softmax(rng.normal(0, 2.5, (3, 8, 40, 40))))
        lab = (q.cumsum(0) > rng.random(q.shape[1:])).argmax(0).astype(np.uint8)
        member = np.stack([lab >= 1, lab == 2])
        ignored = rng.random(lab.shape) < 0.4
        lab[ignored] = 3
        probs = np.stack([q[1] + q[2], q[2]])
        cases.append((probs, lab))
        p32 = probs.astype(np.float32).astype(np.float64)
        xs.append((np.log(p32) - np.log1p(-p32)).reshape(2, -1).T)
        ys.append(member.reshape(2, -1).T.astype(float))
        ign.append(ignored.ravel())
    dj = {"labels": {"background": 0, "whole": [1, 2], "core": [2], "ignore": 3}, "regions_class_order": [1, 2],
          "file_ending": ".nii.gz", "channel_names": {"0": "x"}}
    folder, gt = write_model_folder(tmp_path, dj, cases)
    x_all, y_all, ig = np.concatenate(xs), np.concatenate(ys), np.concatenate(ign)

    def bce(x, y):
        return lambda t: float(np.mean(np.logaddexp(0, x / t) - y * x / t))

    assert cli.main(["fit", str(folder), "--gt", str(gt), "--max-voxels", "0", "--no-progress"]) == 0
    cal = json.loads((folder / model.CALIBRATION_FILE).read_text())
    t = cal["parameters"]["temperature"]
    assert cal["nonlinearity"] == "sigmoid" and cal["ignore_label"] == 3 and cal["voxels"]["used"] == int((~ig).sum())
    assert t == pytest.approx(direct_temperature(bce(x_all[~ig], y_all[~ig])), rel=1e-4)
    assert t == pytest.approx(1.0, rel=0.05)
    y_neg = y_all * (~ig)[:, None]  # ignored voxels counted as negatives of both regions
    t_wrong = direct_temperature(bce(x_all, y_neg))
    print(f"regions with ignore label: fitted T {t:.4f}; ignored voxels counted as negatives: {t_wrong:.4f}")
    assert abs(t_wrong - 1.0) > 0.15


def test_fit_on_ensemble_predictions(synthetic_prediction, tmp_path, capsys):
    """``fit MODEL --predictions PRED --gt GT -f 0``: fitted on an nnUNetv2_predict --save_probabilities folder
    of held-out labelled cases (here the session's test predictions, fold 0: the 'ensemble' of one fold)
    and named so (scope, prediction_folder, caveat); its T is the direct NLL minimiser of every voxel of
    those cases. Predictions of another model (their plans.json) are refused."""
    sp = synthetic_prediction
    folder = tmp_path / sp.dataset.name / sp.model_folder.name
    folder.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(sp.model_folder / name, folder / name)
    (folder / "fold_0").mkdir()
    logp, ys = [], []
    for npz in sorted(sp.pred_folder.glob("*.npz")):
        p = np.load(npz)["probabilities"].astype(np.float64)
        lab = sitk.GetArrayFromImage(sitk.ReadImage(str(sp.gt_folder / f"{npz.name[:-4]}.nii.gz")))
        logp.append(np.log(np.maximum(p.reshape(p.shape[0], -1).T, 2.0 ** -149)))
        ys.append(lab.reshape(-1).astype(int))
    logp, y = np.concatenate(logp), np.concatenate(ys)

    def nll(t):
        z = logp / t
        return float(np.mean(np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1) - z[np.arange(len(y)), y]))

    args = ["fit", str(folder), "--predictions", str(sp.pred_folder), "--gt", str(sp.gt_folder), "-f", "0",
            "--max-voxels", "0", "--no-progress"]
    assert cli.main(args) == 0
    assert "scope: ensemble of folds 0" in capsys.readouterr().out
    cal = json.loads((folder / model.CALIBRATION_FILE).read_text())
    assert cal["scope"] == "ensemble of folds 0" and cal["model"]["folds"] == [0]
    assert cal["prediction_folder"] == str(sp.pred_folder.resolve()) and cal["crossfit"] is None
    assert cal["caveat"] == model.ENSEMBLE_FIT_CAVEAT and cal["cases"] == 2 and cal["voxels"]["used"] == len(y)
    assert cal["parameters"]["temperature"] == pytest.approx(direct_temperature(nll), rel=1e-4)
    # predictions of another dataset
    pred = tmp_path / "pred_other"
    shutil.copytree(sp.pred_folder, pred)
    plans = json.loads((pred / "plans.json").read_text())
    (pred / "plans.json").write_text(json.dumps(dict(plans, dataset_name="Dataset555_Other")))
    before = (folder / model.CALIBRATION_FILE).read_bytes()
    assert cli.main([*args[:3], str(pred), *args[4:]]) == 2
    err = capsys.readouterr().err
    assert f"{pred / 'plans.json'}: dataset_name 'Dataset555_Other' differs from {folder / 'plans.json'}" in err
    assert (folder / model.CALIBRATION_FILE).read_bytes() == before
