"""Patient-wise 5-fold split (nnU-Net's splits_final.json format): properties checked directly."""
from __future__ import annotations

import pytest

from dataset_conversion import ConversionError, patient_wise_splits
from official_layouts import check_split


def acdc_like(n_patients):
    return {f"patient{p:03d}_frame{f:02d}": f"patient{p:03d}" for p in range(1, n_patients + 1) for f in (1, 12)}


@pytest.mark.parametrize("n_patients", [5, 7, 20, 101])
def test_grouped_split_properties(n_patients):
    mapping = acdc_like(n_patients)
    splits = patient_wise_splits(mapping)
    check_split(splits, mapping)
    sizes = sorted(len({mapping[c] for c in f["val"]}) for f in splits)
    assert sizes[-1] - sizes[0] <= 1  # balanced by patient count


def test_split_is_deterministic_and_seed_dependent():
    mapping = acdc_like(20)
    assert patient_wise_splits(mapping) == patient_wise_splits(dict(reversed(list(mapping.items()))))
    assert patient_wise_splits(mapping, seed=1) != patient_wise_splits(mapping, seed=2)


def test_too_few_patients():
    with pytest.raises(ConversionError, match="at least 5 patients"):
        patient_wise_splits(acdc_like(4))
