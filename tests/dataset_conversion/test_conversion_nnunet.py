"""Convert fixtures of every layout and check the result with real nnU-Net.

One module-scoped fixture converts the ACDC, BraTS 2019/2020, MSD-Prostate, three FLARE21 and the
FLARE22 fixtures, then runs ``nnUNetv2_plan_and_preprocess -d ... -c 2d -np 1
--verify_dataset_integrity`` once for all of them (one process start instead of eight). The tests
then check what nnU-Net produced and, independently of nnU-Net, the channel order, label maps,
header preservation and splits.
"""
from __future__ import annotations

import filecmp
import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

import official_layouts as b
from official_layouts import check_split
from dataset_conversion import convert_acdc, convert_brats, convert_flare, convert_prostate
from nnunet_calibration.nnunet_utils import nnunet_env, run_nnunet

pytestmark = pytest.mark.nnunet

IDS = {"acdc": 811, "brats2019": 812, "brats2020": 813, "prostate": 814, "flare21_training_img": 815,
       "flare21_imagesTr": 816, "flare21_train_image": 817, "flare22": 818}


def load_json(p):
    return json.loads(Path(p).read_text())


def sitk_array(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("conv_nnunet")
    env = nnunet_env(root / "nnunet", cpu_friendly=True)
    kw = dict(raw_root=env["nnUNet_raw"], preprocessed_root=env["nnUNet_preprocessed"], progress=False)
    src, res = {}, {}
    src["acdc"] = b.make_acdc(root / "src" / "acdc")
    res["acdc"] = convert_acdc(src["acdc"], IDS["acdc"], **kw)
    src["brats2019"] = b.make_brats(root / "src" / "b19", 2019)
    res["brats2019"] = convert_brats(src["brats2019"], IDS["brats2019"], **kw)
    src["brats2020"] = b.make_brats(root / "src" / "b20", 2020, with_validation=True)
    res["brats2020"] = convert_brats(src["brats2020"], IDS["brats2020"], **kw)
    src["prostate"] = b.make_prostate(root / "src" / "pr")
    res["prostate"] = convert_prostate(src["prostate"], IDS["prostate"], **kw)
    for scheme in b.FLARE_SCHEMES:
        src[scheme] = b.make_flare(root / "src" / "flare", scheme)
        res[scheme] = convert_flare(src[scheme], IDS[scheme], **kw)
    log = run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", *[str(i) for i in IDS.values()], "-c", "2d",
                      "-np", "1", "-npfp", "1", "--verify_dataset_integrity"], env, log_path=root / "plan_and_preprocess.log")
    return SimpleNamespace(env=env, src=src, res=res, log=log, pre=Path(env["nnUNet_preprocessed"]))


def test_nnunet_verified_and_preprocessed_every_dataset(converted):
    assert converted.log.count("verify_dataset_integrity Done") == len(IDS)
    for key, res in converted.res.items():
        pre = converted.pre / res.dataset_name
        plans = load_json(pre / "nnUNetPlans.json")
        assert "2d" in plans["configurations"], key
        fingerprint = load_json(pre / "dataset_fingerprint.json")
        assert len(fingerprint["spacings"]) == res.num_training
        ds = load_json(res.dataset_dir / "dataset.json")
        cases = sorted(p.name[: -len(".nii.gz")] for p in (res.dataset_dir / "labelsTr").iterdir())
        assert len(cases) == ds["numTraining"] == res.num_training
        done = sorted(p.stem for p in (pre / "nnUNetPlans_2d").glob("*.pkl"))
        assert done == cases, key
        # nnU-Net keeps our split (it only writes one when there is none)
        splits = load_json(pre / "splits_final.json")
        check_split(splits, {c: c.split("_frame")[0] if key == "acdc" else c for c in cases})


