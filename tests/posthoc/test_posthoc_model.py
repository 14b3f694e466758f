"""calib-calibrate fit / apply on a real tiny nnU-Net model (the session's ``synthetic_prediction``)."""
from __future__ import annotations

import json
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_calibration.posthoc import cli, model, scaling

pytestmark = pytest.mark.nnunet
REPO = Path(__file__).resolve().parents[2]


def _ref(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def _direct_nll(folder: Path, gt: Path) -> float:
    """Mean over all voxels of all cases of -log(max(p[label], 1e-7)), written out directly."""
    total, n = 0.0, 0
    for npz in sorted(folder.glob("*.npz")):
        p = np.load(npz)["probabilities"].astype(np.float64)
        y = _ref(gt / (npz.stem + ".nii.gz")).reshape(p.shape[1:]).astype(int)
        py = np.take_along_axis(p, y[None], axis=0)[0]
        total += float(-np.log(np.maximum(py, 1e-7)).sum())
        n += y.size
    return total / n


def _copy_model(src: Path, dst: Path) -> Path:
    """The parts of a model folder calibration reads: dataset.json, plans.json, fold_0/validation."""
    dst.mkdir(parents=True)
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(src / name, dst / name)
    shutil.copytree(src / "fold_0" / "validation", dst / "fold_0" / "validation")
    return dst


@pytest.fixture(scope="module")
def fitted(synthetic_prediction, tmp_path_factory):
    """A copy of the trained model folder with a fitted temperature (the session's model stays untouched)."""
    sp = synthetic_prediction
    folder = _copy_model(sp.model_folder, tmp_path_factory.mktemp("model") / sp.dataset.name / sp.model_folder.name)
    assert cli.main(["fit", str(folder), "-f", "0", "--max-voxels", "5000", "--no-progress"]) == 0
    return folder


def test_fit_writes_calibration_json(fitted, synthetic_prediction):
    cal = json.loads((fitted / "calibration.json").read_text())
    assert cal["method"] == "temperature" and cal["nonlinearity"] == "softmax"
    t = cal["parameters"]["temperature"]
    assert scaling.T_BOUNDS[0] < t < scaling.T_BOUNDS[1]
    assert cal["folds"] == [0]
    n_val = len(list((synthetic_prediction.validation_folder).glob("*.npz")))
    assert cal["cases"] == n_val
    # every validation voxel is available; the sample is the requested size
    avail = sum(np.load(f)["probabilities"][0].size for f in synthetic_prediction.validation_folder.glob("*.npz"))
    assert cal["voxels"] == {"available": avail, "used": 5000, "max_voxels": 5000, "seed": 0}
    assert cal["nll"]["after"] < cal["nll"]["before"]
    assert cal["labels"] == json.loads((fitted / "dataset.json").read_text())["labels"]
    assert cal["channels"][0] == "background" and len(cal["channels"]) == 4
    assert cal["command"].startswith("calib-calibrate fit") and cal["date"].endswith("+00:00")
    # which model (issue 22): nnU-Net's names of the model folder and its plans.json
    plans = json.loads((fitted / "plans.json").read_text())
    assert cal["model"] == {"dataset": plans["dataset_name"], "plans": plans["plans_name"], "configuration": "2d",
                            "trainer": synthetic_prediction.trainer, "folds": [0]}
    assert cal["model"]["dataset"] == synthetic_prediction.dataset.name and cal["model"]["plans"] == "nnUNetPlans"
    assert cal["scope"].startswith("folds 0 validation (per fold") and cal["prediction_folder"] is None
    assert "ensemble" in cal["caveat"] and cal["crossfit"] is None  # one fold only
    # the reference folder is nnU-Net's gt_segmentations of the preprocessed dataset
    assert cal["reference_folder"].endswith("gt_segmentations")
    # the fitted T is the NLL minimiser of the sampled voxels: a direct recomputation agrees
    rec = model.fit_model(fitted, [0], max_voxels=5000, write=False, progress=False)
    assert rec["parameters"]["temperature"] == pytest.approx(t, rel=1e-9)


def test_apply_lowers_held_out_nll_and_keeps_nnunet_layout(fitted, synthetic_prediction, tmp_path):
    sp = synthetic_prediction
    out = tmp_path / "calibrated"
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(fitted), "-o", str(out), "--no-progress"]) == 0
    before, after = _direct_nll(sp.pred_folder, sp.gt_folder), _direct_nll(out, sp.gt_folder)
    print(f"held-out NLL {before:.4f} -> {after:.4f}")
    # a barely trained model (fitted T was 0.59 in one run, 1.56 in another): on two unseen test cases the
    # temperature fitted on the validation cases usually lowers the NLL, but with T near 1 it can rise a
    # little by chance (1.2037 -> 1.2054 once); it must never make them markedly worse
    assert after < before * 1.01
    t = json.loads((fitted / "calibration.json").read_text())["parameters"]["temperature"]
    for npz in sorted(sp.pred_folder.glob("*.npz")):
        p = np.load(npz)["probabilities"]
        q = np.load(out / npz.name)["probabilities"]
        assert q.dtype == np.float32 and q.shape == p.shape
        # direct formula: softmax(log(max(p, 2**-149)) / T) (an exact zero taken as the smallest float32)
        z = np.log(np.maximum(p.astype(np.float64), 2.0 ** -149)) / t
        e = np.exp(z - z.max(0))
        np.testing.assert_allclose(q, e / e.sum(0), atol=1e-6)
        # one temperature keeps the decision: segmentation copied byte for byte, pkl as nnU-Net wrote
        # it plus the mark of the applied calibration (issue 21)
        case = npz.name[:-4]
        assert (out / f"{case}.nii.gz").read_bytes() == (sp.pred_folder / f"{case}.nii.gz").read_bytes()
        with open(out / f"{case}.pkl", "rb") as f:
            props = pickle.load(f)
        with open(sp.pred_folder / f"{case}.pkl", "rb") as f:
            original = pickle.load(f)
        mark = props.pop(model.PKL_MARK)
        assert len(mark) == 1 and mark[0]["parameters"] == {"temperature": t}
        assert pickle.dumps(props) == pickle.dumps(original)
    for name in ("dataset.json", "plans.json"):
        assert (out / name).read_bytes() == (sp.pred_folder / name).read_bytes()
    applied = json.loads((out / "calibration.json").read_text())
    assert applied["applied_to"]["segmentations"] == "copied" and applied["applied_to"]["cases"] == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left

    # calib-evaluate reads the calibrated folder; its NLL is the direct one
    ev = tmp_path / "ev"
    r = subprocess.run([sys.executable, "-m", "nnunet_calibration.evaluation.cli", str(out), "--gt",
                        str(sp.gt_folder), "-o", str(ev), "--no-progress"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    summary = json.loads((ev / "summary.json").read_text())
    assert len(summary["cases"]) == 2
    assert summary["pooled"]["NLL"] == pytest.approx(after, rel=1e-4)


def test_vector_scaling_recomputes_segmentations_with_nnunet_writer(synthetic_prediction, tmp_path):
    sp = synthetic_prediction
    folder = _copy_model(sp.model_folder, tmp_path / sp.dataset.name / sp.model_folder.name)
    assert cli.main(["fit", str(folder), "--method", "vector", "--max-voxels", "0", "--no-progress"]) == 0
    cal = json.loads((folder / "calibration.json").read_text())
    temps = np.array(cal["parameters"]["temperatures"])
    assert temps.shape == (4,) and cal["parameters"]["channels"] == cal["channels"]
    assert cal["voxels"]["used"] == cal["voxels"]["available"]
    out = tmp_path / "calibrated"
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(folder), "-o", str(out), "--no-progress"]) == 0
    assert json.loads((out / "calibration.json").read_text())["applied_to"]["segmentations"] == "recomputed"
    before, after = _direct_nll(sp.pred_folder, sp.gt_folder), _direct_nll(out, sp.gt_folder)
    print(f"held-out NLL (vector scaling) {before:.4f} -> {after:.4f}")
    # per-class temperatures on the log-probabilities also fix the class balance of a barely trained
    # model: a large drop (in-sample 1.31 -> 0.49 when written)
    assert after < 0.9 * before
    for npz in sorted(out.glob("*.npz")):
        q = np.load(npz)["probabilities"]
        case = npz.name[:-4]
        seg_img = sitk.ReadImage(str(out / f"{case}.nii.gz"))
        orig_img = sitk.ReadImage(str(sp.pred_folder / f"{case}.nii.gz"))
        # argmax of the calibrated probabilities, in the original prediction's geometry
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg_img).reshape(q.shape[1:]), q.argmax(0))
        assert seg_img.GetSpacing() == orig_img.GetSpacing() and seg_img.GetOrigin() == orig_img.GetOrigin()
        with open(npz.with_suffix(".pkl"), "rb") as f:
            assert pickle.load(f)["spacing"] is not None


