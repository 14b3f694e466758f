"""``calib-evaluate``: calibration metrics, DSC and HD95 of nnU-Net prediction folders."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

from nnunet_calibration.settings import MetricOptions, add_arguments

# Only the standard library and the settings at import time: a worker process of calib-evaluate
# imports this module first (as the main module) before it asks to die with its parent (see .pool),
# so numpy, nnU-Net, SimpleITK and torch are imported in the functions below.

DESCRIPTION = """\
Evaluate nnU-Net v2 predictions saved with probabilities (nnUNetv2_predict --save_probabilities,
or the fold_X/validation folders of nnUNetv2_train --npz): per case DSC and HD95 per class/region
and the calibration metrics ECE (foreground, SDC paper Eq. 6), CECE (class-wise), pECE (SDC paper
Algorithm 1), mL1-ACE/mL1-ECE/mL1-MCE (ACE paper), NLL and Brier (DSC++ paper), and
  SCE              signed class-wise calibration error: mean probability - observed frequency on
                   CECE's voxels, mean over classes (> 0 over-, < 0 under-confident; per class:
                   SCE_<class>), always computed
  debiased-L2-ECE  debiased L2 calibration error (Kumar et al. 2019) on ECE's voxels and bins
  boundary-ECE     ECE within --boundary-k-mm mm of the reference boundary (default 2 voxels of
                   the case's largest spacing)
ECE, CECE, debiased-L2-ECE and boundary-ECE use equal-width bins, or equal-mass bins with
--binning adaptive. Per data set the mean over cases, the exact pooled values, and percentile
bootstrap intervals (--bootstrap N resamples of the cases, 0: none) of the pooled ECE and
debiased-L2-ECE (summary.json "bootstrap").

Which cases to distrust: per case the confidence scores (no reference needed; columns of per_case.csv)
  foreground_entropy  mean normalised entropy over the predicted foreground (higher = less sure)
  boundary_entropy    the same within 2 x the largest spacing (mm) of a predicted boundary
  expected_dice       soft Dice of the probabilities against the prediction (higher = surer)
  uncertain_fraction  voxels with top-label probability < 0.9 per predicted foreground voxel
                      (higher = less sure)
and per score, against the risks 1-DSC (1 - the case's mean DSC) and HD95, the AURC, e-AURC and
AUGRC (summary.json "risk_coverage"; a case with a NaN score, e.g. no predicted foreground, or NaN
risk is left out of that score's analysis and counted in n_excluded).

Writes OUT/summary.json, OUT/per_case.csv, OUT/reliability_<class>.png,
OUT/dataset_reliability_histogram.png and OUT/risk_coverage.png (plots of at most {max_plotted}
classes; --no-plots: none), and
OUT/calib_evaluate_manifest.json, the list of the files it wrote. Nothing is written unless every
case was evaluated (SIGINT and SIGTERM remove the staging folder; one left by a killed run is
removed by the next; worker processes die with the main process). OUT may not be, contain or lie
inside a PRED_FOLDER or the --gt folder (the default PRED_FOLDER/calibration_evaluation excepted),
nor be or contain the folder of dataset.json; an existing OUT
is replaced only if it holds an earlier output of calib-evaluate, unchanged (its manifest's files).
Unusable output locations are errors before any case is computed.
Every reference must have a prediction and vice versa (else an error listing the cases) unless
--allow-missing, or --cases names the cases to evaluate (e.g. one fold's validation cases).
Corrupt/truncated files, geometry mismatches (spacing, origin, direction, shape from nnU-Net's
CASE.pkl or segmentation vs the reference) and dead worker processes are errors.
Exit status 2 on bad input (the message names the file), 130 when interrupted."""


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from nnunet_calibration.utils import ArgumentParser

    from .output import MAX_PLOTTED_CLASSES

    p = ArgumentParser(prog="calib-evaluate", description=DESCRIPTION.format(max_plotted=MAX_PLOTTED_CLASSES),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_folders", nargs="+", metavar="PRED_FOLDER",
                   help="folder(s) with CASE.npz (key 'probabilities') and CASE.pkl; several folders "
                        "(e.g. the five fold_X/validation) are reported together")
    p.add_argument("--gt", required=True, metavar="GT_FOLDER",
                   help="folder with the references CASE<file_ending> (spacing is read from them)")
    p.add_argument("-djfile", "--dataset-json", dest="dataset_json", default=None,
                   help="dataset.json (default: the one in the first PRED_FOLDER or its parent/grand-parent)")
    p.add_argument("-o", "--output", dest="out_dir", default=None,
                   help="output folder outside the input folders (default: PRED_FOLDER/calibration_evaluation); "
                        "an existing one is replaced only if it holds an earlier calib-evaluate output, unchanged")
    p.add_argument("-np", "--num-processes", dest="num_processes", type=_positive_int, default=1,
                   help="cases evaluated in parallel processes (one case in memory per process; default 1)")
    p.add_argument("--cases", nargs="+", default=None, metavar="CASE",
                   help="the cases to evaluate (default: every reference in GT_FOLDER)")
    p.add_argument("--cases-from-split", nargs=2, default=None, metavar=("SPLITS_JSON", "FOLD"),
                   help="evaluate the validation cases of FOLD in nnU-Net's splits_final.json")
    p.add_argument("--allow-missing", action="store_true",
                   help="skip cases without prediction or without reference (listed in summary.json "
                        "under 'missing') instead of stopping with an error")
    metrics = p.add_argument_group("metric options (nnunet_calibration.settings.MetricOptions)")
    add_arguments(metrics, MetricOptions)
    p.add_argument("--no-plots", action="store_true",
                   help="no reliability diagrams and no dataset reliability histogram (by default they are "
                        f"drawn for at most {MAX_PLOTTED_CLASSES} classes, the first ones)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def run(args: argparse.Namespace) -> int:
    from nnunet_calibration.metrics import METRIC_KEYS
    from nnunet_calibration.utils import keep_freed_memory

    from .folders import evaluate_folders

    options = MetricOptions.from_cli(args)  # range checks: one line, exit 2
    cases = args.cases
    if args.cases_from_split is not None:
        from .labels import split_validation_cases

        cases = (cases or []) + split_validation_cases(args.cases_from_split[0], int(args.cases_from_split[1]))
    if args.num_processes == 1:
        keep_freed_memory()  # this process evaluates the cases itself (see keep_freed_memory)
    summary = evaluate_folders(
        args.pred_folders, args.gt, dataset_json=args.dataset_json, out_dir=args.out_dir,
        num_processes=args.num_processes, progress=not args.no_progress, cases=cases,
        allow_missing=args.allow_missing, options=options, plots=not args.no_plots)
    m, pooled = summary["mean"], summary["pooled"]

    def fmt(v):
        return "nan" if v is None else f"{v:.4f}"

    print(f"{summary['config']['n_cases']} cases -> {summary['config']['out_dir']}")
    print("metric              mean   pooled")
    for k in ("DSC", "HD95"):
        print(f"{k:<15} {fmt(m[k]):>8}")
    for k in METRIC_KEYS:
        print(f"{k:<15} {fmt(m[k]):>8} {fmt(pooled[k]):>8}")
    boot = summary["bootstrap"]
    for k in ("ECE", "debiased-L2-ECE"):
        if k in boot:
            print(f"pooled {k} {boot['confidence']:.0%} bootstrap interval ({boot['n_resamples']} resamples of the "
                  f"cases): [{fmt(boot[k]['low'])}, {fmt(boot[k]['high'])}]")
    rc = summary["risk_coverage"]
    print("AURC (1-DSC): " + ", ".join(f"{k} {fmt(v['1-DSC']['AURC'])}" for k, v in rc.items()))
    n_flagged = sum(1 for c in summary["cases"] if c["flags"])
    if n_flagged:
        print(f"{n_flagged} case(s) flagged (empty masks, HD95 = image diagonal; geometry not checked): "
              "see summary.json")
    plots = summary["plots"]
    if len(plots["classes"]) < plots["n_classes"]:
        print(plots["note"])
    miss = summary.get("missing") or {}
    if miss.get("predictions") or miss.get("references"):
        print(f"skipped (--allow-missing): {len(miss.get('predictions') or [])} case(s) without prediction, "
              f"{len(miss.get('references') or [])} without reference: see summary.json 'missing'")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The console script (``argv`` None: ``sys.argv``). Interrupted (exit status 130, workers stopped,
    staging removed), the console script itself leaves at once: the interpreter's own clean-up of
    torch and nnU-Net takes seconds and has nothing left to do."""
    from nnunet_calibration.utils import cli_main

    status = cli_main(build_parser(), run, argv)
    if status == 130 and argv is None:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
