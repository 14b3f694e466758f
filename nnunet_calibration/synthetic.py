"""A tiny synthetic nnU-Net v2 raw dataset, for tests and for the demo without real data.

Each case is a small 3D volume (``shape`` = z, y, x) holding a "heart-like" object: a disc
(label 3), a ring around it (label 2) and a crescent beside it (label 1), with random centre,
radii and noise. Region datasets (``regions=True``) mimic nnU-Net's BraTS layout: labels
0 background, 1 edema-like shell, 2 core, 3 enhancing centre; regions whole (1, 2, 3),
core (2, 3), enhancing (3,); ``regions_class_order`` (1, 2, 3); two input channels.

Files are written with SimpleITK (``.nii.gz``) with spacing ``spacing`` (given z, y, x in mm).
Training cases go to ``imagesTr``/``labelsTr``; ``n_test`` further cases go to ``imagesTs``
with their references in ``labelsTs`` (not read by nnU-Net; used as ``--gt`` in evaluation).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk


def _case_label(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    z, y, x = shape
    zz, yy, xx = np.meshgrid(np.arange(z), np.arange(y), np.arange(x), indexing="ij")
    cy = y / 2 + rng.uniform(-y / 10, y / 10)
    cx = x / 2 + rng.uniform(-x / 10, x / 10)
    r_in = rng.uniform(0.12, 0.18) * min(y, x)
    r_out = r_in + rng.uniform(0.06, 0.1) * min(y, x)
    # the object shrinks a little towards the apex (last slices)
    shrink = 1.0 - 0.3 * zz / max(z - 1, 1)
    d = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2)
    lab = np.zeros(shape, dtype=np.uint8)
    lab[d <= r_out * shrink] = 2
    lab[d <= r_in * shrink] = 3
    # crescent: a disc left of the ring minus the ring's dilation
    d2 = np.sqrt((yy - cy) ** 2 + (xx - (cx - r_out * 1.3)) ** 2)
    lab[(d2 <= r_out * 0.9 * shrink) & (d > r_out * shrink + 1)] = 1
    return lab


def _image_from_label(rng: np.random.Generator, lab: np.ndarray, means: tuple[float, ...]) -> np.ndarray:
    img = np.asarray(means, dtype=np.float32)[lab]
    img += rng.normal(0, 0.35 * (max(means) - min(means)) / len(means), lab.shape).astype(np.float32)
    return img.astype(np.float32)


def _write(arr: np.ndarray, path: Path, spacing_zyx: tuple[float, float, float]) -> None:
    im = sitk.GetImageFromArray(arr)
    im.SetSpacing(tuple(float(s) for s in spacing_zyx[::-1]))
    sitk.WriteImage(im, str(path), useCompression=True)


def make_synthetic_dataset(raw_dir: str | os.PathLike, dataset_id: int = 901, name: str | None = None,
                           n_train: int = 10, n_test: int = 2, shape: tuple[int, int, int] = (6, 40, 40),
                           spacing: tuple[float, float, float] = (4.0, 1.5, 1.5), regions: bool = False,
                           seed: int = 0) -> Path:
    """Write a synthetic raw dataset ``raw_dir/DatasetXXX_name`` and return its folder.

    Case ids are ``synth_NNN``; with ``regions=True`` the dataset has two channels and
    BraTS-like region labels (see the module docstring). The generator is deterministic for a
    given ``seed``.
    """
    name = name or ("SynthRegions" if regions else "SynthLabels")
    out = Path(raw_dir) / f"Dataset{dataset_id:03d}_{name}"
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n_train + n_test):
        cid = f"synth_{i:03d}"
        split = "Tr" if i < n_train else "Ts"
        lab = _case_label(rng, shape)
        if regions:
            channels = [_image_from_label(rng, lab, (0.0, 1.0, 2.0, 3.0)),
                        _image_from_label(rng, lab, (0.0, 2.0, 1.0, 3.0))]
        else:
            channels = [_image_from_label(rng, lab, (0.0, 1.0, 2.0, 3.0))]
        for c, img in enumerate(channels):
            _write(img, out / f"images{split}" / f"{cid}_{c:04d}.nii.gz", spacing)
        _write(lab, out / f"labels{split}" / f"{cid}.nii.gz", spacing)
    if regions:
        labels = {"background": 0, "whole": [1, 2, 3], "core": [2, 3], "enhancing": 3}
        channel_names = {"0": "A", "1": "B"}
    else:
        labels = {"background": 0, "crescent": 1, "ring": 2, "disc": 3}
        channel_names = {"0": "MRI"}
    dataset_json = {
        "channel_names": channel_names,
        "labels": labels,
        "numTraining": n_train,
        "file_ending": ".nii.gz",
        "name": name,
        "description": "nnunet-calibration synthetic test dataset",
    }
    if regions:
        dataset_json["regions_class_order"] = [1, 2, 3]
    (out / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return out
