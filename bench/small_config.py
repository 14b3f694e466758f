"""Benchmark: choose ``calib-plan-small``'s defaults by measurement (issue 18).

For each candidate small configuration (in-plane spacing factor, field of view, base features,
training iterations) it trains ``nnUNetTrainerDiceCE`` on folds 0 and 1 of the ACDC subset, two
folds side by side on the 2 cores (as the demo and the study run), and prints per candidate:

* ``s/it``: seconds per training iteration of one of the two side-by-side trainings (mean epoch
  time from nnU-Net's log / iterations per epoch; includes nnU-Net's per-epoch validation batches);
* ``train min``: iterations x ``s/it`` / 60, the training time of a fold (two run at once);
* validation DSC and HD95 (mm) of each fold: nnU-Net's validation segmentations (its final
  sliding-window validation, resampled to the original grid) against the reference, per case the
  mean over RV, MYO and LV, then the mean over the fold's cases. HD95 in mm on the image's
  spacing; a class missing from the prediction counts as the image diagonal (the metric's
  convention, :func:`nnunet_calibration.metrics.hd95`);
* the same after nnU-Net's own postprocessing (``determine_postprocessing``: keep the largest
  connected foreground component / per-class components where that raises the Dice), as the
  separately named variant ``+PP``. It is **cross-fitted**: what is determined on fold 1 is applied
  to fold 0 and vice versa, so no fold is scored with a choice made on itself;
* nnU-Net's pseudo-Dice curve (mean over classes, mean of both folds, each point the mean of 5
  epochs) at eighths of the budget.

The goal (issue 18): the default of ``calib-plan-small`` becomes the candidate (with or without
``+PP``) with the shortest training time whose DSC >= 0.85 and HD95 <= 8 mm on both folds.

Usage (not part of CI; each candidate trains ~10-50 minutes on 2 cores; resumable: a finished
training or evaluation is not repeated)::

    python bench/small_config.py --list
    python bench/small_config.py --work /work/bench_small            # every candidate, in listed order
    python bench/small_config.py --work W --candidates s1.0-v0.5-f16-i2000,s2.0-v1.0-f16-i2000
    python bench/small_config.py --work W --report-only               # the table of what is finished

Run it from its own installed copy (a clone with its own venv) so that edits to the repository do not
reach a running benchmark, on a machine with nothing else running: the ``s/it`` column is a timing.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "acdc-subset"
DATASET_ID = 27
FOLDS = (0, 1)
ITERATIONS_PER_EPOCH = 50
GOAL_DSC, GOAL_HD95 = 0.85, 8.0
CLASSES = (1, 2, 3)  # RV, MYO, LV


@dataclass(frozen=True)
class Candidate:
    spacing_factor: float
    fov_factor: float
    base_features: int
    iterations: int

    @property
    def name(self) -> str:
        return f"s{self.spacing_factor:g}-v{self.fov_factor:g}-f{self.base_features}-i{self.iterations}"

    @property
    def configuration(self) -> str:  # one nnU-Net configuration per (spacing, field of view, features)
        return f"small_s{self.spacing_factor:g}_v{self.fov_factor:g}_f{self.base_features}"

    @property
    def schedule(self) -> tuple[int, int]:
        """(epochs, iterations per epoch): epochs of 50 iterations (fewer for a smoke run)."""
        per_epoch = min(ITERATIONS_PER_EPOCH, self.iterations)
        return self.iterations // per_epoch, per_epoch

    @property
    def label(self) -> str:  # own results folder per iteration budget
        return f"DiceCE_i{self.iterations}"


def _grid() -> list[Candidate]:
    """The candidates, in the order they are run (cheapest per iteration first, so that the choice is
    known early; a candidate costs about its patch's pixels x features^2 per iteration).

    1. resolution at 2000 iterations and 16 base features: spacing factor 1, 1.25, 1.5, 2 with the
       patch of today's 2d_small (128x112 px, i.e. sf/2 of the 2d plan's field of view);
    2. iterations 1000, 1500, 3000 at spacing factor 1 and 1.25 (128x112 px, 16 features);
    3. base features 24 and 32 at spacing factor 1 and 1.25 (128x112 px, 2000 iterations);
    4. the 2d plan's full field of view at spacing factor 1.5, 1.25 and 1 (2000 iterations, 16 features);
    5. 4000 iterations at spacing factor 1 and 1.25 (128x112 px, 16 features).
    """
    c = [Candidate(sf, sf / 2, 16, 2000) for sf in (1.0, 1.25, 1.5, 2.0)]
    c += [Candidate(sf, sf / 2, 16, it) for sf in (1.0, 1.25) for it in (1000, 1500, 3000)]
    c += [Candidate(sf, sf / 2, f, 2000) for sf in (1.0, 1.25) for f in (24, 32)]
    c += [Candidate(sf, 1.0, 16, 2000) for sf in (1.5, 1.25, 1.0)]
    c += [Candidate(sf, sf / 2, 16, 4000) for sf in (1.0, 1.25)]
    return c


GRID = _grid()


# -- set-up --------------------------------------------------------------------------------------
def _env(work: Path) -> dict:
    from nnunet_calibration.experiments.environment import with_plugin_trainers
    from nnunet_calibration.nnunet_utils import nnunet_env

    env = nnunet_env(work, cpu_friendly=True)
    return with_plugin_trainers(env)


def prepare_dataset(source: Path, work: Path, env: dict) -> Path:
    """ACDC converted (patient-wise folds) and planned with nnU-Net's planner (the 2d plan is the parent)."""
    from dataset_conversion import convert_acdc
    from nnunet_calibration.nnunet_utils import run_nnunet

    pre = Path(env["nnUNet_preprocessed"])
    found = sorted(pre.glob(f"Dataset{DATASET_ID:03d}_*/nnUNetPlans.json"))
    if found:
        return found[0].parent
    if not list(Path(env["nnUNet_raw"]).glob(f"Dataset{DATASET_ID:03d}_*")):
        print(f"converting {source} ...", flush=True)
        convert_acdc(source, DATASET_ID, raw_root=env["nnUNet_raw"], preprocessed_root=env["nnUNet_preprocessed"],
                     progress=False)
    print("fingerprint + plan ...", flush=True)
    run_nnunet(["nnUNetv2_extract_fingerprint", "-d", str(DATASET_ID), "-np", "1", "--verify_dataset_integrity"], env,
               log_path=work / "logs" / "fingerprint.log")
    run_nnunet(["nnUNetv2_plan_experiment", "-d", str(DATASET_ID)], env, log_path=work / "logs" / "plan.log")
    return sorted(pre.glob(f"Dataset{DATASET_ID:03d}_*/nnUNetPlans.json"))[0].parent


