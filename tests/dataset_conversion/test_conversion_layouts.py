"""Layout variants checked without nnU-Net (their output format equals the nnU-Net-verified ones)."""
from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import official_layouts as b
from dataset_conversion import ConversionError, convert_acdc, convert_brats, convert_flare


def load_json(p):
    return json.loads(Path(p).read_text())


def test_brats2021_layout(tmp_path):
    src = b.make_brats(tmp_path / "src", 2021)
    res = convert_brats(src, 5, raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre", progress=False)
    assert res.dataset_name == "Dataset005_BraTS2021" and res.num_training == 5
    assert load_json(res.dataset_dir / "case_metadata.json")["training"]["BraTS2021_00000"]["grade"] is None


def test_acdc_flat_testing_and_database_as_source(tmp_path):
    src = b.make_acdc(tmp_path / "src", n_test=2, nested_testing=False)
    res = convert_acdc(src / "database", 6, raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre",
                       progress=False)
    assert res.num_training == 10 and res.num_test == 4
    assert sorted(p.name for p in (res.dataset_dir / "imagesTs").iterdir())[0] == "patient006_frame01_0000.nii.gz"
    assert not (res.dataset_dir / "labelsTs").exists()


def test_flare_release_option(tmp_path):
    src = b.make_flare(tmp_path / "src", "flare21_training_img")
    res = convert_flare(src, 7, release="FLARE22", raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre",
                        progress=False)
    assert res.dataset_name == "Dataset007_FLARE22"  # labels 1..4 are valid FLARE22 labels too


def test_acdc_testing_labels_go_to_labelsTs(tmp_path):
    src = b.make_acdc(tmp_path / "src", n_test=1)
    tdir = src / "database/testing/testing/patient006"
    for img in sorted(tdir.glob("patient006_frame??.nii.gz")):
        (tdir / img.name.replace(".nii.gz", "_gt.nii.gz")).write_bytes(
            (src / "database/training/patient001/patient001_frame01_gt.nii.gz").read_bytes())
    # patient006 has another grid than patient001 (even index): geometry is checked on test frames too
    with pytest.raises(ConversionError, match="geometry mismatch"):
        convert_acdc(src, 8, raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre", progress=False)
    for gt in tdir.glob("*_gt.nii.gz"):
        img = tdir / gt.name.replace("_gt", "")
        b.write_acdc_nifti(gt, np.zeros(nib.load(img).shape, np.uint8))
    res = convert_acdc(src, 8, raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre", progress=False)
    assert sorted(p.name for p in (res.dataset_dir / "labelsTs").iterdir()) == [
        "patient006_frame01.nii.gz", "patient006_frame10.nii.gz"]


def test_brats_mixed_releases_need_release_option(tmp_path):
    src = b.make_brats(tmp_path / "src", 2021)
    rng = np.random.default_rng(1)
    for k in range(5):
        b.brats_case(src / f"BraTS20_Training_{k + 1:03d}", f"BraTS20_Training_{k + 1:03d}", rng)
    with pytest.raises(ConversionError, match="--release"):
        convert_brats(src, 9, raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre", progress=False)
    res = convert_brats(src, 9, release="2020", raw_root=tmp_path / "raw", preprocessed_root=tmp_path / "pre",
                        progress=False)
    assert res.dataset_name == "Dataset009_BraTS2020"
    assert sorted(p.name for p in (res.dataset_dir / "labelsTr").iterdir())[0] == "BraTS20_Training_001.nii.gz"
