"""Small helpers shared across the package (numpy and the standard library only).

- :func:`nanmean`, :func:`mean_std`: means that leave undefined values (NaN, ``None``, inf) out,
  ``NaN`` when nothing is left.
- :func:`json_clean`: make a nested structure JSON-safe (NaN/inf become ``null``, numpy scalars and
  arrays become Python numbers and lists, paths become strings, dict keys become strings).
- :func:`replace_dir`, :func:`atomic_dir`: build a folder in a temporary sibling and move it into
  place at the end, so readers see the old folder or the complete new one, never half of it.
- :func:`staging_dir`, :func:`remove_stale_staging`, :func:`sigterm_as_interrupt`: the staging
  convention behind them. A staging sibling of ``TARGET`` is named ``.TARGET.tmp-<pid>-<random>``
  (an old folder being swapped out: ``.TARGET.old-<pid>-<random>``); SIGTERM inside
  ``sigterm_as_interrupt()`` raises ``KeyboardInterrupt`` so that the ``finally``/``except`` clean-up
  runs as for Ctrl-C; a staging folder whose process no longer exists (SIGKILL, power loss) is
  removed by the next run's :func:`remove_stale_staging`.
- :func:`keep_freed_memory`: glibc allocator settings for processes that evaluate large cases
  (process-wide: only the owner of a process calls it, i.e. a console script or a worker process).
- :func:`write_json_atomic`: the one atomic JSON writer (temporary file in the same folder, fsync,
  rename).
- :class:`ArgumentParser`, :func:`cli_main`: the frame of every console script (see :func:`cli_main`).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import math
import os
import re
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from nnunet_calibration.errors import UserError

__all__ = ["nanmean", "mean_std", "json_clean", "replace_dir", "atomic_dir", "staging_dir",
           "remove_stale_staging", "sigterm_as_interrupt", "pid_alive", "keep_freed_memory", "write_json_atomic",
           "write_text_atomic", "ArgumentParser", "cli_main"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's <malloc.h>
_FREED_MEMORY_KEPT = False


def keep_freed_memory(mmap_threshold: int = 32 << 20, trim_threshold: int = 256 << 20) -> bool:
    """Let glibc's ``malloc`` keep freed memory for reuse (``mallopt``); returns whether it applied.

    Chunked numpy code (the calibration metrics, HD95) allocates and frees a few MB of temporaries
    per chunk. With glibc's defaults, blocks >= 128 kB are mmapped and the top of the heap is given
    back to the OS (trimmed) once more than twice that threshold is free, so every chunk's
    temporaries page-fault again, until the thresholds have adapted (after a few large frees). In a
    fresh process that made the first cases' metrics up to 1.5x slower (``bench/evaluate.py``).
    Here: blocks below ``mmap_threshold`` (32 MB; larger ones, such as a case's probability array,
    are still mmapped and returned to the OS when freed) come from the heap, and up to
    ``trim_threshold`` (256 MB) of free heap is kept. This changes speed, not results; freed memory
    is reused, so the peak grows little (bench: peak resident growth of one worker 1.85x -> 1.90x
    one case's array for softmax, 2.11x -> 2.20x for regions).
    Process-wide: ``calib-evaluate`` calls it in its worker processes and for ``-np 1``; a no-op
    (``False``) on other C libraries.
    """
    global _FREED_MEMORY_KEPT
    if _FREED_MEMORY_KEPT:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _FREED_MEMORY_KEPT = bool(mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
                              and mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1)
    return _FREED_MEMORY_KEPT


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


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (a process of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staging_dir(target: str | os.PathLike, kind: str = "tmp") -> Path:
    """Create and return the hidden sibling ``.TARGET.<kind>-<pid>-<random>`` of ``target``."""
    target = Path(target)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.{kind}-{os.getpid()}-", dir=target.parent))


def remove_stale_staging(target: str | os.PathLike) -> list[str]:
    """Remove the ``.TARGET.tmp-<pid>-*`` / ``.TARGET.old-<pid>-*`` siblings of ``target`` whose process
    no longer exists (left by a run killed with SIGKILL). Staging folders of running processes are
    left alone. Returns the removed paths."""
    target = Path(target)
    parent = target.parent
    removed: list[str] = []
    if not parent.is_dir():
        return removed
    rx = re.compile(rf"^\.{re.escape(target.name)}\.(tmp|old)-(\d+)-")
    for p in parent.iterdir():
        m = rx.match(p.name)
        if m and p.is_dir() and int(m.group(2)) != os.getpid() and not pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(str(p))
    return removed


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM (``kill``, SLURM, ``timeout``) raises ``KeyboardInterrupt`` like Ctrl-C.

    The previous handler is restored afterwards. Only in the main thread (elsewhere a no-op)."""
    try:
        old = signal.signal(signal.SIGTERM, _raise_interrupt)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def replace_dir(new: str | os.PathLike, target: str | os.PathLike,
                then: Optional[Callable[[], None]] = None) -> Path:
    """Move the finished folder ``new`` to ``target`` (same file system), replacing an existing ``target``.

    The old ``target`` is first renamed into a hidden temporary sibling and deleted only after
    ``new`` is in place and ``then()`` (optional: the rest of a commit, e.g. moving a file that
    belongs with the folder into place) has returned. If moving ``new`` or ``then()`` fails, the
    old folder is put back, ``new`` is back at its own path, and the exception propagates.
    """
    new, target = Path(new), Path(target)
    old_parent = staging_dir(target, "old") if target.exists() else None
    if old_parent is not None:
        os.replace(target, old_parent / "old")
    try:
        os.replace(new, target)
        try:
            if then is not None:
                then()
        except BaseException:
            os.replace(target, new)
            raise
    except BaseException:
        if old_parent is not None:
            os.replace(old_parent / "old", target)
            shutil.rmtree(old_parent, ignore_errors=True)
        raise
    if old_parent is not None:
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
    remove_stale_staging(target)
    tmp = staging_dir(target)
    try:
        yield tmp
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see the old file or the complete new one: a temporary
    file in the same folder (``.NAME.<random>.tmp``), flushed and fsync'ed, then renamed over ``path``.
    The folder is created if missing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data, indent: int | None = 2) -> Path:
    """:func:`write_text_atomic` of ``data`` as JSON (NaN/inf become ``null``, :func:`json_clean`)."""
    import json

    return write_text_atomic(path, json.dumps(json_clean(data), indent=indent, allow_nan=False))


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose usage errors are one line, ``PROG: error: MESSAGE``, exit status 2
    (argparse's own prints the whole usage block first). Sub-commands inherit it."""

    def error(self, message):  # noqa: D401 - argparse's API
        self.exit(2, f"{self.prog}: error: {message}\n")


def cli_main(parser: argparse.ArgumentParser, run: Callable[[argparse.Namespace], int | None],
             argv: Sequence[str] | None = None, interrupted: str = "interrupted; nothing written") -> int:
    """The frame of every console script; returns its exit status.

    * SIGTERM (``kill``, SLURM, ``timeout``) is handled like Ctrl-C from the start: both raise
      ``KeyboardInterrupt`` inside ``run``, whose ``finally``/``except`` clean-up removes what it was
      staging; the script then prints ``PROG: interrupted; nothing written`` and exits with 130.
    * a bad argument: one line from the parser (:class:`ArgumentParser`), exit 2;
    * a named error (:class:`~nnunet_calibration.errors.UserError` and its subclasses): one line
      ``PROG: error: MESSAGE``, exit 2;
    * otherwise ``run``'s return value (``None``: 0). Anything else is a bug and shows its traceback.
    """
    prog = parser.prog
    with sigterm_as_interrupt():
        try:
            args = parser.parse_args(argv)
            return int(run(args) or 0)
        except UserError as e:
            print(f"{prog}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(f"{prog}: {interrupted}", file=sys.stderr)
            return 130
