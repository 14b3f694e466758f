"""Every bad-input case raises ConversionError naming the file, and leaves nothing behind.

No nnU-Net run here: these checks fail before anything is moved into nnUNet_raw.
"""
from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import official_layouts as b
from dataset_conversion import ConversionError, convert_acdc, convert_brats, convert_flare, convert_prostate
from dataset_conversion.cli import main
from testlib import sigterm_when_staging_appears

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def out(tmp_path):
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    return {"raw_root": raw, "preprocessed_root": pre, "progress": False}


def assert_nothing_left(out):
    for key in ("raw_root", "preprocessed_root"):
        folder = Path(out[key])
        left = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
        assert left == [], f"left behind in {folder}: {left}"


def expect_error(fn, out, *patterns, **kwargs):
    with pytest.raises(ConversionError) as ei:
        fn(**kwargs, **out)
    msg = str(ei.value)
    for p in patterns:
        assert str(p) in msg, f"{p!r} not in error message: {msg}"
    assert_nothing_left(out)
    return msg


# ------------------------------------------------------------------------------------ missing modality
def test_brats_missing_modality(tmp_path, out):
    src = b.make_brats(tmp_path / "src", 2019)
    victim = sorted((src / "LGG").glob("BraTS19_*"))[0]
    (victim / f"{victim.name}_flair.nii.gz").unlink()
    expect_error(convert_brats, out, "missing modality flair", victim, source=src, dataset_id=10)


def test_prostate_missing_modality_3d_image(tmp_path, out):
    src = b.make_prostate(tmp_path / "src")
    f = src / "imagesTr" / "prostate_03.nii.gz"
    arr = np.asarray(nib.load(f).dataobj)[..., 0]  # T2 only: ADC missing
    b.write_nib(f, arr, nib.load(f).affine)
    expect_error(convert_prostate, out, "missing modality", f, source=src, dataset_id=10)


# ------------------------------------------------------------------------- label without image / reverse
def test_acdc_label_without_image(tmp_path, out):
    src = b.make_acdc(tmp_path / "src")
    img = src / "database/training/patient003/patient003_frame01.nii.gz"
    img.unlink()
    expect_error(convert_acdc, out, "label file without image", "patient003_frame01_gt.nii.gz",
                 source=src, dataset_id=10)


def test_acdc_image_without_label(tmp_path, out):
    src = b.make_acdc(tmp_path / "src")
    (src / "database/training/patient004/patient004_frame01_gt.nii.gz").unlink()
    expect_error(convert_acdc, out, "image without label", "patient004_frame01.nii.gz", source=src, dataset_id=10)


@pytest.mark.parametrize("drop", ["image", "label"])
def test_flare_unpaired(tmp_path, out, drop):
    src = b.make_flare(tmp_path / "src", "flare21_training_img")
    if drop == "image":
        (src / "TrainingImg" / "train_002_0000.nii.gz").unlink()
        expect_error(convert_flare, out, "label file without image", src / "TrainingMask" / "train_002.nii.gz",
                     source=src, dataset_id=10)
    else:
        (src / "TrainingMask" / "train_002.nii.gz").unlink()
        expect_error(convert_flare, out, "image without label", src / "TrainingImg" / "train_002_0000.nii.gz",
                     source=src, dataset_id=10)


def test_brats_missing_segmentation(tmp_path, out):
    src = b.make_brats(tmp_path / "src", 2021)
    victim = src / "BraTS2021_00002"
    (victim / "BraTS2021_00002_seg.nii.gz").unlink()
    expect_error(convert_brats, out, "image without label", victim / "BraTS2021_00002_t1.nii.gz",
                 source=src, dataset_id=10)


def test_prostate_label_without_image(tmp_path, out):
    src = b.make_prostate(tmp_path / "src")
    (src / "imagesTr" / "prostate_02.nii.gz").unlink()
    expect_error(convert_prostate, out, "label file without image", src / "labelsTr" / "prostate_02.nii.gz",
                 source=src, dataset_id=10)


# ------------------------------------------------------------------------------------ geometry mismatch
def _rewrite_sitk(path: Path, **changes):
    img = sitk.ReadImage(str(path))
    for k, v in changes.items():
        getattr(img, f"Set{k}")(v)
    sitk.WriteImage(img, str(path), useCompression=True)


