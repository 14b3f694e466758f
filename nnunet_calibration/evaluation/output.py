"""The output folder of the evaluator: its default location, the checks made before any case is
computed, the staging folder next to it, and writing ``summary.json``, ``per_case.csv`` and the
plots there before the staging folder is moved into place."""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path
from typing import List, Sequence, Union

import numpy as np

from nnunet_calibration.metrics import METRIC_KEYS
from nnunet_calibration.utils import remove_stale_staging, replace_dir, staging_dir

from .errors import EvaluationInputError

PathLike = Union[str, os.PathLike]

OUR_OUTPUTS = ("summary.json", "per_case.csv")


def default_out_dir(pred_folders: Sequence[PathLike]) -> Path:
    """``PRED_FOLDER/calibration_evaluation`` (several folders: in their common parent)."""
    folders = [str(Path(f).resolve()) for f in pred_folders]
    base = folders[0] if len(folders) == 1 else os.path.commonpath(folders)
    return Path(base) / "calibration_evaluation"


def _prepare_out_dir(out_dir: Path) -> None:
    if out_dir.exists():
        if not out_dir.is_dir():
            raise EvaluationInputError(f"{out_dir}: output path exists and is not a folder")
        foreign = [p.name for p in out_dir.iterdir()
                   if p.name not in OUR_OUTPUTS and not p.name.endswith(".png")]
        if foreign:
            raise EvaluationInputError(f"{out_dir}: output folder exists and holds other files ({foreign[:3]}); "
                                       "choose another -o")


def make_staging(out_dir: Path) -> Path:
    """Create the staging folder next to ``out_dir`` now, so that an unwritable location fails before
    any case is computed."""
    _prepare_out_dir(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(out_dir)
        tmp = staging_dir(out_dir)
        probe = tmp / ".write-test"
        probe.write_bytes(b"x")
        probe.unlink()
    except OSError as e:
        raise EvaluationInputError(f"{out_dir}: output location is not writable ({e.strerror or e})") from e
    return tmp


def safe_name(name: str) -> str:
    """A class name usable in a file name."""
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(name))


def write_per_case_csv(path: Path, cases: List[dict], class_names: List[str]) -> None:
    cols = (["case", "folder"] + [f"DSC_{n}" for n in class_names] + [f"HD95_{n}" for n in class_names]
            + ["DSC_mean", "HD95_mean"] + list(METRIC_KEYS) + ["flags"])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for c in cases:
            m = c["metrics"]
            row = [c["case"], c["folder"]] + [m["DSC"][n] for n in class_names] + \
                  [m["HD95"][n] for n in class_names] + [m["DSC_mean"], m["HD95_mean"]] + \
                  [m[k] for k in METRIC_KEYS] + ["; ".join(c["flags"])]
            w.writerow(["" if isinstance(v, float) and math.isnan(v) else
                        (repr(float(v)) if isinstance(v, (float, np.floating)) else v) for v in row])


def write_outputs(out_dir: Path, tmp: Path, summary: dict, class_names, pooled_acc, case_accs) -> None:
    """Write every output file into the staging folder ``tmp``, then move it to ``out_dir``."""
    from .plots import plot_dataset_reliability_histogram, plot_reliability_diagram

    summary["config"]["out_dir"] = str(out_dir)
    with open(tmp / "summary.json", "w") as f:
        json.dump(summary, f, indent=2, allow_nan=False)
    write_per_case_csv(tmp / "per_case.csv", summary["cases"], summary["classes"])
    edges, n, conf, freq = pooled_acc.reliability()
    for k, name in enumerate(class_names):
        plot_reliability_diagram(tmp / f"reliability_{safe_name(name)}.png", edges, n[k], conf[k], freq[k],
                                 title=f"Pooled reliability: {name} ({summary['config']['n_cases']} cases)")
    per_case_freq = np.stack([a.reliability()[3] for a in case_accs])  # (cases, K, bins)
    plot_dataset_reliability_histogram(tmp / "dataset_reliability_histogram.png", edges, per_case_freq,
                                       class_names)
    replace_dir(tmp, out_dir)
