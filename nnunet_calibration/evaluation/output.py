"""The evaluator's output folder: where it may be, the checks made before any case is computed,
the staging folder next to it, and how it replaces an earlier output.

Nothing of the user's is ever removed, and nothing appears half-written:

* the output folder may not be, contain or lie inside an input folder (a prediction folder, the
  reference folder ``--gt``); it may not be or contain the folder of ``dataset.json`` (often a model
  folder, where an output inside is fine). The default location ``PRED_FOLDER/calibration_evaluation``
  (a sub-folder of the evaluator's own name) is the one exception to "inside";
* every run writes, last, a manifest (:data:`MANIFEST`) into the output folder listing the files it
  wrote with their size and SHA-256. An existing output folder is replaced only if it is empty or
  holds exactly files of its manifest, unchanged (checked before the work starts and again when
  the new folder is moved into place); then exactly those files are deleted. A folder with other
  files, or without a manifest, is refused: it holds someone else's files;
* before any case is computed: a path under a regular file, an unwritable location (the staging
  folder is created there now) and an existing folder that cannot be renamed (tried: renamed aside
  and back) are errors naming the path (the checks shared with ``calib-calibrate apply``:
  :mod:`nnunet_calibration.output_location`). Parent folders created for the output are removed again
  if the run fails;
* everything is written into a staging folder ``.OUT.tmp-<pid>-*`` next to the output and renamed
  into place at the end (:class:`OutputFolder`).

Plots: at most :data:`MAX_PLOTTED_CLASSES` classes get a reliability diagram and a panel of the
dataset reliability histogram (the first ones); ``risk_coverage.png`` is drawn with them (one curve
per confidence score, :mod:`.scores`); ``plots=False`` draws none. What was drawn is recorded in
``summary.json["plots"]``.
"""
from __future__ import annotations

import csv
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from nnunet_calibration.metrics import METRIC_KEYS
from nnunet_calibration.output_location import StagedOutput
from nnunet_calibration.utils import staging_dir

from .errors import EvaluationInputError
from .scores import PLOTTED_RISK, SCORES, plot_curves

PathLike = Union[str, os.PathLike]

#: the name of the evaluator's default output folder, inside the (common parent of the) prediction folder(s)
DEFAULT_NAME = "calibration_evaluation"
#: the manifest the evaluator writes into its output folder: the files it wrote, with size and SHA-256
MANIFEST = "calib_evaluate_manifest.json"
MANIFEST_FORMAT = "nnunet-calibration/calib-evaluate-output"
#: plots are drawn for at most this many classes (the first ones): 300 classes took over 5 minutes
MAX_PLOTTED_CLASSES = 20


def default_out_dir(pred_folders: Sequence[PathLike]) -> Path:
    """``PRED_FOLDER/calibration_evaluation`` (several folders: in their common parent)."""
    folders = [str(Path(f).resolve()) for f in pred_folders]
    base = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    return Path(base) / DEFAULT_NAME


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _read_manifest(folder: Path, names: List[str], shown: Path) -> Dict[str, dict]:
    if MANIFEST not in names:
        raise EvaluationInputError(f"{shown}: output folder exists and holds files calib-evaluate did not write "
                                   f"(no {MANIFEST}; e.g. {names[:3]}); choose another -o")
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"] if manifest.get("format") == MANIFEST_FORMAT else None
        ok = isinstance(files, dict) and all(
            isinstance(n, str) and n == Path(n).name and n not in ("", ".", "..", MANIFEST) and isinstance(v, dict)
            for n, v in files.items())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        ok = False
    if not ok:
        raise EvaluationInputError(f"{shown / MANIFEST}: not a manifest of calib-evaluate; the folder is not "
                                   "replaced, choose another -o")
    return files


def our_files(folder: Path, shown: Optional[Path] = None) -> List[str]:
    """The files of an existing output folder, all written by the evaluator (``[]`` if it is empty);
    an :class:`EvaluationInputError` if it holds anything else or a file changed since it was written.
    ``shown``: the folder's name in messages (default ``folder``)."""
    shown = folder if shown is None else shown
    try:
        names = sorted(os.listdir(folder))
    except OSError as e:
        raise EvaluationInputError(f"{shown}: cannot read the existing output folder ({e.strerror or e})") from e
    if not names:
        return []
    files = _read_manifest(folder, names, shown)
    other = [n for n in names if n not in files and n != MANIFEST]
    if other:
        raise EvaluationInputError(f"{shown}: output folder holds files calib-evaluate did not write "
                                   f"({other[:3]}); choose another -o")
    for name in names:
        if name == MANIFEST:
            continue
        p, want = folder / name, files[name]
        try:
            changed = (not p.is_file() or p.is_symlink() or p.stat().st_size != want.get("bytes")
                       or _sha256(p) != want.get("sha256"))
        except OSError as e:
            raise EvaluationInputError(f"{shown / name}: cannot read it to check it ({e.strerror or e}); the folder is "
                                       "not replaced, choose another -o") from e
        if changed:
            raise EvaluationInputError(f"{shown / name}: changed since calib-evaluate wrote it; the folder is not "
                                       "replaced, choose another -o")
    return names


