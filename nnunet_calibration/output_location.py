"""Where a console script may write its output folder: the one set of checks made before the work
starts, shared by ``calib-evaluate`` (:mod:`nnunet_calibration.evaluation.output`) and
``calib-calibrate apply`` (:mod:`nnunet_calibration.posthoc.model`) and ``calib-convert``
(:class:`dataset_conversion._common.StagedDataset`). Standard library only (and
:mod:`nnunet_calibration.utils`).

* :func:`check_not_an_input`: the output folder may not be, contain or lie inside an input folder;
* :func:`check_output_path`: an existing output path must be a folder; no ancestor may be a file;
* :func:`check_writable`: a folder that is written later (not staged) accepts new files now;
* :class:`StagedOutput`: :meth:`~StagedOutput.prepare` creates the missing parent folders and the
  staging folder ``.OUT.tmp-<pid>-*`` next to the output now (an unwritable location fails here,
  before the work), tries renaming an existing output folder aside and back (it is replaced by
  renaming at the end), :meth:`~StagedOutput.discard` removes the staging folder and the parents
  it created, :meth:`~StagedOutput.commit` renames the staging folder into place (a new output, or
  with ``replace=True`` in place of the existing one).

Every problem is an :class:`OutputLocationError` (a :class:`~nnunet_calibration.errors.UserError`:
one line, exit status 2) naming the path.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

from nnunet_calibration.errors import UserError
from nnunet_calibration.utils import remove_stale_staging, replace_dir, staging_dir

PathLike = Union[str, os.PathLike]

__all__ = ["OutputLocationError", "check_not_an_input", "check_output_path", "check_writable", "StagedOutput"]


class OutputLocationError(UserError):
    """An output location that cannot or must not be written (the message names the path)."""


def check_not_an_input(out_dir: PathLike, inputs: Sequence[Tuple[str, PathLike, bool]],
                       default: Optional[PathLike] = None) -> None:
    """Refuse an output folder that is, contains or lies inside an input folder (``inputs``:
    ``(what, folder, inside_refused)``; ``inside_refused`` False: only "is" and "contains" are
    refused, e.g. for a model folder that merely holds ``dataset.json``). ``default`` (a default
    location) may lie inside any of them."""
    out = Path(os.path.realpath(out_dir))
    is_default = default is not None and out == Path(os.path.realpath(default))
    for what, folder, inside_refused in inputs:
        f = Path(os.path.realpath(folder))
        if out == f:
            relation = "is"
        elif out in f.parents:
            relation = "contains"
        elif f in out.parents and inside_refused and not is_default:
            relation = "is inside"
        else:
            continue
        raise OutputLocationError(f"{out_dir}: the output folder {relation} the {what} {folder}; "
                                  "choose an -o outside the input folders")


def check_output_path(out_dir: PathLike) -> None:
    """An existing output path must be a folder; no ancestor of it may be a file."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputLocationError(f"{out_dir}: output path exists and is not a folder")
    for parent in out_dir.parents:
        if parent.exists():
            if not parent.is_dir():
                raise OutputLocationError(f"{out_dir}: output path lies under {parent}, which is a file, "
                                          "not a folder")
            return


def check_writable(folder: PathLike) -> None:
    """:func:`check_output_path`, and ``folder`` (or, if it does not exist yet, its nearest existing
    ancestor, where it will be created) accepts a new file: a probe file is created there and removed
    at once. Nothing else is created."""
    folder = Path(folder)
    check_output_path(folder)
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    if existing is None:  # pragma: no cover - "/" exists
        return
    try:
        fd, probe = tempfile.mkstemp(prefix=f".write-test-{os.getpid()}-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputLocationError(f"{folder}: output location is not writable ({e.strerror or e})") from e


class StagedOutput:
    """The output folder of one run, written in a staging folder next to it (module docstring)."""

    def __init__(self, out_dir: PathLike):
        self.out_dir = Path(out_dir)
        self.staging: Optional[Path] = None
        self.created: List[Path] = []  # parent folders created by prepare, outermost first

    def check_existing(self) -> None:
        """Hook: what an existing output folder must be like to be replaced (default: anything)."""

    def prepare(self) -> Path:
        """Check the output location and create the staging folder now; returns the staging folder."""
        out = self.out_dir
        check_output_path(out)
        if out.is_dir():
            self.check_existing()
        try:
            for parent in reversed(out.parents):
                if not parent.exists():
                    parent.mkdir()
                    self.created.append(parent)
            remove_stale_staging(out)
            self.staging = staging_dir(out)
            probe = self.staging / ".write-test"
            probe.write_bytes(b"x")
            probe.unlink()
            if out.is_dir():
                self._try_rename()
        except OSError as e:
            self.discard()
            raise OutputLocationError(f"{out}: output location is not writable ({e.strerror or e})") from e
        except BaseException:
            self.discard()
            raise
        return self.staging

    def _try_rename(self) -> None:
        """An existing output folder is replaced by renaming: try it now (aside and back)."""
        aside = staging_dir(self.out_dir, "old")
        try:
            os.rename(self.out_dir, aside / "old")
        except OSError as e:
            os.rmdir(aside)
            raise OutputLocationError(f"{self.out_dir}: the existing output folder cannot be replaced "
                                      f"(renaming it fails: {e.strerror or e})") from e
        try:
            os.rename(aside / "old", self.out_dir)
        except OSError as e:
            raise OutputLocationError(f"{self.out_dir}: renamed aside to {aside / 'old'} to test it, and it cannot "
                                      f"be renamed back ({e.strerror or e}); move it back by hand") from e
        os.rmdir(aside)

    def discard(self) -> None:
        """Remove the staging folder and the parent folders :meth:`prepare` created (if still empty)."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
            self.staging = None
        for parent in reversed(self.created):
            try:
                parent.rmdir()
            except OSError:
                break
        self.created = []

    def commit(self, replace: bool = False, then: Optional[Callable[[], None]] = None) -> Path:
        """Rename the staging folder to the output folder. An existing output folder is an error
        unless ``replace`` (then :func:`~nnunet_calibration.utils.replace_dir` swaps it, and puts it
        back if ``then()``, the rest of the caller's commit, fails)."""
        out = self.out_dir
        if out.exists() and not replace:
            raise OutputLocationError(f"{out}: appeared while this run was writing; the output was not moved "
                                      "into place")
        try:
            replace_dir(self.staging, out, then=then)
        except OSError as e:
            raise OutputLocationError(f"{out}: cannot move the output into place ({e.strerror or e})") from e
        self.staging = None
        return out
