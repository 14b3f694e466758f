"""``calib-evaluate`` and :func:`evaluate_folders`: metrics of nnU-Net prediction folders (see :mod:`.core`)."""
from .core import (EvaluationInputError, evaluate_case, evaluate_folders, find_dataset_json, label_info,
                   load_probabilities, load_reference, read_reference, reader_writer, remove_stale_staging,
                   validation_cases)

__all__ = ["evaluate_folders", "evaluate_case", "EvaluationInputError", "find_dataset_json", "label_info",
           "load_probabilities", "load_reference", "read_reference", "reader_writer", "remove_stale_staging",
           "validation_cases"]
