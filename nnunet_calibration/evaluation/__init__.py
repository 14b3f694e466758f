"""``calib-evaluate`` and :func:`evaluate_folders`: metrics of nnU-Net prediction folders (see :mod:`.core`)."""
from .core import EvaluationInputError, evaluate_case, evaluate_folders, find_dataset_json, label_info

__all__ = ["evaluate_folders", "evaluate_case", "EvaluationInputError", "find_dataset_json", "label_info"]
