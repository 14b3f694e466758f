"""``calib-calibrate export``: nnU-Net's model zip with the model's ``calibration.json`` inside.

The zip is written by nnU-Net's own exporter (``nnUNetv2_export_model_to_zip``, i.e.
``nnunetv2.model_sharing.model_export.export_pretrained_model``) for the one configuration, trainer
and plans of ``MODEL_FOLDER`` (``.../DatasetXXX_Name/Trainer__Plans__Configuration``; its
``nnUNet_results`` is the folder two levels up, given to the exporter's process as
``nnUNet_results``, so the model need not lie under the environment's one), with the folds ``-f``
(default: the calibration's ``model.folds``, else every ``fold_<int>`` folder) and the checkpoints
``-chk`` (default ``checkpoint_final.pth``). Then ``calibration.json`` is added at
``DatasetXXX_Name/Trainer__Plans__Configuration/calibration.json``, the model folder's own path
inside the zip (the same layout as every other file of nnU-Net's zip), so
``nnUNetv2_install_pretrained_model_from_zip`` puts it into the installed model folder, where
``calib-calibrate apply`` and ``calib-predict`` find it (:func:`~.model.read_calibration`).

Checks before anything is written: the calibration is readable and belongs to the model folder
(:func:`nnunet_calibration.posthoc.apply` rules: label set, ``model`` identity, folds); every fold of
the calibration's ``model.folds`` is exported (a zip whose calibration names folds it does not hold
would be refused after installation); ``ZIP`` ends in ``.zip``, does not exist, and its folder
exists. The zip is written into a staging folder next to ``ZIP`` (``.ZIP.tmp-<pid>-*``) and moved
into place at the end; on any error the staging folder is removed and nothing else is left.
"""
from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path
from typing import Optional, Sequence

from nnunet_calibration.posthoc.apply import _checked_calibration, _warn
from nnunet_calibration.posthoc.model import CALIBRATION_FILE, CalibrationError, PathLike, model_folds, model_identity
from nnunet_calibration.utils import remove_stale_staging, staging_dir

DEFAULT_CHECKPOINTS = ("checkpoint_final.pth",)


def export_model(model_folder: PathLike, zip_path: PathLike, folds: Optional[Sequence[int]] = None,
                 checkpoints: Sequence[str] = DEFAULT_CHECKPOINTS) -> Path:
    """Write ``zip_path`` (module docstring) and return it."""
    from nnunet_calibration.nnunet_utils import run_nnunet

    folder = Path(model_folder).resolve()
    if not folder.is_dir():
        raise CalibrationError(f"{folder}: model folder does not exist")
    cal, cal_path = _checked_calibration(folder)
    ident = model_identity(folder)
    if ident["trainer"] is None or not folder.parent.name.startswith("Dataset"):
        raise CalibrationError(f"{folder}: not an nnU-Net model folder DatasetXXX_Name/Trainer__Plans__Configuration "
                               "(nnU-Net's exporter needs that layout)")
    cal_folds = (cal.get("model") or {}).get("folds") or []
    folds = sorted(int(f) for f in folds) if folds else (sorted(cal_folds) or model_folds(folder))
    if not folds:
        raise CalibrationError(f"{folder}: no fold_<number> folders to export")
    missing = [f for f in cal_folds if f not in folds]
    if missing:
        raise CalibrationError(f"{cal_path}: field 'model.folds' is {cal_folds} but the export holds folds {folds}; "
                               f"export folds {missing} too, or fit a calibration for the exported folds")
    out = Path(zip_path).absolute()
    if out.suffix != ".zip":
        raise CalibrationError(f"{out}: the output must end in .zip")
    if out.exists():
        raise CalibrationError(f"{out}: exists; choose a new file name")
    if not out.parent.is_dir():
        raise CalibrationError(f"{out.parent}: folder of the output does not exist")
    remove_stale_staging(out)
    stage = staging_dir(out)
    try:
        tmp_zip = stage / out.name
        env = dict(os.environ, nnUNet_results=str(folder.parent.parent))
        try:
            run_nnunet(["nnUNetv2_export_model_to_zip", "-d", folder.parent.name, "-o", str(tmp_zip), "-c",
                        ident["configuration"], "-tr", ident["trainer"], "-p", folder.name.split("__")[1],
                        "-f", *map(str, folds), "-chk", *checkpoints], env)
        except RuntimeError as e:
            last = [ln for ln in str(e).splitlines() if ln.strip()][-1:] or ["(no output)"]
            raise CalibrationError(f"{folder}: nnUNetv2_export_model_to_zip failed (folds {folds}, checkpoints "
                                   f"{list(checkpoints)}): {last[0].strip()}") from e
        arcname = f"{folder.parent.name}/{folder.name}/{CALIBRATION_FILE}"
        with zipfile.ZipFile(tmp_zip, "a", zipfile.ZIP_DEFLATED) as z:
            z.write(cal_path, arcname)
        os.replace(tmp_zip, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    if not isinstance(cal.get("model"), dict):
        _warn(f"{cal_path}: written by an older version (no 'model' field): exported as is; fit again so that "
              "apply can check it belongs to the installed model")
    return out
