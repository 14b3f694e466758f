"""``calib-convert``: convert an official dataset download to an nnU-Net v2 raw dataset.

Usage::

    calib-convert {acdc,flare,brats,prostate} SOURCE -d DATASET_ID [--overwrite] [--release R]
                  [--seed N] [--nnunet-raw DIR] [--nnunet-preprocessed DIR]

Writes ``$nnUNet_raw/DatasetXXX_Name`` and ``$nnUNet_preprocessed/DatasetXXX_Name/splits_final.json``.
On bad input it prints ``calib-convert: error: ...`` (naming the file) to stderr and exits with
status 2; nothing is written then. Ctrl-C and SIGTERM remove the staging folder and exit with 130.
"""
from __future__ import annotations

import argparse
import sys

from nnunet_calibration.utils import ArgumentParser, cli_main

from ._common import DEFAULT_SPLIT_SEED, ConversionError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="calib-convert",
        description="Convert an ACDC, FLARE21/22, BraTS 2019/2020/2021 or MSD Task05_Prostate download into "
                    "an nnU-Net v2 raw dataset ($nnUNet_raw/DatasetXXX_Name) with a patient-wise 5-fold "
                    "splits_final.json in $nnUNet_preprocessed/DatasetXXX_Name.")
    p.add_argument("dataset", choices=["acdc", "flare", "brats", "prostate"])
    p.add_argument("source", help="folder unpacked from the official download")
    p.add_argument("-d", "--dataset-id", dest="dataset_id", type=int, required=True,
                   help="nnU-Net dataset id (1..999)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing DatasetXXX_Name and splits file")
    p.add_argument("--release", default=None,
                   help="flare: 21 or 22; brats: 2019, 2020 or 2021 (default: detected from the layout)")
    p.add_argument("--seed", type=int, default=DEFAULT_SPLIT_SEED, help="seed of the patient-wise split")
    p.add_argument("--nnunet-raw", default=None, help="default: $nnUNet_raw")
    p.add_argument("--nnunet-preprocessed", default=None, help="default: $nnUNet_preprocessed")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return p


def run(args) -> int:
    from . import CONVERTERS  # imports nnunetv2; after argument parsing so that --help stays fast

    kwargs = dict(overwrite=args.overwrite, raw_root=args.nnunet_raw, preprocessed_root=args.nnunet_preprocessed,
                  seed=args.seed, progress=not args.no_progress)
    if args.dataset in ("flare", "brats"):
        kwargs["release"] = args.release
    elif args.release is not None:
        raise ConversionError("--release is only used for flare and brats")
    result = CONVERTERS[args.dataset](args.source, args.dataset_id, **kwargs)
    print(f"wrote {result.dataset_dir} ({result.num_training} training, {result.num_test} test cases) "
          f"and {result.splits_file}")
    return 0


def main(argv=None) -> int:
    return cli_main(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
