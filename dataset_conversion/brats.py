"""BraTS 2019 / 2020 / 2021 (glioma MRI) -> nnU-Net v2 raw ``DatasetXXX_BraTS2019`` (or 2020/2021).

Accepted layouts (``SOURCE`` is the training folder or a folder holding it):

- 2019: ``MICCAI_BraTS_2019_Data_Training/{HGG,LGG}/BraTS19_*/BraTS19_*_{t1,t1ce,t2,flair,seg}.nii.gz``
  with ``name_mapping.csv`` and ``survival_data.csv`` beside ``HGG``/``LGG``.
- 2020: ``MICCAI_BraTS2020_TrainingData/BraTS20_Training_NNN/...`` (no HGG/LGG level; the grade is in
  ``name_mapping.csv``; the one segmentation not named ``*_seg`` — ``W39_1998.09.19_Segm.nii`` in
  BraTS20_Training_355 — is found as the single remaining file with "seg" in its name).
- 2021: ``BraTS2021_NNNNN/BraTS2021_NNNNN_{t1,t1ce,t2,flair,seg}.nii.gz`` (no grade).

If ``SOURCE`` holds a folder named ``*Training*`` that one is used, and a sibling ``*Validation*``
folder (cases without labels) goes to ``imagesTs``. Only case folders named ``BraTS19_*``,
``BraTS20_*`` or ``BraTS2021_*`` are visited (one release per conversion; detected, or given as
``release``); modalities are picked by file-name suffix, never by order.

Output (nnU-Net's BraTS convention, as in nnunetv2's Dataset137_BraTS21 converter):

- channels ``_0000`` T1, ``_0001`` T1ce, ``_0002`` T2, ``_0003`` Flair, copied byte for byte;
- labels remapped to consecutive values: 0 background, 2 (edema) -> 1, 1 (NCR/NET) -> 2,
  4 (enhancing tumour) -> 3, written with SimpleITK on the same grid (uint8). Any value outside
  {0, 1, 2, 4} is an error;
- ``dataset.json`` with regions: whole tumour (1, 2, 3), tumour core (2, 3), enhancing tumour (3,),
  ``regions_class_order`` (1, 2, 3), so nnU-Net trains region-based;
- ``case_metadata.json``: per case ``grade`` (HGG/LGG from the folder or ``name_mapping.csv``, else
  null), the source folder, and the row of ``survival_data.csv`` if any; ``grades.csv`` (case,grade)
  for quick use;
- ``splits_final.json``: each case is its own patient.
"""
from __future__ import annotations

import csv
import re
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from ._common import (DEFAULT_SPLIT_SEED, ConversionError, ConversionResult, StagedDataset,
                      check_label_values, check_same_geometry, copy_nifti, is_hidden, list_nifti,
                      patient_wise_splits, read_image, write_json)

MODALITIES = ("t1", "t1ce", "t2", "flair")  # output channel order
CHANNELS = {0: "T1", 1: "T1ce", 2: "T2", 3: "Flair"}
BRATS_LABELS = (0, 1, 2, 4)
#: BraTS label -> nnU-Net label (nnunetv2 Dataset137_BraTS21 convention)
REMAP = {0: 0, 2: 1, 1: 2, 4: 3}
REGIONS = {"background": 0, "whole tumor": (1, 2, 3), "tumor core": (2, 3), "enhancing tumor": (3,)}
REGIONS_CLASS_ORDER = (1, 2, 3)
PREFIXES = {2019: "BraTS19_", 2020: "BraTS20_", 2021: "BraTS2021_"}


def parse_release(release) -> int | None:
    if release is None:
        return None
    s = str(release).upper().replace("BRATS", "").strip()
    table = {"19": 2019, "2019": 2019, "20": 2020, "2020": 2020, "21": 2021, "2021": 2021}
    if s not in table:
        raise ConversionError(f"unknown BraTS release {release!r}: use 2019, 2020 or 2021")
    return table[s]


def _release_of(name: str) -> int | None:
    for rel, prefix in PREFIXES.items():
        if name.startswith(prefix):
            return rel
    return None


