"""nnunet_calibration.utils: NaN-aware means, JSON cleaning, atomic folder replacement."""
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest

from nnunet_calibration.utils import atomic_dir, json_clean, mean_std, nanmean, replace_dir


def test_nanmean_and_mean_std():
    assert nanmean([1.0, None, float("nan"), 3.0, float("inf")]) == 2.0
    assert math.isnan(nanmean([None, float("nan")])) and math.isnan(nanmean([]))
    m, s = mean_std([1.0, 2.0, 4.0, float("nan")])
    assert m == pytest.approx(7 / 3) and s == pytest.approx(np.std([1, 2, 4], ddof=1))
    m, s = mean_std([5.0])
    assert m == 5.0 and math.isnan(s)


def test_json_clean():
    obj = {1: np.float32(0.5), "a": [np.int64(3), float("nan"), np.array([1.0, np.inf])], "p": Path("/x"),
           "b": np.bool_(True), "t": (1, 2)}
    out = json_clean(obj)
    assert out == {"1": 0.5, "a": [3, None, [1.0, None]], "p": "/x", "b": True, "t": [1, 2]}
    json.dumps(out, allow_nan=False)


def test_atomic_dir_replaces_or_leaves_untouched(tmp_path):
    target = tmp_path / "rep"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("new")
    assert (target / "a.txt").read_text() == "new"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("boom")
    assert (target / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]  # no temporary folder left
    new = tmp_path / "new"
    new.mkdir()
    (new / "b.txt").write_text("b")
    replace_dir(new, target)
    assert [p.name for p in target.iterdir()] == ["b.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_replace_dir_puts_everything_back_when_the_rest_of_the_commit_fails(tmp_path):
    """``then`` runs with the new folder in place; if it raises, the old folder is back at the target,
    the new one back at its own path, and no hidden folder is left."""
    target, new = tmp_path / "rep", tmp_path / "new"
    for folder, text in ((target, "old"), (new, "new")):
        folder.mkdir()
        (folder / "a.txt").write_text(text)
    seen = []

    def fail():
        seen.append((target / "a.txt").read_text())
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        replace_dir(new, target, then=fail)
    assert seen == ["new"]
    assert (target / "a.txt").read_text() == "old" and (new / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "rep"]
    # the same without an old folder: the target disappears again
    fresh = tmp_path / "fresh"
    with pytest.raises(OSError):
        replace_dir(new, fresh, then=fail)
    assert not fresh.exists() and (new / "a.txt").read_text() == "new"
    replace_dir(new, target, then=lambda: seen.append("done"))
    assert (target / "a.txt").read_text() == "new" and seen[-1] == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


def test_staging_names_and_stale_removal(tmp_path):
    import subprocess
    import sys

    from nnunet_calibration.utils import remove_stale_staging, staging_dir

    target = tmp_path / "out"
    mine = staging_dir(target)
    assert mine.parent == tmp_path and mine.name.startswith(f".out.tmp-{os.getpid()}-")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale_tmp = tmp_path / f".out.tmp-{dead.pid}-x1"
    stale_old = tmp_path / f".out.old-{dead.pid}-x2"
    other = tmp_path / f".outer.tmp-{dead.pid}-x3"  # another target's staging: not ours to remove
    for p in (stale_tmp, stale_old, other):
        p.mkdir()
    removed = remove_stale_staging(target)
    assert sorted(removed) == sorted([str(stale_tmp), str(stale_old)])
    assert mine.exists() and other.exists()  # a running process's staging stays
    stale_tmp.mkdir()
    with atomic_dir(target) as work:  # atomic_dir also clears a dead run's staging first
        (work / "a.txt").write_text("x")
    assert not stale_tmp.exists() and (target / "a.txt").read_text() == "x"


def test_keep_freed_memory_applies_on_glibc_in_a_fresh_process():
    """calib-evaluate's processes call it; on glibc (Linux) mallopt accepts both settings, elsewhere
    it reports False and changes nothing. Run in a child so the test process keeps its defaults."""
    import platform
    import subprocess
    import sys

    code = ("from nnunet_calibration.utils import keep_freed_memory as k; import numpy as np; "
            "a = k(); b = k(); x = np.ones(1 << 22); del x; print(a, b)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == out[1]  # idempotent
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert out == ["True", "True"]
