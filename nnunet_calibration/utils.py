"""Small helpers shared across the package (numpy and the standard library only).

- :func:`nanmean`, :func:`mean_std`: means that leave undefined values (NaN, ``None``, inf) out,
  ``NaN`` when nothing is left.
- :func:`json_clean`: make a nested structure JSON-safe (NaN/inf become ``null``, numpy scalars and
  arrays become Python numbers and lists, paths become strings, dict keys become strings).
- :func:`replace_dir`, :func:`atomic_dir`: build a folder in a temporary sibling and move it into
  place at the end, so readers see the old folder or the complete new one, never half of it.
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

__all__ = ["nanmean", "mean_std", "json_clean", "replace_dir", "atomic_dir"]


def _finite_array(values: Iterable) -> np.ndarray:
    v = np.asarray([np.nan if x is None else x for x in values], dtype=np.float64).reshape(-1)
    return v[np.isfinite(v)]


def nanmean(values: Iterable) -> float:
    """Mean of the finite values (``None``, NaN and inf left out); NaN if none is finite."""
    v = _finite_array(values)
    return float(v.mean()) if v.size else float("nan")


def mean_std(values: Iterable) -> tuple[float, float]:
    """``(mean, sample standard deviation (ddof=1))`` of the finite values.

    NaN mean when no value is finite; NaN standard deviation with fewer than two finite values.
    """
    v = _finite_array(values)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), (float(v.std(ddof=1)) if v.size > 1 else float("nan"))


def json_clean(obj):
    """A JSON-safe copy of ``obj`` (see the module docstring); unknown objects become ``str(obj)``."""
    if isinstance(obj, dict):
        return {str(k): json_clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set)):
        return [json_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return json_clean(obj.tolist())
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


def replace_dir(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Move the finished folder ``new`` to ``target`` (same file system), replacing an existing ``target``.

    The old ``target`` is first renamed into a hidden temporary sibling and deleted only after
    ``new`` is in place; if moving ``new`` fails, the old folder is put back.
    """
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return target
    old_parent = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old = old_parent / "old"
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        shutil.rmtree(old_parent, ignore_errors=True)
        raise
    shutil.rmtree(old_parent, ignore_errors=True)
    return target


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """``with atomic_dir(target) as tmp:`` write into ``tmp``; on success ``tmp`` replaces ``target``.

    ``tmp`` is a hidden sibling of ``target`` (same file system, so the final move is a rename). On
    any exception ``tmp`` is deleted and ``target`` is left as it was.
    """
    target = Path(target).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
