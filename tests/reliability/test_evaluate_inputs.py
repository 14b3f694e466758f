"""calib-evaluate on the inputs of issue 21: every row a test on real folders built here (tiny
nnU-Net-style prediction and reference folders), asserting the exit status, the message, and that
the inputs and the output location are exactly as before (fingerprints of every file, hidden ones
too) unless the run is meant to write.

1. an output folder that is, contains or lies inside an input folder, or holds files the evaluator
   did not write (no manifest, other files, changed files), is refused; its own output is replaced
2. metric options out of range: one line, exit 2
3. SIGKILL of the main process: no worker process (nor the resource tracker) survives it
4. SIGTERM (to the main process) or Ctrl-C (SIGINT to the process group) while the workers start:
   exit 130 within seconds, no traceback (neither of the main process nor of a worker), nothing left
5. an output path under a file, in a read-only place, or an existing output folder that cannot be
   renamed: exit 2 before any case is computed
6. 300 classes: plots for at most MAX_PLOTTED_CLASSES classes (said on stdout and in summary.json),
   --no-plots: none (the limit is lowered to 3 here: the test is about the rule, not matplotlib's speed)
7. a damaged prediction segmentation (read for the geometry check) is named as the prediction's
"""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from nnunet_calibration.evaluation import output
from nnunet_calibration.evaluation.output import MANIFEST, MAX_PLOTTED_CLASSES
from reliability_testlib import (alive, build, children, fingerprint, maps, read_only, replicate, run_inprocess,
                                 sigint_held, signal_masks, start, wait_for, writable_again)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("calib-evaluate: error: "), err
    return lines[0]


def expected_outputs(n_plots: int, names) -> set:
    pngs = {f"reliability_{n}.png" for n in names[:n_plots]}
    plots = pngs | {"dataset_reliability_histogram.png", "risk_coverage.png"}
    return {"summary.json", "per_case.csv", MANIFEST} | (plots if n_plots else set())


# ---------------------------------------------------------------------------------------------- 1
def _earlier_output(root: Path, pred: Path, gt: Path, capsys) -> Path:
    """An earlier output of calib-evaluate (without plots: quicker)."""
    out = root / "out"
    assert run_inprocess(capsys, pred, "--gt", gt, "-o", out, "--no-plots")[0] == 0
    assert {p.name for p in out.iterdir()} == expected_outputs(0, [])
    return out


ROW1 = {  # case -> expected words of the message
    "png_references_as_output": "the output folder is the reference folder",
    "prediction_folder_as_output": "the output folder is the prediction folder",
    "output_contains_the_inputs": "the output folder contains the",
    "output_inside_the_references": "the output folder is inside the reference folder",
    "dataset_json_folder_as_output": "the output folder is the folder of dataset.json",
    "folder_of_someone_else": "holds files calib-evaluate did not write (no " + MANIFEST,
    "file_added_to_earlier_output": "holds files calib-evaluate did not write (['mine.png'])",
    "earlier_output_changed": "changed since calib-evaluate wrote it",
}


@pytest.mark.parametrize("case", list(ROW1))
def test_output_folder_of_inputs_or_of_someone_else_is_refused(tmp_path, capsys, case):
    pred, gt = build(tmp_path, png=case == "png_references_as_output", shape=(12, 14) if case.startswith("png")
                     else (3, 10, 12))
    args = []
    if case == "png_references_as_output":
        out = gt
    elif case == "prediction_folder_as_output":
        out = pred
    elif case == "output_contains_the_inputs":
        out = tmp_path
    elif case == "output_inside_the_references":
        out = gt / "evaluation"
    elif case == "dataset_json_folder_as_output":
        (tmp_path / "dataset").mkdir()
        os.replace(pred / "dataset.json", tmp_path / "dataset" / "dataset.json")
        out, args = tmp_path / "dataset", ["-djfile", tmp_path / "dataset" / "dataset.json"]
    elif case == "folder_of_someone_else":
        out = tmp_path / "out"
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        (out / "summary.json").write_text("{}")
    else:
        out = _earlier_output(tmp_path, pred, gt, capsys)
        if case == "file_added_to_earlier_output":
            (out / "mine.png").write_bytes(b"\x89PNG mine")
        else:
            with open(out / "per_case.csv", "a") as f:
                f.write("my note\n")
    before = fingerprint(tmp_path)
    rc, stdout, err = run_inprocess(capsys, pred, "--gt", gt, "-o", out, *args)
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert ROW1[case] in line and str(out) in line, line
    assert fingerprint(tmp_path) == before


