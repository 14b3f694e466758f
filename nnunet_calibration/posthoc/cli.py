"""``calib-calibrate``: post-hoc temperature / vector scaling of a trained nnU-Net model."""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Optional, Sequence

from nnunet_calibration.posthoc.apply import apply_calibration
from nnunet_calibration.posthoc.export import DEFAULT_CHECKPOINTS, export_model
from nnunet_calibration.posthoc.model import (CALIBRATION_FILE, DEFAULT_MAX_VOXELS, CalibrationError, fit_model,
                                              format_summary)
from nnunet_calibration.utils import ArgumentParser, cli_main

DESCRIPTION = f"""\
Post-hoc calibration of a trained nnU-Net v2 model.

  calib-calibrate fit MODEL_FOLDER [-f FOLDS] [--method temperature|vector] [--max-voxels N]
      fits by NLL on the fold_X/validation/CASE.npz files (nnUNetv2_train ... --npz) against the
      references and writes MODEL_FOLDER/{CALIBRATION_FILE} (scope: per fold).
  calib-calibrate fit MODEL_FOLDER --predictions PRED_FOLDER --gt GT_FOLDER [-f FOLDS]
      fits on a prediction folder of the fold ensemble (nnUNetv2_predict -f 0 1 2 3 4
      --save_probabilities on held-out labelled cases; -f: the folds it used, default every
      fold_<number> folder) (scope: ensemble of folds ...).
  calib-calibrate apply PRED_FOLDER -m MODEL_FOLDER -o OUT [--force]
      writes a calibrated copy of a prediction folder (nnUNetv2_predict --save_probabilities) in
      nnU-Net's own layout (CASE.npz, CASE.pkl, segmentation, dataset.json, plans.json); the copy
      is marked as calibrated (calibration.json, CASE.pkl) and refused as PRED_FOLDER unless --force.
      PRED_FOLDER may be a MODEL_FOLDER/fold_X/validation folder (nnUNetv2_train --npz).
      The calibration must belong to the model (dataset, plans, configuration, trainer, folds).
  calib-calibrate export MODEL_FOLDER -o ZIP [-f FOLDS] [-chk CHECKPOINTS]
      nnU-Net's model zip (nnUNetv2_export_model_to_zip) with {CALIBRATION_FILE} inside, installable
      with nnUNetv2_install_pretrained_model_from_zip.

Softmax (labels) and sigmoid (regions) models are both handled. Exit status 2 on bad input
(the message names the file); nothing is written then."""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="calib-calibrate", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fit", help=f"fit on the validation predictions, write MODEL_FOLDER/{CALIBRATION_FILE}")
    f.add_argument("model_folder", metavar="MODEL_FOLDER",
                   help="nnUNet_results/DatasetXXX_Name/Trainer__Plans__Configuration")
    f.add_argument("-f", "--folds", nargs="+", type=int, default=None,
                   help="folds whose fold_X/validation is used (default: every fold_<number> folder)")
    f.add_argument("--method", choices=("temperature", "vector"), default="temperature",
                   help="one temperature, or one per channel (default %(default)s)")
    f.add_argument("--max-voxels", type=int, default=DEFAULT_MAX_VOXELS,
                   help="fit on at most N voxels drawn uniformly from all validation cases "
                        "(default %(default)s; 0: all voxels)")
    f.add_argument("--seed", type=int, default=0, help="seed of the voxel sample (default %(default)s)")
    f.add_argument("--gt", default=None, metavar="GT_FOLDER",
                   help="references CASE<file_ending> (default: $nnUNet_preprocessed/DATASET/gt_segmentations, "
                        "else $nnUNet_raw/DATASET/labelsTr)")
    f.add_argument("--predictions", default=None, metavar="PRED_FOLDER",
                   help="fit on this prediction folder of the fold ensemble (held-out labelled cases, "
                        "nnUNetv2_predict -f ... --save_probabilities) instead of fold_X/validation; -f names the "
                        "ensemble's folds")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    a = sub.add_parser("apply", help="write a calibrated copy of a prediction folder")
    a.add_argument("pred_folder", metavar="PRED_FOLDER", help="folder with CASE.npz, CASE.pkl, dataset.json")
    a.add_argument("-m", "--model", dest="model_folder", required=True, metavar="MODEL_FOLDER",
                   help=f"model folder holding {CALIBRATION_FILE}")
    a.add_argument("-o", "--output", dest="out_folder", required=True, metavar="OUT",
                   help="new output folder (must not exist; not inside PRED_FOLDER)")
    a.add_argument("--force", action="store_true",
                   help="apply even to a folder that is already a calibrated output (marked in its "
                        "calibration.json / CASE.pkl): the calibration is then applied twice")
    a.add_argument("--no-progress", action="store_true", help="no progress bar")
    e = sub.add_parser("export", help=f"nnU-Net's model zip with {CALIBRATION_FILE} inside")
    e.add_argument("model_folder", metavar="MODEL_FOLDER",
                   help="nnUNet_results/DatasetXXX_Name/Trainer__Plans__Configuration with calibration.json")
    e.add_argument("-o", "--output", dest="zip", required=True, metavar="ZIP", help="new .zip file")
    e.add_argument("-f", "--folds", nargs="+", type=int, default=None,
                   help="folds to export (default: the calibration's folds)")
    e.add_argument("-chk", "--checkpoints", nargs="+", default=list(DEFAULT_CHECKPOINTS),
                   help="checkpoint files to export (default %(default)s)")
    return p


def run(args, command: str) -> int:
    if args.command == "fit":
        if args.max_voxels is not None and args.max_voxels < 0:
            raise CalibrationError(f"--max-voxels must be >= 0, got {args.max_voxels}")
        rec = fit_model(args.model_folder, args.folds, args.method, args.max_voxels or None, args.seed,
                        args.gt, command=command, progress=not args.no_progress, predictions=args.predictions)
        for line in format_summary(rec):
            print(line)
        print(f"written: {args.model_folder}/{CALIBRATION_FILE}")
    elif args.command == "export":
        out = export_model(args.model_folder, args.zip, args.folds, args.checkpoints)
        print(f"written: {out} (nnU-Net's model zip with {CALIBRATION_FILE})")
    else:
        rec = apply_calibration(args.pred_folder, args.model_folder, args.out_folder, progress=not args.no_progress,
                                force=args.force)
        print(f"{rec['applied_to']['cases']} cases written to {args.out_folder} "
              f"(segmentations {rec['applied_to']['segmentations']})")
        if rec.get("caveat"):
            print("note: " + rec["caveat"])
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["calib-calibrate", *argv])
    return cli_main(build_parser(), lambda args: run(args, command), argv)


if __name__ == "__main__":
    sys.exit(main())
