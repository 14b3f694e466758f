"""ACDC (cardiac cine-MRI, MICCAI 2017) -> nnU-Net v2 raw dataset ``DatasetXXX_ACDC``.

Source layout (official download)::

    SOURCE/                              (the unpacked folder, or its database/, or training/ itself)
      database/training/patientNNN/Info.cfg                 ED: / ES: lines
      database/training/patientNNN/patientNNN_frameXX.nii.gz
      database/training/patientNNN/patientNNN_frameXX_gt.nii.gz
      database/training/patientNNN/patientNNN_4d.nii.gz     cine volume: skipped
      database/testing/patientNNN/...                       (2017 release: testing/testing/patientNNN)

Output:

- ``imagesTr/patientNNN_frameXX_0000.nii.gz`` and ``labelsTr/patientNNN_frameXX.nii.gz``: the ED and
  ES frames, **copied byte for byte** (ACDC's headers have qform_code 0 and an unscaled sform with
  sform_code 2, so the true spacing is only in pixdim; SimpleITK, nnU-Net's reader, takes it from
  there. Image dtypes differ between patients: int16, float32, uint8. Rewriting would risk both).
- ``imagesTs/`` (and ``labelsTs/`` when the testing folder has ``_gt`` files) for the testing patients.
- ``dataset.json``: one channel ``cineMRI``; labels background 0, RV 1, MLV 2 (myocardium), LVC 3
  (nnU-Net's own ACDC names).
- ``case_metadata.json``: per case its patient, phase (ED/ES) and frame number, and source file.
- ``$nnUNet_preprocessed/DatasetXXX_ACDC/splits_final.json``: 5 folds by *patient* (both frames of a
  patient are in the same fold), see :func:`dataset_conversion._common.patient_wise_splits`.

Frame selection: the frames named in ``Info.cfg`` (``ED:``/``ES:``) plus every frame that has a
``_gt`` file (ED is not always frame 01). Without ``Info.cfg``, training frames are those with a
``_gt`` file and testing frames are all ``frameXX`` images.
"""
from __future__ import annotations

import re
from pathlib import Path

from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from ._common import (DEFAULT_SPLIT_SEED, ConversionError, ConversionResult, StagedDataset,
                      check_3d_scalar, check_label_values, check_same_geometry, copy_nifti, is_hidden,
                      patient_wise_splits,
                      read_image, write_json)

NAME = "ACDC"
LABELS = {"background": 0, "RV": 1, "MLV": 2, "LVC": 3}
CHANNELS = {0: "cineMRI"}

_PATIENT = re.compile(r"^patient\d{3}$")


def _patient_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and _PATIENT.match(p.name))


def find_acdc_folders(source: Path) -> tuple[Path, Path | None]:
    """Return (training folder, testing folder or None) for an ACDC download."""
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"ACDC source folder not found: {source}")
    candidates = [source / "database" / "training", source / "training", source,
                  source / "ACDC" / "database" / "training"]
    training = next((c for c in candidates if c.is_dir() and _patient_dirs(c)), None)
    if training is None:
        raise ConversionError(f"no ACDC training folder (with patientNNN sub-folders) found in {source}: "
                              f"expected database/training/patientNNN/")
    testing = None
    if training != source:
        t = training.parent / "testing"
        if t.is_dir():
            if not _patient_dirs(t) and (t / "testing").is_dir():  # 2017 release nests it one level deeper
                t = t / "testing"
            testing = t if _patient_dirs(t) else None
    return training, testing


def parse_info_cfg(path: Path) -> dict[str, int]:
    """``Info.cfg`` -> ``{'ED': int, 'ES': int}`` (other keys ignored)."""
    out = {}
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    for line in text.splitlines():
        if ":" not in line:
            continue
        key, value = (s.strip() for s in line.split(":", 1))
        if key in ("ED", "ES"):
            try:
                out[key] = int(float(value))
            except ValueError as e:
                raise ConversionError(f"bad {key} line in {path}: {line!r}") from e
    if set(out) != {"ED", "ES"}:
        raise ConversionError(f"{path} lacks an ED: or ES: line (found {sorted(out)})")
    return out


def _frames(patient_dir: Path) -> tuple[dict[int, Path], dict[int, Path]]:
    pid = patient_dir.name
    rx = re.compile(rf"^{pid}_frame(\d+)(_gt)?\.nii(\.gz)?$")
    images: dict[int, Path] = {}
    labels: dict[int, Path] = {}
    for f in sorted(patient_dir.iterdir()):
        if not f.is_file() or is_hidden(f.name):
            continue
        m = rx.match(f.name)
        if not m:
            continue  # patientNNN_4d.nii.gz, Info.cfg, ...
        frame = int(m.group(1))
        target = labels if m.group(2) else images
        if frame in target:
            raise ConversionError(f"duplicate case id {pid}_frame{frame:02d}: {target[frame]} and {f}")
        target[frame] = f
    return images, labels


