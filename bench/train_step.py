"""Benchmark: mean ``train_step`` time of every nnunet-calibration trainer relative to nnUNetTrainer.

What it does
------------
1. Converts ``../shared/data/acdc-subset`` with the project's ACDC converter
   (:func:`dataset_conversion.acdc.convert_acdc`) into a work folder, then plans and preprocesses the
   **2d** configuration with real nnU-Net (skipped when ``--work-dir`` already holds it).
2. Draws ``--warmup + --steps`` fixed batches (batch size ``--batch-size``, default 4, nnU-Net's own
   2d data loader and augmentation) once, and gives the *same* batches to every trainer.
3. For nnUNetTrainer (the baseline) and each selected trainer, built in-process on the same device
   (CUDA if available, else CPU; ``--device`` to force) from the same seed: runs nnU-Net's
   ``train_step`` on the warm-up batches, then times it on the remaining ones and prints the mean
   time and its ratio to the baseline's mean. Baseline and trainer steps alternate on each batch
   (order swapped from batch to batch), so the baseline is re-measured next to every trainer and
   load changes of a shared machine hit both alike. ``ratio`` is mean/mean (the goal's measure);
   ``median`` is the median of the per-batch ratios, printed as a robustness check.

Goals (issue 5): ratio <= 1.10 for every loss except SDC, <= 1.25 for SDC (which includes the
auxiliary SDF head and its reference signed distance function computed on the fly).

Usage::

    python bench/train_step.py                         # every trainer (slow on CPU: ~2-3 s per step)
    python bench/train_step.py --trainers SDC,NACL,Focal --warmup 3 --steps 5
    python bench/train_step.py --work-dir /tmp/acdc_bench   # keep/reuse the preprocessed data

``--trainers`` takes comma-separated exact names or name fragments (``SDC`` matches
``nnUNetTrainerSDC`` and ``nnUNetTrainerSDC_DC``).
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "acdc-subset"
DATASET_ID = 990


def _parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="ACDC folder (default: %(default)s)")
    p.add_argument("--work-dir", type=Path, default=None,
                   help="folder for nnUNet_raw/preprocessed/results (reused if present; default: a temporary folder)")
    p.add_argument("--dataset-id", type=int, default=DATASET_ID)
    p.add_argument("--trainers", default="", help="comma-separated names or fragments (default: all)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    return p.parse_args(argv)


def _prepare_dataset(args, env) -> Path:
    from nnunet_calibration.nnunet_utils import run_nnunet

    raw_root = Path(env["nnUNet_raw"])
    pre_root = Path(env["nnUNet_preprocessed"])
    existing = sorted(pre_root.glob(f"Dataset{args.dataset_id:03d}_*/nnUNetPlans_2d"))
    if existing:
        return existing[0].parent
    if not sorted(raw_root.glob(f"Dataset{args.dataset_id:03d}_*/dataset.json")):
        from dataset_conversion.acdc import convert_acdc

        print(f"converting {args.source} -> Dataset{args.dataset_id:03d}", flush=True)
        convert_acdc(args.source, args.dataset_id, raw_root=raw_root, preprocessed_root=pre_root)
    print("planning and preprocessing (2d)", flush=True)
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(args.dataset_id), "-c", "2d", "-np", "1"], env)
    return sorted(pre_root.glob(f"Dataset{args.dataset_id:03d}_*/nnUNetPlans_2d"))[0].parent


def _make_trainer(cls, preprocessed: Path, batch_size: int, device):
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json

    plans = load_json(str(preprocessed / "nnUNetPlans.json"))
    plans["continue_training"] = False  # added by nnU-Net's run_training
    plans["configurations"]["2d"]["batch_size"] = batch_size
    dataset_json = load_json(str(preprocessed / "dataset.json"))
    torch.manual_seed(0)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):  # nnU-Net's banner and logs
        trainer = cls(plans, "2d", 0, dataset_json, device=device)
        trainer.initialize()
    return trainer


def _fixed_batches(preprocessed: Path, n: int, batch_size: int, device):
    """n batches from nnU-Net's own training data loader (with its augmentation), kept on the CPU."""
    import numpy as np
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

    tr = _make_trainer(nnUNetTrainer, preprocessed, batch_size, device)
    tr.dataset_class.unpack_dataset(tr.preprocessed_dataset_folder, overwrite_existing=False,
                                    num_processes=1, verify=True)
    np.random.seed(0)
    torch.manual_seed(0)
    dl_train, _ = tr.get_dataloaders()
    batches = []
    for _ in range(n):
        b = next(dl_train)
        batches.append({"data": b["data"].clone(), "target": [t.clone() for t in b["target"]]})
    del tr, dl_train
    return batches


