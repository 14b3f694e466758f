"""Medical Segmentation Decathlon Task05_Prostate -> nnU-Net v2 raw ``DatasetXXX_Prostate``.

Source layout::

    Task05_Prostate/dataset.json                  MSD json: "modality" {"0": "T2", "1": "ADC"}, "labels"
    Task05_Prostate/imagesTr/prostate_NN.nii.gz    4D: (x, y, z, channel), channel 0 T2, 1 ADC
    Task05_Prostate/labelsTr/prostate_NN.nii.gz    3D: 0 background, 1 PZ, 2 TZ (PZ may be absent)
    Task05_Prostate/imagesTs/prostate_NN.nii.gz    4D
    ._*                                            macOS AppleDouble files: ignored, as all hidden files

The 4D images are split into ``_0000`` (T2) and ``_0001`` (ADC) with nnunetv2's own
``split_4d_nifti`` (from its MSD converter; it keeps the spatial spacing, origin and direction —
prostate volumes are oblique — and the voxel type). nnunetv2's whole ``convert_msd_dataset`` is not
used because it writes straight into nnUNet_raw without checks, with a process pool. The channel
count must equal the number of modalities in the source ``dataset.json``; labels are copied byte for
byte after checking their values and that their grid equals the image's. Channel names and labels
come from the source ``dataset.json``. Each case is its own patient in ``splits_final.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from nnunetv2.dataset_conversion.convert_MSD_dataset import split_4d_nifti
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from tqdm import tqdm

from ._common import (DEFAULT_SPLIT_SEED, ConversionError, ConversionResult, StagedDataset,
                      check_case_id, check_label_values, check_same_geometry, copy_nifti, list_nifti,
                      pair_by_case_id, patient_wise_splits, read_image, strip_nifti_suffix, write_json)

NAME = "Prostate"
DEFAULT_CHANNELS = {"0": "T2", "1": "ADC"}
DEFAULT_LABELS = {"background": 0, "PZ": 1, "TZ": 2}


def _read_msd_json(source: Path) -> tuple[dict, dict]:
    path = source / "dataset.json"
    if not path.is_file():
        return dict(DEFAULT_CHANNELS), dict(DEFAULT_LABELS)
    try:
        meta = json.loads(path.read_text())
        channels = {str(k): v for k, v in meta.get("modality", meta.get("channel_names", DEFAULT_CHANNELS)).items()}
        labels_raw = meta.get("labels", {v: k for k, v in DEFAULT_LABELS.items()})
        # MSD: {"0": "background", ...}; nnU-Net v2: {"background": 0, ...}
        if all(str(k).isdigit() for k in labels_raw):
            labels = {v: int(k) for k, v in labels_raw.items()}
        else:
            labels = {k: int(v) for k, v in labels_raw.items()}
    except (OSError, ValueError, AttributeError, TypeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from e
    if sorted(int(k) for k in channels) != list(range(len(channels))):
        raise ConversionError(f"{path}: modality keys must be 0..n-1, got {sorted(channels)}")
    return {k: channels[k] for k in sorted(channels, key=int)}, labels


def _ids(folder: Path) -> dict[str, Path]:
    out = {}
    for f in list_nifti(folder):
        cid = strip_nifti_suffix(f.name)
        check_case_id(cid, f)
        if cid in out:
            raise ConversionError(f"duplicate case id {cid}: {out[cid]} and {f}")
        out[cid] = f
    return out


def _split_checked(image: Path, out_dir: Path, n_channels: int, label: Path | None = None) -> list[sitk.Image]:
    img = read_image(image)
    if img.GetDimension() != 4 or img.GetSize()[3] != n_channels:
        got = img.GetSize()[3] if img.GetDimension() == 4 else 1
        raise ConversionError(f"missing modality: {image} has {got} channel(s) (size {img.GetSize()}), "
                              f"expected a 4D image with {n_channels} (T2, ADC)")
    if not image.name.endswith(".nii.gz"):
        raise ConversionError(f"{image}: expected a .nii.gz file")
    # nnunetv2's MSD splitter: writes <case>_0000.nii.gz, <case>_0001.nii.gz, ...
    split_4d_nifti(str(image), str(out_dir))
    cid = strip_nifti_suffix(image.name)
    parts = [out_dir / f"{cid}_{k:04d}.nii.gz" for k in range(n_channels)]
    first = read_image(parts[0])
    if label is not None:
        lab = read_image(label)
        check_same_geometry(first, Path(f"{image} (3D part)"), lab, label)
    return parts


def convert_prostate(source: str | Path, dataset_id: int, overwrite: bool = False, *, raw_root=None,
                     preprocessed_root=None, seed: int = DEFAULT_SPLIT_SEED, progress: bool = True
                     ) -> ConversionResult:
    """Convert MSD Task05_Prostate; see the module docstring."""
    source = Path(source)
    for sub in ("imagesTr", "labelsTr"):
        if not (source / sub).is_dir():
            raise ConversionError(f"{source / sub} is missing: expected the MSD Task05_Prostate folder")
    channels, labels = _read_msd_json(source)
    images = _ids(source / "imagesTr")
    segs = _ids(source / "labelsTr")
    train_ids = pair_by_case_id(images, segs, where=str(source))
    test = _ids(source / "imagesTs") if (source / "imagesTs").is_dir() else {}
    split = patient_wise_splits({c: c for c in train_ids}, seed=seed)

    with StagedDataset(dataset_id, NAME, overwrite, raw_root=raw_root,
                       preprocessed_root=preprocessed_root, source=source) as st:
        label_values = {}
        for cid in tqdm(train_ids, desc="Prostate training cases", disable=not progress):
            _split_checked(images[cid], st.imagesTr, len(channels), segs[cid])
            lab = read_image(segs[cid])
            arr = check_label_values(lab, labels.values(), segs[cid])
            label_values[cid] = [int(v) for v in np.unique(arr)]
            copy_nifti(segs[cid], st.labelsTr / f"{cid}.nii.gz")
        for cid in tqdm(sorted(test), desc="Prostate test cases", disable=not progress or not test):
            _split_checked(test[cid], st.imagesTs, len(channels))
        generate_dataset_json(
            str(st.root), channel_names={int(k): v for k, v in channels.items()}, labels=dict(labels),
            num_training_cases=len(train_ids), file_ending=".nii.gz", dataset_name=st.name,
            reference="http://medicaldecathlon.com/", license="CC-BY-SA 4.0",
            description="MSD Task05_Prostate; 4D images split into channels, labels copied byte for byte",
            converted_by="nnunet-calibration calib-convert prostate")
        write_json({"training": {c: {"source": str(images[c].relative_to(source)),
                                     "label_values": label_values[c]} for c in train_ids},
                    "test": {c: {"source": str(test[c].relative_to(source))} for c in sorted(test)}},
                   st.root / "case_metadata.json")
        st.commit(split)
    return ConversionResult(st.target, st.splits_file, len(train_ids), len(test), st.name)
