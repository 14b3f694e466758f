"""``calib-evaluate`` and :func:`evaluate_folders`: metrics of nnU-Net prediction folders (see :mod:`.folders`)."""
from nnunet_calibration.utils import remove_stale_staging

from .case import evaluate_case
from .errors import EvaluationInputError
from .folders import evaluate_folders
from .labels import find_dataset_json, label_info, reader_writer, split_validation_cases
from .reading import load_probabilities, load_reference, read_reference

#: old name of :func:`split_validation_cases` (``nnunet_calibration.posthoc.model`` has its own ``validation_cases``)
validation_cases = split_validation_cases

__all__ = ["evaluate_folders", "evaluate_case", "EvaluationInputError", "find_dataset_json", "label_info",
           "load_probabilities", "load_reference", "read_reference", "reader_writer", "remove_stale_staging",
           "split_validation_cases", "validation_cases"]
