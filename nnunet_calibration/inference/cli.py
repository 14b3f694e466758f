"""``calib-predict``: ``nnUNetv2_predict`` with the model's calibration applied to the logits, and
uncertainty maps (conventions: :mod:`nnunet_calibration.inference.predict`,
:mod:`nnunet_calibration.inference.maps`)."""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

# Only the standard library and the light helpers at import time (``--help`` stays fast): torch and
# nnU-Net are imported in run().
from nnunet_calibration.utils import ArgumentParser, cli_main

DESCRIPTION = """\
nnU-Net v2 inference with post-hoc calibration and uncertainty maps.

  calib-predict -i IN -o OUT -d DATASET -c CONFIG [-f 0 1 2 3 4] [-tr TRAINER] [-p PLANS] [...]
  calib-predict -i IN -o OUT -m MODEL_FOLDER [-f ...] [...]

nnU-Net's own predictor (preprocessing, sliding window, mirroring, fold ensemble, resampling,
export; the same arguments and defaults as nnUNetv2_predict), with MODEL_FOLDER/calibration.json
(calib-calibrate fit) applied to the ensemble logits before the softmax / sigmoid: exact, no
probability floor. Softmax: softmax(log_softmax(z) / T) (one T: softmax(z / T)); regions:
sigmoid(z / T_r).

Writes OUT/CASE<file_ending> (segmentation), with --save_probabilities OUT/CASE.npz + CASE.pkl
(calibrated probabilities), dataset.json, plans.json, predict_from_raw_data_args.json and the
applied calibration.json;
  --uncertainty              OUT/uncertainty/CASE_entropy<file_ending>: normalised entropy of the
                             ensemble output (softmax: H / log C; regions: mean binary entropy of
                             the regions / log 2), 0 = certain, 1 = uniform; with two or more folds
                             also CASE_mutual_information<file_ending> (entropy of the folds' mean
                             probabilities minus the folds' mean entropy, normalised the same way:
                             the folds' disagreement, epistemic) and CASE_fold_disagreement
                             <file_ending> (fraction of folds whose label differs from the
                             ensemble's). float32 images with the segmentation's geometry (open them
                             in 3D Slicer / ITK-SNAP over the image).
  --save_fold_probabilities  OUT/fold_probabilities/fold_X/CASE.npz: each fold's calibrated
                             probabilities.
  --no-calibration           nnU-Net's output bit for bit (no calibration.json needed).

OUT must not exist (or be empty); it is written in a staging folder next to it and renamed at
the end. Exit status 2 on bad input (the message names the file): no calibration.json in the model
folder (without --no-calibration), a calibration that does not fit the model, a missing fold
checkpoint, a missing input folder."""


