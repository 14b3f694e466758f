"""calib-calibrate fit / apply on the inputs of issue 21: every row a test on tiny nnU-Net-style folders
built here (no nnU-Net training: a model folder with dataset.json, plans.json and
fold_X/validation/CASE.npz + CASE.pkl, references written with SimpleITK), run in this process through
the CLI frame, asserting the exit status, the one-line message, and that the inputs and the output
location are exactly as before (fingerprints of every file, hidden ones too).

fit: 1. reference in another axis order (same voxel count) -> the evaluator's geometry / shape check;
     2. one case in two folds -> named error; 3. probabilities not summing to 1, NaN, shifted origin ->
     the evaluator's checks.
apply: 4. an already calibrated folder is refused unless --force (the output is marked in its
     calibration.json and CASE.pkl); 5. a bad field of calibration.json (NaN / -1 / text / 1e300
     temperature, wrong number of temperatures, missing channels) -> one line naming file and field;
     6. float16 probabilities whose sums are off, or NaN -> the evaluator's checks; 7. an output under
     a file, in a read-only place, existing (also one that cannot be renamed), or that is, contains or
     lies inside an input -> exit 2 before any case is read.
"""
from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_calibration.posthoc import model
from nnunet_calibration.posthoc.cli import main
from reliability_testlib import (SHAPE, build, fingerprint, model_folder, read_only, run_main, writable_again,
                                 write_calibration)

def run(capsys, *args) -> tuple:
    """:func:`reliability_testlib.run_main` of ``calib-calibrate``."""
    return run_main(main, capsys, *args)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calib-calibrate: error: "), err
    return lines[0]


def npz_probs(npz: Path) -> np.ndarray:
    with np.load(npz) as z:
        return z["probabilities"]


# -------------------------------------------------------------------------------------------- fit
def test_fit_on_a_clean_model_folder_works(tmp_path, capsys):
    """The control of the fit rows: the same tiny folder without damage fits (exit 0)."""
    folder, gt = model_folder(tmp_path)
    rc, stdout, err = run(capsys, "fit", folder, "--gt", gt)
    assert rc == 0, err
    cal = json.loads((folder / model.CALIBRATION_FILE).read_text())
    assert cal["folds"] == [0, 1] and cal["cases"] == 4 and cal["crossfit"] is not None


FIT_ROWS = {  # damage -> expected words of the message (and the file it names)
    "reference_axes_swapped": ("geometry mismatch", "shape (3, 8, 10) vs (8, 3, 10)"),
    "reference_axes_swapped_no_pkl": ("does not match the reference", "of shape (8, 3, 10)"),
    "case_in_two_folds": ("case 'case_000' is in the validation of fold 0 and of fold 1", "validated in one fold only"),
    "sums_not_one": ("softmax probabilities do not sum to 1", "case_001.npz"),
    "nan_probabilities": ("probabilities contain NaN", "case_001.npz"),
    "shifted_origin": ("geometry mismatch", "origin"),
}


@pytest.mark.parametrize("damage", list(FIT_ROWS))
def test_fit_refuses_bad_input(tmp_path, capsys, damage):
    folder, gt = model_folder(tmp_path, pkl=damage != "reference_axes_swapped_no_pkl")
    npz = folder / "fold_1" / "validation" / "case_001.npz"
    ref = gt / "case_001.nii.gz"
    if damage.startswith("reference_axes_swapped"):
        img = sitk.ReadImage(str(ref))
        swapped = sitk.GetImageFromArray(np.ascontiguousarray(sitk.GetArrayFromImage(img).transpose(1, 0, 2)))
        swapped.SetSpacing(img.GetSpacing())
        sitk.WriteImage(swapped, str(ref), useCompression=True)
    elif damage == "case_in_two_folds":
        src = folder / "fold_0" / "validation"
        for name in ("case_000.npz", "case_000.pkl"):
            shutil.copy2(src / name, folder / "fold_1" / "validation" / name)
    elif damage in ("sums_not_one", "nan_probabilities"):
        p = npz_probs(npz)
        if damage == "sums_not_one":
            p = p * 0.9
        else:
            p[:, 1, 2, 3] = np.nan
        np.savez_compressed(npz, probabilities=p)
    else:
        img = sitk.ReadImage(str(ref))
        img.SetOrigin(tuple(o + 5.0 for o in img.GetOrigin()))
        sitk.WriteImage(img, str(ref), useCompression=True)
    before = fingerprint(tmp_path)
    rc, stdout, err = run(capsys, "fit", folder, "--gt", gt)
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert all(words in line for words in FIT_ROWS[damage]), line
    assert fingerprint(tmp_path) == before  # no calibration.json, nothing else


