"""``calib-demo``: a tiny end-to-end calibration experiment on CPU, from raw data to the report.

    calib-demo                                  # embedded synthetic dataset
    calib-demo ../shared/data/acdc-subset       # an ACDC download (or the 20-patient subset)
    calib-demo [SOURCE] --work ./demo_work --output-root results --name NAME

Steps, all in the work folder (default ``./demo_work``; nnU-Net's raw / preprocessed / results
folders are ``WORK/nnUNet_raw`` etc., whatever the environment says):

1. the dataset: ACDC converted with ``calib-convert acdc`` (:mod:`dataset_conversion.acdc`,
   Dataset027_ACDC, patient-wise folds), or the synthetic generator (:mod:`nnunet_calibration.synthetic`,
   Dataset990);
2. ACDC: nnU-Net's fingerprint and planner, then the small configuration ``2d_small``
   (:mod:`nnunet_calibration.experiments.small_config`, ``calib-plan-small``), preprocessed by
   ``nnUNetv2_preprocess``; synthetic data: ``nnUNetv2_plan_and_preprocess -c 2d`` (skipped if
   already done);
3. the experiment file ``WORK/<name>.yaml`` made from the package's ``demo_acdc.yaml`` (ACDC:
   nnUNetTrainerDiceCE and nnUNetTrainerSDC_DC, folds 0 and 1, a CPU budget that trains) or
   ``demo_synthetic.yaml`` (nnUNetTrainerDiceCE, nnUNetTrainerSDC_DC and nnUNetTrainerLS_DC, a few
   iterations);
4. ``calib-experiment run`` with the local backend, ``--parallel`` folds side by side (default 2
   on a machine with 2 or more cores; resumes: running the demo again trains nothing that is
   finished);
5. the report into ``OUTPUT_ROOT/<name>/`` (default ``results/acdc-subset-demo`` or
   ``results/synthetic-demo``).
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from importlib import resources
from pathlib import Path
from typing import Mapping

import yaml

from dataset_conversion import convert_acdc
from nnunet_calibration.experiments.environment import with_plugin_trainers
from nnunet_calibration.experiments.nnunet_checks import check_recorded_hparams, validate
from nnunet_calibration.experiments.report import check_report_folder, make_report
from nnunet_calibration.experiments.runner import run_local
from nnunet_calibration.experiments.small_config import add_small_configuration, preprocess_atomically
from nnunet_calibration.nnunet_utils import nnunet_env, run_nnunet
from nnunet_calibration.output_location import check_not_an_input
from nnunet_calibration.settings import dump_yaml, load_experiment
from nnunet_calibration.synthetic import make_synthetic_dataset
from nnunet_calibration.utils import ArgumentParser, cli_main

ACDC_ID = 27
SYNTH_ID = 990


def _template(name: str) -> dict:
    return yaml.safe_load(resources.files("nnunet_calibration.experiments").joinpath(name).read_text())


def _template_name(source: str | None) -> str:
    return "demo_acdc.yaml" if source else "demo_synthetic.yaml"


def _preprocessed(pre: Path, dataset_id: int, configuration: str = "2d") -> bool:
    found = [p for p in pre.glob(f"Dataset{dataset_id:03d}_*") if (p / "nnUNetPlans.json").is_file()]
    return bool(found) and any(found[0].glob(f"nnUNetPlans_{configuration}/*"))


def demo_environment(work: Path, base: Mapping[str, str] | None = None) -> tuple[dict, dict]:
    """The demo's nnU-Net folders (``WORK/nnUNet_{raw,preprocessed,results}``, created) and the
    environment for its nnU-Net commands: ``base`` (default: a copy of ``os.environ``, never modified)
    with those folders, the CPU-friendly settings and the plugin's trainers. Returns ``(folders, env)``.
    """
    folders = {k: Path(work) / f"nnUNet_{k}" for k in ("raw", "preprocessed", "results")}
    for f in folders.values():
        f.mkdir(parents=True, exist_ok=True)
    env = nnunet_env(None, base=base, cpu_friendly=True)  # the demo's budget is for 2 CPU cores (device: cpu)
    env.update({f"nnUNet_{k}": str(v) for k, v in folders.items()})
    return folders, with_plugin_trainers(env)


def _dataset(args, folders: dict) -> tuple[int, str]:
    """Step 1: the dataset (ACDC converted, or the synthetic one). Returns (dataset id, template)."""
    if not args.source:
        if not list(folders["raw"].glob(f"Dataset{SYNTH_ID:03d}_*")):
            print("[1/4] writing the synthetic dataset ...", flush=True)
            make_synthetic_dataset(folders["raw"], SYNTH_ID, name="SynthDemo", n_train=10, n_test=2)
        else:
            print(f"[1/4] synthetic dataset already in {folders['raw']}", flush=True)
        return SYNTH_ID, _template_name(args.source)
    if not list(folders["raw"].glob(f"Dataset{ACDC_ID:03d}_*")):
        print(f"[1/4] converting {args.source} (calib-convert acdc) ...", flush=True)
        convert_acdc(Path(args.source).resolve(), ACDC_ID, raw_root=folders["raw"],
                     preprocessed_root=folders["preprocessed"], progress=not args.quiet)
    else:
        print(f"[1/4] dataset already converted in {folders['raw']}", flush=True)
    return ACDC_ID, _template_name(args.source)


def _plan(cfg: dict, dataset_id: int, folders: dict, env: dict, work: Path) -> None:
    """Step 2: nnU-Net's planning and preprocessing (ACDC: the small configuration only)."""
    configuration = cfg.get("configuration", "2d")
    small = cfg.pop("small_configuration", {})
    if _preprocessed(folders["preprocessed"], dataset_id, configuration):
        print(f"[2/4] already planned and preprocessed ({configuration})", flush=True)
    elif configuration == "2d":
        print("[2/4] nnUNetv2_plan_and_preprocess -c 2d ...", flush=True)
        run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", "2d", "-np", "1",
                    "-npfp", "1", "--verify_dataset_integrity"], env, log_path=work / "plan_and_preprocess.log")
    else:
        # nnU-Net's planner (no preprocessing of the full 2d configuration), then the small configuration,
        # preprocessed alone with nnU-Net's own preprocessing
        print(f"[2/4] nnUNetv2_plan_experiment + calib-plan-small -c {configuration} ...", flush=True)
        run_nnunet(["nnUNetv2_extract_fingerprint", "-d", str(dataset_id), "-np", "1",
                    "--verify_dataset_integrity"], env, log_path=work / "fingerprint.log")
        run_nnunet(["nnUNetv2_plan_experiment", "-d", str(dataset_id)], env, log_path=work / "plan.log")
        add_small_configuration(dataset_id, folders["preprocessed"], name=configuration, overwrite=True, **small)
        preprocess_atomically(dataset_id, folders["preprocessed"], configuration, "nnUNetPlans", env)


