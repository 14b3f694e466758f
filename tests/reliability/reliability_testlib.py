"""Helpers of the reliability tests: tiny nnU-Net-style prediction / reference folders built here
(dataset.json, ``CASE.npz`` written with ``np.savez_compressed`` as nnU-Net does, ``CASE.pkl`` with the
properties nnU-Net's reader returns plus ``shape_before_cropping``, references written with
SimpleITK), ``calib-evaluate`` run in this process or as a process of its own, fingerprints of
folders, and a look at the processes of a process tree through ``/proc``."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import save_pickle
from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

from nnunet_calibration.posthoc import model

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "nnunet_calibration.evaluation.cli"]


def _case(shape, rng, n_classes):
    """A box of label 1 (2, 3, ... in smaller boxes) and confident softmax probabilities."""
    lab = np.zeros(shape, np.int16)
    lab[tuple(slice(s // 4, s // 4 + max(s // 2, 1)) for s in shape)] = 1
    for c in range(2, min(n_classes, 8)):
        lab[tuple(slice(s // 3, s // 3 + max(s // (2 + c), 1)) for s in shape)] = c
    logits = rng.normal(0, 1.0, size=(n_classes, *shape)).astype(np.float32)
    logits += 4.0 * (lab[None] == np.arange(n_classes).reshape(-1, *[1] * len(shape)))
    p = np.exp(logits - logits.max(0))
    return lab, (p / p.sum(0)).astype(np.float32)


def build(root: Path, n_cases=2, shape=(4, 16, 16), n_classes=2, png=False, pkl=True, seed=0):
    """``(pred, gt)``: ``root/pred`` (dataset.json, CASE.npz, CASE.pkl) and ``root/gt``. ``png``: a 2D
    dataset of ``.png`` references (``shape`` (y, x)), read by nnU-Net's NaturalImage2DIO."""
    rng = np.random.default_rng(seed)
    pred, gt = root / "pred", root / "gt"
    pred.mkdir(parents=True)
    gt.mkdir(parents=True)
    ending = ".png" if png else ".nii.gz"
    labels = {"background": 0, **{f"c{c}": c for c in range(1, n_classes)}}
    (pred / "dataset.json").write_text(json.dumps({"channel_names": {"0": "x"}, "labels": labels,
                                                   "numTraining": n_cases, "file_ending": ending}))
    for i in range(n_cases):
        case = f"case_{i:03d}"
        lab, probs = _case(shape, rng, n_classes)
        if png:
            sitk.WriteImage(sitk.GetImageFromArray(lab.astype(np.uint8)), str(gt / f"{case}.png"))
            np.savez_compressed(pred / f"{case}.npz", probabilities=probs[:, None])  # nnU-Net's (C, 1, y, x)
            props = {"spacing": (999.0, 1.0, 1.0), "shape_before_cropping": (1, *shape)}
        else:
            img = sitk.GetImageFromArray(lab)
            img.SetSpacing((0.8, 0.8, 2.5))
            sitk.WriteImage(img, str(gt / f"{case}.nii.gz"), useCompression=True)
            np.savez_compressed(pred / f"{case}.npz", probabilities=probs)
            arr, props = SimpleITKIO().read_seg(str(gt / f"{case}.nii.gz"))
            props["shape_before_cropping"] = tuple(arr.shape[1:])
        if pkl:
            save_pickle(props, str(pred / f"{case}.pkl"))
    return pred, gt


#: the image shape of the tiny model folders (:func:`model_folder`)
SHAPE = (3, 8, 10)


def model_folder(root: Path, n_cases: int = 4, pkl: bool = True) -> tuple:
    """``(model folder, reference folder)``: cases alternately in fold_0 / fold_1 validation."""
    pred, gt = build(root / "src", n_cases=n_cases, shape=SHAPE, pkl=pkl)
    folder = root / "Dataset999_Tiny" / "Trainer__Plans__3d_fullres"
    folder.mkdir(parents=True)
    shutil.move(str(pred / "dataset.json"), folder / "dataset.json")
    (folder / "plans.json").write_text("{}")
    for i, npz in enumerate(sorted(pred.glob("*.npz"))):
        val = folder / f"fold_{i % 2}" / "validation"
        val.mkdir(parents=True, exist_ok=True)
        for f in pred.glob(npz.stem + ".*"):
            shutil.move(str(f), val / f.name)
    pred.rmdir()
    return folder, gt


def write_calibration(folder: Path, dataset_json: dict, method: str = "temperature", **parameters) -> Path:
    """A calibration.json as fit writes it (only the fields apply reads), with ``parameters``."""
    channels = ["background", *[k for k in dataset_json["labels"] if k != "background"]]
    params = parameters or {"temperature": 1.5}
    rec = {"format": model.FORMAT, "version": model.VERSION, "method": method, "nonlinearity": "softmax",
           "parameters": params, "channels": channels, "labels": dataset_json["labels"],
           "regions_class_order": None}
    path = folder / model.CALIBRATION_FILE
    path.write_text(json.dumps(rec))
    return path


