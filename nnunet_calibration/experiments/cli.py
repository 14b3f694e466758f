"""``calib-experiment``: run an experiment file's trainers x folds locally or on SLURM, show status, report.

    calib-experiment run EXPERIMENT.yaml [--backend local|slurm] [--output-root results] [--no-report]
    calib-experiment status EXPERIMENT.yaml [--watch [SECONDS]]
    calib-experiment report EXPERIMENT.yaml [MORE.yaml ...] [--output-root results] [--name NAME]
    calib-experiment check EXPERIMENT.yaml        # validate only
    calib-experiment archive EXPERIMENT.yaml [--trainer LABEL ...] [--force]

``run --backend local`` trains every unfinished (trainer, fold) one after another (interrupted ones
continue with ``--c``), then writes the report. ``run --backend slurm`` submits one job array of
every unfinished (trainer, fold) and a report job that runs when every fold succeeded (cancelled by SLURM otherwise), and
returns. Running again resumes: finished folds are skipped, nothing is trained twice.
``archive`` (with ``report.archive`` in the file) keeps each trainer entry whose folds are all finished
as its evaluated report rows, small enough to keep beside the experiment file: ``run`` and ``report`` use
them where the folds are gone (:mod:`nnunet_calibration.experiments.report.archive`; ``run`` archives by itself).
``status`` shows per fold the state, epoch / total, last validation pseudo-Dice, mean epoch time,
estimated time left and log (``--watch`` refreshes it). Exit status of ``train-fold`` (one SLURM
task): the training's, or 75 when it was stopped by the time-limit signal (see
:mod:`nnunet_calibration.experiments.slurm`).
See :mod:`nnunet_calibration.settings.experiment` for the file format.
"""
from __future__ import annotations

import argparse
import shlex
import sys

from nnunet_calibration.settings import ExperimentError, load_experiment
from nnunet_calibration.utils import ArgumentParser, cli_main


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="calib-experiment", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{run,status,report,check,archive}")
    r = sub.add_parser("run", help="train unfinished folds (local) or submit them (slurm)")
    r.add_argument("experiment")
    r.add_argument("--backend", choices=("local", "slurm"), default="local")
    r.add_argument("--output-root", default=None, help="report goes to OUTPUT_ROOT/<name>/ (default: results)")
    r.add_argument("--no-report", action="store_true", help="local: train only")
    r.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="local: train N folds side by side, each with cores/N threads (default 1)")
    r.add_argument("--quiet", action="store_true", help="no progress bars")
    s = sub.add_parser("status", help="per trainer and fold: state, epoch/total, pseudo-Dice, s/epoch, ETA, log")
    s.add_argument("experiment")
    s.add_argument("--watch", nargs="?", type=float, const=60.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 60) until every fold is finished or failed")
    rep = sub.add_parser("report", help="evaluate every finished fold and write results/<name>/")
    rep.add_argument("experiments", nargs="+")
    rep.add_argument("--output-root", default=None)
    rep.add_argument("--name", default=None, help="report folder name (default: the first experiment's name)")
    rep.add_argument("--quiet", action="store_true")
    c = sub.add_parser("check", help="validate the experiment file against nnU-Net and exit")
    c.add_argument("experiment")
    a = sub.add_parser("archive", help="keep the evaluated rows of every entry whose folds are all finished "
                                       "(report.archive)")
    a.add_argument("experiment")
    a.add_argument("--trainer", action="append", default=None, metavar="LABEL", help="only this entry (repeatable)")
    a.add_argument("--force", action="store_true", help="archive again entries that are archived already")
    a.add_argument("--quiet", action="store_true")
    t = sub.add_parser("train-fold")  # internal: one SLURM array task (not listed in --help)
    t.add_argument("experiment")
    t.add_argument("--trainer", default=None)
    t.add_argument("--fold", type=int, default=None)
    t.add_argument("--task-table", default=None, help="instead of --trainer/--fold: entry --task-index of this table")
    t.add_argument("--task-index", type=int, default=None)
    t.add_argument("--device", default="auto")
    return p


def _load(path, check_trainers=True):
    from nnunet_calibration.experiments.nnunet_checks import validate

    return validate(load_experiment(path), check_trainers=check_trainers)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = "calib-experiment " + " ".join(shlex.quote(a) for a in argv)
    commands = {"check": _check, "run": _run, "status": _status, "report": _report, "archive": _archive,
                "train-fold": _train_fold}
    return cli_main(_parser(), lambda args: commands[args.cmd](args, command), argv)


def _check(args, command: str) -> int:
    from nnunet_calibration.experiments.nnunet_checks import check_recorded_hparams

    exp = _load(args.experiment)
    check_recorded_hparams(exp)
    print(f"{exp.path}: OK ({exp.dataset_name} {exp.configuration}, {len(exp.trainers)} trainers, "
          f"folds {list(exp.folds)})")
    return 0