def _experiment_file(cfg: dict, args, dataset_id: int, folders: dict, work: Path, command: str) -> Path:
    """Step 3: the experiment file the demo runs (the template with the command line's overrides)."""
    if args.name:
        cfg["name"] = args.name
    if args.iterations is not None:
        cfg["training"]["num_iterations_per_epoch"] = args.iterations
    if args.epochs is not None:
        cfg["training"]["num_epochs"] = args.epochs
    if args.iterations is not None or args.epochs is not None:
        cfg.setdefault("report", {})["note"] = (
            f"{cfg.get('report', {}).get('note', '')} OVERRIDDEN by the command line: training "
            f"{cfg['training']} (see the command below).").strip()
    cfg["dataset"] = dataset_id
    cfg["nnunet_paths"] = {k: str(v) for k, v in folders.items()}
    cfg["state_dir"] = str(work / "state" / cfg["name"])
    exp_file = work / f"{cfg['name']}.yaml"
    exp_file.write_text(f"# written by {command}\n" + dump_yaml(cfg))
    return exp_file


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="calib-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("source", nargs="?", help="ACDC folder (e.g. ../shared/data/acdc-subset); none: synthetic data")
    p.add_argument("--work", default="demo_work", help="work folder (default ./demo_work)")
    p.add_argument("--output-root", default="results", help="report goes to OUTPUT_ROOT/<name>/ (default results)")
    p.add_argument("--name", default=None, help="experiment name (default acdc-subset-demo / synthetic-demo)")
    p.add_argument("--iterations", type=int, default=None, help="training iterations per epoch (override)")
    p.add_argument("--epochs", type=int, default=None, help="epochs (override)")
    p.add_argument("--parallel", type=int, default=min(2, os.cpu_count() or 1),
                   help="folds trained side by side (default: 2 on a machine with 2 or more cores)")
    p.add_argument("--quiet", action="store_true")
    return p


