"""The report's ``DSC+PP`` / ``HD95+PP`` columns: nnU-Net's own postprocessing, cross-fitted over folds.

nnU-Net's ``nnUNetv2_determine_postprocessing`` (:func:`nnunetv2.postprocessing.remove_connected_components.determine_postprocessing`)
decides on a set of validation segmentations whether keeping only the largest connected component
(of the whole foreground, then of each class / region) raises the mean Dice, and records the chosen
functions. Here, for fold ``k`` of a trainer, that decision is made on the validation segmentations of
the trainer's *other* folds and applied (nnU-Net's ``apply_postprocessing``) to fold ``k``'s, so no
fold is scored with a choice made on itself (with a single fold it is made on that fold: *in-sample*,
and the report says so). DSC and HD95 of the postprocessed segmentations are the evaluator's
(:func:`nnunet_calibration.evaluation.segmentation_metrics`, same conventions as the ``DSC`` /
``HD95`` columns). Postprocessing changes segmentations only, never probabilities, so the calibration
columns have no ``+PP`` form. It is never applied to the other columns.

Scratch copies of the segmentations live in a temporary folder under the report's work folder,
removed afterwards.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path

import numpy as np

#: the report columns this module fills, from the evaluator's per-case DSC_mean / HD95_mean
PP_COLUMNS = {"DSC+PP": "DSC", "HD95+PP": "HD95"}


def _determine(fit_dir: Path, gt_folder: Path, plans_file: Path, dataset_json: Path) -> tuple[list, list]:
    from nnunetv2.postprocessing.remove_connected_components import determine_postprocessing

    with contextlib.redirect_stdout(io.StringIO()):  # nnU-Net prints every trial
        return determine_postprocessing(str(fit_dir), str(gt_folder), str(plans_file), str(dataset_json),
                                        num_processes=1, keep_postprocessed_files=False)


def describe(fns: list, kwargs: list) -> list[str]:
    """The chosen functions in words (``keep largest component of [1, 2, 3]``)."""
    return [f"{'keep largest component' if 'largest' in f.__name__ else f.__name__} of {k.get('labels_or_regions')}"
            for f, k in zip(fns, kwargs)]


def crossfit_postprocessing(folds_segs: dict, info, plans_file: Path, work: Path) -> tuple[dict, dict, bool]:
    """Cross-fitted postprocessing of one trainer's validation segmentations.

    ``folds_segs``: ``{fold: [segmentation files]}`` (nnU-Net's ``fold_X/validation/CASE<file_ending>``);
    ``info``: the report's :class:`~.gather.DatasetInfo`. Returns ``(per_case, chosen, cross_fitted)``:
    ``per_case[case] = {"DSC+PP": ..., "HD95+PP": ..., "fold": k}``, ``chosen[k]`` the functions applied
    to fold ``k`` (in words, :func:`describe`).
    """
    from nnunetv2.postprocessing.remove_connected_components import apply_postprocessing

    from nnunet_calibration.evaluation import load_reference
    from nnunet_calibration.evaluation.core import segmentation_metrics

    folds = sorted(folds_segs)
    cross = len(folds) > 1
    per_case, chosen = {}, {}
    scratch = work / ".postprocessing"
    try:
        for k in folds:
            fit_dir = scratch / f"fit_for_fold_{k}"
            fit_dir.mkdir(parents=True)
            for f in ([f for f in folds if f != k] if cross else [k]):
                for seg in folds_segs[f]:
                    shutil.copy2(seg, fit_dir / seg.name)
            fns, kwargs = _determine(fit_dir, info.gt_folder, plans_file, info.dataset_json_path)
            chosen[k] = describe(fns, kwargs)
            for seg_file in folds_segs[k]:
                case = seg_file.name[:-len(info.file_ending)]
                seg, _ = info.reader.read_seg(str(seg_file))
                seg = apply_postprocessing(np.asarray(seg)[0], fns, kwargs)
                ref, spacing = load_reference(info.gt_folder / seg_file.name, info.reader)
                if seg.ndim == ref.ndim + 1:  # 2D: nnU-Net's (1, y, x)
                    seg = seg[0]
                dsc, hd, _ = segmentation_metrics(seg, ref, info.label_manager, info.class_names, spacing)
                per_case[case] = {"DSC+PP": float(np.mean(list(dsc.values()))),
                                  "HD95+PP": float(np.mean(list(hd.values()))), "fold": k}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return per_case, chosen, cross