def prepare_configuration(cand: Candidate, dataset_dir: Path, env: dict, work: Path) -> dict:
    """Add the candidate's configuration with calib-plan-small's function and preprocess it (once)."""
    from nnunet_calibration.experiments.small_config import add_small_configuration
    from nnunet_calibration.nnunet_utils import run_nnunet

    plans = json.loads((dataset_dir / "nnUNetPlans.json").read_text())
    entry = plans["configurations"].get(cand.configuration)
    if entry is None:
        _, entry = add_small_configuration(DATASET_ID, env["nnUNet_preprocessed"], name=cand.configuration,
                                           spacing_factor=cand.spacing_factor, fov_factor=cand.fov_factor,
                                           base_features=cand.base_features)
    data = dataset_dir / entry["data_identifier"]
    if not (data.is_dir() and (work / "logs" / f"preprocess_{cand.configuration}.done").is_file()):
        print(f"{cand.name}: nnUNetv2_preprocess -c {cand.configuration} ...", flush=True)
        run_nnunet(["nnUNetv2_preprocess", "-d", str(DATASET_ID), "-c", cand.configuration, "-np", "1"], env,
                   log_path=work / "logs" / f"preprocess_{cand.configuration}.log")
        (work / "logs" / f"preprocess_{cand.configuration}.done").write_text("")
    return entry


def experiment(cand: Candidate, work: Path):
    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.settings import load_experiment

    f = work / "experiments" / f"{cand.name}.yaml"
    f.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    f.write_text(yaml.safe_dump({
        "name": f"bench-{cand.name}", "dataset": DATASET_ID, "configuration": cand.configuration,
        "folds": list(FOLDS), "device": "cpu",
        "training": {"num_iterations_per_epoch": cand.schedule[1], "num_val_iterations_per_epoch": 2,
                     "batch_size": 4},
        "trainers": [{"name": "nnUNetTrainerDiceCE", "label": cand.label,
                      "hparams": {"num_epochs": cand.schedule[0]}}],
        "nnunet_paths": {k: str(work / k) for k in ("raw", "preprocessed", "results")},
        "state_dir": str(work / "state" / cand.name)}, sort_keys=False))
    return validate(load_experiment(f))