def _check_source(source: str | None) -> None:
    from dataset_conversion import ConversionError

    if source and not Path(source).is_dir():
        raise ConversionError(f"{source}: no such folder (an ACDC download with database/training/patientXXX/)")


def _check_locations(args, work: Path) -> None:
    """Before any folder is made: the work folder and the report folder (``OUTPUT_ROOT/<name>``) may not
    be, contain or lie inside the ACDC folder; the report folder may not be or contain the work folder;
    an existing report folder must hold only what a report wrote (else the report, hours later, would
    refuse it)."""
    inputs = [("ACDC folder", args.source, True)] if args.source else []
    check_not_an_input(work, inputs)
    name = args.name or _template(_template_name(args.source))["name"]
    report = Path(args.output_root).resolve() / name
    check_not_an_input(report, inputs + [("work folder", work, False)])
    check_report_folder(report, [name])


def run(args, command: str) -> int:
    _check_source(args.source)  # before any folder is made
    work = Path(args.work).resolve()
    _check_locations(args, work)
    made = [d for d in (work, *(work / f"nnUNet_{k}" for k in ("raw", "preprocessed", "results")))
            if not d.exists()]
    try:
        work.mkdir(parents=True, exist_ok=True)
        # nnU-Net commands get `env` explicitly; the experiment carries its folders (nnunet_paths): nothing
        # here writes to os.environ
        folders, env = demo_environment(work)
        dataset_id, template = _dataset(args, folders)
    except BaseException:
        for d in reversed(made):  # only the folders this run made, and only if still empty
            if d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        raise
    cfg = _template(template)
    _plan(cfg, dataset_id, folders, env, work)
    exp_file = _experiment_file(cfg, args, dataset_id, folders, work, command)
    exp = validate(load_experiment(exp_file))
    print(f"[3/4] experiment {exp_file}: {', '.join(t.label for t in exp.trainers)} x folds {list(exp.folds)} "
          f"(logs in {exp.state_folder / 'logs'})", flush=True)
    check_recorded_hparams(exp)
    done = run_local(exp, progress=not args.quiet, parallel=args.parallel)
    failed = [f"{l} fold {f}" for (l, f), (_, rc) in done.items() if rc]
    print("[4/4] report ...", flush=True)
    out = make_report([exp], args.output_root, command=command, progress=not args.quiet)
    print("")
    print(f"Done. Report: {out / 'README.md'}")
    print(f"      table: {out / 'table.csv'}; plots: {out}/*.png")
    print(f"      trained models: {folders['results']}; experiment file: {exp_file}")
    print(f"      status: calib-experiment status {exp_file}")
    if failed:
        print(f"Some trainings failed ({', '.join(failed)}); they are listed as missing in the report.",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "calib-demo " + " ".join(shlex.quote(a) for a in argv)
    return cli_main(_parser(), lambda args: run(args, command), argv)


if __name__ == "__main__":
    sys.exit(main())