def replicate(pred: Path, gt: Path, n_cases: int) -> None:
    """Copies of ``case_000`` (npz, pkl, reference) as ``case_001`` ... ``case_<n_cases - 1>``: many large
    cases without compressing each one (np.savez_compressed of a large array takes seconds)."""
    for folder in (pred, gt):
        originals = sorted(folder.glob("case_000*"))
        assert originals, folder
        for i in range(1, n_cases):
            for f in originals:
                shutil.copyfile(f, folder / f.name.replace("case_000", f"case_{i:03d}"))


def fingerprint(root: Path) -> dict:
    """Every entry below ``root`` (hidden ones too): ``relative path -> sha256`` of a file, ``"dir"``
    for a folder, ``"-> target"`` for a symbolic link."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_dir():
            out[rel] = "dir"
        else:
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_main(main, capsys, *args, quiet: str | None = "--no-progress") -> tuple:
    """``(exit status, stdout, stderr)`` of a console script's ``main(ARGS + [quiet])`` in this process
    (``quiet``: the script's flag that hides progress bars, None: none; argparse's SystemExit counts as
    the exit status)."""
    try:
        rc = main([*map(str, args), *([quiet] if quiet else [])])
    except SystemExit as e:  # argparse
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def run_inprocess(capsys, *args) -> tuple:
    """:func:`run_main` of ``calib-evaluate``."""
    from nnunet_calibration.evaluation.cli import main

    return run_main(main, capsys, *args)


def env() -> dict:
    """This environment with the repository first on PYTHONPATH (for ``calib-evaluate`` subprocesses)."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _as_from_a_terminal() -> None:
    """In the child before exec: SIGINT / SIGTERM at their defaults and not blocked, as a shell starts a
    command (dispositions SIG_IGN and the signal mask are inherited through exec, and the pytest worker
    that starts the child may have either changed)."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def start(*args, new_session: bool = False) -> subprocess.Popen:
    """``calib-evaluate ARGS --no-progress`` as a process of its own (stdout / stderr piped), started as
    from a terminal; ``new_session``: in a process group of its own (for a Ctrl-C to the whole group,
    ``os.killpg``)."""
    return subprocess.Popen([*CLI, *map(str, args), "--no-progress"], env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=new_session,
                            preexec_fn=_as_from_a_terminal)


def _stat(pid: int):
    """``(state, ppid)`` of a process, or None if it does not exist."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1])


def children(pid: int) -> dict:
    """``{pid: command line}`` of the living children of ``pid``."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            st = _stat(int(d.name))
            if st is None or st[1] != pid or st[0] == "Z":
                continue
            try:
                out[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
    return out


def signal_masks(pid: int):
    """``(blocked, ignored)``: the sets of signal numbers process ``pid`` blocks and ignores
    (``/proc/PID/status``: SigBlk, SigIgn); None if the process is gone."""
    try:
        lines = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    except OSError:
        return None
    return tuple({n for n in range(1, 65) if int(lines[key], 16) >> (n - 1) & 1} for key in ("SigBlk", "SigIgn"))


def sigint_held(pid: int):
    """Whether SIGINT is blocked or ignored in process ``pid``; None if the process is gone."""
    masks = signal_masks(pid)
    return None if masks is None else signal.SIGINT in masks[0] | masks[1]


def alive(pid: int) -> bool:
    """Whether ``pid`` is a process that has not exited (a zombie, exited but not yet reaped, is not)."""
    st = _stat(pid)
    return st is not None and st[0] != "Z"


def maps(pid: int, text: str) -> bool:
    """Whether process ``pid`` has a file whose path contains ``text`` mapped (a loaded library)."""
    try:
        return text in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def wait_for(condition, timeout: float, step: float = 0.05):
    """Poll ``condition()`` until it returns something true or ``timeout`` seconds passed; its last value."""
    t0 = time.monotonic()
    while True:
        value = condition()
        if value or time.monotonic() - t0 >= timeout:
            return value
        time.sleep(step)


def read_only(path: Path) -> None:
    """Make ``path`` unwritable for this user: ``chattr +i`` as root (root ignores permission bits), else chmod."""
    if os.geteuid() != 0:
        path.chmod(0o555)
        return
    if shutil.which("chattr") is None:
        pytest.skip("running as root without chattr: no way to make a folder read-only for root here")
    r = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"the file system refuses chattr +i: {r.stderr.strip()}")


def writable_again(path: Path) -> None:
    """Undo :func:`read_only`."""
    if path.exists():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        else:
            path.chmod(0o755)
