"""Helpers shared by the experiment tests."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import yaml

try:  # the same short training as the shared fixtures (tests/conftest.py), so their trainings can be reused
    from conftest import SHORT_TRAINING
    from nnunet_calibration.trainers.base import parse_hparams

    SHORT = parse_hparams(SHORT_TRAINING)
except ImportError:  # pragma: no cover
    SHORT = {"num_epochs": 1, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1}
METRICS = ("DSC", "HD95", "ECE", "CECE", "pECE", "mL1-ACE", "NLL", "Brier")


def write_experiment(path: Path, **cfg) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def read_table(report: Path) -> dict:
    with open(report / "table.csv") as fh:
        return {row["method"]: row for row in csv.DictReader(fh)}


def check_table_against_evaluator(exp_name: str, report: Path, model_folders: dict, folds, dataset_name: str,
                                  preprocessed: Path, tmp: Path) -> None:
    """Every table mean equals the mean over folds of evaluate_folders(fold_X/validation) run here."""
    from nnunet_calibration.evaluation import evaluate_folders, validation_cases

    table = read_table(report)
    gt = preprocessed / dataset_name / "gt_segmentations"
    dj = preprocessed / dataset_name / "dataset.json"
    for label, model in model_folders.items():
        per_fold = []
        for f in folds:
            s = evaluate_folders([model / f"fold_{f}" / "validation"], gt, dj, tmp / label / str(f), progress=False,
                                 write=False, cases=validation_cases(preprocessed / dataset_name / "splits_final.json", f))
            per_fold.append(s["mean"])
        row = table[label]
        assert row[f"{exp_name}/folds"] == " ".join(map(str, folds))
        for m in METRICS:
            want = np.mean([pf[m] for pf in per_fold])
            assert float(row[f"{exp_name}/{m}"]) == __import__("pytest").approx(want, rel=1e-9, abs=1e-12), (label, m)
            if len(folds) > 1:
                sd = np.std([pf[m] for pf in per_fold], ddof=1)
                assert float(row[f"{exp_name}/{m}_std"]) == __import__("pytest").approx(sd, rel=1e-9, abs=1e-12)


def load_json(p) -> dict:
    return json.loads(Path(p).read_text())