def _case_dirs(folder: Path) -> list[tuple[Path, str | None]]:
    """(case folder, grade) for every BraTS* case folder in ``folder`` or its HGG/LGG sub-folders."""
    out = []
    for grade in ("HGG", "LGG"):
        if (folder / grade).is_dir():
            out += [(p, grade) for p in sorted((folder / grade).iterdir())
                    if p.is_dir() and _release_of(p.name)]
    out += [(p, None) for p in sorted(folder.iterdir()) if p.is_dir() and _release_of(p.name)]
    return out


def find_brats_folders(source: Path) -> tuple[Path, Path | None]:
    source = Path(source)
    if not source.is_dir():
        raise ConversionError(f"BraTS source folder not found: {source}")
    if _case_dirs(source):
        return source, None
    subs = [p for p in sorted(source.iterdir()) if p.is_dir() and not is_hidden(p.name)]
    train = [p for p in subs if "training" in p.name.lower() and _case_dirs(p)]
    if len(train) != 1:
        raise ConversionError(
            f"no BraTS training folder found in {source}: expected BraTS19_*/BraTS20_*/BraTS2021_* case "
            f"folders (2019: inside HGG/ and LGG/) there or in one *Training* sub-folder"
            + (f"; found several: {[p.name for p in train]}" if train else ""))
    val = [p for p in subs if "validation" in p.name.lower() and _case_dirs(p)]
    return train[0], (val[0] if len(val) == 1 else None)


def find_modalities(case_dir: Path, need_seg: bool) -> dict[str, Path]:
    """Map t1/t1ce/t2/flair/seg -> file by name suffix (``_t1.nii.gz`` etc.)."""
    files = list_nifti(case_dir)
    found: dict[str, Path] = {}
    for mod in MODALITIES + ("seg",):
        hits = [f for f in files if re.search(rf"_{mod}\.nii(\.gz)?$", f.name, flags=re.IGNORECASE)]
        if len(hits) > 1:
            raise ConversionError(f"several {mod} files in {case_dir}: {[h.name for h in hits]}")
        if hits:
            found[mod] = hits[0]
    if "seg" not in found:
        rest = [f for f in files if f not in found.values() and "seg" in f.name.lower()]
        if len(rest) == 1:
            found["seg"] = rest[0]
    missing = [m for m in MODALITIES if m not in found]
    if missing:
        raise ConversionError(f"missing modality {', '.join(missing)} in {case_dir}: expected "
                              f"{case_dir.name}_{missing[0]}.nii.gz (found {[f.name for f in files]})")
    if need_seg and "seg" not in found:
        raise ConversionError(f"image without label file: {found['t1']} (no {case_dir.name}_seg.nii.gz in "
                              f"{case_dir})")
    if not need_seg:
        found.pop("seg", None)
    return found


def _read_csv_rows(path: Path) -> list[dict]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            return list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e


def _csv_lookup(folder: Path, name: str, case_ids: set[str]) -> dict[str, dict]:
    """Rows of ``folder/name`` (or its parent's) keyed by whichever cell equals a case id."""
    for d in (folder, folder.parent):
        if (d / name).is_file():
            out = {}
            for row in _read_csv_rows(d / name):
                for v in row.values():
                    if isinstance(v, str) and v.strip() in case_ids:
                        out[v.strip()] = {k: v2 for k, v2 in row.items() if k is not None}
            return out
    return {}


def remap_labels(arr: np.ndarray) -> np.ndarray:
    out = np.zeros(arr.shape, dtype=np.uint8)
    for src, dst in REMAP.items():
        out[arr == src] = dst
    return out


def _collect(train_root: Path, val_root: Path | None, release) -> tuple:
    """The release, the training cases ``(id, folder, grade, files)`` and the validation cases ``(id, folder,
    files)`` of one release, with duplicate ids and missing files as errors."""
    rel = parse_release(release)
    dirs = _case_dirs(train_root)
    releases = sorted({_release_of(p.name) for p, _ in dirs})
    if rel is None:
        if len(releases) > 1:
            raise ConversionError(f"case folders of several BraTS releases in {train_root} "
                                  f"({[PREFIXES[r] + '*' for r in releases]}): choose one with --release")
        rel = releases[0]
    dirs = [(p, g) for p, g in dirs if p.name.startswith(PREFIXES[rel])]
    if not dirs:
        raise ConversionError(f"no {PREFIXES[rel]}* case folders in {train_root}")
    seen: dict[str, Path] = {}
    for p, _ in dirs:
        if p.name in seen:
            raise ConversionError(f"duplicate case id {p.name}: {seen[p.name]} and {p}")
        seen[p.name] = p
    cases = [(p.name, p, g, find_modalities(p, need_seg=True)) for p, g in dirs]
    test = []
    if val_root is not None:
        for p, _ in _case_dirs(val_root):
            if p.name.startswith(PREFIXES[rel]):
                if p.name in seen or any(t[0] == p.name for t in test):
                    raise ConversionError(f"duplicate case id {p.name}: {p}")
                test.append((p.name, p, find_modalities(p, need_seg=False)))
    return rel, cases, test