def test_bad_input_clear_errors_and_nothing_written(fitted, synthetic_prediction, tmp_path, capsys):
    sp = synthetic_prediction
    # model folder without calibration.json
    bare = _copy_model(sp.model_folder, tmp_path / sp.dataset.name / "bare")
    out = tmp_path / "out"
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(bare), "-o", str(out)]) == 2
    assert "calibration.json: not found" in capsys.readouterr().err
    assert not out.exists()

    # prediction folder whose label set differs
    pred = tmp_path / "pred_other_labels"
    shutil.copytree(sp.pred_folder, pred)
    dj = json.loads((pred / "dataset.json").read_text())
    dj["labels"] = {"background": 0, "a": 1, "b": 2}
    (pred / "dataset.json").write_text(json.dumps(dj))
    assert cli.main(["apply", str(pred), "-m", str(fitted), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dataset.json: label set" in err and "differs from the calibration" in err
    assert not out.exists()

    # output folder that exists
    out.mkdir()
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(fitted), "-o", str(out)]) == 2
    assert "output folder exists" in capsys.readouterr().err
    assert list(out.iterdir()) == []
    out.rmdir()

    # missing validation npz: fit fails naming the folder and the case, no calibration.json
    broken = _copy_model(sp.model_folder, tmp_path / sp.dataset.name / "broken")
    victim = sorted((broken / "fold_0" / "validation").glob("*.npz"))[0]
    victim.unlink()
    assert cli.main(["fit", str(broken), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "fold_0/validation" in err and victim.name[:-4] in err and "--npz" in err
    assert not (broken / "calibration.json").exists()
    assert not [p for p in broken.iterdir() if p.name.startswith(".")]

    # a fold that does not exist
    assert cli.main(["fit", str(fitted), "-f", "3", "--no-progress"]) == 2
    assert "fold_3/validation" in capsys.readouterr().err

    # a reference with another shape: nothing written, the case named
    gt = tmp_path / "gt_bad"
    shutil.copytree(Path(json.loads((fitted / "calibration.json").read_text())["reference_folder"]), gt)
    first = gt / (sorted((fitted / "fold_0" / "validation").glob("*.npz"))[0].name[:-4] + ".nii.gz")
    sitk.WriteImage(sitk.Image(3, 3, sitk.sitkUInt8), str(first))
    before = (fitted / "calibration.json").read_bytes()
    assert cli.main(["fit", str(fitted), "--gt", str(gt), "--no-progress"]) == 2
    err = capsys.readouterr().err  # the evaluator's geometry check (issue 21)
    assert "geometry mismatch" in err and str(first) in err
    assert (fitted / "calibration.json").read_bytes() == before


def test_fit_on_two_folds_writes_cross_fitted_estimate(synthetic_prediction, tmp_path):
    """fold_1/validation is a copy of fold_0's under other case names (a case may be in one fold only),
    with copies of the references: the cross-fitted temperature of each fold is then the all-voxel fit
    of fold 0 alone, and the NLL before is the direct NLL of the validation files."""
    sp = synthetic_prediction
    folder = _copy_model(sp.model_folder, tmp_path / sp.dataset.name / sp.model_folder.name)
    gt = tmp_path / "gt"
    shutil.copytree(model.reference_folder(folder), gt)
    val1 = folder / "fold_1" / "validation"
    val1.mkdir(parents=True)
    for f in (folder / "fold_0" / "validation").iterdir():
        case, _, ext = f.name.partition(".")
        shutil.copy2(f, val1 / f"{case}copy.{ext}")
        if ext == "npz":
            shutil.copy2(gt / f"{case}.nii.gz", gt / f"{case}copy.nii.gz")
    single = model.fit_model(folder, [0], max_voxels=None, gt_folder=gt, write=False, progress=False)
    rec = model.fit_model(folder, max_voxels=None, gt_folder=gt, progress=False)
    assert rec["folds"] == [0, 1] and rec["cases"] == 2 * single["cases"]
    assert rec["voxels"]["used"] == rec["voxels"]["available"] == 2 * single["voxels"]["available"]
    cf = rec["crossfit"]
    t0 = single["parameters"]["temperature"]
    for k in ("0", "1"):
        assert cf["parameters"][k]["temperature"] == pytest.approx(t0, rel=1e-6)
    gt = Path(rec["reference_folder"])
    assert cf["nll_before"] == pytest.approx(_direct_nll(folder / "fold_0" / "validation", gt), rel=1e-5)
    assert cf["nll_after"] < cf["nll_before"]
    assert json.loads((folder / "calibration.json").read_text())["crossfit"] == cf


def test_apply_to_a_validation_folder(fitted, tmp_path):
    """A fold_X/validation folder (nnUNetv2_train --npz: CASE.npz, CASE.pkl, segmentations, summary.json, no
    dataset.json / plans.json): those two are taken from its model folder and copied to the output; its
    summary.json (the uncalibrated scores) is not."""
    val = fitted / "fold_0" / "validation"
    src = {p.name for p in val.iterdir()}
    assert "summary.json" in src and "dataset.json" not in src and "plans.json" not in src
    out = tmp_path / "val_calibrated"
    assert cli.main(["apply", str(val), "-m", str(fitted), "-o", str(out), "--no-progress"]) == 0
    t = json.loads((fitted / "calibration.json").read_text())["parameters"]["temperature"]
    for name in ("dataset.json", "plans.json"):
        assert (out / name).read_bytes() == (fitted / name).read_bytes()
    assert not (out / "summary.json").exists()
    npzs = sorted(val.glob("*.npz"))
    assert sorted(p.name for p in out.glob("*.npz")) == [p.name for p in npzs]
    for npz in npzs:
        p = np.load(npz)["probabilities"].astype(np.float64)
        z = np.log(np.maximum(p, 2.0 ** -149)) / t
        e = np.exp(z - z.max(0))
        np.testing.assert_allclose(np.load(out / npz.name)["probabilities"], e / e.sum(0), atol=1e-6)
        seg = npz.name[:-4] + ".nii.gz"
        assert (out / seg).read_bytes() == (val / seg).read_bytes()


def test_calibration_of_another_model_is_refused(fitted, synthetic_prediction, tmp_path, capsys):
    """fit records the model (dataset, plans, configuration, trainer, folds); apply refuses a calibration
    used with another model folder or with predictions of another model (exit 2, both files and the
    field named, nothing written); a version 1 calibration.json (no 'model') is accepted with a warning."""
    sp = synthetic_prediction
    cal_path = fitted / "calibration.json"
    out = tmp_path / "out"
    # the calibration copied next to another trainer's model of the same dataset
    other = _copy_model(fitted, fitted.parent.parent / "other" / "nnUNetTrainer__nnUNetPlans__2d")
    shutil.copy2(cal_path, other / "calibration.json")
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(other), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{other / 'calibration.json'}: field 'model.trainer' is '{sp.trainer}'" in err
    assert f"the model folder {other}" in err and "'nnUNetTrainer'" in err and not out.exists()
    # predictions of another dataset (their plans.json says so)
    pred = tmp_path / "pred_other_dataset"
    shutil.copytree(sp.pred_folder, pred)
    plans = json.loads((pred / "plans.json").read_text())
    plans["dataset_name"] = "Dataset555_Other"
    (pred / "plans.json").write_text(json.dumps(plans))
    assert cli.main(["apply", str(pred), "-m", str(fitted), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{cal_path}: field 'model.dataset' is '{sp.dataset.name}'" in err
    assert f"{pred / 'plans.json'}" in err and "'Dataset555_Other'" in err and not out.exists()
    # a calibration that names a fold the model folder does not have
    rec = json.loads(cal_path.read_text())
    twofold = _copy_model(fitted, tmp_path / "twofold" / sp.dataset.name / fitted.name)
    (twofold / "calibration.json").write_text(json.dumps(dict(rec, model=dict(rec["model"], folds=[0, 1]))))
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(twofold), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "field 'model.folds' is [0, 1]" in err and "fold_1" in err and not out.exists()
    # version 1 (no 'model'): accepted, with a one-line warning
    old = {k: v for k, v in rec.items() if k not in ("model", "scope", "prediction_folder")}
    (twofold / "calibration.json").write_text(json.dumps(dict(old, version=1)))
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(twofold), "-o", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "no 'model' field" in err and (out / "calibration.json").is_file()
