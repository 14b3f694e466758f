"""Every console script, as a user runs it (the installed script, a real subprocess), through the one CLI
frame (:func:`nnunet_calibration.utils.cli_main`):

* ``--help`` exits 0 with a usage;
* a bad argument exits 2 with exactly one line on stderr, ``PROG: error: ...`` (PROG names the subcommand
  too where there is one: ``calib-calibrate apply: error: ...``);
* SIGTERM in the middle of real work exits 130 with ``PROG: interrupted; nothing written``, leaves no
  staging folder and no half-written output, leaves the inputs as they were, and leaves no process behind.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ACDC_SUBSET = REPO.parent / "shared" / "data" / "acdc-subset"
SCRIPTS = ("calib-evaluate", "calib-convert", "calib-experiment", "calib-demo", "calib-plan-small", "calib-calibrate",
           "calib-predict")


def script(name: str) -> str:
    """The installed console script next to this interpreter (what ``pip install`` put on PATH)."""
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable}"
    return str(path)


def run(name, *args, env=None, timeout=600):
    return subprocess.run([script(name), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


@pytest.mark.parametrize("name", SCRIPTS)
def test_help(name):
    r = run(name, "--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: " + name), r.stdout[:200]


BAD_ARGUMENTS = {
    "calib-evaluate": (["pred", "--gt", "gt", "--nll-eps", "2"], "--nll-eps must be a number in (0, 1), got 2.0"),
    "calib-convert": (["acdc", "src", "-d", "twenty"], "argument -d/--dataset-id: invalid int value: 'twenty'"),
    "calib-experiment": (["check", "no-such-file.yaml"], "experiment file not found"),
    "calib-demo": (["--iterations", "x"], "argument --iterations: invalid int value: 'x'"),
    "calib-plan-small": (["27", "--batch-size", "four"], "argument --batch-size: invalid int value: 'four'"),
    "calib-calibrate": (["apply", "pred"], "the following arguments are required: -m/--model, -o/--output"),
    "calib-predict": (["-i", "in", "-o", "out", "-m", "model", "-step_size", "half"],
                      "argument -step_size: invalid float value: 'half'"),
}


@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_argument_is_one_line_and_exit_2(name, tmp_path):
    args, message = BAD_ARGUMENTS[name]
    r = subprocess.run([script(name), *args], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2, r.stderr
    prog = lines[0].split(": error: ")[0] if lines else ""
    assert len(lines) == 1 and prog.split()[0] == name and message in lines[0], r.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


# -- SIGTERM in the middle of real work ------------------------------------------------------------
def snapshot(*folders) -> dict:
    """Every file below ``folders`` with its content hash (to show inputs unchanged)."""
    out = {}
    for folder in folders:
        for p in sorted(Path(folder).rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha1(p.read_bytes()).hexdigest()
    return out


def descendants(pid: int) -> set[int]:
    """Process ids whose parent chain reaches ``pid`` (from /proc), or in its session."""
    found = set()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == pid or int(fields[3]) == pid:  # parent, or session leader
            found.add(int(d.name))
    return found


def sigterm_when(cmd, env, ready, timeout=900.0, cwd=None):
    """Start ``cmd``; when ``ready(proc, stderr_so_far)`` is true, SIGTERM it. Returns
    ``(returncode, stdout, stderr, fired, children_seen)``; the process is killed if it outlives ``timeout``."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    err, out = [], []
    readers = [threading.Thread(target=lambda s=s, b=b: b.extend(iter(lambda: s.read(1), "")), daemon=True)
               for s, b in ((proc.stderr, err), (proc.stdout, out))]
    for t in readers:
        t.start()
    fired, children = False, set()
    try:
        t0 = time.time()
        while time.time() - t0 < timeout and proc.poll() is None:
            if ready(proc, "".join(err)):
                children = descendants(proc.pid)
                proc.send_signal(signal.SIGTERM)
                fired = True
                break
            time.sleep(0.01)
        proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    for t in readers:
        t.join(10)
    return proc.returncode, "".join(out), "".join(err), fired, children


