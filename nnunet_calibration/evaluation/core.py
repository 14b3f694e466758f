"""Former single module of the evaluator, kept as a thin re-export of its public names while
callers move to the modules that now hold them (issue 20):

=========================  ==========================================================================
:mod:`.errors`             ``EvaluationInputError``
:mod:`.labels`             ``find_dataset_json``, ``read_dataset_json``, ``label_info``, ``mask_keys``,
                           ``reader_writer``, ``split_validation_cases`` (was ``validation_cases``)
:mod:`.reading`            ``load_probabilities``, ``read_reference``, ``is_2d``, ``load_reference``,
                           ``prediction_properties``, ``geometry_problems`` (tolerances: :mod:`nnunet_calibration.io`)
:mod:`.segmentation`       ``SDC_CODE_CLASS``, ``probabilities_to_segmentation``, ``segmentation_metrics``
:mod:`.case`               ``evaluate_case`` (and the worker-process side)
:mod:`.pool`               ``run_jobs``: the cases in this process or in worker processes
:mod:`.output`             ``default_out_dir``, ``OutputFolder`` (checks, staging, manifest), ``write_outputs``,
                           ``write_per_case_csv``
:mod:`.folders`            ``collect_jobs``, ``dataset_means``, ``evaluate_folders``
=========================  ==========================================================================
"""
from nnunet_calibration.io import DIRECTION_ATOL, ORIGIN_ATOL, ORIGIN_RTOL, SPACING_RTOL
from nnunet_calibration.utils import remove_stale_staging

from .case import evaluate_case
from .errors import EvaluationInputError
from .folders import collect_jobs, dataset_means, evaluate_folders
from .labels import find_dataset_json, label_info, reader_writer, split_validation_cases
from .output import default_out_dir, write_per_case_csv
from .reading import geometry_problems, is_2d, load_probabilities, load_reference, read_reference
from .segmentation import SDC_CODE_CLASS, probabilities_to_segmentation, segmentation_metrics

#: old name of :func:`.labels.split_validation_cases`
validation_cases = split_validation_cases

__all__ = ["EvaluationInputError", "find_dataset_json", "label_info", "reader_writer", "split_validation_cases",
           "validation_cases", "load_probabilities", "read_reference", "is_2d", "load_reference",
           "geometry_problems", "probabilities_to_segmentation", "segmentation_metrics", "SDC_CODE_CLASS",
           "evaluate_case", "collect_jobs", "dataset_means", "evaluate_folders", "default_out_dir",
           "write_per_case_csv", "remove_stale_staging", "SPACING_RTOL", "ORIGIN_ATOL", "ORIGIN_RTOL",
           "DIRECTION_ATOL"]
