"""``calib-evaluate``: calibration metrics, DSC and HD95 of nnU-Net prediction folders."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from .core import DEFAULT_OPTIONS, EvaluationInputError, evaluate_folders

DESCRIPTION = """\
Evaluate nnU-Net v2 predictions saved with probabilities (nnUNetv2_predict --save_probabilities,
or the fold_X/validation folders of nnUNetv2_train --npz): per case DSC and HD95 per class/region
and the calibration metrics ECE (foreground, SDC paper Eq. 6), CECE (class-wise), pECE (SDC paper
Algorithm 1), mL1-ACE/mL1-ECE/mL1-MCE (ACE paper), NLL and Brier (DSC++ paper); per data set the
mean over cases and the exact pooled values.

Writes OUT/summary.json, OUT/per_case.csv, OUT/reliability_<class>.png and
OUT/dataset_reliability_histogram.png. Nothing is written unless every case was evaluated.
Exit status 2 on bad input (the message names the file)."""


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULT_OPTIONS
    p = argparse.ArgumentParser(prog="calib-evaluate", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pred_folders", nargs="+", metavar="PRED_FOLDER",
                   help="folder(s) with CASE.npz (key 'probabilities') and CASE.pkl; several folders "
                        "(e.g. the five fold_X/validation) are reported together")
    p.add_argument("--gt", required=True, metavar="GT_FOLDER",
                   help="folder with the references CASE<file_ending> (spacing is read from them)")
    p.add_argument("-djfile", "--dataset-json", dest="dataset_json", default=None,
                   help="dataset.json (default: the one in the first PRED_FOLDER or its parent/grand-parent)")
    p.add_argument("-o", "--output", dest="out_dir", default=None,
                   help="output folder (default: PRED_FOLDER/calibration_evaluation; replaced if it only "
                        "holds earlier calib-evaluate output)")
    p.add_argument("-np", "--num-processes", dest="num_processes", type=int, default=1,
                   help="cases evaluated in parallel processes (one case in memory per process; default 1)")
    p.add_argument("--n-bins-ece", type=int, default=d["n_bins_ece"], help="bins of ECE (default %(default)s)")
    p.add_argument("--n-bins-cece", type=int, default=d["n_bins_cece"], help="bins of CECE (default %(default)s)")
    p.add_argument("--n-bins-pece", type=int, default=d["n_bins_pece"], help="bins of pECE (default %(default)s)")
    p.add_argument("--n-bins-ace", type=int, default=d["n_bins_ace"],
                   help="bins of mL1-ACE/ECE/MCE and of the reliability plots (default %(default)s)")
    p.add_argument("--fp-weight", type=float, default=d["fp_weight"],
                   help="false-positive weight of pECE (default %(default)s)")
    p.add_argument("--cece-threshold", type=float, default=d["cece_threshold"],
                   help="CECE keeps voxels with p_c > threshold (default %(default)s)")
    p.add_argument("--include-background", action="store_true",
                   help="include the background class in mL1-ACE/ECE/MCE (softmax only)")
    p.add_argument("--nll-eps", type=float, default=d["nll_eps"],
                   help="probabilities are clipped to >= eps in NLL (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = evaluate_folders(
            args.pred_folders, args.gt, dataset_json=args.dataset_json, out_dir=args.out_dir,
            num_processes=args.num_processes, progress=not args.no_progress,
            n_bins_ece=args.n_bins_ece, n_bins_cece=args.n_bins_cece, n_bins_pece=args.n_bins_pece,
            n_bins_ace=args.n_bins_ace, fp_weight=args.fp_weight, cece_threshold=args.cece_threshold,
            include_background=args.include_background, nll_eps=args.nll_eps)
    except EvaluationInputError as e:
        print(f"calib-evaluate: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:  # bad option values (bins, ...)
        print(f"calib-evaluate: error: {e}", file=sys.stderr)
        return 2
    m, pooled = summary["mean"], summary["pooled"]

    def fmt(v):
        return "nan" if v is None else f"{v:.4f}"

    print(f"{summary['config']['n_cases']} cases -> {summary['config']['out_dir']}")
    print("metric      mean    pooled")
    for k in ("DSC", "HD95"):
        print(f"{k:<9} {fmt(m[k]):>8}")
    for k in ("ECE", "CECE", "pECE", "mL1-ACE", "mL1-ECE", "mL1-MCE", "NLL", "Brier"):
        print(f"{k:<9} {fmt(m[k]):>8} {fmt(pooled[k]):>8}")
    n_flagged = sum(1 for c in summary["cases"] if c["flags"])
    if n_flagged:
        print(f"{n_flagged} case(s) flagged (empty masks, HD95 = image diagonal): see summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