# ------------------------------------------------------------------------------------------- ACDC
def test_acdc_bytes_headers_and_frames(converted):
    res, src = converted.res["acdc"], converted.src["acdc"] / "database"
    ds = load_json(res.dataset_dir / "dataset.json")
    assert ds["channel_names"] == {"0": "cineMRI"}
    assert ds["labels"] == {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
    tr = sorted(p.name for p in (res.dataset_dir / "imagesTr").iterdir())
    assert "patient002_frame04_0000.nii.gz" in tr and "patient002_frame11_0000.nii.gz" in tr  # ED != 01
    assert len(tr) == 10 and not any("4d" in n for n in tr)
    assert sorted(p.name for p in (res.dataset_dir / "imagesTs").iterdir()) == [
        "patient006_frame01_0000.nii.gz", "patient006_frame10_0000.nii.gz"]  # nested testing/testing
    dtypes = set()
    for name in tr:
        case = name[: -len("_0000.nii.gz")]
        pid = case.split("_")[0]
        assert filecmp.cmp(res.dataset_dir / "imagesTr" / name, src / "training" / pid / f"{case}.nii.gz",
                           shallow=False)
        assert filecmp.cmp(res.dataset_dir / "labelsTr" / f"{case}.nii.gz",
                           src / "training" / pid / f"{case}_gt.nii.gz", shallow=False)
        hdr = nib.load(res.dataset_dir / "imagesTr" / name).header
        assert (int(hdr["qform_code"]), int(hdr["sform_code"])) == (0, 2)
        assert np.allclose(hdr.get_sform()[:3, :3], np.diag([-1, -1, 1]))  # unscaled sform kept
        assert np.allclose(hdr["pixdim"][1:4], b.ACDC_SPACING)
        dtypes.add(hdr.get_data_dtype().name)
        # nnU-Net's reader (SimpleITK) takes the true spacing from pixdim
        assert np.allclose(sitk.ReadImage(str(res.dataset_dir / "imagesTr" / name)).GetSpacing(), b.ACDC_SPACING)
    assert dtypes == {"int16", "float32", "uint8"}
    meta = load_json(res.dataset_dir / "case_metadata.json")["training"]
    assert meta["patient002_frame04"]["phase"] == "ED" and meta["patient002_frame11"]["phase"] == "ES"


def test_acdc_split_groups_frames(converted):
    res = converted.res["acdc"]
    splits = load_json(res.splits_file)
    for fold in splits:
        val_patients = {c.split("_")[0] for c in fold["val"]}
        assert len(fold["val"]) == 2 * len(val_patients)  # both frames of each validation patient
        assert not val_patients & {c.split("_")[0] for c in fold["train"]}


# ------------------------------------------------------------------------------------------ BraTS
@pytest.mark.parametrize("key", ["brats2019", "brats2020"])
def test_brats_channels_labels_regions(converted, key):
    res = converted.res[key]
    train_root = converted.src[key] if key == "brats2019" else converted.src[key] / "MICCAI_BraTS2020_TrainingData"
    ds = load_json(res.dataset_dir / "dataset.json")
    assert ds["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "Flair"}
    assert ds["labels"] == {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3],
                            "enhancing tumor": [3]}
    assert ds["regions_class_order"] == [1, 2, 3]
    case_dirs = {p.name: p for p in train_root.rglob("BraTS*_*") if p.is_dir()}
    assert sorted(case_dirs) == sorted(load_json(res.dataset_dir / "case_metadata.json")["training"])
    for cid, cdir in case_dirs.items():
        for k, mod in enumerate(["t1", "t1ce", "t2", "flair"]):
            img = sitk_array(res.dataset_dir / "imagesTr" / f"{cid}_{k:04d}.nii.gz")
            lo = b.MODALITY_OFFSET[mod]
            assert lo <= img.min() and img.max() < lo + 50, (cid, mod)  # channel picked by suffix
        seg_src = next(p for p in cdir.iterdir() if "seg" in p.name.lower())
        src = sitk_array(seg_src)
        out_img = sitk.ReadImage(str(res.dataset_dir / "labelsTr" / f"{cid}.nii.gz"))
        out = sitk.GetArrayFromImage(out_img)
        assert set(np.unique(src)) == {0, 1, 2, 4}
        expected = np.select([src == 2, src == 1, src == 4], [1, 2, 3], default=0)
        np.testing.assert_array_equal(out, expected)
        # BraTS LPS geometry kept
        assert np.allclose(out_img.GetOrigin(), (0, -239, 0)) and np.allclose(out_img.GetDirection(), np.eye(3).ravel())
    if key == "brats2019":
        grades = load_json(res.dataset_dir / "case_metadata.json")["training"]
        assert {c: g["grade"] for c, g in grades.items()} == {
            c: d.parent.name for c, d in case_dirs.items()}
        surv = [g["survival"] for g in grades.values() if g["survival"]]
        assert len(surv) == 1 and surv[0]["Age"] == "60.5"
        assert (res.dataset_dir / "grades.csv").read_text().count("HGG") == 3
    else:
        grades = load_json(res.dataset_dir / "case_metadata.json")["training"]
        assert grades["BraTS20_Training_001"]["grade"] == "HGG"  # from name_mapping.csv
        assert grades["BraTS20_Training_002"]["grade"] == "LGG"
        assert sorted(p.name for p in (res.dataset_dir / "imagesTs").iterdir()) == [
            f"BraTS20_Validation_001_{k:04d}.nii.gz" for k in range(4)]
        # the uncompressed quirk case was gzip-compressed without changing its bytes
        import gzip
        raw = (train_root / "BraTS20_Training_005" / "BraTS20_Training_005_t1ce.nii").read_bytes()
        with gzip.open(res.dataset_dir / "imagesTr" / "BraTS20_Training_005_0001.nii.gz") as f:
            assert f.read() == raw


# --------------------------------------------------------------------------------------- Prostate
def test_prostate_split_channels_and_geometry(converted):
    res, src = converted.res["prostate"], converted.src["prostate"]
    ds = load_json(res.dataset_dir / "dataset.json")
    assert ds["channel_names"] == {"0": "T2", "1": "ADC"}
    assert ds["labels"] == {"background": 0, "PZ": 1, "TZ": 2}
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        assert not any(p.name.startswith(".") for p in (res.dataset_dir / folder).iterdir())
    assert res.num_training == 5 and res.num_test == 2
    for k in range(5):
        cid = f"prostate_{k:02d}"
        src_img = nib.load(src / "imagesTr" / f"{cid}.nii.gz")
        src_arr = np.asarray(src_img.dataobj)
        for ch in range(2):
            out = nib.load(res.dataset_dir / "imagesTr" / f"{cid}_{ch:04d}.nii.gz")
            np.testing.assert_array_equal(np.asarray(out.dataobj), src_arr[..., ch])
            # oblique affine kept (nibabel, independent of SimpleITK)
            assert np.allclose(out.affine, src_img.affine, atol=1e-4)
        assert filecmp.cmp(res.dataset_dir / "labelsTr" / f"{cid}.nii.gz", src / "labelsTr" / f"{cid}.nii.gz",
                           shallow=False)
    no_pz = sitk_array(res.dataset_dir / "labelsTr" / "prostate_01.nii.gz")
    assert set(np.unique(no_pz)) == {0, 2}


# ------------------------------------------------------------------------------------------ FLARE
@pytest.mark.parametrize("scheme", list(b.FLARE_SCHEMES))
def test_flare_schemes(converted, scheme):
    res, src = converted.res[scheme], converted.src[scheme]
    img_dir, lab_dir, img_pat, lab_pat, tests = b.FLARE_SCHEMES[scheme]
    ds = load_json(res.dataset_dir / "dataset.json")
    rel = 22 if scheme == "flare22" else 21
    assert res.dataset_name == f"Dataset{IDS[scheme]:03d}_FLARE{rel}"
    assert ds["channel_names"] == {"0": "CT"}
    expected_labels = 13 if rel == 22 else 4
    assert sorted(ds["labels"].values()) == list(range(expected_labels + 1))
    if rel == 22:
        assert ds["labels"]["left kidney"] == 13 and ds["labels"]["right kidney"] == 2
    else:
        assert ds["labels"] == {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4}
    for k in range(1, 6):
        cid = lab_pat.format(k=k)
        assert filecmp.cmp(res.dataset_dir / "imagesTr" / f"{cid}_0000.nii.gz",
                           src / img_dir / f"{img_pat.format(k=k)}.nii.gz", shallow=False)
        assert filecmp.cmp(res.dataset_dir / "labelsTr" / f"{cid}.nii.gz",
                           src / lab_dir / f"{lab_pat.format(k=k)}.nii.gz", shallow=False)
    expected_ts = sorted(f"{pat.format(k=1)}.nii.gz" if pat.endswith("_0000") else f"{pat.format(k=1)}_0000.nii.gz"
                         for pat in tests.values())
    assert sorted(p.name for p in (res.dataset_dir / "imagesTs").iterdir()) == expected_ts