def test_own_output_is_replaced_and_default_location_allowed(tmp_path, capsys):
    pred, gt = build(tmp_path, shape=(3, 10, 12))
    inputs = {k: v for k, v in fingerprint(tmp_path).items()}
    out = _earlier_output(tmp_path, pred, gt, capsys)
    first = json.loads((out / "summary.json").read_text())
    assert run_inprocess(capsys, pred, "--gt", gt, "-o", out, "--n-bins-ece", "7")[0] == 0
    assert json.loads((out / "summary.json").read_text())["config"]["n_bins_ece"] == 7 != first["config"]["n_bins_ece"]
    assert {p.name for p in out.iterdir()} == expected_outputs(MAX_PLOTTED_CLASSES, ["c1"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "out", "pred"]  # no staging left
    rc, stdout, err = run_inprocess(capsys, pred, "--gt", gt, "--no-plots")  # PRED/calibration_evaluation
    assert rc == 0, err
    assert (pred / "calibration_evaluation" / MANIFEST).is_file()
    after = fingerprint(tmp_path)
    assert {k: after[k] for k in inputs} == inputs


# ---------------------------------------------------------------------------------------------- 2
@pytest.mark.parametrize("option,value,message", [
    ("--nll-eps", "2", "--nll-eps must be a number in (0, 1), got 2.0"),
    ("--fp-weight", "-1", "--fp-weight must be a positive finite number, got -1.0"),
    ("--cece-threshold", "2", "--cece-threshold must be a number in [0, 1), got 2.0"),
])
def test_metric_option_out_of_range_is_one_line_exit_2(tmp_path, capsys, option, value, message):
    pred, gt = build(tmp_path, shape=(3, 10, 12))
    before = fingerprint(tmp_path)
    rc, stdout, err = run_inprocess(capsys, pred, "--gt", gt, "-o", tmp_path / "out", option, value)
    assert rc == 2, stdout + err
    assert one_error_line(err) == f"calib-evaluate: error: {message}"
    assert fingerprint(tmp_path) == before


# ---------------------------------------------------------------------------------------------- 3, 4
def _workers(proc) -> list:
    """The pids of the two worker processes of ``proc`` once both exist."""
    def both():
        found = [p for p, c in children(proc.pid).items() if "spawn_main" in c]
        return found if len(found) == 2 else None

    workers = wait_for(both, 600, step=0.1)  # a scan of /proc per step: not too often on 2 cores
    assert workers, "two worker processes expected"
    return workers


def _kill_all(proc, pids) -> None:
    """Clean-up of a failed test: the processes this test started, by pid (the pipes stay open while
    a worker lives)."""
    for pid in [proc.pid, *pids]:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=60)


@pytest.mark.parametrize("when", ["workers_starting", "workers_busy"])
def test_workers_die_with_a_killed_main_process(tmp_path, when):
    if when == "workers_busy":  # cases that keep the workers busy for a while after their imports
        pred, gt = build(tmp_path, n_cases=1, shape=(24, 160, 160))
        replicate(pred, gt, 12)
    else:
        pred, gt = build(tmp_path, n_cases=6, shape=(8, 64, 64))
    inputs = fingerprint(tmp_path)
    proc = start(pred, "--gt", gt, "-o", tmp_path / "out", "-np", "2")
    workers, helpers = [], []
    try:
        workers = _workers(proc)
        if when == "workers_busy":  # SimpleITK is loaded after the workers asked for the parent-death signal
            assert wait_for(lambda: all(maps(w, "SimpleITK") for w in workers), 600, step=0.1)
            for w in workers:  # set up: Ctrl-C ignored (the main process stops the workers), SIGTERM not blocked
                blocked, ignored = signal_masks(w)
                assert signal.SIGINT in ignored and not {signal.SIGINT, signal.SIGTERM} & blocked
        helpers = [p for p, c in children(proc.pid).items() if "resource_tracker" in c]
        assert proc.poll() is None, "the run ended before it was killed"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        t0 = time.monotonic()
        assert wait_for(lambda: not any(alive(p) for p in workers + helpers), 10), \
            [p for p in workers + helpers if alive(p)]
        assert time.monotonic() - t0 < 10
    finally:
        _kill_all(proc, workers + helpers)
    after = fingerprint(tmp_path)
    assert {k: after[k] for k in inputs} == inputs
    left = sorted(set(after) - set(inputs))  # only the staging folder of the killed run (removed by the next run)
    assert left and all(k.startswith(f".out.tmp-{proc.pid}-") for k in left), left


