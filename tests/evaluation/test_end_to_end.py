"""calib-evaluate on the output of a real short nnU-Net training (``synthetic_prediction`` fixture):
the folder of ``nnUNetv2_predict --save_probabilities`` and the ``fold_0/validation`` folder of
``nnUNetv2_train --npz``. Numbers are checked against direct calls of the metric functions on the
arrays loaded here, and DSC against nnU-Net's own validation summary."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunet_calibration.evaluation import evaluate_folders
from nnunet_calibration.metrics import (brier, cece, debiased_l2_ece, dice, ece, hd95, marginal_calibration_errors, nll,
                                        pece, signed_calibration_error)
from test_evaluate_options import boundary_ece_here

pytestmark = pytest.mark.nnunet

CAL_KEYS = ("ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier")


def run_cli(args):
    r = subprocess.run([sys.executable, "-m", "nnunet_calibration.evaluation.cli", *map(str, args)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def load_case(npz: Path, ref: Path):
    probs = np.load(npz)["probabilities"]
    img = sitk.ReadImage(str(ref))
    lab = sitk.GetArrayFromImage(img)
    return probs, lab, img.GetSpacing()[::-1]


def check_against_direct(out: Path, folder: Path, gt: Path, dataset_json: Path):
    summary = json.loads((out / "summary.json").read_text())
    dj = json.loads(Path(dataset_json).read_text())
    fg = sorted((v, k) for k, v in dj["labels"].items() if v != 0)
    names = [k for _, k in fg]
    assert summary["classes"] == names
    npzs = sorted(folder.glob("*.npz"))
    assert [c["case"] for c in summary["cases"]] == [p.name[:-4] for p in npzs]
    all_p, all_l = [], []
    for entry, npz in zip(summary["cases"], npzs):
        probs, lab, spacing = load_case(npz, gt / f"{entry['case']}{dj['file_ending']}")
        assert probs.dtype == np.float32 and probs.shape[1:] == lab.shape
        m = entry["metrics"]
        direct = {"ECE": ece(probs, lab), "CECE": cece(probs, lab), "pECE": pece(probs, lab),
                  "NLL": nll(probs, lab), "Brier": brier(probs, lab), **marginal_calibration_errors(probs, lab)}
        for k in CAL_KEYS:
            if np.isnan(direct[k]):
                assert m[k] is None
            else:
                assert m[k] == pytest.approx(direct[k], rel=1e-9, abs=1e-12), k
        seg = probs.argmax(0)
        for value, name in fg:
            assert m["DSC"][name] == pytest.approx(dice(seg == value, lab == value))
            assert m["HD95"][name] == pytest.approx(hd95(seg == value, lab == value, spacing))
        all_p.append(probs.reshape(probs.shape[0], -1))
        all_l.append(lab.reshape(-1))
    cat_p, cat_l = np.concatenate(all_p, 1), np.concatenate(all_l)
    pooled = {"ECE": ece(cat_p, cat_l), "CECE": cece(cat_p, cat_l), "pECE": pece(cat_p, cat_l),
              "NLL": nll(cat_p, cat_l), "Brier": brier(cat_p, cat_l), **marginal_calibration_errors(cat_p, cat_l)}
    for k in CAL_KEYS:
        assert summary["pooled"][k] == pytest.approx(pooled[k], rel=1e-9), k
    # issue 23: signed error per class, debiased L2 ECE, boundary-band ECE (band made here, data set pooled)
    sce = signed_calibration_error(cat_p, cat_l)
    for name, v in zip(names, sce):
        assert summary["pooled"][f"SCE_{name}"] == pytest.approx(v, rel=1e-9, abs=1e-15)
    assert summary["pooled"]["SCE"] == pytest.approx(np.nanmean(sce), rel=1e-9, abs=1e-15)
    assert summary["pooled"]["debiased-L2-ECE"] == pytest.approx(debiased_l2_ece(cat_p, cat_l), rel=1e-9)
    data = {e["case"]: load_case(npz, gt / f"{e['case']}{dj['file_ending']}")
            for e, npz in zip(summary["cases"], npzs)}
    assert summary["pooled"]["boundary-ECE"] == pytest.approx(boundary_ece_here(data, None, 15, "uniform"), rel=1e-9)
    assert summary["bootstrap"]["n_resamples"] == 1000
    b = summary["bootstrap"]["debiased-L2-ECE"]
    assert b["low"] <= b["estimate"] <= b["high"] and b["estimate"] == pytest.approx(summary["pooled"]["debiased-L2-ECE"])
    for k in CAL_KEYS:
        vals = [c["metrics"][k] for c in summary["cases"] if c["metrics"][k] is not None]
        assert summary["mean"][k] == pytest.approx(np.mean(vals))
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(npzs)
    assert float(rows[0]["mL1-ACE"]) == pytest.approx(summary["cases"][0]["metrics"]["mL1-ACE"])
    for name in names:
        assert (out / f"reliability_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "dataset_reliability_histogram.png").read_bytes()[:4] == b"\x89PNG"
    return summary


def test_calib_evaluate_on_real_prediction_folder(synthetic_prediction, tmp_path):
    sp = synthetic_prediction
    pred = Path(sp.pred_folder)
    assert (pred / "dataset.json").is_file() and list(pred.glob("*.pkl"))
    out = tmp_path / "eval_pred"
    r = run_cli([pred, "--gt", sp.gt_folder, "-o", out, "--no-progress"])
    assert "pooled" in r.stdout
    check_against_direct(out, pred, Path(sp.gt_folder), Path(sp.dataset_json))
    # equal-mass bins: the pooled ECE / CECE / debiased L2 ECE are the functions' on the concatenated cases
    adaptive = evaluate_folders([pred], sp.gt_folder, write=False, progress=False, binning="adaptive", bootstrap=0)
    dj = json.loads(Path(sp.dataset_json).read_text())
    cases = [load_case(pred / f"{c['case']}.npz", Path(sp.gt_folder) / f"{c['case']}{dj['file_ending']}")
             for c in adaptive["cases"]]
    cat_p = np.concatenate([p.reshape(p.shape[0], -1) for p, _, _ in cases], 1)
    cat_l = np.concatenate([lab.reshape(-1) for _, lab, _ in cases])
    for key, fn in (("ECE", ece), ("CECE", cece), ("debiased-L2-ECE", debiased_l2_ece)):
        assert adaptive["pooled"][key] == pytest.approx(fn(cat_p, cat_l, binning="adaptive"), rel=1e-9), key


def test_calib_evaluate_on_real_validation_folder(synthetic_prediction, tmp_path):
    sp = synthetic_prediction
    val = Path(sp.validation_folder)
    out = tmp_path / "eval_val"
    # dataset.json is found in the model folder (two levels up); two processes
    # the fold's validation cases from nnU-Net's splits (the other references have no prediction here)
    splits = Path(sp.dataset.env["nnUNet_preprocessed"]) / sp.dataset.name / "splits_final.json"
    run_cli([val, "--gt", sp.gt_folder_train, "-o", out, "-np", "2", "--no-progress", "--cases-from-split", splits, 0])
    summary = check_against_direct(out, val, Path(sp.gt_folder_train), Path(sp.dataset_json))
    # our DSC equals nnU-Net's own validation Dice where nnU-Net defines it (reference or prediction non-empty)
    nn = json.loads((val / "summary.json").read_text())
    ours = {c["case"]: c for c in summary["cases"]}
    n_compared = 0
    for entry in nn["metric_per_case"]:
        case = Path(entry["reference_file"]).name.split(".")[0]
        for label, metrics in entry["metrics"].items():
            name = summary["classes"][int(label) - 1]
            if metrics["Dice"] is not None and not np.isnan(metrics["Dice"]):
                assert ours[case]["metrics"]["DSC"][name] == pytest.approx(metrics["Dice"], abs=1e-6)
                n_compared += 1
    assert n_compared > 0