def _env_int(name: str, default: int) -> int:
    """nnUNetv2_predict's default for -npp / -nps: the environment variable, else ``default``."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="calib-predict", description=DESCRIPTION,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-i", required=True, metavar="INPUT_FOLDER", help="images CASE_XXXX<file_ending> (as nnU-Net)")
    p.add_argument("-o", required=True, metavar="OUTPUT_FOLDER", help="new output folder (must not exist, or be empty)")
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("-d", metavar="DATASET", help="dataset name or id (with -c, -tr, -p: the model in $nnUNet_results)")
    model.add_argument("-m", metavar="MODEL_FOLDER", help="the trained model folder (instead of -d/-c/-tr/-p)")
    p.add_argument("-c", metavar="CONFIGURATION", help="configuration (required with -d)")
    p.add_argument("-p", default="nnUNetPlans", help="plans identifier (default %(default)s)")
    p.add_argument("-tr", default="nnUNetTrainer", help="trainer (default %(default)s)")
    p.add_argument("-f", nargs="+", default=["0", "1", "2", "3", "4"],
                   help="folds to ensemble (default 0 1 2 3 4; 'all' for fold_all)")
    p.add_argument("-chk", default="checkpoint_final.pth", help="checkpoint file name (default %(default)s)")
    p.add_argument("-step_size", type=float, default=0.5, help="sliding-window step (default %(default)s)")
    p.add_argument("--disable_tta", action="store_true", help="no mirroring at test time")
    p.add_argument("-device", default="cuda", choices=("cuda", "cpu", "mps"), help="default %(default)s")
    p.add_argument("-npp", type=int, default=_env_int("nnUNet_npp", 3),
                   help="preprocessing processes (default $nnUNet_npp or 3; 0: in this process)")
    p.add_argument("-nps", type=int, default=_env_int("nnUNet_nps", 3),
                   help="export processes (default $nnUNet_nps or 3; 0: in this process)")
    p.add_argument("--save_probabilities", action="store_true", help="write CASE.npz and CASE.pkl (calibrated)")
    p.add_argument("--verbose", action="store_true", help="nnU-Net's verbose output")
    p.add_argument("--disable_progress_bar", action="store_true", help="no progress bars")
    p.add_argument("--not_on_device", action="store_true", help="nnU-Net's --not_on_device")
    p.add_argument("--uncertainty", action="store_true", help="write the uncertainty maps (OUT/uncertainty/)")
    p.add_argument("--save_fold_probabilities", action="store_true",
                   help="write each fold's probabilities (OUT/fold_probabilities/fold_X/CASE.npz)")
    p.add_argument("--no-calibration", dest="no_calibration", action="store_true",
                   help="do not apply calibration.json: nnU-Net's output bit for bit")
    return p


def _model_folder(args) -> Path:
    from nnunet_calibration.inference.predict import PredictionError

    if args.m is not None:
        return Path(args.m)
    if not args.c:
        raise PredictionError("-c CONFIGURATION is required with -d")
    if not os.environ.get("nnUNet_results"):
        raise PredictionError("nnUNet_results is not set; set it or pass the model folder with -m")
    from nnunetv2.utilities.file_path_utilities import get_output_folder

    try:
        return Path(get_output_folder(args.d, args.tr, args.p, args.c))
    except (RuntimeError, ValueError) as e:
        raise PredictionError(f"-d {args.d}: {e}") from e


def _check_inputs(args, model: Path, folds: list) -> None:
    from nnunet_calibration.inference.predict import PredictionError

    if not model.is_dir():
        raise PredictionError(f"{model}: model folder does not exist")
    for name in ("dataset.json", "plans.json"):
        if not (model / name).is_file():
            raise PredictionError(f"{model / name}: not found (is {model} a trained nnU-Net model folder?)")
    for f in folds:
        chk = model / f"fold_{f}" / args.chk
        if not chk.is_file():
            raise PredictionError(f"{chk}: checkpoint not found (fold {f}; choose the folds with -f)")
    if not Path(args.i).is_dir():
        raise PredictionError(f"{args.i}: input folder does not exist")
    if args.step_size <= 0 or args.step_size > 1:
        raise PredictionError(f"-step_size must be in (0, 1], got {args.step_size}")
    if args.npp < 0 or args.nps < 0:
        raise PredictionError("-npp and -nps must be >= 0")


def run(args, command: str) -> int:
    import json

    from nnunet_calibration.output_location import StagedOutput, check_not_an_input, check_output_path

    folds = [f if f == "all" else int(f) for f in args.f]
    model = _model_folder(args)
    _check_inputs(args, model, folds)
    out = Path(args.o)
    check_not_an_input(out, [("input folder", args.i, True), ("model folder", model, False)])
    check_output_path(out)
    from nnunet_calibration.inference.predict import PredictionError

    if out.is_dir() and any(out.iterdir()):
        raise PredictionError(f"{out}: output folder exists and is not empty; choose a new one")

    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json, save_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_calibration.inference.predict import CalibratedPredictor, ExportOptions, load_calibration
    from nnunet_calibration.utils import json_clean

    dataset_json = load_json(str(model / "dataset.json"))
    plans_manager = PlansManager(load_json(str(model / "plans.json")))
    lm = plans_manager.get_label_manager(dataset_json)
    cal = temps = None
    if not args.no_calibration:
        cal, temps = load_calibration(model, dataset_json, lm.num_segmentation_heads, lm.has_regions)

    if args.device == "cpu":
        import multiprocessing

        torch.set_num_threads(multiprocessing.cpu_count())  # as nnUNetv2_predict
        device = torch.device("cpu")
    elif args.device == "cuda":
        torch.set_num_threads(1)
        torch.set_num_interop_threads(1)
        device = torch.device("cuda")
    else:
        device = torch.device("mps")
    predictor = CalibratedPredictor(tile_step_size=args.step_size, use_gaussian=True,
                                    use_mirroring=not args.disable_tta, perform_everything_on_device=not args.not_on_device,
                                    device=device, verbose=args.verbose, verbose_preprocessing=args.verbose,
                                    allow_tqdm=not args.disable_progress_bar)
    predictor.initialize_from_trained_model_folder(str(model), folds, args.chk)
    if predictor.configuration_manager.previous_stage_name is not None:
        raise PredictionError(f"{model}: a cascade stage (previous stage "
                              f"{predictor.configuration_manager.previous_stage_name}); calib-predict predicts "
                              "single-stage configurations only")
    applied = None
    if cal is not None:
        from datetime import datetime, timezone

        applied = {"calibration": str((model / "calibration.json").resolve()), "method": cal["method"],
                   "parameters": cal["parameters"], "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                   "by": "calib-predict"}
    staged = StagedOutput(out)
    tmp = staged.prepare()
    try:
        options = ExportOptions(save_probabilities=args.save_probabilities, temperatures=temps,
                                regions=lm.has_regions, uncertainty=args.uncertainty,
                                fold_names=[str(f) for f in folds],
                                save_fold_probabilities=args.save_fold_probabilities, root=str(tmp),
                                applied=applied, file_ending=dataset_json["file_ending"])
        record = {"command": command, "model_folder": str(model.resolve()), "input_folder": str(Path(args.i).resolve()),
                  "folds": folds, "checkpoint": args.chk, "step_size": args.step_size, "tta": not args.disable_tta,
                  "save_probabilities": args.save_probabilities, "uncertainty": args.uncertainty,
                  "save_fold_probabilities": args.save_fold_probabilities, "calibrated": cal is not None}
        save_json(json_clean(record), str(tmp / "predict_from_raw_data_args.json"))
        save_json(predictor.dataset_json, str(tmp / "dataset.json"), sort_keys=False)
        save_json(predictor.plans_manager.plans, str(tmp / "plans.json"), sort_keys=False)
        n = predictor.predict_folder(args.i, str(tmp), options, args.npp, args.nps)
        if cal is not None:
            rec = dict(cal, applied_to={"prediction_folder": str(out.resolve()), "cases": n,
                                        "segmentations": "predicted (calib-predict)", "date": applied["date"]})
            with open(tmp / "calibration.json", "w") as f:
                json.dump(json_clean(rec), f, indent=2)
        if out.is_dir():
            out.rmdir()  # an empty folder given as -o (checked above)
        staged.commit()
    except BaseException:
        staged.discard()
        raise
    what = "calibrated" if cal is not None else "not calibrated (--no-calibration)"
    print(f"{n} cases written to {out} ({what})")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = shlex.join(["calib-predict", *argv])
    return cli_main(build_parser(), lambda args: run(args, command), argv)


if __name__ == "__main__":
    sys.exit(main())