# ------------------------------------------------------------------------------------------ apply
@pytest.fixture
def setup(tmp_path):
    """``(prediction folder, model folder with calibration.json T=1.5, its calibration.json)``."""
    pred, _ = build(tmp_path, n_cases=2, shape=SHAPE)
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy2(pred / "dataset.json", folder / "dataset.json")
    cal = write_calibration(folder, json.loads((pred / "dataset.json").read_text()))
    return pred, folder, cal


@pytest.mark.parametrize("mark", ["calibration_json_and_pkl", "pkl_only"])
def test_apply_to_a_calibrated_folder_is_refused_unless_forced(tmp_path, capsys, setup, mark):
    pred, folder, _ = setup
    once = tmp_path / "once"
    rc, stdout, err = run(capsys, "apply", pred, "-m", folder, "-o", once)
    assert rc == 0, err
    assert "applied_to" in json.loads((once / model.CALIBRATION_FILE).read_text())
    props = pickle.loads((once / "case_000.pkl").read_bytes())
    assert [m["parameters"] for m in props[model.PKL_MARK]] == [{"temperature": 1.5}]
    assert props["spacing"] == pickle.loads((pred / "case_000.pkl").read_bytes())["spacing"]
    if mark == "pkl_only":
        (once / model.CALIBRATION_FILE).unlink()
    before = fingerprint(tmp_path)
    rc, stdout, err = run(capsys, "apply", once, "-m", folder, "-o", tmp_path / "twice")
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert f"{once}: already calibrated" in line and "--force" in line, line
    assert fingerprint(tmp_path) == before
    rc, stdout, err = run(capsys, "apply", once, "-m", folder, "-o", tmp_path / "twice", "--force")
    assert rc == 0, err
    assert len(pickle.loads((tmp_path / "twice" / "case_000.pkl").read_bytes())[model.PKL_MARK]) == 2
    after = fingerprint(tmp_path)
    assert {k: after[k] for k in before} == before


BAD_CALIBRATION = {  # case -> (method, parameters or None for the default, what is removed, expected words)
    "nan_temperature": ("temperature", {"temperature": float("nan")}, None,
                        "field 'parameters.temperature' is nan, outside the fitted range [0.05, 20]"),
    "negative_temperature": ("temperature", {"temperature": -1}, None,
                             "field 'parameters.temperature' is -1, outside the fitted range"),
    "text_temperature": ("temperature", {"temperature": "1.5"}, None,
                         "field 'parameters.temperature' must be a number, got '1.5'"),
    "huge_temperature": ("temperature", {"temperature": 1e300}, None,
                         "field 'parameters.temperature' is 1e+300, outside the fitted range [0.05, 20]"),
    "wrong_number_of_temperatures": ("vector", {"temperatures": [1.0, 1.2, 1.4]}, None,
                                     "field 'parameters.temperatures' has 3 values for the 2 channels"),
    "missing_channels": ("temperature", None, "channels", "field 'channels' is missing"),
}


@pytest.mark.parametrize("case", list(BAD_CALIBRATION))
def test_apply_with_a_bad_calibration_field_is_one_line(tmp_path, capsys, setup, case):
    pred, folder, cal = setup
    method, params, removed, words = BAD_CALIBRATION[case]
    write_calibration(folder, json.loads((pred / "dataset.json").read_text()), method, **(params or {}))
    if removed:
        rec = json.loads(cal.read_text())
        del rec[removed]
        cal.write_text(json.dumps(rec))
    before = fingerprint(tmp_path)
    rc, stdout, err = run(capsys, "apply", pred, "-m", folder, "-o", tmp_path / "out")
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert f"{cal}: {words}" in line, line
    assert fingerprint(tmp_path) == before


@pytest.mark.parametrize("damage,words", [("float16_sums_off", "softmax probabilities do not sum to 1"),
                                          ("float16_nan", "probabilities contain NaN")])
def test_apply_checks_probabilities_as_the_evaluator(tmp_path, capsys, setup, damage, words):
    pred, folder, _ = setup
    npz = pred / "case_001.npz"
    p = npz_probs(npz).astype(np.float16)
    if damage == "float16_sums_off":
        p[:, 0] *= np.float16(0.9)
    else:
        p[:, 1, 2, 3] = np.nan
    np.savez_compressed(npz, probabilities=p)
    before = fingerprint(tmp_path)
    rc, stdout, err = run(capsys, "apply", pred, "-m", folder, "-o", tmp_path / "out")
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert f"{npz}: {words}" in line, line
    assert fingerprint(tmp_path) == before  # the staging folder of the first case is gone too


OUTPUT_ROWS = {
    "under_a_file": "output path lies under",
    "deep_under_a_file": "output path lies under",
    "read_only_place": "output location is not writable",
    "existing_folder": "output folder exists; choose a new one",
    "existing_folder_not_renamable": "output folder exists; choose a new one",
    "prediction_folder": "the output folder is the prediction folder",
    "contains_the_prediction_folder": "the output folder contains the prediction folder",
    "inside_the_prediction_folder": "the output folder is inside the prediction folder",
    "model_folder": "the output folder is the model folder",
}


