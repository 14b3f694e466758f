"""The real ACDC subset (20 patients, ED+ES, original files) converts and passes nnU-Net's verification.

Data: ``<repo>/../shared/data/acdc-subset`` (see its README; never copied into the repo).
"""
from __future__ import annotations

import filecmp
import json
from pathlib import Path

import nibabel as nib
import pytest

from official_layouts import check_split
from dataset_conversion import convert_acdc
from nnunet_calibration.nnunet_utils import nnunet_env, run_nnunet

ACDC_SUBSET = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "acdc-subset"
TRAINING = ACDC_SUBSET / "database" / "training"


@pytest.mark.nnunet
@pytest.mark.skipif(not TRAINING.is_dir(), reason=f"real ACDC subset not found at {ACDC_SUBSET}")
def test_real_acdc_subset(tmp_path):
    env = nnunet_env(tmp_path / "nnunet", cpu_friendly=True)
    res = convert_acdc(ACDC_SUBSET, 27, raw_root=env["nnUNet_raw"], preprocessed_root=env["nnUNet_preprocessed"],
                       progress=False)
    patients = sorted(p.name for p in TRAINING.iterdir() if p.is_dir())
    assert len(patients) == 20 and res.num_training == 40 and res.num_test == 0

    # every image/label is the original file, byte for byte; frames follow Info.cfg
    source_dtypes, out_dtypes = set(), set()
    case_to_patient = {}
    for pid in patients:
        info = dict(line.split(":") for line in (TRAINING / pid / "Info.cfg").read_text().splitlines() if ":" in line)
        for phase in ("ED", "ES"):
            case = f"{pid}_frame{int(info[phase]):02d}"
            case_to_patient[case] = pid
            out_img = res.dataset_dir / "imagesTr" / f"{case}_0000.nii.gz"
            assert filecmp.cmp(out_img, TRAINING / pid / f"{case}.nii.gz", shallow=False)
            assert filecmp.cmp(res.dataset_dir / "labelsTr" / f"{case}.nii.gz", TRAINING / pid / f"{case}_gt.nii.gz",
                               shallow=False)
            source_dtypes.add(nib.load(TRAINING / pid / f"{case}.nii.gz").get_data_dtype().name)
            out_dtypes.add(nib.load(out_img).get_data_dtype().name)
    assert out_dtypes == source_dtypes and len(source_dtypes) > 1  # mixed dtypes kept
    assert "patient090_frame04" in case_to_patient and "patient090_frame11" in case_to_patient
    assert sorted(p.name[:-7] for p in (res.dataset_dir / "labelsTr").iterdir()) == sorted(case_to_patient)

    splits = json.loads(res.splits_file.read_text())
    check_split(splits, case_to_patient)
    assert [len(f["val"]) for f in splits] == [8] * 5  # 4 patients x 2 frames per fold

    log = run_nnunet(["nnUNetv2_plan_and_preprocess", "-d", "27", "-c", "2d", "-np", "1",
                      "-npfp", "1", "--verify_dataset_integrity"], env)
    assert "verify_dataset_integrity Done" in log
    pre = Path(env["nnUNet_preprocessed"]) / res.dataset_name
    assert len(list((pre / "nnUNetPlans_2d").glob("*.pkl"))) == 40
    assert json.loads((pre / "splits_final.json").read_text()) == splits
