"""Shared helper layer of the dataset converters.

Everything a converter needs besides its own layout parsing lives here:

- :class:`ConversionError`: the one exception every converter raises for bad input. Its message
  names the offending file or folder and what is wrong.
- Reading: :func:`read_image` (SimpleITK through :mod:`nnunet_calibration.io`: truncated / corrupt
  files are detected, errors wrapped, ITK's NIfTI warnings silenced),
  :func:`check_same_geometry`, :func:`check_label_values`, :func:`pair_by_case_id`,
  :func:`check_case_id`.
- Writing: :func:`copy_nifti` keeps the original bytes (a ``.nii`` source is gzip-compressed, which
  leaves its header and data bytes unchanged) and :class:`StagedDataset`, which builds the dataset in
  a temporary folder next to the target (same file system) and renames it into place at the end, so
  that a failed conversion leaves nothing behind.
- Splits: :func:`patient_wise_splits` (nnU-Net's ``splits_final.json`` format, grouped by patient).

Geometry tolerances (image vs. label, and between the channels of one case): identical size;
spacing equal up to a relative tolerance of 1e-4; origin equal up to 1e-3 mm (absolute) plus a
relative 1e-5; direction cosines equal up to 1e-4 (absolute). nnU-Net itself only warns about origin
and direction mismatches; here all four are errors.
"""
from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from nnunet_calibration.errors import UserError
from nnunet_calibration.io import CorruptFileError, read_sitk_image
from nnunet_calibration.output_location import StagedOutput, check_not_an_input, check_writable

SPACING_RTOL = 1e-4
ORIGIN_ATOL = 1e-3
ORIGIN_RTOL = 1e-5
DIRECTION_ATOL = 1e-4

#: seed of :func:`patient_wise_splits` (any fixed value gives a reproducible split)
DEFAULT_SPLIT_SEED = 12345
NUM_FOLDS = 5

NIFTI_SUFFIXES = (".nii.gz", ".nii")


class ConversionError(UserError):
    """Bad input for a converter (missing/unmatched/unreadable file, geometry or label problem,
    duplicate case id, existing target). The message names the file and the problem."""


@dataclass
class ConversionResult:
    """What a converter wrote."""

    dataset_dir: Path
    splits_file: Path
    num_training: int
    num_test: int
    dataset_name: str
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- file names
def strip_nifti_suffix(name: str) -> str | None:
    """``'a_0000.nii.gz'`` -> ``'a_0000'``; ``None`` if the name is not a NIfTI file."""
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def is_hidden(name: str) -> bool:
    """Hidden files, including macOS AppleDouble ``._*`` companions (not images)."""
    return name.startswith(".")


