"""What the dataset says: ``dataset.json`` (found next to the predictions, read, its labels turned
into nnU-Net's ``LabelManager`` and the class / region names), the nnU-Net reader/writer of the
dataset's images, and the validation cases of a fold in nnU-Net's ``splits_final.json``."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import List, Optional, Union

from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json
from nnunetv2.utilities.label_handling.label_handling import LabelManager

from .errors import EvaluationInputError

PathLike = Union[str, os.PathLike]


def find_dataset_json(pred_folder: PathLike) -> Path:
    """``dataset.json`` in the prediction folder (nnU-Net copies it there), else in its parent or
    grand-parent (the model folder, for ``fold_X/validation``)."""
    folder = Path(pred_folder).resolve()
    if not folder.is_dir():
        raise EvaluationInputError(f"{folder}: prediction folder does not exist")
    for cand in (folder, folder.parent, folder.parent.parent):
        if (cand / "dataset.json").is_file():
            return cand / "dataset.json"
    raise EvaluationInputError(f"{folder}: no dataset.json in the prediction folder or its parents; "
                               "pass it with -djfile")


def read_dataset_json(path: PathLike) -> dict:
    """The dataset.json dict; an unreadable file is an :class:`EvaluationInputError` naming it."""
    try:
        with open(path) as f:
            return json.load(f)
    except Exception as e:
        raise EvaluationInputError(f"{path}: cannot read dataset.json ({e})") from e


def label_info(dataset_json: dict, source: str = "dataset.json"):
    """``(label_manager, class_names, region_labels or None)`` from a dataset.json dict.

    An ``ignore`` label is allowed (``label_manager.ignore_label``); it is not a class."""
    labels = dataset_json.get("labels")
    if not isinstance(labels, dict):
        raise EvaluationInputError(f"{source}: has no 'labels' dict")
    try:
        lm = LabelManager(labels, dataset_json.get("regions_class_order"))
    except (AssertionError, RuntimeError) as e:
        raise EvaluationInputError(f"{source}: invalid labels ({e})") from e
    if lm.has_regions:
        # LabelManager builds the regions from the labels dict in its order, skipping background/ignore
        class_names, regions = [], []
        for name, value in labels.items():
            vals = [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]
            if name == "ignore" or set(vals) == {0}:
                continue
            class_names.append(name)
            regions.append(tuple(vals))
        if len(regions) != lm.num_segmentation_heads:
            raise EvaluationInputError(f"{source}: could not match region names to regions")
        return lm, class_names, regions
    expected = list(range(len(lm.all_labels)))
    if list(lm.all_labels) != expected:
        raise EvaluationInputError(f"{source}: labels must be consecutive 0..{len(expected) - 1}, "
                                   f"got {lm.all_labels}")
    by_value = {int(v[0]) if isinstance(v, (list, tuple)) else int(v): k
                for k, v in labels.items() if k != "ignore"}
    return lm, [by_value[c] for c in lm.foreground_labels], None


def mask_keys(lm) -> list:
    """The keys of the foreground masks for ``region_or_label_to_mask``: regions or labels."""
    return list(lm.foreground_regions) if lm.has_regions else list(lm.foreground_labels)


def reader_writer(dataset_json: dict, example_file: Optional[PathLike] = None):
    """The nnU-Net reader/writer *instance* for the dataset (``determine_reader_writer_from_dataset_json``:
    ``overwrite_image_reader_writer`` or the ``file_ending``)."""
    try:
        cls = determine_reader_writer_from_dataset_json(
            dataset_json, None if example_file is None else str(example_file), allow_nonmatching_filename=True,
            verbose=False)
    except Exception as e:  # nnU-Net raises RuntimeError if no reader supports the ending
        raise EvaluationInputError(f"no nnU-Net reader/writer for file ending {dataset_json.get('file_ending')!r} "
                                   f"({e})") from e
    return cls()


def split_validation_cases(splits_file: PathLike, fold: int) -> List[str]:
    """The validation case ids of ``fold`` in an nnU-Net ``splits_final.json`` (for ``cases=``)."""
    try:
        splits = load_json(str(splits_file))
        return list(splits[int(fold)]["val"])
    except Exception as e:
        raise EvaluationInputError(f"{splits_file}: cannot read the validation cases of fold {fold} ({e})") from e
