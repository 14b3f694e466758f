"""``calib-plan-small``: a small, cheap nnU-Net configuration for CPU work and quick ablations.

    calib-plan-small DATASET                      # adds "2d_small" to nnUNetPlans.json, preprocesses it
    calib-plan-small 27 -c 2d_half --spacing-factor 2 --fov-factor 1 --base-features 16 --batch-size 4
    nnUNetv2_train 27 2d_small 0 -tr nnUNetTrainerSDC_DC -device cpu     # stock nnU-Net from then on

What it does, nnU-Net's own way
-------------------------------
It reads the dataset's plans (``$nnUNet_preprocessed/DatasetXXX_Name/<plans>.json``, made by
``nnUNetv2_plan_and_preprocess``) and adds one configuration that ``inherits_from`` the ``2d``
configuration and overrides only what makes it cheap:

* ``spacing``: the 2d in-plane spacing times ``spacing_factor`` (default 1: the 2d resolution; 2 would
  halve it, a quarter of the pixels); ``median_image_size_in_voxels`` scaled accordingly;
* ``patch_size``: the 2d patch times ``fov_factor / spacing_factor``: it covers ``fov_factor`` of
  the 2d patch's field of view along each axis (default 0.5: half of it, a quarter of the pixels;
  ACDC: 128 x 112 instead of 256 x 224), then made divisible by the pooling as nnU-Net's planner does;
* the U-Net topology (``n_stages``, ``strides``, ``kernel_sizes``, convolutions per stage) from
  nnU-Net's own ``get_pool_and_conv_props`` for that spacing and patch (bottleneck at least 4
  pixels), at most ``max_stages`` stages and at least 3 (nnU-Net's deep supervision gives the
  lowest output weight 0, so 2 stages would leave no weight: such a request is an error); ``features_per_stage`` = ``base_features`` doubling per
  stage, capped at ``max_features`` (nnU-Net: 32 ... 512);
* ``batch_size`` (default 4; nnU-Net's 2d plan fills a GPU: 29 for ACDC. On 2 CPU cores batch 4 learned
  far more per second than batch 12: see the README's measurements);
* ``data_identifier`` = ``<plans>_<name>``, so that the coarser data gets its own preprocessed
  folder, which this command fills with nnU-Net's own preprocessing
  (``nnUNetv2_preprocess -d ID -c NAME``; skip with ``--no-preprocess``).

Everything else (normalisation, resampling functions, batch Dice, the network class) is the 2d
configuration's. Afterwards the stock commands work unchanged: ``nnUNetv2_train ID 2d_small FOLD``,
``nnUNetv2_predict ... -c 2d_small`` (predictions are resampled back to the original image grid by
nnU-Net as usual), and ``calib-experiment`` with ``configuration: 2d_small``.

The small configuration is for CPU work, tests and quick ablations; the papers' numbers come from
nnU-Net's full configurations. The defaults were chosen by measurement on the 20-patient ACDC subset
on a 2-core CPU (``bench/small_config.py``, the README's table): of every candidate (spacing factor
1-2, field of view, 16-32 base features, 1000-4000 iterations) the one with the shortest training
that reached DSC >= 0.85 and HD95 <= 8 mm on folds 0 and 1 was this one at 2000 iterations of batch 4,
with nnU-Net's own postprocessing (keep-largest-component) applied: the smaller field of view learns
the structures sooner but adds false positives far from the heart, which that postprocessing removes.

Errors: a dataset that is not planned, or whose plans lack a ``2d`` configuration, stops with a
message naming the dataset and the command to run first; an existing configuration of that name is
not replaced without ``overwrite=True`` (``--overwrite``). The plans file is written atomically
(temporary file in the same folder, then ``os.replace``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from nnunetv2.experiment_planning.experiment_planners.network_topology import get_pool_and_conv_props

from nnunet_calibration.errors import UserError
from nnunet_calibration.nnunet_utils import nnunet_env, run_nnunet
from nnunet_calibration.utils import (ArgumentParser, cli_main, remove_stale_staging, replace_dir, write_json_atomic,
                                     write_text_atomic)

DEFAULT_NAME = "2d_small"
#: chosen by measurement (bench/small_config.py, README "A small configuration for CPU work"): the 2d
#: plan's spacing, half its field of view (ACDC: 128 x 112 px), 16-256 features, batch 4; with 2000
#: iterations and nnU-Net's postprocessing the shortest training that reached DSC >= 0.85 and HD95 <= 8 mm
#: on folds 0 and 1 of the ACDC subset
DEFAULTS = {"spacing_factor": 1.0, "fov_factor": 0.5, "base_features": 16, "max_features": 256, "max_stages": 5,
            "batch_size": 4}


class SmallConfigError(UserError):
    """The dataset is not ready for a small configuration, or the request is invalid."""


def find_plans_file(dataset: str | int, preprocessed: str | os.PathLike, plans: str = "nnUNetPlans") -> Path:
    """``<preprocessed>/DatasetXXX_Name/<plans>.json`` for a dataset id or name; clear error if missing."""
    pre = Path(preprocessed)
    text = str(dataset)
    if text.isdigit():
        found = sorted(pre.glob(f"Dataset{int(text):03d}_*"))
    else:
        found = [pre / text] if (pre / text).is_dir() else []
    if not found:
        raise SmallConfigError(
            f"dataset {dataset} is not in nnUNet_preprocessed ({pre}): plan it first with "
            f"`nnUNetv2_plan_and_preprocess -d {dataset} -c 2d`")
    plans_file = found[0] / f"{plans}.json"
    if not plans_file.is_file():
        raise SmallConfigError(
            f"{plans_file} does not exist: dataset {found[0].name} is not planned; run "
            f"`nnUNetv2_plan_and_preprocess -d {dataset} -c 2d` first")
    return plans_file


def data_identifier(plans: str, name: str) -> str:
    """The preprocessed data folder of the small configuration ``name``: ``<plans>_<name>``."""
    return f"{plans}_{name}"


def small_configuration(plans: dict, name: str = DEFAULT_NAME, plans_name: str = "nnUNetPlans",
                        spacing_factor: float = DEFAULTS["spacing_factor"],
                        base_features: int = DEFAULTS["base_features"],
                        max_features: int = DEFAULTS["max_features"],
                        max_stages: int = DEFAULTS["max_stages"],
                        batch_size: int = DEFAULTS["batch_size"],
                        fov_factor: float = DEFAULTS["fov_factor"]) -> dict:
    """The plans entry of the small configuration (a dict with ``inherits_from: "2d"``); pure function.

    ``plans`` is the content of an nnU-Net plans file with a ``2d`` configuration. See the module
    docstring for what is changed; nothing else is.
    """
    if "2d" not in plans.get("configurations", {}):
        raise SmallConfigError(f"the plans {plans.get('plans_name', '')} have no '2d' configuration "
                               f"(configurations: {sorted(plans.get('configurations', {}))}); run "
                               f"`nnUNetv2_plan_and_preprocess -d {plans.get('dataset_name', 'ID')} -c 2d` first")
    for key, value, low in (("spacing_factor", spacing_factor, 1e-6), ("base_features", base_features, 1),
                            ("max_features", max_features, 1), ("max_stages", max_stages, 2),
                            ("batch_size", batch_size, 1), ("fov_factor", fov_factor, 1e-6)):
        if not value >= low:
            raise SmallConfigError(f"{key} must be >= {low}, got {value}")
    base = plans["configurations"]["2d"]
    missing = [k for k in ("spacing", "patch_size", "median_image_size_in_voxels", "architecture") if k not in base]
    if missing:
        raise SmallConfigError(f"the plans' '2d' configuration lacks {missing}: not a plans file of nnU-Net 2.x "
                               f"(re-run nnUNetv2_plan_experiment)")
    spacing = [float(s) * spacing_factor for s in base["spacing"]]
    median = [float(m) / spacing_factor for m in base["median_image_size_in_voxels"]]
    patch = [max(8, int(round(p * fov_factor / spacing_factor))) for p in base["patch_size"]]
    # nnU-Net's own topology rule (bottleneck >= 4 px), limited to max_stages stages
    num_pool, pool_kernels, conv_kernels, patch, _ = get_pool_and_conv_props(spacing, patch, 4, max_stages - 1)
    n_stages = len(pool_kernels)
    if n_stages < 3:
        # nnU-Net's deep supervision gives the lowest-resolution output weight 0: with fewer than 3
        # stages every remaining weight would be 0 (a NaN loss)
        raise SmallConfigError(f"the small patch {[int(v) for v in patch]} leaves only {n_stages} U-Net stages (nnU-Net's deep "
                               f"supervision needs at least 3); use a smaller --spacing-factor than {spacing_factor} or a larger "
                               f"--fov-factor than {fov_factor}")
    arch = json.loads(json.dumps(base["architecture"]))  # deep copy of the parent's architecture
    kw = arch["arch_kwargs"]
    kw["n_stages"] = n_stages
    kw["features_per_stage"] = [min(max_features, base_features * 2 ** i) for i in range(n_stages)]
    kw["kernel_sizes"] = [list(k) for k in conv_kernels]
    kw["strides"] = [list(s) for s in pool_kernels]
    kw["n_conv_per_stage"] = [2] * n_stages
    kw["n_conv_per_stage_decoder"] = [2] * (n_stages - 1)
    return {
        "inherits_from": "2d",
        "data_identifier": data_identifier(plans_name, name),
        "spacing": spacing,
        "median_image_size_in_voxels": median,
        "patch_size": [int(p) for p in patch],
        "batch_size": int(batch_size),
        "architecture": arch,
        "calib_small_config": {"spacing_factor": spacing_factor, "fov_factor": fov_factor,
                               "base_features": base_features,
                               "max_features": max_features, "max_stages": max_stages,
                               "made_by": "nnunet_calibration.experiments.small_config"},
    }


def check_replaceable_configuration(plans_file: Path, content: dict, name: str, plans: str) -> None:
    """The configuration ``name`` and its preprocessed data folder (``<plans>_<name>``, replaced by the
    preprocessing) must be this tool's own: an existing configuration of that name must have been made
    by calib-plan-small (its ``calib_small_config`` record), no other configuration may use that data
    folder, and an existing data folder needs the configuration (else it is someone else's)."""
    configs = content.get("configurations", {})
    data = data_identifier(plans, name)
    if name in configs and "calib_small_config" not in configs[name]:
        raise SmallConfigError(f"{plans_file}: configuration {name!r} was not made by calib-plan-small and is "
                               f"not replaced; choose another name with -c")
    others = sorted(k for k, v in configs.items() if k != name and v.get("data_identifier") == data)
    if others:
        raise SmallConfigError(f"{plans_file}: configuration {others[0]!r} uses the data folder {data}; choose "
                               f"another name with -c")
    if (plans_file.parent / data).exists() and name not in configs:
        raise SmallConfigError(f"{plans_file.parent / data} exists but {plans_file} has no configuration "
                               f"{name!r}: it was not made by calib-plan-small and is not replaced; move it or "
                               f"choose another name with -c")


def add_small_configuration(dataset: str | int, preprocessed: str | os.PathLike, name: str = DEFAULT_NAME,
                            plans: str = "nnUNetPlans", overwrite: bool = False, **settings) -> tuple[Path, dict]:
    """Add the small configuration to the dataset's plans file (atomically). Returns (plans file, entry)."""
    plans_file = find_plans_file(dataset, preprocessed, plans)
    try:
        content = json.loads(plans_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SmallConfigError(f"{plans_file}: cannot read the plans ({e})") from None
    if name in content.get("configurations", {}) and not overwrite:
        raise SmallConfigError(f"{plans_file} already has a configuration {name!r}; pass --overwrite to replace it")
    if name == "2d":
        raise SmallConfigError("the small configuration cannot be named '2d' (it inherits from it)")
    check_replaceable_configuration(plans_file, content, name, plans)
    entry = small_configuration(content, name=name, plans_name=plans, **settings)
    content["configurations"][name] = entry
    write_json_atomic(plans_file, content, indent=4)
    return plans_file, entry


def preprocess_atomically(dataset: str | int, preprocessed: str | os.PathLike, name: str, plans: str, env: dict,
                          num_processes: int = 1, previous_plans: str | None = None) -> None:
    """Run ``nnUNetv2_preprocess`` for the configuration ``name`` so that nothing is half-written: nnU-Net
    writes into a staging ``data_identifier`` (``.<id>.tmp-<pid>-nnunet``) that is renamed at the end (one
    left by a killed run is removed by the next). On an
    error or interrupt the staging folder is removed and the plans file gets back ``previous_plans``
    (its text before the configuration was added; None: left as is)."""
    plans_file = find_plans_file(dataset, preprocessed, plans)
    content = json.loads(plans_file.read_text())
    final = content["configurations"][name]["data_identifier"]
    remove_stale_staging(plans_file.parent / final)  # a killed run's staging data (its pid is gone)
    staging = f".{final}.tmp-{os.getpid()}-nnunet"
    content["configurations"][name]["data_identifier"] = staging
    write_json_atomic(plans_file, content, indent=4)
    try:
        run_nnunet(["nnUNetv2_preprocess", "-d", str(dataset), "-plans_name", plans, "-c", name,
                    "-np", str(num_processes)], env)
        target = plans_file.parent / final
        if target.exists():
            replace_dir(plans_file.parent / staging, target)
        else:
            os.replace(plans_file.parent / staging, target)
        content["configurations"][name]["data_identifier"] = final
        write_json_atomic(plans_file, content, indent=4)
    except BaseException:
        shutil.rmtree(plans_file.parent / staging, ignore_errors=True)
        if previous_plans is not None:
            write_text_atomic(plans_file, previous_plans)
        else:
            content["configurations"][name]["data_identifier"] = final
            write_json_atomic(plans_file, content, indent=4)
        raise


def _parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="calib-plan-small", description=__doc__.split("\n\n")[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="See `python -c 'import nnunet_calibration.experiments.small_config as m; "
                              "help(m)'` for what is changed.")
    p.add_argument("dataset", help="dataset id or DatasetXXX_Name (planned with nnUNetv2_plan_and_preprocess -c 2d)")
    p.add_argument("-c", "--configuration", default=DEFAULT_NAME, help=f"name of the new configuration ({DEFAULT_NAME})")
    p.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (nnUNetPlans)")
    p.add_argument("--spacing-factor", type=float, default=DEFAULTS["spacing_factor"],
                   help="in-plane spacing = 2d spacing x this (%(default)s)")
    p.add_argument("--fov-factor", type=float, default=DEFAULTS["fov_factor"],
                   help="fraction of the 2d patch's field of view the patch covers per axis (%(default)s)")
    p.add_argument("--base-features", type=int, default=DEFAULTS["base_features"], help="%(default)s")
    p.add_argument("--max-features", type=int, default=DEFAULTS["max_features"], help="%(default)s")
    p.add_argument("--max-stages", type=int, default=DEFAULTS["max_stages"], help="%(default)s")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"], help="%(default)s")
    p.add_argument("--overwrite", action="store_true", help="replace an existing configuration of that name (only one calib-plan-small made)")
    p.add_argument("--no-preprocess", action="store_true", help="only write the plans entry")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="preprocessing processes (1)")
    return p


def run(args) -> int:
    env = nnunet_env(cpu_friendly=True)  # preprocessing only (-np decides the processes); nothing compiles
    pre = env.get("nnUNet_preprocessed")
    if not pre:
        raise SmallConfigError("nnUNet_preprocessed is not set")
    before = find_plans_file(args.dataset, pre, args.plans).read_text()
    plans_file, entry = add_small_configuration(
        args.dataset, pre, name=args.configuration, plans=args.plans, overwrite=args.overwrite,
        spacing_factor=args.spacing_factor, fov_factor=args.fov_factor, base_features=args.base_features,
        max_features=args.max_features, max_stages=args.max_stages, batch_size=args.batch_size)
    kw = entry["architecture"]["arch_kwargs"]
    print(f"added {args.configuration!r} to {plans_file}: spacing {entry['spacing']}, patch {entry['patch_size']}, "
          f"batch {entry['batch_size']}, {kw['n_stages']} stages, features {kw['features_per_stage']}")
    if not args.no_preprocess:
        print(f"preprocessing {args.configuration} with nnUNetv2_preprocess ...", flush=True)
        try:
            preprocess_atomically(args.dataset, pre, args.configuration, args.plans, env, args.num_processes,
                                  previous_plans=before)
        except RuntimeError as e:
            print(f"calib-plan-small: error: {e}", file=sys.stderr)
            return 1
        print(f"done: nnUNetv2_train {args.dataset} {args.configuration} FOLD -tr TRAINER")
    return 0


def main(argv=None) -> int:
    return cli_main(_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