# -- evaluation ----------------------------------------------------------------------------------
def _read(path: Path):
    import SimpleITK as sitk

    sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ACDC's sform scale warnings, nothing of use here
    img = sitk.ReadImage(str(path))
    return sitk.GetArrayFromImage(img), tuple(reversed(img.GetSpacing()))


def score_folder(pred_dir: Path, ref_dir: Path) -> dict:
    """Per case: DSC and HD95 of each class, and their means over classes; the fold's means."""
    from nnunet_calibration.metrics import dice, hd95

    cases = {}
    for p in sorted(pred_dir.glob("*.nii.gz")):
        pred, spacing = _read(p)
        ref, _ = _read(ref_dir / p.name)
        d = [dice(pred == c, ref == c) for c in CLASSES]
        h = [hd95(pred == c, ref == c, spacing) for c in CLASSES]
        cases[p.name[:-7]] = {"dsc": d, "hd95": h, "dsc_mean": float(np.nanmean(d)), "hd95_mean": float(np.mean(h))}
    if not cases:
        raise RuntimeError(f"no predictions in {pred_dir}")
    return {"cases": cases, "dsc": float(np.mean([c["dsc_mean"] for c in cases.values()])),
            "hd95": float(np.mean([c["hd95_mean"] for c in cases.values()])),
            "dsc_per_class": np.nanmean([c["dsc"] for c in cases.values()], axis=0).round(4).tolist()}


def postprocessed(cand: Candidate, exp, dataset_dir: Path, work: Path) -> dict:
    """nnU-Net's postprocessing, cross-fitted between the two folds; the postprocessed folders."""
    from nnunetv2.postprocessing.remove_connected_components import (apply_postprocessing_to_folder,
                                                                     determine_postprocessing)

    from nnunet_calibration.experiments.folds import fold_folder

    root = work / "eval" / cand.name
    spec = exp.trainers[0]
    ref = dataset_dir / "gt_segmentations"
    plans, dsj = str(dataset_dir / "nnUNetPlans.json"), str(dataset_dir / "dataset.json")
    fns = {}
    for fold in FOLDS:
        raw = root / f"fold_{fold}" / "raw"
        if not (root / f"fold_{fold}" / "pp_fns.json").is_file():
            shutil.rmtree(raw, ignore_errors=True)
            raw.mkdir(parents=True)
            for f in (fold_folder(exp, spec, fold) / "validation").glob("*.nii.gz"):
                shutil.copy2(f, raw / f.name)
            pp_fns, pp_kwargs = determine_postprocessing(str(raw), str(ref), plans, dsj, num_processes=1,
                                                         keep_postprocessed_files=False)
            (root / f"fold_{fold}" / "pp_fns.json").write_text(json.dumps(
                {"functions": [f.__name__ for f in pp_fns], "kwargs": pp_kwargs}, default=str))
        fns[fold] = (root / f"fold_{fold}" / "raw")
    out = {}
    for fold in FOLDS:
        other = [f for f in FOLDS if f != fold][0]
        dest = root / f"fold_{fold}" / "pp_from_other_fold"
        if not dest.is_dir():
            import pickle

            with open(root / f"fold_{other}" / "raw" / "postprocessing.pkl", "rb") as fh:
                pp_fns, pp_kwargs = pickle.load(fh)
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            apply_postprocessing_to_folder(str(fns[fold]), str(tmp), pp_fns, pp_kwargs, plans, dsj, num_processes=1)
            os.replace(tmp, dest)
        out[fold] = dest
    return out


def _curve(history: dict, points: int = 8, window: int = 5) -> list[float]:
    epochs = sorted(history)
    values = [float(np.nanmean(history[e]["pseudo_dice"])) if history[e]["pseudo_dice"] else math.nan
              for e in epochs]
    out = []
    for k in range(1, points + 1):
        end = round(len(values) * k / points)
        chunk = [v for v in values[max(0, end - window):end] if not math.isnan(v)]
        out.append(float(np.mean(chunk)) if chunk else math.nan)
    return out