def _submit(exp, output_root) -> int:
    from nnunet_calibration.experiments.slurm import submit

    rec = submit(exp, output_root)
    if rec["array"]:
        arr, by_label = rec["array"], {}
        for label, fold in arr["tasks"]:
            by_label.setdefault(label, []).append(fold)
        limit = f", at most {exp.slurm.max_parallel} at once" if exp.slurm.max_parallel else ""
        print(f"submitted job array {arr['job_id']}: {len(arr['tasks'])} tasks{limit} (task table {arr['table']})")
        for label, folds in by_label.items():
            print(f"  {label}: folds {folds}")
    for label, sk in rec["skipped"].items():
        for fold, why in sk.items():
            print(f"skipped {label} fold {fold}: {why}")
    if rec["report"].get("reused"):
        print(f"nothing new to submit; report job {rec['report']['job_id']} is still waiting")
    else:
        print(f"report job {rec['report']['job_id']} (runs after every fold succeeded; "
              f"SLURM cancels it if a fold fails)")
    print(f"state and logs: {exp.state_folder}; follow with: calib-experiment status {exp.path}")
    return 0


def _run(args, command: str) -> int:
    from nnunet_calibration.experiments.nnunet_checks import check_recorded_hparams
    from nnunet_calibration.experiments.runner import run_local

    exp = _load(args.experiment)
    check_recorded_hparams(exp)
    if args.backend == "slurm":
        return _submit(exp, args.output_root)
    done = run_local(exp, progress=not args.quiet, parallel=args.parallel)
    failed = [k for k, (_, rc) in done.items() if rc != 0]
    for (label, fold), (what, rc) in done.items():
        print(f"{label} fold {fold}: {what}" + (f" -> FAILED (exit {rc})" if rc else ""))
    if not args.no_report:
        from nnunet_calibration.experiments.report import make_report

        out = make_report([exp], args.output_root, command=command, progress=not args.quiet)
        print(f"report: {out / 'README.md'}")
    if failed:
        print(f"{len(failed)} fold(s) failed; see: calib-experiment status {exp.path}", file=sys.stderr)
        return 1
    return 0


def _status(args, command: str) -> int:
    from nnunet_calibration.experiments.folds import FoldStatus
    from nnunet_calibration.experiments.status import fold_statuses, format_statuses, report_job_status, watch

    exp = _load(args.experiment, check_trainers=False)
    if args.watch is not None:
        if args.watch <= 0:
            raise ExperimentError(f"--watch needs a positive number of seconds, got {args.watch}")
        try:
            rows = watch(exp, args.watch)
        except KeyboardInterrupt:
            return 0
    else:
        rows = fold_statuses(exp)
        print(format_statuses(rows))
        rep = report_job_status(exp)
        if rep:
            print(f"report job {rep['job_id']}: {rep['state']} (log: {rep['log']})")
    return 1 if any(r["status"] == FoldStatus.FAILED for r in rows) else 0


def _report(args, command: str) -> int:
    from nnunet_calibration.experiments.report import make_report

    exps = [_load(p, check_trainers=False) for p in args.experiments]
    out = make_report(exps, args.output_root, command=command, name=args.name, progress=not args.quiet)
    print(f"report: {out / 'README.md'}")
    return 0


def _archive(args, command: str) -> int:
    from nnunet_calibration.experiments.folds import archived
    from nnunet_calibration.experiments.nnunet_checks import check_recorded_hparams
    from nnunet_calibration.experiments.report.gather import archive_finished

    exp = _load(args.experiment)
    if not exp.report.archive:
        raise ExperimentError(f"{exp.path}: report.archive is not set (the folder to keep the rows in)")
    unknown = sorted(set(args.trainer or ()) - {t.label for t in exp.trainers})
    if unknown:
        raise ExperimentError(f"{exp.path}: no trainer entry labelled {unknown}; labels: {[t.label for t in exp.trainers]}")
    check_recorded_hparams(exp)
    written = archive_finished(exp, args.trainer, force=args.force, progress=not args.quiet)
    for t in exp.trainers:
        if args.trainer is None or t.label in args.trainer:
            state = "archived now" if t.label in written else ("archived" if archived(exp, t) else "not all folds finished")
            print(f"{t.label}: {state}" + (f" -> {written[t.label]}" if t.label in written else ""))
    return 0


def _train_fold(args, command: str) -> int:
    from nnunet_calibration.experiments.slurm import train_fold_entry

    if (args.task_table is None) == (args.trainer is None or args.fold is None) or \
            (args.task_table is not None and args.task_index is None):
        raise ExperimentError("train-fold needs --trainer and --fold, or --task-table and --task-index")
    return train_fold_entry(args.experiment, args.trainer, args.fold, args.device, args.task_table, args.task_index)


if __name__ == "__main__":
    sys.exit(main())