def staging_of(folder: Path, prefix: str):
    return lambda proc, err: folder.is_dir() and any(p.name.startswith(f"{prefix}{proc.pid}-") for p in folder.iterdir())


def stderr_has(text: str):
    return lambda proc, err: text in err


def assert_interrupted(name, rc, stderr, fired, children):
    assert fired, f"{name} finished before it could be interrupted:\n{stderr[-2000:]}"
    assert rc == 130, stderr[-3000:]
    assert f"{name}: interrupted; nothing written" in stderr and "Traceback" not in stderr, stderr[-3000:]
    time.sleep(1.0)
    alive = [p for p in children if Path(f"/proc/{p}").exists()]
    assert not alive, f"processes left behind: {alive}"


def _env(**extra):
    env = dict(os.environ, **{k: str(v) for k, v in extra.items()})
    env.setdefault("nnUNet_compile", "f")
    return env


@pytest.fixture
def many_cases(synthetic_prediction, tmp_path):
    """A prediction folder and references of 40 cases (the fixture's two test cases, copied under new ids)."""
    pred, gt = tmp_path / "pred", tmp_path / "gt"
    pred.mkdir()
    gt.mkdir()
    src = synthetic_prediction
    cases = sorted(p.name[:-4] for p in src.pred_folder.glob("*.npz"))
    for i in range(40):
        case = cases[i % len(cases)]
        new = f"many_{i:03d}"
        for suffix in (".npz", ".pkl", ".nii.gz"):
            shutil.copy2(src.pred_folder / f"{case}{suffix}", pred / f"{new}{suffix}")
        shutil.copy2(src.gt_folder / f"{case}.nii.gz", gt / f"{new}.nii.gz")
    for name in ("dataset.json", "plans.json"):
        shutil.copy2(src.pred_folder / name, pred / name)
    return pred, gt


def test_sigterm_calib_evaluate(many_cases, tmp_path):
    pred, gt = many_cases
    out = tmp_path / "out"
    before = snapshot(pred, gt)
    rc, _, err, fired, kids = sigterm_when([script("calib-evaluate"), pred, "--gt", gt, "-o", out], _env(),
                                           staging_of(tmp_path, ".out.tmp-"))
    assert_interrupted("calib-evaluate", rc, err, fired, kids)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert snapshot(pred, gt) == before


def test_sigterm_calib_calibrate_apply(many_cases, synthetic_prediction, tmp_path):
    pred, _ = many_cases
    model = tmp_path / "model"
    shutil.copytree(synthetic_prediction.model_folder, model)
    fit = run("calib-calibrate", "fit", model, "--gt", synthetic_prediction.gt_folder_train, "--no-progress")
    assert fit.returncode == 0, fit.stderr
    out = tmp_path / "calibrated"
    before = snapshot(pred, model)
    rc, _, err, fired, kids = sigterm_when([script("calib-calibrate"), "apply", pred, "-m", model, "-o", out], _env(),
                                           staging_of(tmp_path, ".calibrated.tmp-"))
    assert_interrupted("calib-calibrate", rc, err, fired, kids)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".calibrated.")]
    assert snapshot(pred, model) == before


def test_sigterm_calib_calibrate_fit(synthetic_prediction, tmp_path):
    model, gt = tmp_path / "model", tmp_path / "gt"
    shutil.copytree(synthetic_prediction.model_folder, model)
    gt.mkdir()
    val = model / "fold_0" / "validation"
    for npz in sorted(val.glob("*.npz")):  # more cases: time to be interrupted while reading
        for i in range(15):
            for suffix in (".npz", ".pkl"):
                shutil.copy2(npz.with_suffix(suffix), val / f"{npz.stem}x{i}{suffix}")
            shutil.copy2(synthetic_prediction.gt_folder_train / f"{npz.stem}.nii.gz", gt / f"{npz.stem}x{i}.nii.gz")
        shutil.copy2(synthetic_prediction.gt_folder_train / f"{npz.stem}.nii.gz", gt / f"{npz.stem}.nii.gz")
    before = snapshot(model)
    rc, _, err, fired, kids = sigterm_when([script("calib-calibrate"), "fit", model, "--gt", gt], _env(),
                                           stderr_has("calibration: reading validation cases"))
    assert_interrupted("calib-calibrate", rc, err, fired, kids)
    assert not (model / "calibration.json").exists()
    assert snapshot(model) == before