@pytest.mark.parametrize("where", list(OUTPUT_ROWS))
def test_apply_unusable_output_fails_before_any_case(tmp_path, capsys, setup, where):
    pred, folder, _ = setup
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    locked = None
    out = {"under_a_file": a_file / "out", "deep_under_a_file": a_file / "a" / "b" / "out",
           "read_only_place": tmp_path / "ro" / "out", "existing_folder": tmp_path / "old",
           "existing_folder_not_renamable": tmp_path / "old", "prediction_folder": pred,
           "contains_the_prediction_folder": tmp_path, "inside_the_prediction_folder": pred / "calibrated",
           "model_folder": folder}[where]
    if where.startswith("existing_folder"):
        out.mkdir()
        (out / "mine.txt").write_text("mine")
    (pred / "case_001.npz").write_bytes(b"not a zip")  # would stop the run later: the output error comes first
    try:
        if where == "read_only_place":
            locked = out.parent
            locked.mkdir()
            read_only(locked)
        elif where == "existing_folder_not_renamable":
            locked = out
            read_only(locked)
        before = fingerprint(tmp_path)
        rc, stdout, err = run(capsys, "apply", pred, "-m", folder, "-o", out)
        after = fingerprint(tmp_path)
    finally:
        if locked is not None:
            writable_again(locked)
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert OUTPUT_ROWS[where] in line and str(out) in line and "case_001" not in line, line
    assert after == before


# ------------------------------------------------------------------------- which model (issue 22)
MODEL_ROWS = {  # the calibration of Dataset999_Tiny/Trainer__Plans__3d_fullres (fitted here) used with ... -> words
    "another_configuration": ("field 'model.configuration' is '3d_fullres'", "'2d'"),
    "another_trainer": ("field 'model.trainer' is 'Trainer'", "'OtherTrainer'"),
    "another_plans": ("field 'model.plans' is 'Plans'", "'OtherPlans'"),
    "predictions_of_another_dataset": ("field 'model.dataset' is 'Dataset999_Tiny'", "'Dataset998_Other'"),
    "validation_folder_of_another_model": ("field 'model.trainer' is 'Trainer'", "of the validation folder"),
}


@pytest.mark.parametrize("row", list(MODEL_ROWS))
def test_apply_refuses_a_calibration_of_another_model(tmp_path, capsys, row):
    """The tiny model folder is fitted (so its calibration.json records the model); then it is applied
    to another model's folder or predictions: exit 2, one line naming the calibration, the other file
    and the differing field, nothing written."""
    folder, gt = model_folder(tmp_path)
    rc, _, err = run(capsys, "fit", folder, "--gt", gt)
    assert rc == 0, err
    cal = folder / model.CALIBRATION_FILE
    names = {"another_configuration": "Trainer__Plans__2d", "another_trainer": "OtherTrainer__Plans__3d_fullres",
             "another_plans": "Trainer__OtherPlans__3d_fullres"}
    pred, model_arg = folder / "fold_0" / "validation", folder
    if row in names:
        model_arg = folder.parent / names[row]
        shutil.copytree(folder, model_arg)
    elif row == "predictions_of_another_dataset":
        pred = tmp_path / "pred"
        shutil.copytree(folder / "fold_0" / "validation", pred)
        shutil.copy2(folder / "dataset.json", pred / "dataset.json")
        (pred / "plans.json").write_text(json.dumps({"dataset_name": "Dataset998_Other", "plans_name": "Plans"}))
    else:
        other = folder.parent / "OtherTrainer__Plans__3d_fullres"
        shutil.copytree(folder, other)
        pred = other / "fold_0" / "validation"
    before = fingerprint(tmp_path)
    rc, stdout, err = run(capsys, "apply", pred, "-m", model_arg, "-o", tmp_path / "out")
    assert rc == 2, stdout + err
    line = one_error_line(err)
    used_cal = model_arg / model.CALIBRATION_FILE
    assert f"{used_cal}: " in line and all(w in line for w in MODEL_ROWS[row]), line
    if row == "predictions_of_another_dataset":
        assert str(pred / "plans.json") in line
    elif row == "validation_folder_of_another_model":
        assert str(pred) in line
    else:
        assert f"the model folder {model_arg}" in line
    assert fingerprint(tmp_path) == before
    # the control: the right model's validation folder is accepted
    rc, _, err = run(capsys, "apply", folder / "fold_1" / "validation", "-m", folder, "-o", tmp_path / "ok")
    assert rc == 0, err
    assert (tmp_path / "ok" / "dataset.json").read_bytes() == (folder / "dataset.json").read_bytes()
    assert cal.is_file()