def list_nifti(folder: Path) -> list[Path]:
    """NIfTI files (``.nii``/``.nii.gz``) directly in ``folder``, sorted, hidden and ``._*`` files ignored."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not is_hidden(p.name) and strip_nifti_suffix(p.name) is not None)


def pair_by_case_id(images: Mapping[str, Sequence[Path] | Path], labels: Mapping[str, Path],
                    where: str = "") -> list[str]:
    """Check that every image case has a label and vice versa; return the sorted case ids."""
    missing_label = sorted(set(images) - set(labels))
    missing_image = sorted(set(labels) - set(images))
    if missing_label:
        c = missing_label[0]
        first = images[c][0] if isinstance(images[c], (list, tuple)) else images[c]
        raise ConversionError(
            f"image without label file{' in ' + where if where else ''}: {first} (case {c}); "
            f"{len(missing_label)} case(s) without label: {missing_label[:10]}")
    if missing_image:
        c = missing_image[0]
        raise ConversionError(
            f"label file without image{' in ' + where if where else ''}: {labels[c]} (case {c}); "
            f"{len(missing_image)} label(s) without image: {missing_image[:10]}")
    return sorted(images)


# ---------------------------------------------------------------------------------------- reading
def read_image(path: Path) -> sitk.Image:
    """Read an image with SimpleITK (nnU-Net's reader for NIfTI) through the shared checked reader
    :func:`nnunet_calibration.io.read_sitk_image`: a ``.gz`` stream is fully decompressed first
    (truncation, CRC and deflate errors are detected, which SimpleITK alone zero-fills silently) and a
    NIfTI file must hold as many bytes as its header says. Raises :class:`ConversionError` naming the
    file if it cannot be read."""
    try:
        return read_sitk_image(path)
    except CorruptFileError as e:
        raise ConversionError(f"cannot read {e}") from e


def check_3d_scalar(img: sitk.Image, path: Path) -> None:
    """A 3D image with one value per voxel, else :class:`ConversionError` saying what was found (a 4D
    series is read either as a 4D image or as a 3D image with one component per time point)."""
    dim, comps = img.GetDimension(), img.GetNumberOfComponentsPerPixel()
    if dim != 3 or comps != 1:
        found = f"a {dim}D image of size {tuple(img.GetSize())}" + (f" with {comps} components per voxel" if comps > 1
                                                                  else "")
        raise ConversionError(f"{path} is not a 3D scalar image: found {found}"
                              + (" (a 4D series? give the 3D frame files)" if dim == 4 or comps > 1 else ""))


def geometry(img: sitk.Image) -> tuple:
    """(size, spacing, origin, direction) in SimpleITK's (x, y, z) / LPS convention."""
    return img.GetSize(), img.GetSpacing(), img.GetOrigin(), img.GetDirection()


def check_same_geometry(ref: sitk.Image, ref_path: Path, other: sitk.Image, other_path: Path) -> None:
    """Raise :class:`ConversionError` if ``other`` is not on the same voxel grid as ``ref``
    (tolerances in the module docstring)."""
    problems = []
    if ref.GetDimension() != other.GetDimension():
        problems.append(f"dimension {other.GetDimension()} vs {ref.GetDimension()}")
    else:
        if ref.GetSize() != other.GetSize():
            problems.append(f"size {other.GetSize()} vs {ref.GetSize()}")
        if not np.allclose(other.GetSpacing(), ref.GetSpacing(), rtol=SPACING_RTOL, atol=0):
            problems.append(f"spacing {other.GetSpacing()} vs {ref.GetSpacing()}")
        if not np.allclose(other.GetOrigin(), ref.GetOrigin(), rtol=ORIGIN_RTOL, atol=ORIGIN_ATOL):
            problems.append(f"origin {other.GetOrigin()} vs {ref.GetOrigin()}")
        if not np.allclose(other.GetDirection(), ref.GetDirection(), rtol=0, atol=DIRECTION_ATOL):
            problems.append(f"direction {np.round(other.GetDirection(), 4).tolist()} vs "
                            f"{np.round(ref.GetDirection(), 4).tolist()}")
    if problems:
        raise ConversionError(f"geometry mismatch: {other_path} does not match {ref_path}: " + "; ".join(problems))


def check_label_values(label: sitk.Image | np.ndarray, allowed: Iterable[int], path: Path) -> np.ndarray:
    """Return the label array after checking that every voxel value is in ``allowed``
    (non-integer and NaN values are never allowed)."""
    if isinstance(label, sitk.Image):
        if label.GetNumberOfComponentsPerPixel() != 1:
            raise ConversionError(f"label file {path} has {label.GetNumberOfComponentsPerPixel()} components "
                                  f"per voxel, expected a scalar label map")
        arr = sitk.GetArrayFromImage(label)
    else:
        arr = np.asarray(label)
    values = np.unique(arr)
    allowed = sorted(int(a) for a in allowed)
    bad = values[~np.isin(values, allowed)]
    if bad.size:
        shown = ", ".join(str(v.item()) for v in bad[:10])
        raise ConversionError(f"unexpected label value(s) {shown} in {path} (allowed: {allowed})")
    return arr


# ---------------------------------------------------------------------------------------- writing
def copy_nifti(src: Path, dst: Path) -> None:
    """Copy a NIfTI file byte for byte to ``dst`` (which must end in ``.nii.gz``). A plain ``.nii``
    source is gzip-compressed: its header and voxel bytes are unchanged."""
    src, dst = Path(src), Path(dst)
    if not str(dst).endswith(".nii.gz"):
        raise ValueError(f"target must end with .nii.gz: {dst}")
    if src.name.endswith(".nii.gz"):
        shutil.copyfile(src, dst)
    else:
        with open(src, "rb") as fi, gzip.open(dst, "wb", compresslevel=6) as fo:
            shutil.copyfileobj(fi, fo, length=1 << 22)


def write_json(obj, path: Path) -> None:
    path = Path(path)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=False)
        f.write("\n")