def _step_time(trainer, batch, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    trainer.train_step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _time_paired(baseline, cls, preprocessed, batches, warmup, batch_size, device) -> tuple[float, float, float]:
    """Mean train_step time of ``cls`` and of the baseline trainer, alternating step by step on the
    same batches (so that load changes of a shared machine hit both alike), and the median of the
    per-batch ratios (robust to load spikes)."""
    import torch

    tr = _make_trainer(cls, preprocessed, batch_size, device)
    tr.network.train()
    baseline.network.train()
    t_base, t_cand = [], []
    for i, b in enumerate(batches):
        if i % 2 == 0:  # alternate the order (ABBA...) so that order effects cancel
            tb = _step_time(baseline, b, device)
            tc = _step_time(tr, b, device)
        else:
            tc = _step_time(tr, b, device)
            tb = _step_time(baseline, b, device)
        if i >= warmup:
            t_base.append(tb)
            t_cand.append(tc)
    del tr
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ratios = sorted(c / b for c, b in zip(t_cand, t_base))
    mid = len(ratios) // 2
    median = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return sum(t_cand) / len(t_cand), sum(t_base) / len(t_base), median


def _select(names, spec: str):
    if not spec.strip():
        return list(names)
    wanted = [s.strip() for s in spec.split(",") if s.strip()]
    out = [n for n in names if any(w == n or w == n.replace("nnUNetTrainer", "") for w in wanted)]
    if not out:  # fragments
        out = [n for n in names if any(w in n for w in wanted)]
    if not out:
        raise SystemExit(f"--trainers {spec!r} matches none of: {', '.join(names)}")
    return out


def main(argv=None) -> int:
    args = _parse(argv)
    if args.steps < 1 or args.warmup < 0:
        raise SystemExit("--steps must be >= 1 and --warmup >= 0")
    if not args.source.is_dir():
        raise SystemExit(f"ACDC source folder not found: {args.source}")
    from nnunet_calibration.nnunet_utils import nnunet_env

    tmp = None
    if args.work_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="calib_bench_"))
        work = tmp
    else:
        work = args.work_dir
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    env = nnunet_env(work, cpu_friendly=device.type == "cpu")  # on a GPU nnU-Net's own defaults
    env.pop("nnUNet_n_proc_DA", None)  # breaks nnU-Net's planning; set below for the data loader
    os.environ.update(env)
    os.environ.pop("nnUNet_n_proc_DA", None)
    try:
        from tqdm import tqdm
        from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

        import nnunet_calibration.trainers as T

        preprocessed = _prepare_dataset(args, env)
        os.environ["nnUNet_n_proc_DA"] = "0"  # in-process data augmentation for the fixed batches
        names = _select(T.TRAINER_NAMES, args.trainers)
        n = args.warmup + args.steps
        print(f"device {device}, batch size {args.batch_size}, {args.warmup} warm-up + {args.steps} timed "
              f"train_step calls per trainer, {len(names)} trainers", flush=True)
        batches = _fixed_batches(preprocessed, n, args.batch_size, device)
        print(f"batch data {tuple(batches[0]['data'].shape)}", flush=True)

        baseline = _make_trainer(nnUNetTrainer, preprocessed, args.batch_size, device)
        results = {}
        for name in tqdm(names, desc="trainers", file=sys.stderr):
            results[name] = _time_paired(baseline, getattr(T, name), preprocessed, batches, args.warmup,
                                         args.batch_size, device)
            tc, tb, med = results[name]
            tqdm.write(f"  {name}: {tc:.3f} s/step, nnUNetTrainer {tb:.3f} s/step: {tc / tb:.3f}x "
                       f"(median per-batch ratio {med:.3f})", file=sys.stderr)
        print()
        print(f"{'trainer':45s} {'s/step':>8s} {'nnUNetTrainer':>14s} {'ratio':>7s} {'median':>7s} {'goal':>6s}")
        n_fail = 0
        for name in names:
            goal = 1.25 if "SDC" in name else 1.10
            tc, tb, med = results[name]
            ratio = tc / tb
            ok = ratio <= goal
            n_fail += not ok
            print(f"{name:45s} {tc:8.3f} {tb:14.3f} {ratio:7.3f} {med:7.3f} {goal:6.2f}  {'ok' if ok else 'OVER'}")
        print(f"\n{len(names) - n_fail}/{len(names)} trainers within their goal "
              f"(timing noise on a shared CPU is several percent; rerun with more --steps to confirm)")
        return 0
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
