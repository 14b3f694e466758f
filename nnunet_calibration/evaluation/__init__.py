"""``calib-evaluate`` and :func:`evaluate_folders`: metrics of nnU-Net prediction folders (see :mod:`.folders`).

The names below are imported when first used: a worker process (:mod:`.pool`) imports this package
before its heavy imports (nnU-Net, SimpleITK, torch), and so does ``calib-evaluate --help``.
"""
import importlib

_WHERE = {"evaluate_folders": ".folders", "evaluate_case": ".case", "EvaluationInputError": ".errors",
          "find_dataset_json": ".labels", "label_info": ".labels", "reader_writer": ".labels",
          "split_validation_cases": ".labels", "load_probabilities": ".reading", "load_reference": ".reading",
          "read_reference": ".reading", "remove_stale_staging": "nnunet_calibration.utils"}
#: old name of :func:`split_validation_cases` (``nnunet_calibration.posthoc.model`` has its own ``validation_cases``)
_ALIASES = {"validation_cases": "split_validation_cases"}

__all__ = sorted([*_WHERE, *_ALIASES])


def __getattr__(name):
    real = _ALIASES.get(name, name)
    if real not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_WHERE[real], __name__), real)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