class OutputFolder(StagedOutput):
    """The evaluator's output folder of one run: :meth:`prepare` (the shared checks of
    :class:`~nnunet_calibration.output_location.StagedOutput`, and an existing folder must hold
    exactly its own files: :func:`our_files`), :meth:`commit` (manifest, move into place),
    :meth:`discard` (remove the staging folder and the parents created for it)."""

    def check_existing(self) -> None:
        our_files(self.out_dir)

    def commit(self) -> Path:
        """Write the manifest into the staging folder and move it into place; an earlier output is
        checked again and exactly its files are deleted afterwards."""
        tmp, out = self.staging, self.out_dir
        files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(tmp.iterdir())}
        (tmp / MANIFEST).write_text(json.dumps({"format": MANIFEST_FORMAT, "version": 1, "files": files}, indent=1))
        try:
            if not out.is_dir() or not os.listdir(out):
                os.replace(tmp, out)  # a new folder, or over an empty one
                self.staging = None
                return out
            aside = staging_dir(out, "old")
        except OSError as e:
            raise EvaluationInputError(f"{out}: cannot move the output into place ({e.strerror or e})") from e
        old = aside / "old"
        try:
            os.rename(out, old)
        except OSError as e:
            os.rmdir(aside)
            raise EvaluationInputError(f"{out}: cannot move the earlier output aside ({e.strerror or e})") from e
        try:
            names = our_files(old, shown=out)  # again: nothing may have been added since the check
            os.rename(tmp, out)
        except BaseException:
            os.rename(old, out)
            os.rmdir(aside)
            raise
        self.staging = None
        for name in names:
            (old / name).unlink()
        old.rmdir()
        aside.rmdir()
        return out


# -- writing ------------------------------------------------------------------------------------------
def safe_name(name: str) -> str:
    """A class name usable in a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def plot_plan(class_names: Sequence[str], plots: bool, why_not: str = "--no-plots") -> dict:
    """``summary["plots"]``: whether plots are drawn, for which classes, and why not for the others."""
    drawn = list(class_names[:MAX_PLOTTED_CLASSES]) if plots else []
    if not plots:
        note = f"no plots ({why_not})"
    elif len(drawn) < len(class_names):
        note = (f"plots of the first {len(drawn)} of {len(class_names)} classes only (at most "
                f"{MAX_PLOTTED_CLASSES}; --no-plots: none)")
    else:
        note = f"plots of all {len(drawn)} classes"
    return {"drawn": bool(drawn), "classes": drawn, "n_classes": len(class_names),
            "max_classes": MAX_PLOTTED_CLASSES, "risk_coverage": bool(drawn), "note": note}


def write_per_case_csv(path: Path, cases: List[dict], class_names: List[str],
                       calibration_names: Optional[List[str]] = None) -> None:
    """One row per case: DSC / HD95 per class (``class_names``), the metrics, the scores and the signed
    calibration error per calibration class (``calibration_names``, default ``class_names``)."""
    calibration_names = class_names if calibration_names is None else calibration_names
    cols = (["case", "folder"] + [f"DSC_{n}" for n in class_names] + [f"HD95_{n}" for n in class_names]
            + ["DSC_mean", "HD95_mean"] + list(METRIC_KEYS) + list(SCORES)
            + [f"SCE_{n}" for n in calibration_names] + ["flags"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for c in cases:
            m = c["metrics"]
            row = [c["case"], c["folder"]] + [m["DSC"][n] for n in class_names] + \
                  [m["HD95"][n] for n in class_names] + [m["DSC_mean"], m["HD95_mean"]] + \
                  [m[k] for k in METRIC_KEYS] + [c["scores"][k] for k in SCORES] + \
                  [m["SCE_classes"][n] for n in calibration_names] + ["; ".join(c["flags"])]
            w.writerow(["" if v is None or isinstance(v, float) and math.isnan(v) else
                        (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for v in row])


def write_outputs(folder: OutputFolder, summary: dict, class_names, pooled_acc, case_accs) -> None:
    """Write every output file into the staging folder, then move it into place (:meth:`OutputFolder.commit`)."""
    from .plots import plot_dataset_reliability_histogram, plot_reliability_diagram, plot_risk_coverage

    tmp = folder.staging
    summary["config"]["out_dir"] = str(folder.out_dir)
    with open(tmp / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    write_per_case_csv(tmp / "per_case.csv", summary["cases"], summary["classes"], summary["calibration_classes"])
    drawn = summary["plots"]["classes"]
    if drawn:
        edges, n, conf, freq = pooled_acc.reliability()
        for k, name in enumerate(drawn):
            plot_reliability_diagram(tmp / f"reliability_{safe_name(name)}.png", edges, n[k], conf[k], freq[k],
                                     title=f"Pooled reliability: {name} ({summary['config']['n_cases']} cases)")
        per_case_freq = np.stack([a.reliability()[3][:len(drawn)] for a in case_accs])  # (cases, K, bins)
        plot_dataset_reliability_histogram(tmp / "dataset_reliability_histogram.png", edges, per_case_freq, drawn)
    if summary["plots"]["risk_coverage"]:
        plot_risk_coverage(tmp / "risk_coverage.png", plot_curves(summary["cases"]), PLOTTED_RISK)
    folder.commit()
