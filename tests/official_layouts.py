"""Builders of tiny fixtures that mimic the official ACDC, FLARE21/22, BraTS and MSD-Prostate layouts
and their header quirks (used by the dataset_conversion tests).

- ACDC: qform_code 0, sform_code 2 with an *unscaled* sform diag(-1, -1, 1) and the true spacing only
  in pixdim (written with nibabel, as ITK/SimpleITK cannot write such a header); image dtypes int16,
  float32, uint8 by patient; ``patientNNN_4d.nii.gz`` present; ED not always frame 01.
- BraTS: the BraTS header (RAS affine diag(-1, -1, 1), offset (0, 239, 0), i.e. LPS direction
  identity and origin (0, -239, 0)), 1 mm isotropic, labels 0/1/2/4. Arrays are 24x24x16 instead of
  240x240x155 to keep nnU-Net's verification fast. Each modality has its own intensity offset so the
  channel order can be checked.
- MSD prostate: 4D (x, y, z, 2) float32 with an oblique affine (T2 in channel 0, ADC in 1), 3D labels
  on the same grid, ``._*`` AppleDouble junk files.
- FLARE: CT int16 volumes in the three FLARE21 naming schemes and the FLARE22 layout.

:func:`check_split` checks a splits_final.json content against a case -> patient map.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk

ACDC_SPACING = (1.5625, 1.5625, 10.0)
ACDC_DTYPES = (np.int16, np.float32, np.uint8)
MODALITY_OFFSET = {"t1": 100, "t1ce": 300, "t2": 500, "flair": 700}


def _blobs(shape, n_labels, rng, values=None):
    """Background with a central box split into one contiguous chunk per label value (all present)."""
    values = list(range(1, n_labels + 1)) if values is None else list(values)
    lab = np.zeros(shape, np.uint8)
    sl = tuple(slice(max(1, s // 5) + int(rng.integers(0, 2)), s - max(1, s // 5)) for s in shape)
    box = lab[sl]
    flat = np.repeat(np.asarray(values, np.uint8), int(np.ceil(box.size / len(values))))[: box.size]
    lab[sl] = flat.reshape(box.shape)
    return lab


# ---------------------------------------------------------------------------------------- ACDC
def write_acdc_nifti(path: Path, arr: np.ndarray, spacing=ACDC_SPACING) -> None:
    """ACDC's header: qform_code 0, sform_code 2, unscaled sform diag(-1, -1, 1), spacing in pixdim."""
    h = nib.Nifti1Header()
    h.set_data_dtype(arr.dtype)
    img = nib.Nifti1Image(arr, None, header=h)
    img.header.set_zooms(tuple(spacing) + (1.0,) * (arr.ndim - 3))
    img.header.set_sform(np.diag([-1.0, -1.0, 1.0, 1.0]), code=2)
    img.header["qform_code"] = 0
    img.header["quatern_d"] = 1.0
    nib.save(img, str(path))


def acdc_image(shape, dtype, rng) -> np.ndarray:
    arr = rng.normal(100, 30, size=shape).clip(0, 250)
    return arr.astype(dtype)


