"""Every console script with its output set to each of its inputs (issue 21: no data file outside a
command's own output folder is ever removed by it). Each case runs the script's ``main`` in this
process and asserts exit status 2, one error line naming the output and the input, and that nothing
under the test's folder changed (fingerprints of every file, hidden ones too): no input touched,
nothing half-written, no folder left behind. The refusals come before any work.

=====================  ====================================================================
calib-evaluate         ``-o`` = the prediction folder, the references, the folder of
                       dataset.json, a folder containing them or inside them:
                       ``test_evaluate_inputs.py::test_output_folder_of_inputs_or_of_someone_else_is_refused``
calib-calibrate apply  ``-o`` = the prediction folder, the model folder, a folder containing or
                       inside the prediction folder:
                       ``test_calibrate_inputs.py::test_apply_unusable_output_fails_before_any_case``
calib-calibrate fit    no output option: writes only ``MODEL/calibration.json`` (atomically)
calib-experiment run   no output option besides the experiment's own folders; it removes nothing
                       (nnU-Net writes the trainings; the trainers replace only their own
                       checkpoint files)
calib-convert          here: the raw or preprocessed root is the download, the download is the
                       dataset folder (``--overwrite``), the download lies inside it
calib-plan-small       here: a configuration nnU-Net made (``-c 3d_fullres --overwrite``), a data
                       folder of that name that the plans do not own
calib-experiment       here: the report folder is the results folder of the trainings, the
  report               preprocessed dataset, the folder of the experiment file
calib-demo             here: the work folder inside the download, the report folder is the
                       download, inside it, is the work folder, contains it
=====================  ====================================================================
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from official_layouts import make_acdc
from reliability_testlib import fingerprint, run_main



def refused(capsys, main, args, root: Path, *words: str, quiet: str | None = "--no-progress") -> str:
    """Run ``main(args + [quiet])``: exit 2, one error line holding every one of ``words``, ``root``
    unchanged."""
    before = fingerprint(root)
    rc, stdout, err = run_main(main, capsys, *args, quiet=quiet)
    assert rc == 2, stdout + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    assert all(w in lines[0] for w in words), (words, lines[0])
    assert fingerprint(root) == before
    return lines[0]


# ----------------------------------------------------------------------------------- calib-convert
CONVERT = {  # case -> expected words
    "raw_root_is_the_download": "is inside the source folder",
    "preprocessed_root_is_the_download": "is inside the source folder",
    "download_is_the_dataset_folder": "the output folder is the source folder",
    "download_inside_the_dataset_folder": "the output folder contains the source folder",
}


@pytest.mark.parametrize("case", list(CONVERT))
def test_convert_never_writes_into_or_replaces_its_download(tmp_path, capsys, case):
    from dataset_conversion.cli import main

    raw, pre = tmp_path / "raw", tmp_path / "pre"
    raw.mkdir()
    pre.mkdir()
    src = {"download_is_the_dataset_folder": raw / "Dataset027_ACDC",
           "download_inside_the_dataset_folder": raw / "Dataset027_ACDC" / "download"}.get(case, tmp_path / "acdc")
    make_acdc(src, n_patients=5, n_test=0)
    if case == "raw_root_is_the_download":
        raw = src
    elif case == "preprocessed_root_is_the_download":
        pre = src
    refused(capsys, main, ["acdc", src, "-d", "27", "--overwrite", "--nnunet-raw", raw, "--nnunet-preprocessed", pre],
            tmp_path, CONVERT[case], str(src))


# ------------------------------------------------------------------------------------ calib-plan-small
@pytest.mark.parametrize("case", ["configuration_nnunet_made", "data_folder_not_in_the_plans"])
def test_plan_small_never_replaces_what_it_did_not_make(synthetic_labels, tmp_path, capsys, monkeypatch, case):
    from nnunet_calibration.experiments.small_config import main

    ds = synthetic_labels
    folder = tmp_path / ds.name
    folder.mkdir()
    for f in ("nnUNetPlans.json", "dataset.json", "dataset_fingerprint.json"):
        shutil.copy2(ds.preprocessed / f, folder / f)
    shutil.copytree(ds.preprocessed / "nnUNetPlans_3d_fullres", folder / "nnUNetPlans_3d_fullres")
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    if case == "configuration_nnunet_made":
        args, words = ["-c", "3d_fullres", "--overwrite"], ("'3d_fullres' was not made by calib-plan-small",)
    else:
        (folder / "nnUNetPlans_mine").mkdir()
        (folder / "nnUNetPlans_mine" / "notes.txt").write_text("mine")
        args, words = ["-c", "mine"], (str(folder / "nnUNetPlans_mine"), "was not made by calib-plan-small")
    refused(capsys, main, [ds.dataset_id, *args], tmp_path, *words, quiet=None)


# ------------------------------------------------------------------------------ calib-experiment report
@pytest.mark.parametrize("case", ["results_folder", "preprocessed_dataset", "folder_of_the_experiment_file"])
def test_report_never_replaces_an_input_folder(synthetic_labels, tmp_path, capsys, case):
    from nnunet_calibration.experiments.cli import main

    ds = synthetic_labels
    results = tmp_path / "results"
    model = results / ds.name / "nnUNetTrainerDiceCE__nnUNetPlans__2d" / "fold_0"
    model.mkdir(parents=True)
    (model / "checkpoint_final.pth").write_bytes(b"weights")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    exp = mine / "exp.yaml"
    exp.write_text(json.dumps({
        "name": "exp", "dataset": ds.dataset_id, "configuration": "2d", "folds": [0],
        "trainers": ["nnUNetTrainerDiceCE"],
        "nnunet_paths": {"raw": str(ds.raw.parent), "preprocessed": str(ds.preprocessed.parent),
                         "results": str(results)}}))
    target = {"results_folder": results / ds.name, "preprocessed_dataset": ds.preprocessed,
              "folder_of_the_experiment_file": mine}[case]
    root = tmp_path if case != "preprocessed_dataset" else ds.preprocessed
    refused(capsys, main, ["report", exp, "--output-root", target.parent, "--name", target.name], root,
            f"report folder {target} holds files no report wrote", quiet="--quiet")


# ------------------------------------------------------------------------------------------ calib-demo
DEMO = {  # case -> (--work, --output-root, --name) relative to tmp_path ("SRC": the download), words
    "work_inside_the_download": (("SRC/work", "out", None), "is inside the ACDC folder"),
    "report_is_the_download": (("work", ".", "acdc"), "the output folder is the ACDC folder"),
    "report_inside_the_download": (("work", "SRC", None), "is inside the ACDC folder"),
    "report_is_the_work_folder": (("work", ".", "work"), "the output folder is the work folder"),
    "report_contains_the_work_folder": (("out/work", ".", "out"), "the output folder contains the work folder"),
}


@pytest.mark.parametrize("case", list(DEMO))
def test_demo_refuses_before_any_work(tmp_path, capsys, case):
    from nnunet_calibration.experiments.demo import main

    src = make_acdc(tmp_path / "acdc", n_patients=5, n_test=0)
    (work, out_root, name), words = DEMO[case]

    def at(rel: str) -> Path:
        return src / rel[4:] if rel.startswith("SRC/") else src if rel == "SRC" else tmp_path / rel

    args = [src, "--work", at(work), "--output-root", at(out_root)] + (["--name", name] if name else [])
    refused(capsys, main, args, tmp_path, words, quiet="--quiet")
