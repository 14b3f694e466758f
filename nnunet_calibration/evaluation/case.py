"""One case (runs in a worker process, or in the caller's with one process): read it, check it
(geometry, shapes, channels, probabilities, label values), compute DSC, HD95, the calibration
metrics (one :class:`~nnunet_calibration.metrics.CalibrationAccumulator` per case, given the case's
spacing for the boundary-band ECE; the signed calibration error per class in ``SCE_classes``) and the case-level
confidence scores (:mod:`.scores`), all from the one read of the probabilities."""
from __future__ import annotations

from typing import List

import numpy as np
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_calibration.metrics import CalibrationAccumulator, validate_labels, validate_probabilities
from nnunet_calibration.metrics.calibration import SOFTMAX_SUM_TOLERANCE

from .errors import EvaluationInputError
from .reading import geometry_problems, is_2d, load_probabilities, prediction_properties, read_reference
from .scores import case_scores
from .segmentation import probabilities_to_segmentation, segmentation_metrics


def check_probabilities(probs, regions: bool, path) -> None:
    """The evaluator's check of a probability map (NaN, values outside [0, 1], softmax channels not
    summing to 1 within ``SOFTMAX_SUM_TOLERANCE``): an :class:`EvaluationInputError` naming ``path``.
    Also used by ``calib-calibrate apply``."""
    try:
        # the same tolerance as the argmax shortcut of evaluate_case, which relies on this check
        validate_probabilities(probs, regions, SOFTMAX_SUM_TOLERANCE)
    except ValueError as e:
        raise EvaluationInputError(f"{path}: {e}") from e


def read_checked(job: dict, lm, regions, reader):
    """``(probs, ref, spacing, flags)`` of a case in the array's axis order (2D: ``(y, x)``), after
    the geometry check against nnU-Net's CASE.pkl / segmentation and the checks of shapes, channels,
    probabilities and label values. Also used by ``calib-calibrate fit`` (the same checks).

    ``job``: ``{"case", "folder", "npz", "reference"}`` (optionally ``"file_ending"``)."""
    npz, ref_path = job["npz"], job["reference"]
    probs = load_probabilities(npz)
    ref3, ref_props = read_reference(ref_path, reader)
    spacing3 = tuple(float(s) for s in ref_props["spacing"])
    flags = []
    pred_props, pred_src = prediction_properties(dict(job, file_ending=job.get("file_ending", ".nii.gz")), reader)
    if pred_props is None:
        flags.append("geometry not checked (no CASE.pkl or segmentation file next to the npz)")
    else:
        problems = geometry_problems(pred_props, ref_props, ref3.shape)
        if problems:
            raise EvaluationInputError(f"geometry mismatch: prediction {pred_src} does not match the reference "
                                       f"{ref_path}: " + "; ".join(problems))
    if is_2d(spacing3, ref3.shape):
        ref, spacing = ref3[0], spacing3[1:]
        if probs.ndim == 4 and probs.shape[1] == 1:
            probs = probs[:, 0]  # nnU-Net stores 2D images as (C, 1, y, x)
    else:
        ref, spacing = ref3, spacing3
    if probs.ndim != ref.ndim + 1 or probs.shape[1:] != ref.shape:
        raise EvaluationInputError(f"{npz}: probability map of shape {probs.shape[1:]} (channels {probs.shape[0]}) "
                                   f"does not match the reference {ref_path} of shape {ref.shape}")
    if probs.shape[0] != lm.num_segmentation_heads:
        raise EvaluationInputError(f"{npz}: {probs.shape[0]} channels but dataset.json implies "
                                   f"{lm.num_segmentation_heads} ({'regions' if regions else 'classes incl. background'})")
    check_probabilities(probs, regions is not None, npz)
    allowed = list(lm.all_labels) + ([lm.ignore_label] if lm.ignore_label is not None else [])
    try:
        validate_labels(ref, allowed)
    except ValueError as e:
        raise EvaluationInputError(f"{ref_path}: {e} (dataset.json labels)") from e
    return probs, ref, spacing, flags


def evaluate_case(job: dict, lm, class_names: List[str], regions, options, reader=None):
    """Evaluate one case. Returns ``(case_entry, accumulator)``.

    ``job``: ``{"case", "folder", "npz", "reference"}`` (optionally ``"file_ending"`` for the
    geometry look-up of a segmentation file); ``regions``: the region label tuples or ``None``;
    ``options``: the metrics' :class:`~nnunet_calibration.settings.MetricOptions`; ``reader``: nnU-Net
    reader/writer instance (default ``SimpleITKIO``).
    """
    reader = SimpleITKIO() if reader is None else reader
    probs, ref, spacing, flags = read_checked(job, lm, regions, reader)
    acc = CalibrationAccumulator(options, regions=regions is not None, region_labels=regions,
                                 ignore_index=lm.ignore_label).update(probs, ref, spacing=spacing)
    seg = probabilities_to_segmentation(probs, lm, sum_tolerance=SOFTMAX_SUM_TOLERANCE)  # sums checked before
    scores = case_scores(probs, seg, spacing, regions)
    del probs
    dsc, hd, seg_flags = segmentation_metrics(seg, ref, lm, class_names, spacing, options.convention)
    flags += seg_flags
    metrics = {"DSC": dsc, "HD95": hd, "DSC_mean": float(np.mean(list(dsc.values()))),
               "HD95_mean": float(np.mean(list(hd.values())))}
    metrics.update(acc.compute())
    metrics["SCE_classes"] = dict(zip(class_names, acc.signed_per_class().tolist()))
    entry = {"case": job["case"], "folder": job["folder"], "prediction": str(job["npz"]),
             "reference": str(job["reference"]), "spacing": list(spacing), "metrics": metrics, "scores": scores, "flags": flags}
    return entry, acc