@pytest.mark.parametrize("how", ["sigterm_to_main", "ctrl_c_to_group"])
def test_interrupt_while_workers_start_exits_at_once(tmp_path, how):
    """SIGTERM to the main process (``kill PID``), or SIGINT to the whole process group (Ctrl-C in a
    terminal: it reaches the workers too, while they are still starting)."""
    pred, gt = build(tmp_path, n_cases=6, shape=(8, 64, 64))
    before = fingerprint(tmp_path)
    proc = start(pred, "--gt", gt, "-o", tmp_path / "out", "-np", "2", new_session=how == "ctrl_c_to_group")
    workers = []
    try:
        workers = _workers(proc)
        # still starting: a Ctrl-C must not reach a worker's Python code (a traceback) before it ignores SIGINT
        assert all(sigint_held(w) is not False for w in workers)
        t0 = time.monotonic()
        if how == "sigterm_to_main":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)
        stdout, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 130, stdout + err
        assert err.strip() == "calib-evaluate: interrupted; nothing written", err
        # not a speed goal: it must not wait for the workers to finish starting (that took 113 s before);
        # generous for a loaded 2-core CI
        assert elapsed < 60, f"{elapsed:.1f} s"
        assert wait_for(lambda: not any(alive(p) for p in workers), 30)
    finally:
        _kill_all(proc, workers)
    assert fingerprint(tmp_path) == before


# ---------------------------------------------------------------------------------------------- 5
ROW5 = {"under_a_file": "output path lies under", "deep_under_a_file": "output path lies under",
        "existing_file": "output path exists and is not a folder", "read_only_place": "output location is not writable",
        "non_renamable_output": "the existing output folder cannot be replaced"}


@pytest.mark.parametrize("where", list(ROW5))
def test_unusable_output_location_fails_before_any_case(tmp_path, capsys, where):
    pred, gt = build(tmp_path / "in", shape=(3, 10, 12))
    locked = None
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    try:
        if where == "under_a_file":
            out = a_file / "out"
        elif where == "deep_under_a_file":
            out = a_file / "a" / "b" / "out"
        elif where == "existing_file":
            out = a_file
        elif where == "read_only_place":
            locked = tmp_path / "ro"
            locked.mkdir()
            out = locked / "out"
            read_only(locked)
        else:
            out = locked = _earlier_output(tmp_path, pred, gt, capsys)
            read_only(locked)
        (pred / "case_001.npz").write_bytes(b"not a zip")  # would stop the run later: the output error comes first
        before = fingerprint(tmp_path)
        rc, stdout, err = run_inprocess(capsys, pred, "--gt", gt, "-o", out)
        after = fingerprint(tmp_path)
    finally:
        if locked is not None:
            writable_again(locked)
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert ROW5[where] in line and str(out) in line, line
    assert "case_001.npz" not in line
    assert after == before


# ---------------------------------------------------------------------------------------------- 6
@pytest.mark.parametrize("flag", [None, "--no-plots"])
def test_many_classes_plots_at_most_the_limit(tmp_path, capsys, monkeypatch, flag):
    assert 1 <= MAX_PLOTTED_CLASSES <= 20  # 300 classes' plots took over 5 minutes
    limit = 3
    monkeypatch.setattr(output, "MAX_PLOTTED_CLASSES", limit)  # the rule, not matplotlib's speed
    pred, gt = build(tmp_path, n_cases=2, shape=(2, 10, 10), n_classes=300)
    inputs = fingerprint(tmp_path)
    out = tmp_path / "out"
    rc, stdout, err = run_inprocess(capsys, pred, "--gt", gt, "-o", out, *([flag] if flag else []))
    assert rc == 0, err
    names = [f"c{c}" for c in range(1, 300)]
    n_plots = 0 if flag else limit
    plots = json.loads((out / "summary.json").read_text())["plots"]
    assert plots["classes"] == names[:n_plots] and plots["n_classes"] == 299 and plots["drawn"] is bool(n_plots)
    assert plots["risk_coverage"] is bool(n_plots)
    expected_note = "no plots (--no-plots)" if flag else \
        f"plots of the first {limit} of 299 classes only (at most {limit}; --no-plots: none)"
    assert plots["note"] == expected_note and expected_note in stdout, stdout
    assert {p.name for p in out.iterdir()} == expected_outputs(n_plots, names)
    after = fingerprint(tmp_path)
    assert {k: after[k] for k in inputs} == inputs


# ---------------------------------------------------------------------------------------------- 7
@pytest.mark.parametrize("damage", ["truncated", "not_an_image"])
def test_damaged_prediction_segmentation_is_named_as_the_prediction(tmp_path, capsys, damage):
    pred, gt = build(tmp_path, pkl=False, shape=(3, 10, 12))
    seg = pred / "case_001.nii.gz"  # nnU-Net's segmentation next to the npz: read for the geometry check
    data = (gt / "case_001.nii.gz").read_bytes()
    seg.write_bytes(data[: len(data) * 6 // 10] if damage == "truncated" else b"not an image at all")
    before = fingerprint(tmp_path)
    rc, stdout, err = run_inprocess(capsys, pred, "--gt", gt, "-o", tmp_path / "out")
    assert rc == 2, stdout + err
    line = one_error_line(err)
    assert "unreadable prediction segmentation" in line and str(seg) in line and "reference" not in line, line
    assert fingerprint(tmp_path) == before
