"""FLARE21 / FLARE22 (abdominal CT organs) -> nnU-Net v2 raw ``DatasetXXX_FLARE21`` / ``_FLARE22``.

Accepted layouts (``SOURCE`` is the unpacked download folder):

- FLARE21, official: ``TrainingImg/train_NNN_0000.nii.gz`` + ``TrainingMask/train_NNN.nii.gz``;
  test images in ``ValidationImg/`` and ``TestImg/``.
- FLARE21, nnU-Net-like: ``imagesTr/train_NNN.nii.gz`` (no ``_0000``) + ``labelsTr/train_NNN.nii.gz``;
  test images in ``imagesTs/``, ``ValidationImg/``, ``TestImg/``.
- FLARE21, 4-digit: ``TrainImage/train_NNNN_0000.nii.gz`` + ``TrainMask/train_NNNN.nii.gz``; test
  images in ``ValidationImg/``, ``TestImg/``, ``ValImage/``, ``TestImage/``.
- FLARE22: ``Training/FLARE22_LabeledCase50/images/FLARE22_Tr_NNNN_0000.nii.gz`` +
  ``Training/FLARE22_LabeledCase50/labels/FLARE22_Tr_NNNN.nii.gz`` (or ``FLARE22_LabeledCase50/``
  itself as SOURCE); test images in ``Tuning/`` and ``Testing/`` (their ``images/`` sub-folder if
  present, else the folder itself; labels there are not used). Unlabelled cases are ignored.

Test images go to ``imagesTs``. The case id is the file name without ``.nii.gz``/``.nii`` and
without a trailing ``_0000``. Images and labels are copied byte for byte (``.nii`` sources are gzip-compressed). The release (which
fixes the label set) is detected from the layout (FLARE22 if ``FLARE22_LabeledCase50`` exists or
the training files start with ``FLARE22``), unless given as ``release``.

Labels: FLARE21 liver 1, kidney 2, spleen 3, pancreas 4. FLARE22 liver 1, right kidney 2,
spleen 3, pancreas 4, aorta 5, inferior vena cava 6, right adrenal gland 7, left adrenal gland 8,
gallbladder 9, esophagus 10, stomach 11, duodenum 12, left kidney 13. One channel ``CT``
(nnU-Net's CT normalisation). Each case is its own patient in ``splits_final.json``.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from ._common import (DEFAULT_SPLIT_SEED, ConversionError, ConversionResult, StagedDataset,
                      check_3d_scalar, check_case_id, check_label_values, check_same_geometry, copy_nifti,
                      list_nifti,
                      pair_by_case_id, patient_wise_splits, read_image, strip_nifti_suffix, write_json)

LABELS = {
    21: {"background": 0, "liver": 1, "kidney": 2, "spleen": 3, "pancreas": 4},
    22: {"background": 0, "liver": 1, "right kidney": 2, "spleen": 3, "pancreas": 4, "aorta": 5,
         "inferior vena cava": 6, "right adrenal gland": 7, "left adrenal gland": 8, "gallbladder": 9,
         "esophagus": 10, "stomach": 11, "duodenum": 12, "left kidney": 13},
}
CHANNELS = {0: "CT"}

#: (training images, training labels, test image folders), relative to SOURCE, in detection order
LAYOUTS = [
    ("Training/FLARE22_LabeledCase50/images", "Training/FLARE22_LabeledCase50/labels",
     ["Tuning/images", "Tuning", "Testing/images", "Testing"]),
    ("FLARE22_LabeledCase50/images", "FLARE22_LabeledCase50/labels", []),
    ("TrainingImg", "TrainingMask", ["ValidationImg", "TestImg"]),
    ("imagesTr", "labelsTr", ["imagesTs", "ValidationImg", "TestImg"]),
    ("TrainImage", "TrainMask", ["ValidationImg", "TestImg", "ValImage", "TestImage"]),
]

_CHANNEL = re.compile(r"_(\d{4})$")


def parse_release(release) -> int | None:
    """``None``, 21/22, '21', 'FLARE21', '2021', ... -> 21 / 22 / None."""
    if release is None:
        return None
    s = str(release).upper().replace("FLARE", "").strip()
    table = {"21": 21, "2021": 21, "22": 22, "2022": 22}
    if s not in table:
        raise ConversionError(f"unknown FLARE release {release!r}: use 21 or 22")
    return table[s]


def find_layout(source: Path) -> tuple[Path, Path, list[Path]]:
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"FLARE source folder not found: {source}")
    for img, lab, tests in LAYOUTS:
        if (source / img).is_dir() and (source / lab).is_dir():
            test_dirs = []
            for t in tests:
                d = source / t
                # 'Tuning' itself only when it has no images/ sub-folder (else that one is used)
                if d.is_dir() and not (d / "images").is_dir() and list_nifti(d):
                    test_dirs.append(d)
            return source / img, source / lab, test_dirs
    for img, lab, _ in LAYOUTS:
        if (source / img).is_dir() != (source / lab).is_dir():
            present, absent = (img, lab) if (source / img).is_dir() else (lab, img)
            raise ConversionError(f"{source / present} exists but {source / absent} is missing")
    raise ConversionError(
        f"no FLARE layout found in {source}: expected one of "
        + ", ".join(f"{i}/ + {l}/" for i, l, _ in LAYOUTS))


def _case_ids(files: list[Path], kind: str) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for f in files:
        stem = strip_nifti_suffix(f.name)
        m = _CHANNEL.search(stem)
        if kind == "image" and m:
            if m.group(1) != "0000":
                raise ConversionError(f"unexpected channel file {f}: FLARE has a single CT channel (_0000)")
            stem = stem[: -5]
        check_case_id(stem, f)
        if stem in out:
            raise ConversionError(f"duplicate case id {stem}: {out[stem]} and {f}")
        out[stem] = f
    return out


def detect_release(img_dir: Path) -> int:
    if "FLARE22_LabeledCase50" in img_dir.parts or any(f.name.startswith("FLARE22") for f in list_nifti(img_dir)):
        return 22
    return 21


def convert_flare(source: str | Path, dataset_id: int, overwrite: bool = False, release=None, *,
                  raw_root=None, preprocessed_root=None, seed: int = DEFAULT_SPLIT_SEED,
                  progress: bool = True) -> ConversionResult:
    """Convert a FLARE21/FLARE22 download; see the module docstring."""
    source = Path(source)
    img_dir, lab_dir, test_dirs = find_layout(source)
    rel = parse_release(release) or detect_release(img_dir)
    labels = LABELS[rel]
    images = _case_ids(list_nifti(img_dir), "image")
    segs = _case_ids(list_nifti(lab_dir), "label")
    train_ids = pair_by_case_id(images, segs, where=str(source))
    if not train_ids:
        raise ConversionError(f"no training images in {img_dir}")
    test: dict[str, Path] = {}
    for d in test_dirs:
        for cid, f in _case_ids(list_nifti(d), "image").items():
            if cid in test or cid in images:
                raise ConversionError(f"duplicate case id {cid}: {test.get(cid, images.get(cid))} and {f}")
            test[cid] = f
    split = patient_wise_splits({c: c for c in train_ids}, seed=seed)

    with StagedDataset(dataset_id, f"FLARE{rel}", overwrite, raw_root=raw_root,
                       preprocessed_root=preprocessed_root, source=source) as st:
        for cid in tqdm(train_ids, desc=f"FLARE{rel} training cases", disable=not progress):
            img = read_image(images[cid])
            check_3d_scalar(img, images[cid])
            lab = read_image(segs[cid])
            check_same_geometry(img, images[cid], lab, segs[cid])
            check_label_values(lab, labels.values(), segs[cid])
            copy_nifti(images[cid], st.imagesTr / f"{cid}_0000.nii.gz")
            copy_nifti(segs[cid], st.labelsTr / f"{cid}.nii.gz")
        for cid in tqdm(sorted(test), desc=f"FLARE{rel} test cases", disable=not progress or not test):
            img = read_image(test[cid])
            if img.GetDimension() != 3:
                raise ConversionError(f"{test[cid]} is not a 3D image")
            copy_nifti(test[cid], st.imagesTs / f"{cid}_0000.nii.gz")
        generate_dataset_json(
            str(st.root), channel_names=dict(CHANNELS), labels=dict(labels),
            num_training_cases=len(train_ids), file_ending=".nii.gz", dataset_name=st.name,
            reference="https://flare.grand-challenge.org/" if rel == 21 else "https://flare22.grand-challenge.org/",
            license="see the FLARE challenge data terms",
            description=f"FLARE{rel} abdominal CT; images and labels copied byte for byte",
            converted_by="nnunet-calibration calib-convert flare")
        write_json({"release": f"FLARE{rel}",
                    "training": {c: {"source": str(images[c].relative_to(source)),
                                     "label_source": str(segs[c].relative_to(source))} for c in train_ids},
                    "test": {c: {"source": str(test[c].relative_to(source))} for c in sorted(test)}},
                   st.root / "case_metadata.json")
        st.commit(split)
    return ConversionResult(st.target, st.splits_file, len(train_ids), len(test), st.name,
                            extra={"release": rel})