def nnunet_folders(raw_root: str | os.PathLike | None = None,
                   preprocessed_root: str | os.PathLike | None = None) -> tuple[Path, Path]:
    """The nnUNet_raw and nnUNet_preprocessed folders: the arguments, else the environment variables
    (read at call time)."""
    out = []
    for value, var in ((raw_root, "nnUNet_raw"), (preprocessed_root, "nnUNet_preprocessed")):
        if value is None:
            value = os.environ.get(var)
        if not value:
            raise ConversionError(f"{var} is not set: set the environment variable (see nnU-Net's "
                                  f"documentation/setting_up_paths.md) or pass the folder explicitly")
        out.append(Path(value).absolute())
    return out[0], out[1]


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not isinstance(dataset_id, (int, np.integer)) or not 1 <= int(dataset_id) <= 999:
        raise ConversionError(f"dataset id must be an integer in 1..999, got {dataset_id!r}")
    return f"Dataset{int(dataset_id):03d}_{name}"


class StagedDataset:
    """Build ``$nnUNet_raw/DatasetXXX_Name`` in a temporary sibling folder and move it into place.

    Use as a context manager::

        with StagedDataset(dataset_id, "ACDC", overwrite) as st:
            ... write into st.imagesTr / st.labelsTr / st.imagesTs / st.root ...
            st.commit(splits)

    On an exception (or without :meth:`commit`) the temporary folder is removed and nothing in
    ``nnUNet_raw``/``nnUNet_preprocessed`` changes (``calib-convert`` turns SIGTERM into the same
    clean-up; a staging folder ``.DatasetXXX_Name.tmp-<pid>-*`` left by a SIGKILLed run is removed by
    the next conversion, see :mod:`nnunet_calibration.utils`). ``commit`` renames the staged folder into place
    (an existing target, allowed only with ``overwrite``, is first renamed aside and deleted after
    the swap) and writes ``$nnUNet_preprocessed/DatasetXXX_Name/splits_final.json`` (written to a
    temporary file and renamed). Other folders using the same dataset id with a different name in
    nnUNet_raw or nnUNet_preprocessed are refused (nnU-Net could not tell them apart).

    The output location is checked before any work (:mod:`nnunet_calibration.output_location`, the
    checks ``calib-evaluate`` and ``calib-calibrate apply`` make): the dataset folder and the
    preprocessed dataset folder may not be, contain or lie inside ``source`` (the download: a
    conversion never writes into it, and ``--overwrite`` can never delete it); no ancestor may be a
    file; both locations must accept new files, and an existing dataset folder must be renamable.
    Parent folders created for the dataset folder are removed again when the conversion fails.
    """

    def __init__(self, dataset_id: int, name: str, overwrite: bool = False,
                 raw_root: str | os.PathLike | None = None,
                 preprocessed_root: str | os.PathLike | None = None, with_test: bool = True,
                 source: str | os.PathLike | None = None):
        self.source = source
        self.name = dataset_folder_name(dataset_id, name)
        self.dataset_id = int(dataset_id)
        self.overwrite = overwrite
        self.raw_root, self.preprocessed_root = nnunet_folders(raw_root, preprocessed_root)
        self.target = self.raw_root / self.name
        self.splits_file = self.preprocessed_root / self.name / "splits_final.json"
        self.with_test = with_test
        self._staged: StagedOutput | None = None
        self.committed = False

    # -- checks before any work
    def _check_target(self) -> None:
        prefix = f"Dataset{self.dataset_id:03d}_"
        for root in (self.raw_root, self.preprocessed_root):
            if root.is_dir():
                others = sorted(p.name for p in root.iterdir()
                                if p.name.startswith(prefix) and p.name != self.name and not is_hidden(p.name))
                if others:
                    raise ConversionError(f"dataset id {self.dataset_id} is already used by {root / others[0]}; "
                                          f"choose another id with -d")
        if not self.overwrite:
            for p in (self.target, self.splits_file):
                if p.exists():
                    raise ConversionError(f"target exists: {p} (use --overwrite to replace it)")

    def _check_location(self) -> None:
        if self.source is not None:
            inputs = [("source folder", self.source, True)]
            check_not_an_input(self.target, inputs)
            check_not_an_input(self.splits_file.parent, inputs)
        check_writable(self.splits_file.parent)

    def __enter__(self) -> "StagedDataset":
        self._check_target()
        self._check_location()
        # checks the dataset folder's location, creates its parents and the staging folder (a killed
        # converter's staging folder is removed), tries renaming an existing target aside and back
        self._staged = StagedOutput(self.target)
        self.root = self._staged.prepare()
        self.imagesTr = self.root / "imagesTr"
        self.labelsTr = self.root / "labelsTr"
        self.imagesTs = self.root / "imagesTs"
        self.imagesTr.mkdir()
        self.labelsTr.mkdir()
        if self.with_test:
            self.imagesTs.mkdir()
        return self

    def commit(self, splits: list[dict]) -> None:
        assert self._staged is not None, "use StagedDataset as a context manager"
        self._check_target()  # something may have appeared meanwhile
        if self.with_test and not any(self.imagesTs.iterdir()):
            self.imagesTs.rmdir()  # no test images in this download
        pre_dir = self.splits_file.parent
        created_pre = not pre_dir.exists()
        pre_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_split = tempfile.mkstemp(prefix=".splits_final.json.tmp-", dir=pre_dir)
        os.close(fd)
        try:
            write_json(splits, Path(tmp_split))
            # the dataset folder and its splits move into place together: if the splits cannot, the
            # old dataset folder is put back
            self._staged.commit(replace=self.overwrite, then=lambda: os.replace(tmp_split, self.splits_file))
        except BaseException:
            if os.path.exists(tmp_split):
                os.remove(tmp_split)
            if created_pre and pre_dir.exists() and not any(pre_dir.iterdir()):
                pre_dir.rmdir()
            raise
        self.committed = True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._staged is not None and not self.committed:
            self._staged.discard()  # the staging folder and the parent folders prepare() created