def measure(cand: Candidate, exp, dataset_dir: Path, work: Path) -> dict:
    from nnunet_calibration.experiments.folds import fold_folder
    from nnunet_calibration.experiments.status import training_history

    cache = work / "eval" / cand.name / "result.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    spec = exp.trainers[0]
    ref = dataset_dir / "gt_segmentations"
    res = {"candidate": asdict(cand), "name": cand.name, "folds": {}}
    pp_dirs = postprocessed(cand, exp, dataset_dir, work)
    curves, times = [], []
    for fold in FOLDS:
        folder = fold_folder(exp, spec, fold)
        hist = training_history(folder)
        t = [h["time"] for h in hist.values() if h["time"] is not None]
        times.append(float(np.median(t)) / cand.schedule[1])
        curves.append(_curve(hist))
        plain = score_folder(folder / "validation", ref)
        pp = score_folder(pp_dirs[fold], ref)
        res["folds"][str(fold)] = {"dsc": plain["dsc"], "hd95": plain["hd95"], "dsc_per_class": plain["dsc_per_class"],
                                   "pp_dsc": pp["dsc"], "pp_hd95": pp["hd95"], "pp_dsc_per_class": pp["dsc_per_class"],
                                   "s_per_it": times[-1], "cases": plain["cases"], "pp_cases": pp["cases"],
                                   "nnunet_summary_dsc": json.loads((folder / "validation" / "summary.json").read_text())
                                   ["foreground_mean"]["Dice"]}
    res["s_per_it"] = float(np.mean(times))
    res["train_min"] = res["s_per_it"] * cand.iterations / 60
    res["curve"] = np.nanmean(curves, axis=0).tolist()
    entry = json.loads((dataset_dir / "nnUNetPlans.json").read_text())["configurations"][cand.configuration]
    res["patch_size"] = entry["patch_size"]
    res["spacing"] = entry["spacing"]
    res["features"] = entry["architecture"]["arch_kwargs"]["features_per_stage"]
    for variant, dk, hk in (("plain", "dsc", "hd95"), ("pp", "pp_dsc", "pp_hd95")):
        res[f"meets_{variant}"] = all(f[dk] >= GOAL_DSC and f[hk] <= GOAL_HD95 for f in res["folds"].values())
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res, indent=1))
    return res