def _write_case(st, cid: str, files: dict, training: bool) -> None:
    """One case's images (copied byte for byte) and, for training, its remapped label map; every file's
    geometry checked against the T1 image."""
    ref = read_image(files["t1"])
    for mod in MODALITIES[1:]:
        check_same_geometry(ref, files["t1"], read_image(files[mod]), files[mod])
    if training:
        seg = read_image(files["seg"])
        check_same_geometry(ref, files["t1"], seg, files["seg"])
        arr = check_label_values(seg, BRATS_LABELS, files["seg"])
        out = sitk.GetImageFromArray(remap_labels(arr))
        out.CopyInformation(seg)
        sitk.WriteImage(out, str(st.labelsTr / f"{cid}.nii.gz"), useCompression=True)
    folder = st.imagesTr if training else st.imagesTs
    for k, mod in enumerate(MODALITIES):
        copy_nifti(files[mod], folder / f"{cid}_{k:04d}.nii.gz")


def convert_brats(source: str | Path, dataset_id: int, overwrite: bool = False, release=None, *,
                  raw_root=None, preprocessed_root=None, seed: int = DEFAULT_SPLIT_SEED,
                  progress: bool = True) -> ConversionResult:
    """Convert a BraTS 2019/2020/2021 download; see the module docstring."""
    train_root, val_root = find_brats_folders(Path(source))
    rel, cases, test = _collect(train_root, val_root, release)
    ids = {c[0] for c in cases}
    names = _csv_lookup(train_root, "name_mapping.csv", ids)
    survival = _csv_lookup(train_root, "survival_data.csv", ids)
    grades = {cid: g or (names.get(cid, {}).get("Grade") or "").strip() or None for cid, _, g, _ in cases}
    split = patient_wise_splits({c: c for c in ids}, seed=seed)
    with StagedDataset(dataset_id, f"BraTS{rel}", overwrite, raw_root=raw_root,
                       preprocessed_root=preprocessed_root, source=source) as st:
        for cid, _, _, files in tqdm(cases, desc=f"BraTS{rel} training cases", disable=not progress):
            _write_case(st, cid, files, training=True)
        for cid, _, files in tqdm(test, desc=f"BraTS{rel} validation cases", disable=not progress or not test):
            _write_case(st, cid, files, training=False)
        generate_dataset_json(
            str(st.root), channel_names=dict(CHANNELS), labels=dict(REGIONS),
            num_training_cases=len(cases), file_ending=".nii.gz", regions_class_order=REGIONS_CLASS_ORDER,
            dataset_name=st.name, reference="https://www.med.upenn.edu/cbica/brats/",
            license="see the BraTS data terms of use",
            description=(f"BraTS {rel}; images copied byte for byte; labels remapped "
                         f"BraTS->nnU-Net {REMAP} (edema 1, NCR/NET 2, enhancing 3)"),
            converted_by="nnunet-calibration calib-convert brats", brats_label_remap={str(k): v for k, v in REMAP.items()})
        write_json({"release": rel,
                    "training": {cid: {"grade": grades[cid], "source": str(cdir.relative_to(train_root)),
                                       "survival": survival.get(cid)} for cid, cdir, _, _ in cases},
                    "test": {cid: {"source": str(cdir)} for cid, cdir, _ in test}},
                   st.root / "case_metadata.json")
        with open(st.root / "grades.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "grade"])
            for cid, *_ in cases:
                w.writerow([cid, grades[cid] or ""])
        st.commit(split)
    return ConversionResult(st.target, st.splits_file, len(cases), len(test), st.name,
                            extra={"release": rel, "grades": grades})