def test_flare_size_mismatch(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare21_imagesTr")
    lab = src / "labelsTr" / "train_003.nii.gz"
    b.write_ct(lab, np.zeros((6, 20, 21), np.uint8))
    expect_error(convert_flare, out, "geometry mismatch", lab, "size", source=src, dataset_id=10)


def test_acdc_spacing_mismatch(tmp_path, out):
    src = b.make_acdc(tmp_path / "src")
    gt = src / "database/training/patient002/patient002_frame11_gt.nii.gz"
    arr = np.asarray(nib.load(gt).dataobj)
    b.write_acdc_nifti(gt, arr, spacing=(1.5625, 1.5625, 5.0))
    expect_error(convert_acdc, out, "geometry mismatch", gt, "spacing", source=src, dataset_id=10)


def test_acdc_4d_frame_says_the_dimension_it_found(tmp_path, out):
    """Issue 21: a 4D image where a 3D frame belongs names the file and the dimension and size found."""
    src = b.make_acdc(tmp_path / "src")
    frame = src / "database/training/patient001/patient001_frame01.nii.gz"
    b.write_acdc_nifti(frame, np.zeros((20, 24, 4, 3), np.float32))
    expect_error(convert_acdc, out, frame, "is not a 3D scalar image: found a 4D image of size (20, 24, 4, 3)",
                 source=src, dataset_id=10)


def test_brats_origin_mismatch_between_modalities(tmp_path, out):
    src = b.make_brats(tmp_path / "src", 2021)
    f = src / "BraTS2021_00001" / "BraTS2021_00001_t2.nii.gz"
    _rewrite_sitk(f, Origin=(0.0, -239.0, 2.0))
    expect_error(convert_brats, out, "geometry mismatch", f, "origin", source=src, dataset_id=10)


def test_prostate_direction_mismatch(tmp_path, out):
    src = b.make_prostate(tmp_path / "src")
    lab = src / "labelsTr" / "prostate_04.nii.gz"
    arr = np.asarray(nib.load(lab).dataobj)
    b.write_nib(lab, arr, b.oblique_affine(angles=(10.0, -20.0, 35.0), offset=(-46.0, 20.0, -34.0)))
    expect_error(convert_prostate, out, "geometry mismatch", lab, "direction", source=src, dataset_id=10)


def test_small_origin_difference_is_tolerated(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare21_imagesTr")
    lab = src / "labelsTr" / "train_001.nii.gz"
    _rewrite_sitk(lab, Origin=(-200.0 + 1e-5, -180.0, -400.0))
    res = convert_flare(src, 10, **out)
    assert res.num_training == 5


# ------------------------------------------------------------------------------- unexpected label value
def test_brats_label_3_is_rejected(tmp_path, out):
    src = b.make_brats(tmp_path / "src", 2019)
    case = sorted((src / "HGG").glob("BraTS19_*"))[1]
    seg = case / f"{case.name}_seg.nii.gz"
    img = nib.load(seg)
    arr = np.asarray(img.dataobj).copy()
    arr[2, 2, 2] = 3
    b.write_brats_nifti(seg, arr)
    expect_error(convert_brats, out, "unexpected label value(s) 3", seg, source=src, dataset_id=10)


def test_acdc_label_out_of_range(tmp_path, out):
    src = b.make_acdc(tmp_path / "src")
    gt = src / "database/training/patient005/patient005_frame01_gt.nii.gz"
    arr = np.asarray(nib.load(gt).dataobj).copy()
    arr[0, 0, 0] = 5
    b.write_acdc_nifti(gt, arr)
    expect_error(convert_acdc, out, "unexpected label value(s) 5", gt, source=src, dataset_id=10)


def test_flare_fractional_label(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare22")
    lab = src / "Training/FLARE22_LabeledCase50/labels/FLARE22_Tr_0004.nii.gz"
    arr = sitk.GetArrayFromImage(sitk.ReadImage(str(lab))).astype(np.float32)
    arr[0, 0, 0] = 1.5
    b.write_ct(lab, arr)
    expect_error(convert_flare, out, "unexpected label value(s) 1.5", lab, source=src, dataset_id=10)


def test_flare21_rejects_flare22_labels(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare22")
    expect_error(convert_flare, out, "unexpected label value(s) 5", source=src, dataset_id=10, release="21")


# ------------------------------------------------------------------------------------ duplicate case ids
def test_brats_duplicate_case_in_hgg_and_lgg(tmp_path, out):
    src = b.make_brats(tmp_path / "src", 2019)
    case = sorted((src / "HGG").glob("BraTS19_*"))[0]
    b.brats_case(src / "LGG" / case.name, case.name, np.random.default_rng(5))
    expect_error(convert_brats, out, "duplicate case id", case.name, source=src, dataset_id=10)


def test_flare_duplicate_case_with_and_without_channel_suffix(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare21_imagesTr")
    (src / "imagesTr" / "train_001_0000.nii.gz").write_bytes((src / "imagesTr" / "train_001.nii.gz").read_bytes())
    expect_error(convert_flare, out, "duplicate case id train_001", source=src, dataset_id=10)


def test_acdc_duplicate_frame(tmp_path, out):
    src = b.make_acdc(tmp_path / "src")
    p = src / "database/training/patient001"
    with gzip.open(p / "patient001_frame01.nii.gz") as f:
        (p / "patient001_frame1.nii").write_bytes(f.read())
    expect_error(convert_acdc, out, "duplicate case id patient001_frame01", source=src, dataset_id=10)


def test_prostate_duplicate_nii_and_niigz(tmp_path, out):
    src = b.make_prostate(tmp_path / "src")
    with gzip.open(src / "labelsTr" / "prostate_00.nii.gz") as f:
        (src / "labelsTr" / "prostate_00.nii").write_bytes(f.read())
    expect_error(convert_prostate, out, "duplicate case id prostate_00", source=src, dataset_id=10)


# -------------------------------------------------------------------------------------- unreadable file
def test_unreadable_image(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare21_train_image")
    bad = src / "TrainImage" / "train_0003_0000.nii.gz"
    bad.write_bytes(b"this is not a nifti file")
    expect_error(convert_flare, out, "cannot read", bad, source=src, dataset_id=10)


def test_truncated_label(tmp_path, out):
    src = b.make_acdc(tmp_path / "src")
    gt = src / "database/training/patient002/patient002_frame04_gt.nii.gz"
    data = gt.read_bytes()
    gt.write_bytes(data[: len(data) // 2])
    expect_error(convert_acdc, out, "cannot read", gt, source=src, dataset_id=10)


def _damage_gzip(path: Path, how: str) -> None:
    """``truncate``: keep the first 60% of the bytes; ``middle``: change 64 bytes in the middle of the
    deflate stream; ``crc``: flip the stored CRC-32 (the voxels stay intact, only the check fails)."""
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) * 6 // 10]
    elif how == "middle":
        m = len(data) // 2
        data[m:m + 64] = bytes(v ^ 0x5A for v in data[m:m + 64])
    elif how == "crc":
        data[-8] ^= 0xFF
    else:
        raise AssertionError(how)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("how", ["truncate", "middle", "crc"])
@pytest.mark.parametrize("which", ["image", "label"])
def test_corrupt_gzip_detected(tmp_path, out, how, which):
    # images large enough that SimpleITK reads the damaged stream without an error (zero-filled voxels)
    src = b.make_acdc(tmp_path / "src", n_patients=5, n_test=0, shape=(256, 256, 10))
    name = "patient002_frame04" + ("_gt" if which == "label" else "") + ".nii.gz"
    bad = src / "database/training/patient002" / name
    _damage_gzip(bad, how)
    msg = expect_error(convert_acdc, out, "cannot read", bad, source=src, dataset_id=10)
    assert ("truncated" in msg) or ("CRC" in msg) or ("corrupt" in msg), msg


def test_truncated_plain_nii_detected(tmp_path, out):
    src = b.make_acdc(tmp_path / "src", n_patients=5, n_test=0, shape=(256, 256, 10))
    p = src / "database/training/patient001"
    gz = p / "patient001_frame01.nii.gz"
    with gzip.open(gz) as f:
        raw = f.read()
    gz.unlink()
    (p / "patient001_frame01.nii").write_bytes(raw[:-1000])
    expect_error(convert_acdc, out, "cannot read", "truncated NIfTI", p / "patient001_frame01.nii",
                 source=src, dataset_id=10)


def test_bad_info_cfg(tmp_path, out):
    src = b.make_acdc(tmp_path / "src")
    cfg = src / "database/training/patient001/Info.cfg"
    cfg.write_text("ED: one\nES: 8\n")
    expect_error(convert_acdc, out, "bad ED line", cfg, source=src, dataset_id=10)


# ----------------------------------------------------------------------------- target handling, failure
def test_existing_target_needs_overwrite(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare21_imagesTr")
    res = convert_flare(src, 12, **out)
    marker = res.dataset_dir / "stale_file.txt"
    marker.write_text("old")
    splits_before = res.splits_file.read_text()
    with pytest.raises(ConversionError, match="use --overwrite"):
        convert_flare(src, 12, **out)
    assert marker.exists()
    res2 = convert_flare(src, 12, overwrite=True, **out)
    assert res2.dataset_dir == res.dataset_dir and not marker.exists()
    assert res2.splits_file.read_text() == splits_before
    assert sorted(p.name for p in Path(out["raw_root"]).iterdir()) == ["Dataset012_FLARE21"]
    assert sorted(p.name for p in res.splits_file.parent.iterdir()) == ["splits_final.json"]


def test_failed_overwrite_keeps_old_dataset(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare21_imagesTr")
    res = convert_flare(src, 13, **out)
    before = sorted(p.name for p in (res.dataset_dir / "imagesTr").iterdir())
    (src / "labelsTr" / "train_005.nii.gz").write_bytes(b"garbage")
    with pytest.raises(ConversionError, match="train_005"):
        convert_flare(src, 13, overwrite=True, **out)
    assert sorted(p.name for p in (res.dataset_dir / "imagesTr").iterdir()) == before
    assert sorted(p.name for p in Path(out["raw_root"]).iterdir()) == ["Dataset013_FLARE21"]


def test_dataset_id_used_by_another_name(tmp_path, out):
    src = b.make_flare(tmp_path / "src", "flare21_imagesTr")
    (Path(out["raw_root"]) / "Dataset014_Other").mkdir(parents=True)
    with pytest.raises(ConversionError, match="Dataset014_Other"):
        convert_flare(src, 14, overwrite=True, **out)
    assert sorted(p.name for p in Path(out["raw_root"]).iterdir()) == ["Dataset014_Other"]


def test_missing_source_and_unknown_layout(tmp_path, out):
    expect_error(convert_acdc, out, tmp_path / "nope", source=tmp_path / "nope", dataset_id=10)
    (tmp_path / "empty").mkdir()
    expect_error(convert_flare, out, "no FLARE layout", source=tmp_path / "empty", dataset_id=10)
    expect_error(convert_brats, out, "no BraTS training folder", source=tmp_path / "empty", dataset_id=10)
    expect_error(convert_prostate, out, "imagesTr is missing", source=tmp_path / "empty", dataset_id=10)
    expect_error(convert_flare, out, "unknown FLARE release", source=b.make_flare(tmp_path, "flare22"),
                 dataset_id=10, release="23")


def test_environment_variables_are_required(tmp_path, monkeypatch):
    src = b.make_flare(tmp_path / "src", "flare21_imagesTr")
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(ConversionError, match="nnUNet_raw is not set"):
        convert_flare(src, 10, preprocessed_root=tmp_path / "pre", progress=False)


# ------------------------------------------------------------------------------------------------- CLI
def test_cli_error_exit_code_and_message(tmp_path, capsys, monkeypatch):
    src = b.make_brats(tmp_path / "src", 2021)
    seg = src / "BraTS2021_00003" / "BraTS2021_00003_seg.nii.gz"
    arr = np.asarray(nib.load(seg).dataobj).copy()
    arr[1, 1, 1] = 7
    b.write_brats_nifti(seg, arr)
    monkeypatch.setenv("nnUNet_raw", str(tmp_path / "raw"))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path / "pre"))
    rc = main(["brats", str(src), "-d", "21", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "calib-convert: error:" in err and str(seg) in err and "7" in err
    assert not (tmp_path / "raw").exists()  # made by this run for the dataset, removed with its staging folder


def test_cli_subprocess_success_and_existing_target(tmp_path):
    src = b.make_brats(tmp_path / "src", 2021)
    env = dict(os.environ, nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "dataset_conversion.cli", "brats", str(src), "-d", "22"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "BraTS2021 training cases" in p.stderr  # tqdm progress bar
    ds = tmp_path / "raw" / "Dataset022_BraTS2021"
    assert json.loads((ds / "dataset.json").read_text())["numTraining"] == 5
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "--overwrite" in p.stderr and str(ds) in p.stderr
    p = subprocess.run(cmd + ["--overwrite", "--no-progress"], env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    p = subprocess.run(cmd + ["--release", "2019"], env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "no BraTS19_* case folders" in p.stderr


def test_cli_sigterm_removes_staging_and_stale_staging_is_removed(tmp_path):
    """SIGTERM during a conversion exits 130 and leaves nothing (like Ctrl-C); a staging folder of an
    earlier run killed with SIGKILL (its process is gone) is removed by the next run."""
    src = b.make_acdc(tmp_path / "src", n_patients=10, n_test=0, shape=(128, 128, 8))
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    raw.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = raw / f".Dataset010_ACDC.tmp-{dead.pid}-abc123"
    (stale / "imagesTr").mkdir(parents=True)
    env = dict(os.environ, nnUNet_raw=str(raw), nnUNet_preprocessed=str(pre),
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    rc, stdout, stderr, seen = sigterm_when_staging_appears(
        [sys.executable, "-m", "dataset_conversion.cli", "acdc", str(src), "-d", "10", "--no-progress"],
        env, raw, ".Dataset010_ACDC.tmp-")
    assert seen, "the staging folder (named with the converter's pid) exists while converting"
    assert rc == 130, stdout + stderr
    assert "interrupted" in stderr
    assert not stale.exists(), "the staging folder of a dead run is removed"
    assert list(raw.iterdir()) == []
    assert not pre.exists() or list(pre.iterdir()) == []
