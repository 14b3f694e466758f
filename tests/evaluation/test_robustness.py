"""calib-evaluate never gives a silently wrong number: corrupt references, killed workers, missing and
duplicate cases, geometry mismatches, unwritable output, SIGTERM, stale staging folders, -np < 1;
ignore labels and non-NIfTI datasets (.png) read with nnU-Net's reader/writer.

Folders are built here like nnU-Net writes them: CASE.npz (np.savez_compressed), CASE.pkl with the
properties nnU-Net's SimpleITKIO / NaturalImage2DIO return for the image (plus
``shape_before_cropping``), references written with SimpleITK."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_calibration.evaluation import EvaluationInputError, evaluate_folders
from nnunet_calibration.evaluation.cli import main
from nnunet_calibration.metrics import brier, cece, dice, ece, hd95, marginal_calibration_errors, nll, pece
from testlib import sigterm_when_staging_appears

REPO = Path(__file__).resolve().parents[2]
CAL_KEYS = ("ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier")


def nnunet_pkl(ref_path: Path, pkl_path: Path) -> None:
    """The properties nnU-Net stores in CASE.pkl for an image with the reference's geometry."""
    arr, props = SimpleITKIO().read_seg(str(ref_path))
    props["shape_before_cropping"] = tuple(arr.shape[1:])
    save_pickle(props, str(pkl_path))


