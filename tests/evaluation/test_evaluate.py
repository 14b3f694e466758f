"""calib-evaluate on small nnU-Net-style folders built here (dataset.json, CASE.npz written with
np.savez_compressed as nnU-Net does, CASE.pkl via nnU-Net's save_pickle, references written with
SimpleITK), compared with direct calls of the metric functions; and every bad input."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import save_pickle

from nnunet_calibration.evaluation import EvaluationInputError, evaluate_folders
from nnunet_calibration.evaluation.cli import main
from nnunet_calibration.metrics import (brier, cece, dice, ece, hd95, marginal_calibration_errors, nll, pece)

LABELS = {"background": 0, "a": 1, "b": 2, "c": 3}
REGION_LABELS = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
REGIONS = [(1, 2, 3), (2, 3), (3,)]
CAL_KEYS = ("ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier")


def rk(region_labels):
    """Keyword arguments of the public metrics for softmax (``None``) or the given region label tuples."""
    return {} if region_labels is None else {"regions": True, "region_labels": region_labels}


def write_reference(path, labels, spacing_zyx):
    img = sitk.GetImageFromArray(labels.astype(np.uint8))
    img.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(img, str(path), useCompression=True)


def make_case(rng, shape, regions):
    lab = np.zeros(shape, np.uint8)
    sl = tuple(slice(s // 4, s // 4 + max(s // 2, 1)) for s in shape)
    lab[sl] = 1
    inner = tuple(slice(s // 3, s // 3 + max(s // 4, 1)) for s in shape)
    lab[inner] = 2
    lab[tuple(slice(s // 2, s // 2 + 1) for s in shape)] = 3
    lab[rng.random(shape) < 0.03] = 1
    if regions:
        chans = [1 / (1 + np.exp(-(rng.normal(size=shape) * 1.5 + 3 * (2 * np.isin(lab, r) - 1)))) for r in REGIONS]
        probs = np.stack(chans)
    else:
        logits = rng.normal(size=(4, *shape)) * 1.5 + 3 * np.stack([lab == c for c in range(4)])
        probs = np.exp(logits - logits.max(0))
        probs /= probs.sum(0)
    return lab, probs.astype(np.float32)


def make_folders(root: Path, n_cases=3, shape=(5, 12, 13), spacing=(3.0, 1.0, 0.8), regions=False, seed=0,
                 two_d=False, prefix="case"):
    """pred folder + gt folder in nnU-Net layout; returns (pred, gt, {case: (probs, labels, spacing)})."""
    rng = np.random.default_rng(seed)
    pred, gt = root / "pred", root / "gt"
    pred.mkdir(parents=True, exist_ok=True)
    gt.mkdir(parents=True, exist_ok=True)
    dj = {"channel_names": {"0": "x"}, "labels": REGION_LABELS if regions else LABELS, "numTraining": n_cases,
          "file_ending": ".nii.gz"}
    if regions:
        dj["regions_class_order"] = [1, 2, 3]
    (pred / "dataset.json").write_text(json.dumps(dj))
    data = {}
    for i in range(n_cases):
        case = f"{prefix}_{i:03d}"
        lab, probs = make_case(rng, shape, regions)
        write_reference(gt / f"{case}.nii.gz", lab, spacing)
        stored = probs[:, None] if two_d else probs  # nnU-Net stores 2D images as (C, 1, y, x)
        np.savez_compressed(pred / f"{case}.npz", probabilities=stored)
        save_pickle({"spacing": list(spacing)}, str(pred / f"{case}.pkl"))
        data[case] = (probs, lab, spacing)
    return pred, gt, data


def direct_metrics(probs, lab, spacing, regions):
    out = {"ECE": ece(probs, lab, **rk(regions)), "CECE": cece(probs, lab, **rk(regions)),
           "pECE": pece(probs, lab, **rk(regions)), "NLL": nll(probs, lab, **rk(regions)),
           "Brier": brier(probs, lab, **rk(regions))}
    out.update(marginal_calibration_errors(probs, lab, **rk(regions)))
    dsc, hd = [], []
    if regions is None:
        seg = probs.argmax(0)
        masks = [(seg == c, lab == c) for c in (1, 2, 3)]
    else:
        seg = np.zeros(lab.shape, int)
        for i, c in enumerate([1, 2, 3]):
            seg[probs[i] > 0.5] = c
        masks = [(np.isin(seg, r), np.isin(lab, r)) for r in regions]
    for pm, rm in masks:
        dsc.append(dice(pm, rm))
        hd.append(hd95(pm, rm, spacing))
    return out, dsc, hd


def check_summary(summary, data, regions, names):
    assert summary["classes"] == names
    assert len(summary["cases"]) == len(data)
    for entry in summary["cases"]:
        probs, lab, spacing = data[entry["case"]]
        cal, dsc, hd = direct_metrics(probs, lab, spacing, regions)
        m = entry["metrics"]
        for k in CAL_KEYS:
            assert m[k] == pytest.approx(cal[k], rel=1e-9, abs=1e-12), k
        assert [m["DSC"][n] for n in names] == pytest.approx(dsc)
        assert [m["HD95"][n] for n in names] == pytest.approx(hd)
        assert m["DSC_mean"] == pytest.approx(np.mean(dsc))
        assert m["HD95_mean"] == pytest.approx(np.mean(hd))
    # mean over cases
    for k in CAL_KEYS:
        assert summary["mean"][k] == pytest.approx(np.mean([c["metrics"][k] for c in summary["cases"]]))
    assert summary["mean"]["DSC"] == pytest.approx(np.mean([c["metrics"]["DSC_mean"] for c in summary["cases"]]))
    for n in names:
        assert summary["mean"][f"DSC_{n}"] == pytest.approx(np.mean([c["metrics"]["DSC"][n] for c in summary["cases"]]))
        assert f"HD95_{n}" in summary["mean"]
    # pooled = metrics of all voxels of all cases concatenated into one "case"
    cat_p = np.concatenate([d[0].reshape(d[0].shape[0], -1) for d in data.values()], 1)
    cat_l = np.concatenate([d[1].reshape(-1) for d in data.values()])
    pooled = {"ECE": ece(cat_p, cat_l, **rk(regions)), "CECE": cece(cat_p, cat_l, **rk(regions)),
              "pECE": pece(cat_p, cat_l, **rk(regions)), "NLL": nll(cat_p, cat_l, **rk(regions)),
              "Brier": brier(cat_p, cat_l, **rk(regions))}
    pooled.update(marginal_calibration_errors(cat_p, cat_l, **rk(regions)))
    for k in CAL_KEYS:
        assert summary["pooled"][k] == pytest.approx(pooled[k], rel=1e-9), k


def check_files(out: Path, summary, names):
    assert json.loads((out / "summary.json").read_text()) == summary
    with open(out / "per_case.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == [c["case"] for c in summary["cases"]]
    for r, c in zip(rows, summary["cases"]):
        assert float(r["ECE"]) == pytest.approx(c["metrics"]["ECE"])
        assert float(r[f"DSC_{names[0]}"]) == pytest.approx(c["metrics"]["DSC"][names[0]])
    for n in names:
        png = out / f"reliability_{n}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "dataset_reliability_histogram.png").read_bytes()[:4] == b"\x89PNG"
    # no temporary folders left next to the output
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.mark.parametrize("regions", [False, True])
def test_evaluate_folders_matches_direct_metrics(tmp_path, regions):
    pred, gt, data = make_folders(tmp_path, regions=regions, seed=int(regions))
    out = tmp_path / "out"
    summary = evaluate_folders([str(pred)], str(gt), None, str(out), num_processes=1, progress=False)
    names = ["whole", "core", "enhancing"] if regions else ["a", "b", "c"]
    check_summary(summary, data, REGIONS if regions else None, names)
    check_files(out, summary, names)
    assert summary["config"]["mode"] == ("regions" if regions else "softmax")
    assert summary["cases"][0]["folder"] == str(pred)


def test_2d_references_and_custom_options(tmp_path):
    pred, gt, data = make_folders(tmp_path, shape=(15, 17), spacing=(0.7, 1.3), two_d=True, seed=3)
    summary = evaluate_folders([pred], gt, out_dir=tmp_path / "o", progress=False, n_bins_ace=7, fp_weight=0.5,
                               n_bins_ece=4, n_bins_cece=6, cece_threshold=0.01, n_bins_pece=3)
    for entry in summary["cases"]:
        probs, lab, spacing = data[entry["case"]]
        m = entry["metrics"]
        assert m["ECE"] == pytest.approx(ece(probs, lab, n_bins=4))
        assert m["CECE"] == pytest.approx(cece(probs, lab, n_bins=6, threshold=0.01))
        assert m["pECE"] == pytest.approx(pece(probs, lab, n_bins=3, fp_weight=0.5))
        assert m["mL1-ACE"] == pytest.approx(marginal_calibration_errors(probs, lab, n_bins=7)["mL1-ACE"])
        assert m["HD95"]["a"] == pytest.approx(hd95(probs.argmax(0) == 1, lab == 1, spacing))
    assert summary["config"]["n_bins_ace"] == 7


def test_several_folders_parallel_and_empty_class_flag(tmp_path):
    p1, gt, d1 = make_folders(tmp_path / "f0", n_cases=2, seed=4, prefix="x")
    p2, gt2, d2 = make_folders(tmp_path / "f1", n_cases=2, seed=5, prefix="y")
    for f in gt2.iterdir():
        os.replace(f, gt / f.name)
    # case y_001: class c absent from the reference and never predicted; class b predicted nowhere
    probs, lab, sp = d2["y_001"]
    lab = lab.copy(); lab[lab == 3] = 1
    write_reference(gt / "y_001.nii.gz", lab, sp)
    probs = probs.copy(); probs[0] += probs[3] + probs[2]; probs[3] = 0; probs[2] = 0
    np.savez_compressed(p2 / "y_001.npz", probabilities=probs)
    d2["y_001"] = (probs, lab, sp)
    out = tmp_path / "out"
    rc = main([str(p1), str(p2), "--gt", str(gt), "-o", str(out), "-np", "2", "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in summary["cases"]] == ["x_000", "x_001", "y_000", "y_001"]
    assert {c["folder"] for c in summary["cases"]} == {str(p1), str(p2)}
    check_summary(summary, {**d1, **d2}, None, ["a", "b", "c"])
    y1 = summary["cases"][-1]
    assert y1["metrics"]["DSC"]["c"] == 1.0 and y1["metrics"]["HD95"]["c"] == 0.0
    diag = float(np.sqrt(np.sum((np.array(lab.shape) * np.array(sp)) ** 2)))
    assert y1["metrics"]["DSC"]["b"] == 0.0
    assert y1["metrics"]["HD95"]["b"] == pytest.approx(diag)
    assert any("b: empty prediction" in f for f in y1["flags"])
    assert not summary["cases"][0]["flags"]
    # re-running into the same output folder replaces it; the references of p2 have no prediction now
    assert main([str(p1), "--gt", str(gt), "-o", str(out), "--no-progress"]) == 2
    assert main([str(p1), "--gt", str(gt), "-o", str(out), "--no-progress", "--cases", "x_000", "x_001"]) == 0
    assert len(json.loads((out / "summary.json").read_text())["cases"]) == 2
    assert main([str(p1), "--gt", str(gt), "-o", str(out), "--no-progress", "--allow-missing"]) == 0
    s2 = json.loads((out / "summary.json").read_text())
    assert len(s2["cases"]) == 2 and s2["missing"] == {"predictions": ["y_000", "y_001"], "references": []}


def test_validation_folder_finds_dataset_json_in_model_folder(tmp_path):
    pred, gt, data = make_folders(tmp_path / "model" / "fold_0", n_cases=1)
    pred = pred.rename(pred.parent / "validation")
    os.replace(pred / "dataset.json", tmp_path / "model" / "dataset.json")
    summary = evaluate_folders([pred], gt, write=False, progress=False)
    assert summary["config"]["dataset_json"] == str((tmp_path / "model" / "dataset.json"))


# ----------------------------------------------------------------------------------------------
# bad input: non-zero exit, message naming the file, nothing written
# ----------------------------------------------------------------------------------------------
def _corrupt(kind, pred: Path, gt: Path, data):
    case = "case_002"  # the last case: the others are evaluated before the error
    probs, lab, sp = data[case]
    npz, ref = pred / f"{case}.npz", gt / f"{case}.nii.gz"
    if kind == "missing_reference":
        ref.unlink()
        return ref
    if kind == "shape":
        np.savez_compressed(npz, probabilities=probs[:, :, :-1])
        return npz
    if kind == "nan":
        p = probs.copy(); p[1, 0, 0, 0] = np.nan
        np.savez_compressed(npz, probabilities=p)
        return npz
    if kind == "range":
        p = probs.copy(); p[1, 0, 0, 0] = 1.2; p[0, 0, 0, 0] = -0.2
        np.savez_compressed(npz, probabilities=p)
        return npz
    if kind == "softmax_sum":
        p = probs.copy(); p[:, 1, 2, 3] = [0.5, 0.3, 0.1, 0.098]
        np.savez_compressed(npz, probabilities=p)
        return npz
    if kind == "label_values":
        l2 = lab.copy(); l2[0, 0, 0] = 7
        write_reference(ref, l2, sp)
        return ref
    if kind == "unreadable_npz":
        npz.write_bytes(b"this is not a zip file")
        return npz
    if kind == "truncated_npz":
        npz.write_bytes(npz.read_bytes()[:200])
        return npz
    if kind == "missing_key":
        np.savez_compressed(npz, softmax=probs)
        return npz
    if kind == "channels":
        np.savez_compressed(npz, probabilities=probs[:3] / probs[:3].sum(0))
        return npz
    raise AssertionError(kind)


BAD = ["missing_reference", "shape", "nan", "range", "softmax_sum", "label_values", "unreadable_npz",
       "truncated_npz", "missing_key", "channels"]
MESSAGES = {"missing_reference": "no reference", "shape": "does not match the reference", "nan": "NaN",
            "range": r"outside [0, 1]", "softmax_sum": "do not sum to 1", "label_values": "label values [7]",
            "unreadable_npz": "unreadable npz", "truncated_npz": "unreadable npz", "missing_key": "probabilities",
            "channels": "channels"}


@pytest.mark.parametrize("kind", BAD)
def test_bad_input_exits_nonzero_names_file_writes_nothing(tmp_path, capsys, kind):
    pred, gt, data = make_folders(tmp_path, n_cases=3, shape=(4, 9, 8))
    bad_file = _corrupt(kind, pred, gt, data)
    out = tmp_path / "out"
    rc = main([str(pred), "--gt", str(gt), "-o", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc != 0
    assert str(bad_file) in err, err
    assert MESSAGES[kind] in err, err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]  # no temp folder left


def test_bad_regions_input_and_softmax_check_not_applied_to_regions(tmp_path, capsys):
    pred, gt, data = make_folders(tmp_path, regions=True, n_cases=2, shape=(4, 9, 8))
    # sigmoid regions need not sum to 1 -> fine
    assert main([str(pred), "--gt", str(gt), "-o", str(tmp_path / "ok"), "--no-progress"]) == 0
    p, lab, sp = data["case_001"]
    p = p.copy(); p[2, 0, 0, 0] = np.nan
    np.savez_compressed(pred / "case_001.npz", probabilities=p)
    assert main([str(pred), "--gt", str(gt), "-o", str(tmp_path / "bad"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "case_001.npz" in err and "NaN" in err
    assert not (tmp_path / "bad").exists()


def test_cli_subprocess_exit_code_and_missing_folders(tmp_path):
    pred, gt, data = make_folders(tmp_path, n_cases=1, shape=(3, 6, 5))
    (gt / "case_000.nii.gz").unlink()
    r = subprocess.run([sys.executable, "-m", "nnunet_calibration.evaluation.cli", str(pred), "--gt", str(gt),
                        "-o", str(tmp_path / "out"), "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2
    assert "case_000.nii.gz" in r.stderr and "no reference" in r.stderr
    with pytest.raises(EvaluationInputError, match="no dataset.json"):
        evaluate_folders([tmp_path / "gt"], gt, write=False)
    with pytest.raises(EvaluationInputError, match="does not exist"):
        evaluate_folders([pred], tmp_path / "nope", write=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EvaluationInputError, match="no CASE.npz"):
        evaluate_folders([empty], gt, dataset_json=pred / "dataset.json", write=False)


@pytest.mark.parametrize("regions", [False, True])
def test_segmentation_equals_nnunet_label_manager(regions):
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_calibration.evaluation.segmentation import probabilities_to_segmentation

    rng = np.random.default_rng(0)
    if regions:
        lm = LabelManager(REGION_LABELS, [1, 2, 3])
        probs = rng.random((3, 6, 7, 8)).astype(np.float32)
        probs[:, 0, 0, :4] = 0.5  # exactly on the threshold
    else:
        lm = LabelManager(LABELS, None)
        probs = rng.random((4, 6, 7, 8)).astype(np.float32)
        probs[:, 0, 0, 0] = 0.25  # four-way tie
        probs[1, 0, 0, 1] = probs[3, 0, 0, 1] = 2.0  # tie between 1 and 3
        probs /= probs.sum(0)
    ours = probabilities_to_segmentation(probs, lm)
    np.testing.assert_array_equal(ours, np.asarray(lm.convert_probabilities_to_segmentation(probs)))


def test_segmentation_shortcut_for_checked_softmax_sums_gives_the_same_argmax():
    """With ``sum_tolerance`` (sums checked by the caller) voxels with background > 0.5 + tol skip the
    comparison; the result must still equal nnU-Net's argmax, also for voxels right at the bound,
    ties at 0.5 and sums off by up to the tolerance."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager

    from nnunet_calibration.evaluation.segmentation import probabilities_to_segmentation
    from nnunet_calibration.metrics import validate_probabilities
    from nnunet_calibration.metrics.calibration import SOFTMAX_SUM_TOLERANCE as tol

    lm = LabelManager(LABELS, None)
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 3, (4, 20, 30, 40))
    logits[0] += 3  # mostly background, as in real predictions
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    probs = probs.astype(np.float32)
    flat = probs.reshape(4, -1)
    flat[:, :6] = [[0.5, 0.5, 0.5 + tol, 0.5 + tol, 0.4995, 0.9], [0.5, 0, 0.5 - tol, 0, 0.5005, 0.1],
                   [0, 0.5, 0, 0.5, 0, 0], [0, 0, 0, 0, 0, 0]]  # ties, bound, sums 1 +- tol
    flat[:, 2] *= np.float32(1 + tol * 0.99) / flat[:, 2].sum()
    validate_probabilities(probs)
    expected = np.asarray(lm.convert_probabilities_to_segmentation(probs))
    assert 0.05 < (expected != 0).mean() < 0.5
    np.testing.assert_array_equal(probabilities_to_segmentation(probs, lm, sum_tolerance=tol), expected)
    np.testing.assert_array_equal(probabilities_to_segmentation(probs, lm), expected)


def test_dataset_reliability_counts_by_hand():
    from nnunet_calibration.evaluation.plots import dataset_reliability_counts

    edges = np.linspace(0, 1, 5)  # 4 bins
    # 3 cases, 1 class, 4 probability bins: observed frequencies (NaN = empty bin in that case)
    freq = np.array([[[0.0, 0.25, 0.6, 1.0]],
                     [[0.1, np.nan, 0.5, 0.9]],
                     [[np.nan, 0.3, 0.75, 1.0]]])
    counts = dataset_reliability_counts(edges, freq)
    expected = np.zeros((1, 4, 4), int)
    # bin (lo, hi]: 0 -> first, 0.25 -> first, 0.5 -> second, 0.75 -> third, 1 -> last
    for b, js in enumerate([[0, 0], [0, 1], [2, 1, 2], [3, 3, 3]]):
        for j in js:
            expected[0, b, j] += 1
    np.testing.assert_array_equal(counts, expected)
