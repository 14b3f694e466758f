"""Reading one case (runs in a worker process): the prediction's probabilities (npz), the reference
as nnU-Net reads it, nnU-Net's 2D convention, and the geometry check of the prediction against the
reference with the tolerances of :mod:`nnunet_calibration.io` (``SPACING_RTOL``, ``ORIGIN_ATOL`` +
``ORIGIN_RTOL``, ``DIRECTION_ATOL``; shapes identical)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import load_pickle
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_calibration.io import (DIRECTION_ATOL, ORIGIN_ATOL, ORIGIN_RTOL, SPACING_RTOL, CorruptFileError, quiet_itk,
                                   verify_image_file)

from .errors import EvaluationInputError

PathLike = Union[str, os.PathLike]

__all__ = ["load_probabilities", "read_reference", "is_2d", "load_reference", "prediction_properties",
           "geometry_problems", "SPACING_RTOL", "ORIGIN_ATOL", "ORIGIN_RTOL", "DIRECTION_ATOL"]


def load_probabilities(npz_path: PathLike) -> np.ndarray:
    """``probabilities`` of an nnU-Net npz (zip members are CRC-checked when read)."""
    try:
        with np.load(npz_path) as z:
            if "probabilities" not in z.files:
                raise EvaluationInputError(f"{npz_path}: no array 'probabilities' in the npz (keys: {z.files})")
            probs = z["probabilities"]
    except EvaluationInputError:
        raise
    except Exception as e:  # zipfile.BadZipFile, OSError, ValueError, EOFError, ...
        raise EvaluationInputError(f"{npz_path}: unreadable npz ({type(e).__name__}: {e})") from e
    if not np.issubdtype(probs.dtype, np.floating):
        raise EvaluationInputError(f"{npz_path}: probabilities must be floating point, got {probs.dtype}")
    return probs


def read_reference(path: PathLike, reader=None, role: str = "reference") -> Tuple[np.ndarray, dict]:
    """A reference segmentation as nnU-Net reads it: ``(labels (z, y, x) int32, properties)``.

    ``reader``: an nnU-Net reader/writer instance (:func:`~.labels.reader_writer`; default ``SimpleITKIO``).
    The file is checked first (:func:`nnunet_calibration.io.verify_image_file`: truncated / corrupt
    ``.gz`` streams and short NIfTI files are errors). 2D images come back as ``(1, y, x)`` with
    nnU-Net's spacing convention (first entry 999 x the largest in-plane spacing). ``role``: what the
    file is, in messages (``"prediction segmentation"`` for nnU-Net's segmentation next to an npz)."""
    path = Path(path)
    try:
        verify_image_file(path)
    except CorruptFileError as e:
        raise EvaluationInputError(f"unreadable {role}: {e}") from e
    reader = SimpleITKIO() if reader is None else reader
    try:
        with quiet_itk():
            seg, props = reader.read_seg(str(path))
    except Exception as e:
        raise EvaluationInputError(f"{path}: unreadable {role} ({type(e).__name__}: {e})") from e
    arr = np.asarray(seg)
    if arr.ndim == 4 and arr.shape[0] == 1:
        arr = arr[0]
    if np.issubdtype(arr.dtype, np.floating):
        if np.any(arr != np.round(arr)):
            raise EvaluationInputError(f"{path}: {role} holds non-integer values")
    return arr.astype(np.int32, copy=False), props


def is_2d(spacing: Sequence[float], shape: Sequence[int]) -> bool:
    """nnU-Net's 2D convention: one slice and a first spacing of at least 999 x the others."""
    return len(shape) == 3 and shape[0] == 1 and float(spacing[0]) >= 998.999 * max(float(s) for s in spacing[1:])


def load_reference(path: PathLike, reader=None) -> Tuple[np.ndarray, Tuple[float, ...]]:
    """``(labels, spacing)`` with the spacing in the array's axis order; a 2D image is returned as
    ``(y, x)`` with its 2 in-plane spacings. See :func:`read_reference`."""
    arr, props = read_reference(path, reader)
    spacing = tuple(float(s) for s in props["spacing"])
    if is_2d(spacing, arr.shape):
        return arr[0], spacing[1:]
    return arr, spacing


def prediction_properties(job: dict, reader) -> Tuple[Optional[dict], Optional[str]]:
    """nnU-Net's geometry of the prediction: ``CASE.pkl`` (properties written by nnU-Net) or else the
    segmentation ``CASE<file_ending>`` it wrote next to the npz. ``(None, None)`` if neither exists."""
    pkl = Path(job["folder"]) / f"{job['case']}.pkl"
    if pkl.is_file():
        try:
            props = load_pickle(str(pkl))
        except Exception as e:
            raise EvaluationInputError(f"{pkl}: unreadable properties pickle ({type(e).__name__}: {e})") from e
        if not isinstance(props, dict):
            raise EvaluationInputError(f"{pkl}: properties pickle does not hold a dict")
        return props, str(pkl)
    seg = Path(job["folder"]) / f"{job['case']}{job['file_ending']}"
    if seg.is_file():
        arr, props = read_reference(seg, reader, role="prediction segmentation")
        props = dict(props, shape_before_cropping=tuple(arr.shape))
        return props, str(seg)
    return None, None


def geometry_problems(pred_props: dict, ref_props: dict, ref_shape: Sequence[int]) -> List[str]:
    """Differences beyond the tolerances (``SPACING_RTOL`` ...) between a prediction's nnU-Net
    properties and its reference's: spacing (nnU-Net order), shape (``shape_before_cropping``),
    and, when both have them (SimpleITK-based readers), ITK spacing, origin and direction."""
    out = []
    sp_p, sp_r = pred_props.get("spacing"), ref_props.get("spacing")
    if sp_p is not None and sp_r is not None:
        a, b = np.abs(np.asarray(sp_p, float)), np.abs(np.asarray(sp_r, float))
        k = min(a.size, b.size)
        if (is_2d(b, ref_shape) and k == 3) or k == len(ref_shape) + 1:
            k -= 1  # the 2D dummy spacing is not a real one
        if not np.allclose(a[a.size - k:], b[b.size - k:], rtol=SPACING_RTOL, atol=0):
            out.append(f"spacing {tuple(a.tolist())} vs {tuple(b.tolist())}")
    shp = pred_props.get("shape_before_cropping")
    if shp is not None and tuple(int(s) for s in shp) != tuple(int(s) for s in ref_shape):
        out.append(f"shape {tuple(int(s) for s in shp)} vs {tuple(int(s) for s in ref_shape)}")
    ip, ir = pred_props.get("sitk_stuff"), ref_props.get("sitk_stuff")
    if isinstance(ip, dict) and isinstance(ir, dict):
        if len(ip["origin"]) != len(ir["origin"]):
            out.append(f"dimension {len(ip['origin'])} vs {len(ir['origin'])}")
        else:
            if not np.allclose(ip["origin"], ir["origin"], rtol=ORIGIN_RTOL, atol=ORIGIN_ATOL):
                out.append(f"origin {tuple(ip['origin'])} vs {tuple(ir['origin'])}")
            if not np.allclose(ip["direction"], ir["direction"], rtol=0, atol=DIRECTION_ATOL):
                out.append(f"direction {np.round(ip['direction'], 4).tolist()} vs {np.round(ir['direction'], 4).tolist()}")
    return out