def make_acdc(root: Path, n_patients: int = 5, n_test: int = 1, first_id: int = 1, shape=(20, 24, 4),
              nested_testing: bool = True, seed: int = 0) -> Path:
    """``root/database/{training,testing}/patientNNN/``; returns ``root``. Patient 2 has ED at
    frame 04 (like the real patient090)."""
    rng = np.random.default_rng(seed)
    train = root / "database" / "training"
    test = root / "database" / "testing" / ("testing" if nested_testing else "")
    for k in range(n_patients + n_test):
        pid = f"patient{first_id + k:03d}"
        is_train = k < n_patients
        pdir = (train if is_train else test) / pid
        pdir.mkdir(parents=True)
        ed, es = (4, 11) if k == 1 else (1, 8 + k % 3)
        (pdir / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 170.0\nNbFrame: 20\nWeight: 70.0\n")
        dtype = ACDC_DTYPES[k % len(ACDC_DTYPES)]
        shp = (shape[0] + 2 * (k % 2), shape[1], shape[2])
        for fr in (ed, es):
            write_acdc_nifti(pdir / f"{pid}_frame{fr:02d}.nii.gz", acdc_image(shp, dtype, rng))
            if is_train:
                write_acdc_nifti(pdir / f"{pid}_frame{fr:02d}_gt.nii.gz", _blobs(shp, 3, rng))
        # the cine volume (skipped by the converter)
        write_acdc_nifti(pdir / f"{pid}_4d.nii.gz", acdc_image(shp + (3,), dtype, rng))
    return root


# ---------------------------------------------------------------------------------------- BraTS
def write_brats_nifti(path: Path, arr: np.ndarray) -> None:
    """BraTS header: RAS affine diag(-1, -1, 1) with offset (0, 239, 0), codes 1 (LPS identity)."""
    aff = np.diag([-1.0, -1.0, 1.0, 1.0])
    aff[1, 3] = 239.0
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def brats_case(case_dir: Path, cid: str, rng, shape=(24, 24, 16), seg_name: str | None = None,
               with_seg: bool = True, labels=(1, 2, 4), ext=".nii.gz") -> None:
    case_dir.mkdir(parents=True)
    mods = list(MODALITY_OFFSET)
    rng.shuffle(mods)  # creation order must not matter
    for mod in mods:
        arr = (MODALITY_OFFSET[mod] + rng.integers(0, 50, size=shape)).astype(np.int16)
        write_brats_nifti(case_dir / f"{cid}_{mod}{ext}", arr)
    if with_seg:
        seg = _blobs(shape, 3, rng, values=labels)
        write_brats_nifti(case_dir / (seg_name or f"{cid}_seg{ext}"), seg)


def make_brats(root: Path, release: int = 2019, n: int = 5, seed: int = 0, with_validation: bool = False) -> Path:
    """Returns the folder to pass as SOURCE."""
    rng = np.random.default_rng(seed)
    ids, grades = [], []
    if release == 2019:
        train = root / "MICCAI_BraTS_2019_Data_Training"
        for k in range(n):
            grade = "HGG" if k % 2 == 0 else "LGG"
            cid = f"BraTS19_TCIA{k:02d}_{100 + k}_1"
            brats_case(train / grade / cid, cid, rng)
            ids.append(cid)
            grades.append(grade)
        (train / "HGG" / ".DS_Store").write_bytes(b"\x00junk")
        (train / "LGG" / "notes").mkdir()  # not a BraTS19_* folder: ignored
        with open(train / "name_mapping.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                        "BraTS_2019_subject_ID"])
            for cid, g in zip(ids, grades):
                w.writerow([g, "NA", "NA", "TCGA-XX", cid])
        with open(train / "survival_data.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["BraTS19ID", "Age", "Survival", "ResectionStatus"])
            w.writerow([ids[0], "60.5", "300", "GTR"])
        return train if not with_validation else root
    if release == 2020:
        train = root / "MICCAI_BraTS2020_TrainingData"
        for k in range(n):
            cid = f"BraTS20_Training_{k + 1:03d}"
            # the real BraTS20_Training_355 quirk: uncompressed files, segmentation with another name
            quirk = k == n - 1
            brats_case(train / cid, cid, rng, seg_name="W39_1998.09.19_Segm.nii" if quirk else None,
                       ext=".nii" if quirk else ".nii.gz")
            ids.append(cid)
            grades.append("HGG" if k % 2 == 0 else "LGG")
        with open(train / "name_mapping.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["Grade", "BraTS_2017_subject_ID", "BraTS_2018_subject_ID", "TCGA_TCIA_subject_ID",
                        "BraTS_2019_subject_ID", "BraTS_2020_subject_ID"])
            for cid, g in zip(ids, grades):
                w.writerow([g, "NA", "NA", "NA", "NA", cid])
        if with_validation:
            val = root / "MICCAI_BraTS2020_ValidationData"
            brats_case(val / "BraTS20_Validation_001", "BraTS20_Validation_001", rng, with_seg=False)
        return root if with_validation else train
    if release == 2021:
        for k in range(n):
            cid = f"BraTS2021_{k:05d}"
            brats_case(root / cid, cid, rng)
        return root
    raise ValueError(release)


# ---------------------------------------------------------------------------------------- prostate
def oblique_affine(spacing=(0.6, 0.6, 3.6), angles=(10.0, -20.0, 30.0), offset=(-50.0, 20.0, -30.0)):
    a, b, c = np.deg2rad(angles)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    aff[:3, 3] = offset
    return aff


def write_nib(path: Path, arr: np.ndarray, aff: np.ndarray) -> None:
    img = nib.Nifti1Image(arr, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    img.header.set_xyzt_units("mm", "sec")
    nib.save(img, str(path))


def make_prostate(root: Path, n: int = 5, n_test: int = 2, shape=(20, 18, 6), seed: int = 0) -> Path:
    """``root/Task05_Prostate``; case 1 has no PZ (label 1)."""
    rng = np.random.default_rng(seed)
    src = root / "Task05_Prostate"
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (src / sub).mkdir(parents=True)
        (src / sub / "._prostate_00.nii.gz").write_bytes(b"\x00\x05\x16\x07Mac OS X        ")
    training = []
    for k in range(n + n_test):
        cid = f"prostate_{k:02d}"
        aff = oblique_affine(offset=(-50.0 + k, 20.0, -30.0 - k))
        t2 = rng.normal(400, 50, size=shape).astype(np.float32)
        adc = rng.normal(1500, 100, size=shape).astype(np.float32)
        img4d = np.stack([t2, adc], axis=-1)
        is_train = k < n
        write_nib(src / ("imagesTr" if is_train else "imagesTs") / f"{cid}.nii.gz", img4d, aff)
        if is_train:
            values = (2,) if k == 1 else (1, 2)
            write_nib(src / "labelsTr" / f"{cid}.nii.gz", _blobs(shape, 2, rng, values=values), aff)
            training.append({"image": f"./imagesTr/{cid}.nii.gz", "label": f"./labelsTr/{cid}.nii.gz"})
    meta = {"name": "PROSTATE", "description": "Prostate transitional zone and peripheral zone segmentation",
            "tensorImageSize": "4D", "modality": {"0": "T2", "1": "ADC"},
            "labels": {"0": "background", "1": "PZ", "2": "TZ"}, "numTraining": n, "numTest": n_test,
            "training": training,
            "test": [f"./imagesTs/prostate_{k:02d}.nii.gz" for k in range(n, n + n_test)]}
    (src / "dataset.json").write_text(json.dumps(meta, indent=4))
    return src


# ---------------------------------------------------------------------------------------- FLARE
def write_ct(path: Path, arr: np.ndarray, spacing=(0.8, 0.8, 2.5), origin=(-200.0, -180.0, -400.0)) -> None:
    img = sitk.GetImageFromArray(arr)  # arr in (z, y, x)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    sitk.WriteImage(img, str(path), useCompression=True)


FLARE_SCHEMES = {
    # name: (image dir, label dir, image name pattern, label name pattern, test dirs)
    "flare21_training_img": ("TrainingImg", "TrainingMask", "train_{k:03d}_0000", "train_{k:03d}",
                             {"ValidationImg": "validation_{k:03d}_0000", "TestImg": "test_{k:03d}_0000"}),
    "flare21_imagesTr": ("imagesTr", "labelsTr", "train_{k:03d}", "train_{k:03d}", {"imagesTs": "test_{k:03d}"}),
    "flare21_train_image": ("TrainImage", "TrainMask", "train_{k:04d}_0000", "train_{k:04d}",
                            {"ValidationImg": "validation_{k:04d}_0000"}),
    "flare22": ("Training/FLARE22_LabeledCase50/images", "Training/FLARE22_LabeledCase50/labels",
                "FLARE22_Tr_{k:04d}_0000", "FLARE22_Tr_{k:04d}",
                {"Tuning/images": "FLARE22_Tuning_{k:04d}_0000", "Testing": "FLARE22_Ts_{k:04d}_0000"}),
}


def make_flare(root: Path, scheme: str, n: int = 5, shape=(6, 20, 22), seed: int = 0) -> Path:
    """Returns SOURCE. Labels 1..4 (FLARE21) or 1..13 (FLARE22)."""
    rng = np.random.default_rng(seed)
    img_dir, lab_dir, img_pat, lab_pat, tests = FLARE_SCHEMES[scheme]
    n_labels = 13 if scheme == "flare22" else 4
    src = root / scheme
    (src / img_dir).mkdir(parents=True)
    (src / lab_dir).mkdir(parents=True)
    for k in range(1, n + 1):
        ct = rng.integers(-1000, 1000, size=shape).astype(np.int16)
        write_ct(src / img_dir / f"{img_pat.format(k=k)}.nii.gz", ct)
        write_ct(src / lab_dir / f"{lab_pat.format(k=k)}.nii.gz", _blobs(shape, n_labels, rng))
    for d, pat in tests.items():
        (src / d).mkdir(parents=True, exist_ok=True)
        write_ct(src / d / f"{pat.format(k=1)}.nii.gz", rng.integers(-1000, 1000, size=shape).astype(np.int16))
    if scheme == "flare22":  # unlabelled cases and tuning labels are not used
        (src / "Training" / "FLARE22_UnlabeledCase1-1000").mkdir(parents=True)
        write_ct(src / "Training" / "FLARE22_UnlabeledCase1-1000" / "Case_00001_0000.nii.gz",
                 np.zeros(shape, np.int16))
    return src


# ---------------------------------------------------------------------------------------- splits
def check_split(splits, case_to_patient, n_folds=5):
    """Independent checks: n folds, train/val disjoint and covering all cases in each fold, every case
    validated exactly once, and no patient split between train and val or between two val folds."""
    assert isinstance(splits, list) and len(splits) == n_folds
    all_cases = set(case_to_patient)
    val_count = {c: 0 for c in all_cases}
    patient_fold = {}
    for k, fold in enumerate(splits):
        assert set(fold) == {"train", "val"}
        tr, va = set(fold["train"]), set(fold["val"])
        assert len(tr) == len(fold["train"]) and len(va) == len(fold["val"])
        assert not tr & va
        assert tr | va == all_cases
        assert va, f"fold {k} has no validation case"
        for c in va:
            val_count[c] += 1
            p = case_to_patient[c]
            assert patient_fold.setdefault(p, k) == k, f"patient {p} in two validation folds"
        assert not {case_to_patient[c] for c in tr} & {case_to_patient[c] for c in va}
    assert all(v == 1 for v in val_count.values())