def smooth_case(shape, rng, n_classes=2):
    """A box of label 1 (and 2) with confident, well-compressible probabilities."""
    lab = np.zeros(shape, np.uint8)
    lab[tuple(slice(s // 4, s // 4 + s // 2) for s in shape)] = 1
    if n_classes > 2:
        lab[tuple(slice(s // 3, s // 3 + max(s // 5, 1)) for s in shape)] = 2
    logits = 4.0 * np.stack([lab == c for c in range(n_classes)]).astype(np.float32)
    logits += rng.normal(0, 1.0, size=logits.shape).astype(np.float32).round(1)
    p = np.exp(logits - logits.max(0))
    p /= p.sum(0)
    return lab, p.astype(np.float32)


def build(root: Path, n_cases=2, shape=(10, 256, 256), spacing_xyz=(0.7, 0.7, 2.5), labels=None, n_classes=2,
          seed=0, pkl=True):
    rng = np.random.default_rng(seed)
    pred, gt = root / "pred", root / "gt"
    pred.mkdir(parents=True)
    gt.mkdir(parents=True)
    labels = labels or {"background": 0, "a": 1}
    (pred / "dataset.json").write_text(json.dumps({"channel_names": {"0": "x"}, "labels": labels,
                                                   "numTraining": n_cases, "file_ending": ".nii.gz"}))
    data = {}
    for i in range(n_cases):
        case = f"case_{i:03d}"
        lab, probs = smooth_case(shape, rng, n_classes)
        img = sitk.GetImageFromArray(lab)
        img.SetSpacing(spacing_xyz)
        img.SetOrigin((10.0, -5.0, 3.0))
        sitk.WriteImage(img, str(gt / f"{case}.nii.gz"), useCompression=True)
        np.savez_compressed(pred / f"{case}.npz", probabilities=probs)
        if pkl:
            nnunet_pkl(gt / f"{case}.nii.gz", pred / f"{case}.pkl")
        data[case] = (probs, lab)
    return pred, gt, data


def run_main(capsys, *args):
    rc = main([*map(str, args), "--no-progress"])
    return rc, capsys.readouterr().err


def assert_nothing_written(root: Path, out: Path):
    assert not out.exists()
    assert not [p for p in root.rglob(".*tmp-*")], list(root.rglob(".*tmp-*"))


# ---------------------------------------------------------------------------------------------- 1
def damage_gzip(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) * 6 // 10]
    elif how == "middle":  # 64 changed bytes in the deflate stream
        m = len(data) // 2
        data[m:m + 64] = bytes(v ^ 0x5A for v in data[m:m + 64])
    else:  # only the stored CRC-32 is wrong
        data[-8] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "middle", "crc"])
def test_corrupt_reference_is_an_error(tmp_path, capsys, how):
    pred, gt, _ = build(tmp_path)
    bad = gt / "case_001.nii.gz"
    damage_gzip(bad, how)
    out = tmp_path / "out"
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", out)
    assert rc == 2, err
    assert str(bad) in err and ("truncated" in err or "CRC" in err or "corrupt" in err), err
    assert_nothing_written(tmp_path, out)


# ---------------------------------------------------------------------------------------------- 2
def _children(pid: int):
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append((int(d.name), cmd))
    return out


def test_killed_worker_is_an_error_naming_the_case_not_a_hang(tmp_path):
    pred, gt, _ = build(tmp_path, n_cases=10, shape=(12, 256, 256), seed=1)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "nnunet_calibration.evaluation.cli", str(pred), "--gt", str(gt),
                             "-o", str(out), "-np", "2", "--no-progress"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        victim = None
        t0 = time.time()
        while victim is None and time.time() - t0 < 600 and proc.poll() is None:  # slow on a busy machine
            workers = [p for p, cmd in _children(proc.pid) if "spawn_main" in cmd]
            if len(workers) == 2:
                time.sleep(0.5)  # killed while importing or busy with a case: the pool is broken either way
                victim = workers[0]
            time.sleep(0.2)
        assert victim is not None, "no worker process seen"
        os.kill(victim, signal.SIGKILL)  # like the kernel's out-of-memory killer
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 2, stdout + stderr
    assert "worker process died" in stderr, stderr
    assert "case_0" in stderr, stderr
    assert_nothing_written(tmp_path, out)


# ---------------------------------------------------------------------------------------------- 3
def test_missing_and_duplicate_cases(tmp_path, capsys):
    pred, gt, _ = build(tmp_path, n_cases=3, shape=(4, 20, 20))
    out = tmp_path / "out"
    # a prediction whose npz is missing (nnU-Net's pkl is there) is an error listing the case
    (pred / "case_001.npz").unlink()
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", out)
    assert rc == 2 and "no prediction" in err and "case_001" in err, err
    assert_nothing_written(tmp_path, out)
    # --allow-missing proceeds and records it
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", out, "--allow-missing")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert [c["case"] for c in s["cases"]] == ["case_000", "case_002"]
    assert s["missing"] == {"predictions": ["case_001"], "references": []}
    # a reference without any prediction file at all
    os.unlink(pred / "case_001.pkl")
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", tmp_path / "o2")
    assert rc == 2 and "case_001" in err, err
    # a prediction without reference
    (gt / "case_002.nii.gz").unlink()
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", tmp_path / "o3", "--cases", "case_000", "case_002")
    assert rc == 2 and "no reference" in err and str(gt / "case_002.nii.gz") in err, err
    # the same folder twice, and one case id in two folders
    rc, err = run_main(capsys, pred, pred, "--gt", gt, "-o", tmp_path / "o4")
    assert rc == 2 and "more than once" in err, err
    other = tmp_path / "pred2"
    other.mkdir()
    os.link(pred / "case_000.npz", other / "case_000.npz")
    rc, err = run_main(capsys, pred, other, "--gt", gt, "-o", tmp_path / "o5", "--allow-missing")
    assert rc == 2 and "more than one prediction folder" in err and "case_000" in err, err
    assert not any((tmp_path / f"o{k}").exists() for k in (2, 3, 4, 5))


# ---------------------------------------------------------------------------------------------- 4
@pytest.mark.parametrize("change", ["transposed", "respaced", "origin"])
def test_geometry_mismatch_is_an_error(tmp_path, capsys, change):
    pred, gt, _ = build(tmp_path, n_cases=2, shape=(6, 32, 32), spacing_xyz=(0.8, 0.8, 3.0))
    ref = gt / "case_001.nii.gz"
    img = sitk.ReadImage(str(ref))
    if change == "transposed":  # y/x swapped on a square image (ITK permutes the direction as well)
        img = sitk.PermuteAxes(img, [1, 0, 2])
        expect = "direction"
    elif change == "respaced":
        img.SetSpacing((1.6, 1.6, 3.0))
        expect = "spacing"
    else:
        img.SetOrigin((12.0, -5.0, 3.0))
        expect = "origin"
    sitk.WriteImage(img, str(ref), useCompression=True)
    out = tmp_path / "out"
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", out)
    assert rc == 2, err
    assert "geometry mismatch" in err and expect in err, err
    assert str(pred / "case_001.pkl") in err and str(ref) in err, err
    assert_nothing_written(tmp_path, out)


def test_geometry_from_segmentation_file_and_unchecked_flag(tmp_path, capsys):
    pred, gt, _ = build(tmp_path, n_cases=2, shape=(6, 32, 32), pkl=False)
    # nnU-Net's segmentation of case_000 (same geometry) -> checked; case_001 has nothing -> flagged
    img = sitk.ReadImage(str(gt / "case_000.nii.gz"))
    sitk.WriteImage(img, str(pred / "case_000.nii.gz"))
    s = evaluate_folders([pred], gt, write=False, progress=False)
    flags = {c["case"]: c["flags"] for c in s["cases"]}
    assert not any("geometry" in f for f in flags["case_000"])
    assert any("geometry not checked" in f for f in flags["case_001"])
    img.SetSpacing((1.0, 1.0, 1.0))
    sitk.WriteImage(img, str(pred / "case_000.nii.gz"))
    with pytest.raises(EvaluationInputError, match="geometry mismatch.*spacing"):
        evaluate_folders([pred], gt, write=False, progress=False)


# ---------------------------------------------------------------------------------------------- 5
def test_unwritable_output_fails_before_computing(tmp_path, capsys):
    pred, gt, data = build(tmp_path, n_cases=2, shape=(4, 20, 20))
    # a bad npz that would stop the run later: the output error must come first
    (pred / "case_001.npz").write_bytes(b"not a zip")
    if os.geteuid() == 0:
        out = Path("/proc") / "calib-evaluate-test" / "out"  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        out = ro / "out"
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", out)
    assert rc == 2, err
    assert "not writable" in err and str(out) in err, err
    assert "case_001.npz" not in err


def test_np_below_one_and_missing_prediction_folder(tmp_path, capsys):
    pred, gt, _ = build(tmp_path, n_cases=1, shape=(4, 20, 20))
    for bad in ("0", "-3"):
        with pytest.raises(SystemExit) as ei:
            main([str(pred), "--gt", str(gt), "-np", bad])
        assert ei.value.code == 2
        assert ">= 1" in capsys.readouterr().err
    with pytest.raises(EvaluationInputError, match=">= 1"):
        evaluate_folders([pred], gt, write=False, num_processes=0)
    with pytest.raises(EvaluationInputError, match="prediction folder does not exist"):
        evaluate_folders([tmp_path / "nope"], gt, write=False)


def test_sigterm_removes_staging_and_stale_staging_is_removed(tmp_path):
    pred, gt, _ = build(tmp_path, n_cases=8, shape=(12, 256, 256), seed=2)
    out = tmp_path / "out"
    # a staging folder left by a killed earlier run (its process no longer exists)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abc123"
    stale.mkdir()
    (stale / "summary.json").write_text("{}")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc, stdout, stderr, seen = sigterm_when_staging_appears(
        [sys.executable, "-m", "nnunet_calibration.evaluation.cli", str(pred), "--gt", str(gt), "-o", str(out),
         "--no-progress"], env, tmp_path, ".out.tmp-")
    assert seen, "the staging folder is created before computing"
    assert not stale.exists(), "stale staging of a dead run removed"
    assert rc == 130, stdout + stderr
    assert "interrupted" in stderr
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------------------------------- 6
def test_ignore_label_excluded_from_every_metric(tmp_path):
    labels = {"background": 0, "a": 1, "b": 2, "ignore": 3}
    pred, gt, data = build(tmp_path, n_cases=2, shape=(5, 14, 15), labels=labels, n_classes=3, seed=5)
    rng = np.random.default_rng(9)
    spacing = (2.5, 0.7, 0.7)
    for case, (probs, lab) in data.items():
        lab = lab.copy()
        lab[rng.random(lab.shape) < 0.2] = 3  # scattered ignore voxels, also inside the objects
        lab[:, :3] = 3
        img = sitk.GetImageFromArray(lab)
        img.SetSpacing(spacing[::-1])
        img.SetOrigin((10.0, -5.0, 3.0))
        sitk.WriteImage(img, str(gt / f"{case}.nii.gz"), useCompression=True)
        data[case] = (probs, lab)
    s = evaluate_folders([pred], gt, write=False, progress=False)
    assert s["config"]["ignore_label"] == 3
    for entry in s["cases"]:
        probs, lab = data[entry["case"]]
        valid = lab != 3
        p_v, l_v = probs[:, valid], lab[valid]  # the metrics of the remaining voxels only
        m = entry["metrics"]
        direct = {"ECE": ece(p_v, l_v), "CECE": cece(p_v, l_v), "pECE": pece(p_v, l_v), "NLL": nll(p_v, l_v),
                  "Brier": brier(p_v, l_v), **marginal_calibration_errors(p_v, l_v)}
        for k in CAL_KEYS:
            assert m[k] == pytest.approx(direct[k], rel=1e-9, abs=1e-12), k
        # NLL by hand: mean over the non-ignored voxels of -log p_label
        q = np.take_along_axis(probs, lab.clip(0, 2)[None].astype(np.int64), 0)[0][valid]
        assert m["NLL"] == pytest.approx(float(np.mean(-np.log(np.maximum(q.astype(np.float64), 1e-7)))), rel=1e-5)
        seg = probs.argmax(0)
        for c, name in ((1, "a"), (2, "b")):
            pm, rm = (seg == c) & valid, lab == c
            assert m["DSC"][name] == pytest.approx(2 * np.sum(pm & rm) / (pm.sum() + rm.sum()))
            assert m["HD95"][name] == pytest.approx(hd95(pm, rm, spacing))
            assert m["DSC"][name] != pytest.approx(dice(seg == c, rm))  # the ignored voxels did matter


def test_png_2d_dataset_read_with_nnunet_reader(tmp_path):
    rng = np.random.default_rng(3)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    (pred / "dataset.json").write_text(json.dumps({"channel_names": {"0": "R"}, "labels": {"background": 0, "a": 1},
                                                   "numTraining": 2, "file_ending": ".png"}))
    data = {}
    for i in range(2):
        case = f"img_{i}"
        lab, probs = smooth_case((30, 41), rng)
        sitk.WriteImage(sitk.GetImageFromArray(lab), str(gt / f"{case}.png"))
        np.savez_compressed(pred / f"{case}.npz", probabilities=probs[:, None])  # nnU-Net's (C, 1, y, x)
        save_pickle({"spacing": (999, 1, 1), "shape_before_cropping": (1, 30, 41)}, str(pred / f"{case}.pkl"))
        data[case] = (probs, lab)
    s = evaluate_folders([pred], gt, write=False, progress=False)
    assert s["config"]["reader_writer"] == "NaturalImage2DIO"
    for entry in s["cases"]:
        probs, lab = data[entry["case"]]
        assert entry["spacing"] == [1.0, 1.0]
        assert entry["metrics"]["ECE"] == pytest.approx(ece(probs, lab), rel=1e-9)
        assert entry["metrics"]["DSC"]["a"] == pytest.approx(dice(probs.argmax(0) == 1, lab == 1))
        assert entry["metrics"]["HD95"]["a"] == pytest.approx(hd95(probs.argmax(0) == 1, lab == 1, (1.0, 1.0)))


# ---------------------------------------------------------------------------------------------- 7
def test_sdc_code_convention_in_the_evaluator(tmp_path, capsys):
    from scipy import ndimage

    labels = {"background": 0, "a": 1, "b": 2}
    pred, gt, data = build(tmp_path, n_cases=2, shape=(6, 24, 22), labels=labels, n_classes=3, seed=7)
    out = tmp_path / "out"
    rc, err = run_main(capsys, pred, "--gt", gt, "-o", out, "--convention", "sdc-code")
    assert rc == 0, err
    s = json.loads((out / "summary.json").read_text())
    assert s["classes"] == ["foreground"] and s["config"]["n_bins_ece"] == 10
    for entry in s["cases"]:
        probs, lab = data[entry["case"]]
        m = entry["metrics"]
        # ECE: binary, 1 - p_background vs label != 0, all voxels, 10 bins (lo, hi]
        conf, y = (1.0 - probs[0]).ravel().astype(np.float64), (lab != 0).ravel()
        edges = np.linspace(0, 1, 11)
        e = sum((((conf > lo) & (conf <= hi)).sum() / conf.size)
                * abs(conf[(conf > lo) & (conf <= hi)].mean() - y[(conf > lo) & (conf <= hi)].mean())
                for lo, hi in zip(edges[:-1], edges[1:]) if ((conf > lo) & (conf <= hi)).any())
        assert m["ECE"] == pytest.approx(e, rel=1e-9)
        # DSC and HD95 of the foreground union; HD95 in voxels with all-neighbour surfaces
        pf, rf = probs.argmax(0) != 0, lab != 0
        assert m["DSC"]["foreground"] == pytest.approx((2 * np.sum(pf & rf) + 1e-6) / (pf.sum() + rf.sum() + 1e-6))
        st = np.ones((3, 3, 3), bool)
        sp_, sr_ = pf ^ ndimage.binary_erosion(pf, st, border_value=0), rf ^ ndimage.binary_erosion(rf, st, border_value=0)
        d = np.hstack([ndimage.distance_transform_edt(~sr_)[sp_], ndimage.distance_transform_edt(~sp_)[sr_]])
        assert m["HD95"]["foreground"] == pytest.approx(float(np.percentile(d, 95)), rel=1e-9)


def test_tif_dataset_uses_spacing_from_nnunet_reader(tmp_path):
    """nnU-Net's Tiff3DIO (chosen by dataset.json's overwrite_image_reader_writer, as nnU-Net does)
    keeps the spacing in CASE.json next to CASE.tif; HD95 must use it."""
    from nnunetv2.imageio.tif_reader_writer import Tiff3DIO

    rng = np.random.default_rng(4)
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    (pred / "dataset.json").write_text(json.dumps({"channel_names": {"0": "x"}, "labels": {"background": 0, "a": 1},
                                                   "numTraining": 1, "file_ending": ".tif",
                                                   "overwrite_image_reader_writer": "Tiff3DIO"}))
    spacing = (2.0, 0.5, 0.75)
    lab, _ = smooth_case((6, 20, 18), rng)
    p1 = np.where(np.roll(lab, 2, axis=1) == 1, 0.9, 0.1).astype(np.float32)  # a shifted prediction
    probs = np.stack([1 - p1, p1])
    Tiff3DIO().write_seg(lab, str(gt / "c_000.tif"), {"spacing": spacing})
    np.savez_compressed(pred / "c_000.npz", probabilities=probs)
    save_pickle({"spacing": spacing, "shape_before_cropping": lab.shape}, str(pred / "c_000.pkl"))
    s = evaluate_folders([pred], gt, write=False, progress=False)
    assert s["config"]["reader_writer"] == "Tiff3DIO"
    m = s["cases"][0]["metrics"]
    assert m["HD95"]["a"] == pytest.approx(hd95(probs.argmax(0) == 1, lab == 1, spacing))
    assert m["HD95"]["a"] != pytest.approx(hd95(probs.argmax(0) == 1, lab == 1, (1, 1, 1)))