def test_sigterm_calib_convert(tmp_path):
    if not ACDC_SUBSET.is_dir():
        pytest.fail(f"{ACDC_SUBSET} is needed (the ACDC subset beside the repository)")
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    before = snapshot(ACDC_SUBSET)
    rc, _, err, fired, kids = sigterm_when(
        [script("calib-convert"), "acdc", ACDC_SUBSET, "-d", "27"], _env(nnUNet_raw=raw, nnUNet_preprocessed=pre),
        staging_of(raw, ".Dataset027_ACDC.tmp-"))
    assert_interrupted("calib-convert", rc, err, fired, kids)
    assert not raw.exists() and not list(pre.rglob("splits_final.json"))  # raw: made by the run, removed again
    assert snapshot(ACDC_SUBSET) == before


def test_sigterm_calib_plan_small(synthetic_labels, tmp_path):
    pre = tmp_path / "pre"
    shutil.copytree(synthetic_labels.preprocessed, pre / synthetic_labels.name)
    before = snapshot(pre)
    rc, _, err, fired, kids = sigterm_when(
        [script("calib-plan-small"), str(synthetic_labels.dataset_id), "--spacing-factor", "1", "--fov-factor", "1",
         "--overwrite"],
        _env(nnUNet_preprocessed=pre, nnUNet_raw=synthetic_labels.env["nnUNet_raw"]),
        staging_of(pre / synthetic_labels.name, ".nnUNetPlans_2d_small.tmp-"))
    assert_interrupted("calib-plan-small", rc, err, fired, kids)
    assert snapshot(pre) == before  # the plans as before (an earlier 2d_small kept), no staging, no new data


def test_sigterm_calib_experiment_run(synthetic_labels, tmp_path):
    from experiments_testlib import write_experiment

    exp = write_experiment(tmp_path / "e.yaml", name="interrupted", dataset=synthetic_labels.dataset_id,
                           configuration="2d", folds=[0], device="cpu",
                           training={"num_epochs": 50, "num_iterations_per_epoch": 2, "num_val_iterations_per_epoch": 1},
                           trainers=["nnUNetTrainerDiceCE"], state_dir=str(tmp_path / "state"),
                           nnunet_paths={"results": str(tmp_path / "results")})
    log = tmp_path / "state" / "logs" / "nnUNetTrainerDiceCE_fold0.log"
    rc, _, err, fired, kids = sigterm_when(
        [script("calib-experiment"), "run", exp, "--output-root", tmp_path / "reports", "--quiet"], _env(),
        lambda proc, err: log.is_file() and "Epoch 1" in log.read_text(errors="replace"))
    assert_interrupted("calib-experiment", rc, err, fired, kids)
    assert not (tmp_path / "reports").exists()  # no report of an interrupted run


def test_sigterm_calib_demo(tmp_path):
    work = tmp_path / "work"
    rc, _, err, fired, kids = sigterm_when(
        [script("calib-demo"), "--work", work, "--output-root", tmp_path / "results", "--quiet"], _env(),
        lambda proc, err: (work / "nnUNet_preprocessed").is_dir() and any((work / "nnUNet_preprocessed").iterdir()),
        cwd=tmp_path)
    assert_interrupted("calib-demo", rc, err, fired, kids)
    assert not (tmp_path / "results").exists()
