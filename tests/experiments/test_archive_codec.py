"""The archive's JSON form of the report's records (nnunet_calibration.experiments.report.archive.encode/decode):
exact round trip of every type a report row holds, refusal of what it cannot hold."""
import json
import math

import numpy as np
import pytest

from nnunet_calibration.experiments.report.archive import decode, encode
from nnunet_calibration.experiments.report.data import MethodResult, PosthocFit
from nnunet_calibration.metrics import BinStats


def _same(a, b):
    """Deep equality that also compares numpy dtypes and shapes, NaN equal to NaN, and types (a numpy
    scalar is kept as the Python number of the same value)."""
    if isinstance(a, np.generic):
        a = a.item()
    assert type(a) is type(b), (type(a), type(b))
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(a, b, equal_nan=a.dtype.kind == "f")
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    elif hasattr(a, "__dataclass_fields__"):
        for name in a.__dataclass_fields__:
            _same(getattr(a, name), getattr(b, name))
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b


def _row(rng) -> MethodResult:
    stats = BinStats(rng.integers(0, 9, (3, 15, 2)).astype(np.int64), rng.random((3, 15, 2)),
                     rng.integers(0, 99, 3).astype(np.int64))
    fit = PosthocFit(method="vector", per_fold={0: rng.random(4), 1: rng.random(4)}, all_folds=rng.random(4),
                     fit_voxels={0: 123, 1: 456}, cross_fitted=True, scope="single-fold validation predictions")
    return MethodResult(
        method="nnUNetTrainerSDC_DC + VS", trainer="nnUNetTrainerSDC_DC", kind="VS", hparams={"alpha": 0.2},
        folds=[0, 1], fold_means={0: {"DSC": 0.8, "HD95": float("nan"), "ECE": 1 / 3}, 1: {"DSC": float("inf")}},
        train_seconds={0: 12.5}, cases={"patient001_frame01": {"DSC": 0.1 + 0.2, "fold": 0}},
        reliability=stats, pooled={"ECE": 0.05, "per_class": rng.random(3).astype(np.float32), "n": np.int64(7)},
        sweep_counts=[rng.integers(0, 1000, (99, 3)).astype(np.int64)], fit=fit, run=1,
        history={0: {1: {"time": 7.25, "pseudo_dice": [0.1, None, 0.3], "lr": 0.01}}},
        postprocessing={0: "keep the largest component of (1,)"}, postprocessing_cross_fitted=False)


def test_round_trip_is_exact_through_json_text():
    rng = np.random.default_rng(0)
    row = _row(rng)
    back = decode(json.loads(json.dumps(encode(row))))
    _same(row, back)
    # the float64 values are bit-exact (shortest repr round trip), float32 keep their dtype and bits
    assert back.reliability.conf_sum.tobytes() == row.reliability.conf_sum.tobytes()
    assert back.pooled["per_class"].tobytes() == row.pooled["per_class"].tobytes()
    # numpy scalars become Python numbers of the same value
    assert back.pooled["n"] == 7 and isinstance(back.pooled["n"], int)
    # tuples and dict keys that are not text keep their type
    _same(decode(encode({(1, 2): (3, "a"), "__x": 1})), {(1, 2): (3, "a"), "__x": 1})


@pytest.mark.parametrize("bad", [np.array(["a"]), {1, 2}, object(), np.array([1 + 2j])])
def test_what_cannot_be_kept_is_refused(bad):
    with pytest.raises(TypeError, match="cannot archive"):
        encode({"x": [bad]})


def test_unknown_record_type_is_refused():
    with pytest.raises(ValueError, match="unknown record type"):
        decode({"__dataclass__": "Popen", "fields": {}})