def _case_id(image_or_label: Path) -> str:
    name = image_or_label.name
    name = name[:-7] if name.endswith(".nii.gz") else name[:-4]
    return name[:-3] if name.endswith("_gt") else name


def collect_cases(folder: Path, with_labels: bool) -> list[dict]:
    """One dict per selected frame: case, patient, frame, phase, image, label (None for test frames
    without ``_gt``)."""
    cases = []
    for pdir in _patient_dirs(folder):
        images, labels = _frames(pdir)
        info_path = pdir / "Info.cfg"
        info = parse_info_cfg(info_path) if info_path.is_file() else {}
        phase_of = {v: k for k, v in info.items()}
        if info:
            frames = set(info.values()) | set(labels)
        elif with_labels:
            frames = set(labels)
        else:
            frames = set(images)
        if with_labels and not frames:
            raise ConversionError(f"no labelled frame (patientNNN_frameXX_gt.nii.gz) and no Info.cfg in {pdir}")
        for fr in sorted(frames):
            img, lab = images.get(fr), labels.get(fr)
            if img is None:
                if lab is not None:
                    raise ConversionError(f"label file without image: {lab} (no {pdir.name}_frame{fr:02d}.nii.gz)")
                raise ConversionError(f"missing image for frame {fr} ({phase_of.get(fr, '?')}) listed in "
                                      f"{info_path}: no {pdir / f'{pdir.name}_frame{fr:02d}.nii.gz'}")
            if with_labels and lab is None:
                raise ConversionError(f"image without label file: {img} (no {pdir.name}_frame{fr:02d}_gt.nii.gz)")
            cases.append(dict(case=_case_id(img), patient=pdir.name, frame=fr, phase=phase_of.get(fr),
                              image=img, label=lab))
        # a _gt file whose frame was not selected cannot happen (labels are always selected)
    ids = [c["case"] for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ConversionError(f"duplicate case ids in {folder}: {dup}")
    return cases


def _check_and_copy(case: dict, images_dir: Path, labels_dir: Path | None) -> None:
    img = read_image(case["image"])
    check_3d_scalar(img, case["image"])
    if case["label"] is not None:
        lab = read_image(case["label"])
        check_same_geometry(img, case["image"], lab, case["label"])
        check_label_values(lab, LABELS.values(), case["label"])
    copy_nifti(case["image"], images_dir / f"{case['case']}_0000.nii.gz")
    if case["label"] is not None and labels_dir is not None:
        copy_nifti(case["label"], labels_dir / f"{case['case']}.nii.gz")


def convert_acdc(source: str | Path, dataset_id: int, overwrite: bool = False, *, raw_root=None,
                 preprocessed_root=None, seed: int = DEFAULT_SPLIT_SEED, progress: bool = True
                 ) -> ConversionResult:
    """Convert an ACDC download; see the module docstring. Raises :class:`ConversionError` on bad input
    (nothing is written then)."""
    training, testing = find_acdc_folders(Path(source))
    train_cases = collect_cases(training, with_labels=True)
    test_cases = collect_cases(testing, with_labels=False) if testing is not None else []
    split = patient_wise_splits({c["case"]: c["patient"] for c in train_cases}, seed=seed)

    with StagedDataset(dataset_id, NAME, overwrite, raw_root=raw_root,
                       preprocessed_root=preprocessed_root, source=source) as st:
        labels_ts = st.root / "labelsTs"
        for c in tqdm(train_cases, desc="ACDC training frames", disable=not progress):
            _check_and_copy(c, st.imagesTr, st.labelsTr)
        if any(c["label"] is not None for c in test_cases):
            labels_ts.mkdir()
        for c in tqdm(test_cases, desc="ACDC testing frames", disable=not progress):
            _check_and_copy(c, st.imagesTs, labels_ts)
        generate_dataset_json(
            str(st.root), channel_names=dict(CHANNELS), labels=dict(LABELS),
            num_training_cases=len(train_cases), file_ending=".nii.gz", dataset_name=st.name,
            reference="https://www.creatis.insa-lyon.fr/Challenge/acdc/",
            license="ACDC terms of use (non-commercial research); cite Bernard et al., IEEE TMI 37(11), 2018",
            description="ACDC cine-MRI, ED and ES frames; images and labels copied byte for byte",
            converted_by="nnunet-calibration calib-convert acdc")

        def meta(c, root):
            return {"patient": c["patient"], "phase": c["phase"], "frame": c["frame"],
                    "source": str(Path(c["image"]).relative_to(root))}

        write_json({"training": {c["case"]: meta(c, training) for c in train_cases},
                    "test": {c["case"]: meta(c, testing) for c in test_cases}},
                   st.root / "case_metadata.json")
        st.commit(split)
    return ConversionResult(st.target, st.splits_file, len(train_cases), len(test_cases), st.name)
