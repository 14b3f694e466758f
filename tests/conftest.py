"""Shared fixtures: tiny synthetic datasets, planned and preprocessed by real nnU-Net, once per run.

- ``nnunet_root``: an environment dict whose nnUNet_raw / nnUNet_preprocessed / nnUNet_results point
  into one temporary folder of this pytest process (of this worker under ``pytest -n 2``); applied
  to ``os.environ`` for the whole session.
- ``synthetic_labels``: Dataset901 (plain labels 0..3), 2d and 3d_fullres preprocessed.
- ``synthetic_regions``: Dataset902 (BraTS-like regions, two channels), 2d and 3d_fullres preprocessed.
- ``synthetic_labels_workflow_plans``: Dataset901 with two more plans of nnU-Net's own planners
  (tests/trainers/test_workflows.py): ``nnUNetResEncUNetMPlans`` (planner nnUNetPlannerResEncM; it
  reuses the plain plans' 2d / 3d_fullres data, nnU-Net's choice) and ``nnUNetPlansCascade``
  (ExperimentPlanner with ``-gpu_memory_target 0.001``: the 6 x 24 x 24 images get a 3 x 10 x 10
  patch, so nnU-Net plans 3d_lowres -> 3d_cascade_fullres, which 8 GB would not for images this small;
  the patch depth is then raised to 4, the least nnU-Net's blur augmentation takes).
- ``synthetic_prediction``: a real short ``nnUNetTrainerDiceCE`` training on 901 (2d, fold 0, --npz)
  and ``nnUNetv2_predict --save_probabilities`` on its imagesTs; the model folder lies in
  ``nnunet_root``'s nnUNet_results.

Once per run: each dataset is generated and planned/preprocessed, and the DiceCE model trained and
predicted, ONCE per pytest run in a folder shared by all xdist workers (``testlib.build_once``,
under a file lock); each worker's ``nnunet_root`` receives a copy (raw, preprocessed and model
folders are small), so tests of one worker never see files another worker is writing.

Trainer lookup: after a normal ``pip install .`` our trainers sit inside nnU-Net's trainer folder.
With an editable install they don't, so ``nnUNet_extTrainer`` is pointed at the plugin folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace

import nnunetv2
import pytest

from nnunet_calibration.nnunet_utils import nnunet_env, run_nnunet
from nnunet_calibration.synthetic import make_synthetic_dataset
from testlib import PREDICT_IN_PROCESS, SHORT_TRAINING, build_once, copy_tree, shared_dir

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
ACDC_SUBSET = SHARED / "data" / "acdc-subset"

#: the synthetic datasets of the fixtures: id -> make_synthetic_dataset arguments. 24 x 24 slices:
#: nnU-Net plans its 3-stage U-Net (32, 64, 128 features; 40 x 40 gives 4 stages up to 256), which
#: trains, validates and predicts several times faster; 2 stages would need slices under 16 voxels,
#: where the ring label gets thinner than a voxel
SHAPE = (6, 24, 24)
SYNTHETIC = {
    901: dict(n_train=10, n_test=2, regions=False, seed=0, shape=SHAPE),
    902: dict(n_train=10, n_test=2, regions=True, seed=1, shape=SHAPE),
}
PREDICTION_TRAINER = "nnUNetTrainerDiceCE"


#: environment variable naming the folder where xdist workers record which tests share a fixture
XDIST_GROUPS_ENV = "NNUNET_CALIB_XDIST_GROUPS"


def _fixture_group(item) -> str | None:
    """The module (or, for a package-scoped fixture, the folder) of a test that uses a module-,
    class- or package-scoped fixture; None for a test with only session- or function-scoped ones."""
    info = getattr(item, "_fixtureinfo", None)
    scopes = {d.scope for ds in (info.name2fixturedefs.values() if info is not None else ()) for d in ds}
    if "package" in scopes:
        return str(Path(item.path).parent)
    if scopes & {"module", "class"}:
        return item.nodeid.split("::")[0]
    return None


class XdistFixtureGroups:
    """With pytest-xdist (``pytest -n 2``, xdist's "load" distribution) every test goes to whichever
    worker is free, except that the tests sharing a module-, class- or package-scoped fixture (a
    conversion, an experiment run, a SLURM cluster) go to one worker together, so that fixture runs
    once. Workers write which tests share a fixture into a folder the scheduler reads. (xdist's own
    ``--dist loadgroup`` would need ``xdist_group`` marks in every test module, and pytest 9 ignores
    the node ids it rewrites.) Registered only when pytest-xdist is installed."""

    def __init__(self, folder: Path):
        self.folder = folder

    def pytest_collection_modifyitems(self, config, items):
        worker = os.environ.get("PYTEST_XDIST_WORKER")
        if worker:
            groups = {item.nodeid: g for item in items if (g := _fixture_group(item)) is not None}
            tmp = self.folder / f"{worker}.json.tmp"
            tmp.write_text(json.dumps(groups))
            tmp.replace(self.folder / f"{worker}.json")

    def pytest_xdist_make_scheduler(self, config, log):
        if config.getvalue("dist") != "load":
            return None
        # deferred on purpose: pytest-xdist is optional and this hook only runs when it is installed
        from xdist.scheduler import LoadScopeScheduling

        folder = self.folder

        class FixtureGroupScheduling(LoadScopeScheduling):
            groups: dict | None = None

            def _split_scope(self, nodeid: str) -> str:
                if self.groups is None:  # first called once every worker has collected
                    self.groups = {}
                    for f in sorted(folder.glob("*.json")):
                        self.groups.update(json.loads(f.read_text()))
                return self.groups.get(nodeid, nodeid)

        return FixtureGroupScheduling(config, log)


def pytest_configure(config):
    if not config.pluginmanager.hasplugin("xdist"):
        return
    if not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller: workers inherit the variable
        if not config.getoption("numprocesses", None):
            return
        os.environ[XDIST_GROUPS_ENV] = tempfile.mkdtemp(prefix="calib-xdist-groups-")
    if os.environ.get(XDIST_GROUPS_ENV):
        config.pluginmanager.register(XdistFixtureGroups(Path(os.environ[XDIST_GROUPS_ENV])), "calib-xdist-groups")


def pytest_unconfigure(config):
    folder = os.environ.get(XDIST_GROUPS_ENV)
    if folder and not os.environ.get("PYTEST_XDIST_WORKER"):  # the controller cleans up its folder
        shutil.rmtree(folder, ignore_errors=True)
        os.environ.pop(XDIST_GROUPS_ENV, None)


def plugin_installed_in_nnunet() -> bool:
    """True if the wheel's re-export module lies inside nnU-Net's trainer folder (non-editable install)."""
    return (Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / "zz_nnunet_calibration"
            / "nnunet_calibration_trainers.py").is_file()


def _nnunet_env(root: Path) -> dict:
    env = nnunet_env(root, cpu_friendly=True)
    # nnU-Net gives torch one thread per core in every process; with two xdist workers (and on a busy
    # machine) threads spinning at OpenMP barriers steal the cores the other threads wait for
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not plugin_installed_in_nnunet():
        env["nnUNet_extTrainer"] = str(REPO / "nnunet_calibration" / "_nnunet_plugin")
    return env


@pytest.fixture(scope="session")
def nnunet_root(tmp_path_factory):
    env = _nnunet_env(tmp_path_factory.mktemp("nnunet"))
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _plan_and_preprocess(env: dict, dataset_id: int, configs=("2d", "3d_fullres")) -> None:
    # -npfp 1: nnU-Net's fingerprint extraction otherwise spawns 8 processes (each importing torch)
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", str(dataset_id), "-c", *configs, "-np",
                *["1"] * len(configs), "-npfp", "1", "--verify_dataset_integrity"], env)


def _dataset_name(root: Path, dataset_id: int) -> str:
    return next(p.name for p in (root / "raw").iterdir() if p.name.startswith(f"Dataset{dataset_id:03d}_"))


def _build_synthetic(folder: Path, dataset_id: int) -> None:
    """raw/ and preprocessed/ of one synthetic dataset in their own nnU-Net root ``folder``."""
    env = _nnunet_env(folder)
    make_synthetic_dataset(env["nnUNet_raw"], dataset_id, **SYNTHETIC[dataset_id])
    _plan_and_preprocess(env, dataset_id)


def _synthetic(dataset_id: int, env: dict, tmp_path_factory) -> SimpleNamespace:
    """The run's copy of one synthetic dataset, copied into this worker's nnU-Net folders."""
    built = build_once(shared_dir(tmp_path_factory) / f"synthetic_{dataset_id}",
                       lambda folder: _build_synthetic(folder, dataset_id))
    name = _dataset_name(built, dataset_id)
    raw = copy_tree(built / "raw" / name, Path(env["nnUNet_raw"]) / name)
    pre = copy_tree(built / "preprocessed" / name, Path(env["nnUNet_preprocessed"]) / name)
    return SimpleNamespace(dataset_id=dataset_id, name=name, raw=raw, env=env, preprocessed=pre)


@pytest.fixture(scope="session")
def synthetic_labels(nnunet_root, tmp_path_factory):
    return _synthetic(901, nnunet_root, tmp_path_factory)


@pytest.fixture(scope="session")
def synthetic_regions(nnunet_root, tmp_path_factory):
    return _synthetic(902, nnunet_root, tmp_path_factory)


#: further plans of Dataset901 (``synthetic_labels_workflow_plans``): name -> planner command arguments
RESENC_PLANS = "nnUNetResEncUNetMPlans"
CASCADE_PLANS = "nnUNetPlansCascade"
#: GB: the smallest VRAM target for which nnU-Net's planner shrinks the patch of the 6 x 24 x 24
#: images (3 x 10 x 10) enough to add 3d_lowres (its patch < 25% of the median image)
CASCADE_GPU_MEMORY_TARGET = "0.001"


def _build_workflow_plans(folder: Path, dataset) -> None:
    """The extra plans of ``synthetic_labels_workflow_plans`` in their own nnU-Net root ``folder``."""
    env = _nnunet_env(folder)
    copy_tree(dataset.raw, Path(env["nnUNet_raw"]) / dataset.name)
    copy_tree(dataset.preprocessed, Path(env["nnUNet_preprocessed"]) / dataset.name)
    did = str(dataset.dataset_id)
    # ResEnc M: its 2d / 3d_fullres data identifiers are the plain plans' (nnUNetPlans_2d, ...): no preprocessing
    run_nnunet(["nnUNetv2_plan_experiment", "-d", did, "-pl", "nnUNetPlannerResEncM"], env)
    # the fingerprint exists: nnU-Net reuses it; the cascade's configurations get their own data
    run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", did, "-gpu_memory_target", CASCADE_GPU_MEMORY_TARGET,
                "-overwrite_plans_name", CASCADE_PLANS, "-c", "3d_lowres", "3d_fullres", "-np", "1", "1",
                "-npfp", "1"], env)
    # the planner's patches are 3 x 10 x 10; nnU-Net's Gaussian-blur augmentation pads 3 voxels by reflection,
    # which needs 4 slices: the depth (stride 1 on that axis, preprocessing unaffected) raised to 4
    plans_file = Path(env["nnUNet_preprocessed"]) / dataset.name / f"{CASCADE_PLANS}.json"
    plans = load_json(plans_file)
    for name in ("3d_lowres", "3d_fullres"):
        conf = plans["configurations"][name]
        assert all(s[0] == 1 for s in conf["architecture"]["arch_kwargs"]["strides"]), conf
        conf["patch_size"] = [max(4, conf["patch_size"][0]), *conf["patch_size"][1:]]
    plans_file.write_text(json.dumps(plans, indent=4))


@pytest.fixture(scope="session")
def synthetic_labels_workflow_plans(synthetic_labels, tmp_path_factory):
    """``synthetic_labels`` plus the plans ``nnUNetResEncUNetMPlans`` and ``nnUNetPlansCascade`` (with
    3d_lowres and 3d_cascade_fullres), planned once per run and copied into this worker's folders."""
    ds = synthetic_labels
    built = build_once(shared_dir(tmp_path_factory) / "synthetic_901_workflow_plans",
                       lambda folder: _build_workflow_plans(folder, ds))
    src = built / "preprocessed" / ds.name
    for plans in (RESENC_PLANS, CASCADE_PLANS):
        shutil.copy2(src / f"{plans}.json", ds.preprocessed / f"{plans}.json")
    for data in src.glob(f"{CASCADE_PLANS}_*"):
        copy_tree(data, ds.preprocessed / data.name)
    cascade = load_json(ds.preprocessed / f"{CASCADE_PLANS}.json")["configurations"]
    assert {"3d_lowres", "3d_cascade_fullres"} <= set(cascade), sorted(cascade)
    return SimpleNamespace(**vars(ds), resenc_plans=RESENC_PLANS, cascade_plans=CASCADE_PLANS)


def _train_and_predict(folder: Path, dataset) -> None:
    """The DiceCE model of ``synthetic_prediction`` in its own nnU-Net root ``folder``: train on a
    copy of the dataset, predict imagesTs into ``folder/imagesTs_pred``."""
    env = dict(_nnunet_env(folder), NNUNET_CALIB_HPARAMS=SHORT_TRAINING)
    copy_tree(dataset.raw, Path(env["nnUNet_raw"]) / dataset.name)
    copy_tree(dataset.preprocessed, Path(env["nnUNet_preprocessed"]) / dataset.name)
    run_nnunet(["nnUNetv2_train", str(dataset.dataset_id), "2d", "0", "-tr", PREDICTION_TRAINER, "--npz",
                "-device", "cpu"], env)
    images = Path(env["nnUNet_raw"]) / dataset.name / "imagesTs"
    run_nnunet(["nnUNetv2_predict", "-i", images, "-o", folder / "imagesTs_pred", "-d",
                str(dataset.dataset_id), "-c", "2d", "-f", "0", "-tr", PREDICTION_TRAINER,
                "--save_probabilities", "-device", "cpu", *PREDICT_IN_PROCESS], env)


@pytest.fixture(scope="session")
def synthetic_prediction(synthetic_labels, tmp_path_factory):
    ds = synthetic_labels
    built = build_once(shared_dir(tmp_path_factory) / "synthetic_prediction",
                       lambda folder: _train_and_predict(folder, ds))
    model_name = f"{PREDICTION_TRAINER}__nnUNetPlans__2d"
    model = copy_tree(built / "results" / ds.name / model_name, Path(ds.env["nnUNet_results"]) / ds.name / model_name)
    pred = copy_tree(built / "imagesTs_pred", tmp_path_factory.mktemp("pred") / "imagesTs_pred")
    # the splits the model was trained with (nnU-Net wrote them into the build's preprocessed copy): tests that
    # read fold 0's validation cases must find them whatever ran before on this worker
    splits = built / "preprocessed" / ds.name / "splits_final.json"
    if not (ds.preprocessed / "splits_final.json").exists():
        shutil.copy2(splits, ds.preprocessed / "splits_final.json")
    return SimpleNamespace(pred_folder=pred, gt_folder=ds.raw / "labelsTs",
                           validation_folder=model / "fold_0" / "validation",
                           gt_folder_train=ds.raw / "labelsTr",
                           dataset_json=ds.raw / "dataset.json", model_folder=model,
                           trainer=PREDICTION_TRAINER, dataset=ds)


def load_json(path) -> dict:
    with open(path) as f:
        return json.load(f)