# ---------------------------------------------------------------------------------------- splits
def patient_wise_splits(case_to_patient: Mapping[str, str], n_folds: int = NUM_FOLDS,
                        seed: int = DEFAULT_SPLIT_SEED) -> list[dict]:
    """nnU-Net ``splits_final.json`` content, grouped by patient.

    Convention: the sorted unique patient ids are shuffled with ``numpy.random.RandomState(seed)``
    and patient ``k`` of the shuffled order goes to validation fold ``k % n_folds`` (fold sizes
    differ by at most one patient). Every case of a patient (e.g. ACDC's ED and ES frames) is in the
    same fold. Returns ``[{"train": [...], "val": [...]}, ...]`` (``n_folds`` dicts, case ids sorted).
    Needs at least ``n_folds`` patients.
    """
    patients = sorted(set(case_to_patient.values()))
    if len(patients) < n_folds:
        raise ConversionError(f"need at least {n_folds} patients for a {n_folds}-fold split, found "
                              f"{len(patients)}: {patients}")
    order = np.array(patients, dtype=object)
    np.random.RandomState(seed).shuffle(order)
    fold_of = {p: k % n_folds for k, p in enumerate(order)}
    splits = []
    for fold in range(n_folds):
        val = sorted(c for c, p in case_to_patient.items() if fold_of[p] == fold)
        train = sorted(c for c, p in case_to_patient.items() if fold_of[p] != fold)
        splits.append({"train": train, "val": val})
    return splits


_CASE_ID_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


def check_case_id(case_id: str, source: Path) -> None:
    """nnU-Net derives ids from file names: refuse ids that would not round-trip."""
    if not _CASE_ID_OK.match(case_id):
        raise ConversionError(f"cannot derive a valid case id from {source} (got {case_id!r})")
