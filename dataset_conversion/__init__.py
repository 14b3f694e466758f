"""Converters from the official ACDC, FLARE21/22, BraTS 2019/2020/2021 and MSD Task05_Prostate
downloads to nnU-Net v2 raw datasets, with patient-wise ``splits_final.json``.

Command line: ``calib-convert {acdc,flare,brats,prostate} SOURCE -d DATASET_ID [--overwrite]
[--release R]`` (see :mod:`dataset_conversion.cli`). Output folder names: ``DatasetXXX_ACDC``,
``DatasetXXX_FLARE21`` / ``DatasetXXX_FLARE22``, ``DatasetXXX_BraTS2019`` (``BraTS2020``,
``BraTS2021`` by release), ``DatasetXXX_Prostate``.

Bad input raises :class:`ConversionError` naming the file; nothing is left behind then.
"""
from ._common import ConversionError, ConversionResult, patient_wise_splits
from .acdc import convert_acdc
from .brats import convert_brats
from .flare import convert_flare
from .prostate import convert_prostate

CONVERTERS = {"acdc": convert_acdc, "flare": convert_flare, "brats": convert_brats,
              "prostate": convert_prostate}

__all__ = ["ConversionError", "ConversionResult", "patient_wise_splits", "convert_acdc", "convert_brats",
           "convert_flare", "convert_prostate", "CONVERTERS"]