# -- output --------------------------------------------------------------------------------------
def table(results: list[dict]) -> str:
    head = ("| candidate | spacing (mm) | patch | features | iterations | s/it | train min | DSC f0 / f1 | HD95 f0 / f1 | "
            "+PP DSC f0 / f1 | +PP HD95 f0 / f1 | pseudo-Dice at 1/8 ... 8/8 of the budget | goal |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        c, f = r["candidate"], r["folds"]
        goal = ("yes" if r["meets_plain"] else "") + (" +PP" if r["meets_pp"] else "")
        lines.append(
            f"| {r['name']} | {r['spacing'][0]:.3g} x {r['spacing'][1]:.3g} | {r['patch_size'][0]}x{r['patch_size'][1]} | "
            f"{r['features'][0]}-{r['features'][-1]} | {c['iterations']} | {r['s_per_it']:.2f} | {r['train_min']:.1f} | "
            f"{f['0']['dsc']:.3f} / {f['1']['dsc']:.3f} | {f['0']['hd95']:.1f} / {f['1']['hd95']:.1f} | "
            f"{f['0']['pp_dsc']:.3f} / {f['1']['pp_dsc']:.3f} | {f['0']['pp_hd95']:.1f} / {f['1']['pp_hd95']:.1f} | "
            f"{' '.join(f'{v:.2f}' for v in r['curve'])} | {goal.strip() or 'no'} |")
    return "\n".join(lines)


def choose(results: list[dict]) -> tuple[dict, str] | None:
    """The candidate (and variant) with the shortest training time that meets the goal on both folds."""
    ok = [(r["train_min"], r["name"], r, "plain") for r in results if r["meets_plain"]]
    ok += [(r["train_min"], r["name"], r, "+PP") for r in results if r["meets_pp"] and not r["meets_plain"]]
    if not ok:
        return None
    _, _, r, variant = min(ok, key=lambda x: (x[0], x[1]))
    return r, variant


def plot(results: list[dict], work: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # a script of its own: no display here
    import matplotlib.pyplot as plt

    from nnunet_calibration.experiments.status import training_history

    fig, ax = plt.subplots(figsize=(9, 5.5))
    for r in results:
        c = Candidate(**r["candidate"])
        hists = []
        for fold in FOLDS:
            folder = next((work / "results").glob(
                f"calib_variants/{c.label}/Dataset{DATASET_ID:03d}_*/nnUNetTrainerDiceCE__nnUNetPlans__"
                f"{c.configuration}/fold_{fold}"), None)
            if folder is not None:
                h = training_history(folder)
                hists.append([float(np.nanmean(h[e]["pseudo_dice"])) if h[e]["pseudo_dice"] else np.nan
                              for e in sorted(h)])
        n = min(len(h) for h in hists)
        y = np.nanmean([h[:n] for h in hists], axis=0)
        y = np.convolve(np.nan_to_num(y), np.ones(5) / 5, mode="valid")
        x = (np.arange(len(y)) + 5) * c.schedule[1]
        ax.plot(x, y, label=f"{r['name']} ({r['s_per_it']:.2f} s/it)", lw=1.2)
    ax.axhline(GOAL_DSC, color="k", ls=":", lw=0.8)
    ax.set_xlabel("training iteration (batch 4)")
    ax.set_ylabel("nnU-Net pseudo-Dice (mean of classes, folds 0-1, 5-epoch mean)")
    ax.set_title("Candidate small configurations, nnUNetTrainerDiceCE, ACDC subset")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="ACDC folder (default %(default)s)")
    p.add_argument("--work", type=Path, default=Path("bench_work/small_config"),
                   help="work folder (nnU-Net folders, logs, results; reused) (default %(default)s)")
    p.add_argument("--candidates", default="", help="comma-separated candidate names (default: all, in order)")
    p.add_argument("--list", action="store_true", help="list the candidates and exit")
    p.add_argument("--report-only", action="store_true", help="only print the table of finished candidates")
    p.add_argument("--parallel", type=int, default=2, help="folds trained side by side (default 2)")
    p.add_argument("--smoke", type=int, default=None, metavar="N",
                   help="check the script: train every candidate N iterations only (results under WORK/smoke)")
    args = p.parse_args(argv)
    if args.list:
        for c in GRID:
            print(c.name)
        return 0
    by_name = {c.name: c for c in GRID}
    wanted = [by_name[n] if n in by_name else p.error(f"unknown candidate {n!r}; see --list")
              for n in args.candidates.split(",") if n] or GRID
    work = args.work.resolve()
    if args.smoke:
        wanted = [Candidate(c.spacing_factor, c.fov_factor, c.base_features, args.smoke) for c in wanted]
        wanted = list(dict.fromkeys(wanted))
        work = work / "smoke"
    (work / "logs").mkdir(parents=True, exist_ok=True)
    env = _env(work)
    if not args.report_only and not args.source.is_dir():
        p.error(f"{args.source}: no ACDC folder")
    dataset_dir = prepare_dataset(args.source, work, env) if not args.report_only else \
        sorted((work / "preprocessed").glob(f"Dataset{DATASET_ID:03d}_*"))[0]
    from nnunet_calibration.experiments.runner import run_local

    results = []
    for cand in wanted:
        if args.report_only:
            cache = work / "eval" / cand.name / "result.json"
            if cache.is_file():
                results.append(json.loads(cache.read_text()))
            continue
        t0 = time.time()
        prepare_configuration(cand, dataset_dir, env, work)
        exp = experiment(cand, work)
        print(f"{cand.name}: training folds {list(FOLDS)} side by side ...", flush=True)
        done = run_local(exp, progress=False, parallel=args.parallel)
        failed = [k for k, (_, rc) in done.items() if rc]
        if failed:
            print(f"{cand.name}: FAILED trainings {failed}; logs in {exp.state_folder / 'logs'}", flush=True)
            continue
        r = measure(cand, exp, dataset_dir, work)
        results.append(r)
        print(f"{cand.name}: done in {(time.time() - t0) / 60:.1f} min: DSC {r['folds']['0']['dsc']:.3f} / "
              f"{r['folds']['1']['dsc']:.3f}, HD95 {r['folds']['0']['hd95']:.1f} / {r['folds']['1']['hd95']:.1f}, "
              f"+PP HD95 {r['folds']['0']['pp_hd95']:.1f} / {r['folds']['1']['pp_hd95']:.1f}, "
              f"{r['s_per_it']:.2f} s/it", flush=True)
        (work / "table.md").write_text(table(results) + "\n")
    if not results:
        print("no finished candidate")
        return 1
    print(table(results))
    best = choose(results)
    if best is None:
        print(f"\nno candidate reaches DSC >= {GOAL_DSC} and HD95 <= {GOAL_HD95} mm on both folds")
    else:
        r, variant = best
        print(f"\nchosen: {r['name']}{'' if variant == 'plain' else ' ' + variant} "
              f"(shortest training time, {r['train_min']:.1f} min, that reaches DSC >= {GOAL_DSC} and "
              f"HD95 <= {GOAL_HD95} mm on both folds)")
    plot(results, work, work / "learning_curves.png")
    print(f"learning curves: {work / 'learning_curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
