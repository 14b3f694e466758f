"""calib-calibrate export (issue 22): nnU-Net's model zip with calibration.json, installed with nnU-Net's own
``nnUNetv2_install_pretrained_model_from_zip`` into a fresh nnUNet_results (the session's real DiceCE model)."""
from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from nnunet_calibration.nnunet_utils import run_nnunet
from nnunet_calibration.posthoc import cli, model

pytestmark = pytest.mark.nnunet


def test_export_zip_round_trip(synthetic_prediction, tmp_path, capsys):
    sp = synthetic_prediction
    folder = tmp_path / "results" / sp.dataset.name / sp.model_folder.name
    # fold 0 only: other tests on this worker may have trained more folds into the shared model folder
    shutil.copytree(sp.model_folder, folder, ignore=lambda d, names: [
        n for n in names if d == str(sp.model_folder) and n.startswith("fold_") and n != "fold_0"])
    assert cli.main(["fit", str(folder), "--max-voxels", "2000", "--no-progress"]) == 0
    cal_bytes = (folder / model.CALIBRATION_FILE).read_bytes()
    zip_path = tmp_path / "model.zip"

    # refused before anything is written: folds that leave out the calibration's fold, an existing zip
    assert cli.main(["export", str(folder), "-o", str(tmp_path / "other.zip"), "-f", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{folder / 'calibration.json'}: field 'model.folds' is [0] but the export holds folds [1]" in err
    zip_path.write_text("mine")
    assert cli.main(["export", str(folder), "-o", str(zip_path)]) == 2
    assert f"{zip_path}: exists" in capsys.readouterr().err and zip_path.read_text() == "mine"
    zip_path.unlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results"]

    assert cli.main(["export", str(folder), "-o", str(zip_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.zip", "results"]  # no staging folder left
    prefix = f"{sp.dataset.name}/{sp.model_folder.name}/"
    with zipfile.ZipFile(zip_path) as z:
        names = sorted(z.namelist())
        assert z.read(prefix + "calibration.json") == cal_bytes
    # nnU-Net's exporter's selection (model_export.py, default checkpoint, one fold) plus calibration.json
    assert names == sorted(prefix + n for n in ("calibration.json", "dataset.json", "dataset_fingerprint.json",
                                                "plans.json", "fold_0/checkpoint_final.pth", "fold_0/debug.json",
                                                "fold_0/progress.png", "fold_0/validation/summary.json"))

    fresh = tmp_path / "fresh_results"
    fresh.mkdir()
    run_nnunet(["nnUNetv2_install_pretrained_model_from_zip", str(zip_path)], dict(sp.dataset.env, nnUNet_results=str(fresh)))
    installed = fresh / sp.dataset.name / sp.model_folder.name
    assert (installed / "calibration.json").read_bytes() == cal_bytes
    assert (installed / "fold_0" / "checkpoint_final.pth").read_bytes() == \
        (folder / "fold_0" / "checkpoint_final.pth").read_bytes()
    cal = model.read_calibration(installed)
    assert cal["parameters"] == json.loads(cal_bytes)["parameters"]
    assert model.params_from_calibration(cal) == json.loads(cal_bytes)["parameters"]["temperature"]
    # the installed model passes apply's which-model check (its folder name, plans.json and fold_0)
    out = tmp_path / "applied"
    assert cli.main(["apply", str(sp.pred_folder), "-m", str(installed), "-o", str(out), "--no-progress"]) == 0
    assert (out / "calibration.json").is_file()
