"""Calibrated, uncertainty-aware inference with nnU-Net's own predictor (``calib-predict``).

What is nnU-Net's and what is added
-----------------------------------
Preprocessing, sliding-window prediction with test-time mirroring, the fold ensemble (the mean of
the folds' logits), resampling to the original grid, cropping reverted and the export are
nnU-Net's own (:class:`nnunetv2.inference.predict_from_raw_data.nnUNetPredictor`,
``convert_predicted_logits_to_segmentation_with_correct_shape``, ``export_prediction_from_logits``,
the plans' image reader/writer). Two things are added:

* **calibration on the logits.** ``calibration.json`` of the model folder
  (:func:`~nnunet_calibration.posthoc.model.read_calibration`) is applied inside nnU-Net's
  nonlinearity (a label manager built with ``inference_nonlin=``:class:`CalibratedNonlin`), i.e. to
  the ensemble logits ``z`` after nnU-Net resampled them to the original grid and before its
  softmax / sigmoid; exact, no probability floor. Softmax (labels):
  ``softmax_c(log_softmax(z)_c / T_c)``; with one temperature this is ``softmax(z / T)``; with one
  temperature per channel (vector scaling) it is the definition the fit uses
  (:mod:`~nnunet_calibration.posthoc.scaling`: scaling of the log-probabilities), so ``calib-predict``
  equals ``calib-calibrate apply`` on the same prediction wherever no probability is below apply's
  floor of 1e-7. Sigmoid regions: ``sigmoid(z_r / T_r)``. The segmentation is nnU-Net's decision
  on the calibrated probabilities (argmax with the first channel winning ties; regions
  ``p > 0.5`` in ``regions_class_order``): a single temperature (and any scaling of regions) keeps
  it up to float32 ties, softmax vector scaling can change it.
* **per-fold outputs.** With ``--uncertainty`` or ``--save_fold_probabilities`` the predictor keeps
  each fold's logits of the current case (:meth:`CalibratedPredictor.predict_logits_from_preprocessed_data`;
  the ensemble is computed with the very operations of nnU-Net's method, so it is bit-for-bit
  nnU-Net's), and every fold's logits are resampled, calibrated and converted like the ensemble's.

Output folder ``OUT`` (written in a staging folder next to it and renamed at the end; ``OUT`` must
not exist or be an empty folder)
* nnU-Net's layout: ``CASE<file_ending>`` (segmentation), with ``--save_probabilities``
  ``CASE.npz`` (key ``probabilities``, float32, ``(C, ...)`` in nnU-Net's array order) and
  ``CASE.pkl``; ``dataset.json``, ``plans.json``, ``predict_from_raw_data_args.json`` (this run's
  arguments). Calibrated: ``calibration.json`` (the applied calibration plus ``applied_to``) and
  every ``CASE.pkl`` marked with :data:`~nnunet_calibration.posthoc.model.PKL_MARK`, as
  ``calib-calibrate apply`` marks its output (so it refuses to scale this folder a second time).
* ``--uncertainty``: ``OUT/uncertainty/CASE_entropy<file_ending>`` and, with two or more folds,
  ``CASE_mutual_information<file_ending>`` and ``CASE_fold_disagreement<file_ending>``
  (:mod:`~nnunet_calibration.inference.maps`): float32 images with the segmentation's geometry,
  written like nnU-Net writes the segmentation (SimpleITK / nibabel writers of the plans:
  float32; any other writer: the map in percent, 0-100, as its 8-bit segmentation format). A
  subfolder, so that tools which read every ``*<file_ending>`` of ``OUT`` as a prediction
  (``nnUNetv2_evaluate_folder``, ``calib-evaluate``) see only the segmentations.
* ``--save_fold_probabilities``: ``OUT/fold_probabilities/fold_X/CASE.npz`` (key ``probabilities``,
  calibrated like the ensemble, same layout as ``CASE.npz``).

``--no-calibration``: nnU-Net's own ``export_prediction_from_logits`` writes the segmentation and
npz, bit for bit ``nnUNetv2_predict``'s (tested).

Memory: nnU-Net's predictor, plus, with per-fold outputs, the current case's fold logits
(network resolution, float16, one array per fold) and its maps; cases are processed one at a time
(with ``-nps N`` at most two more queued in the export workers, as nnU-Net does).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from time import sleep
from typing import List, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from nnunetv2.configuration import default_num_processes
from nnunetv2.inference.export_prediction import (convert_predicted_logits_to_segmentation_with_correct_shape,
                                                  export_prediction_from_logits)
from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
from nnunetv2.utilities.file_path_utilities import check_workers_alive_and_busy
from torch._dynamo import OptimizedModule

from nnunet_calibration.errors import UserError
from nnunet_calibration.inference import maps as uncertainty_maps
from nnunet_calibration.posthoc.model import (CALIBRATION_FILE, PKL_MARK, CalibrationError, params_from_calibration,
                                              read_calibration)

UNCERTAINTY_DIR = "uncertainty"
FOLD_PROBABILITIES_DIR = "fold_probabilities"


class PredictionError(UserError):
    """Bad input for ``calib-predict`` (the message names the file or option and what is wrong)."""


# -- calibration -----------------------------------------------------------------------------------
class CalibratedNonlin:
    """nnU-Net's inference nonlinearity with the calibration applied to the logits first (module
    docstring). ``inv_t``: one inverse temperature per channel. Called by nnU-Net's label manager
    on float32 logits ``(C, ...)`` (a torch tensor); picklable for nnU-Net's export workers."""

    def __init__(self, temperatures: Sequence[float], regions: bool):
        self.inv_t = [1.0 / float(t) for t in temperatures]
        self.regions = regions

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        shape = (len(self.inv_t),) + (1,) * (logits.ndim - 1)
        inv_t = torch.tensor(self.inv_t, dtype=logits.dtype, device=logits.device).reshape(shape)
        if self.regions:
            return torch.sigmoid(logits * inv_t)
        return torch.softmax(torch.log_softmax(logits, 0) * inv_t, 0)


def load_calibration(model_folder: Path, dataset_json: dict, num_heads: int, regions: bool) -> tuple[dict, list]:
    """The model's ``calibration.json`` (through :func:`~nnunet_calibration.posthoc.model.read_calibration`)
    and one temperature per output channel; a :class:`CalibrationError` naming the file when it is
    missing or does not fit the model (label set, channel count, softmax vs sigmoid)."""
    cal = read_calibration(model_folder)
    path = Path(model_folder) / CALIBRATION_FILE
    params = params_from_calibration(cal, path)

    def norm(labels):
        return {k: sorted(v) if isinstance(v, (list, tuple)) else [v] for k, v in labels.items()}

    if norm(cal["labels"]) != norm(dataset_json["labels"]):
        raise CalibrationError(f"{path}: its labels {cal['labels']} differ from the model's dataset.json "
                               f"{dataset_json['labels']}; fit again")
    channels = cal["channels"]
    if len(channels) != num_heads:
        raise CalibrationError(f"{path}: field 'channels' names {len(channels)} channels {channels}, the model "
                               f"has {num_heads} output channels")
    want = "sigmoid" if regions else "softmax"
    if cal.get("nonlinearity", want) != want:
        raise CalibrationError(f"{path}: field 'nonlinearity' is {cal.get('nonlinearity')!r}, the model uses {want}")
    temps = [float(params)] * num_heads if np.ndim(params) == 0 else [float(t) for t in params]
    return cal, temps


# -- the per-case export (in this process or in nnU-Net-style export workers) ---------------------
@dataclass
class ExportOptions:
    """What :func:`export_case` writes (picklable)."""
    save_probabilities: bool
    temperatures: Optional[List[float]]  # None: no calibration
    regions: bool
    uncertainty: bool
    fold_names: List[str]
    save_fold_probabilities: bool
    root: str  # the (staging) output folder
    applied: Optional[dict] = None  # the PKL_MARK entry of a calibrated run
    file_ending: str = ".nii.gz"

    @property
    def per_fold(self) -> bool:
        return self.save_fold_probabilities or (self.uncertainty and len(self.fold_names) > 1)


def _label_manager(plans_manager, dataset_json, options: ExportOptions):
    if options.temperatures is None:
        return plans_manager.get_label_manager(dataset_json)
    return plans_manager.get_label_manager(dataset_json,
                                           inference_nonlin=CalibratedNonlin(options.temperatures, options.regions))


def write_float_map(rw, values: np.ndarray, fname: str, properties: dict) -> None:
    """Write a float map with the geometry nnU-Net's ``rw.write_seg`` gives the segmentation
    (``values``: the segmentation's array shape). SimpleITK and nibabel writers: float32; any
    other writer: ``round(100 * values)`` through its own ``write_seg`` (module docstring)."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO, NibabelIOWithReorient
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO, SimpleITKIOWithReorient

    values = np.asarray(values, dtype=np.float32)
    if isinstance(rw, SimpleITKIO) and "sitk_stuff" in properties:
        import SimpleITK as sitk

        st = properties["sitk_stuff"]
        arr = values[0] if len(st["spacing"]) == 2 else values
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing(st["spacing"])
        img.SetOrigin(st["origin"])
        img.SetDirection(st["direction"])
        if isinstance(rw, SimpleITKIOWithReorient):
            img = sitk.DICOMOrient(img, st["original_orientation"])
        sitk.WriteImage(img, fname, True)
    elif isinstance(rw, (NibabelIO, NibabelIOWithReorient)) and "nibabel_stuff" in properties:
        import nibabel

        nb = properties["nibabel_stuff"]
        arr = values.transpose((2, 1, 0))
        if isinstance(rw, NibabelIOWithReorient):
            from nibabel.orientations import axcodes2ornt, io_orientation, ornt_transform

            img = nibabel.Nifti1Image(arr, affine=nb["reoriented_affine"])
            img = img.as_reoriented(ornt_transform(axcodes2ornt("RAS"), io_orientation(nb["original_affine"])))
        else:
            img = nibabel.Nifti1Image(arr, affine=nb["original_affine"])
        nibabel.save(img, fname)
    else:
        rw.write_seg(np.round(100 * values).astype(np.uint8), fname, properties)


def _save_pkl(properties: dict, path: str, applied: Optional[dict]) -> None:
    from batchgenerators.utilities.file_and_folder_operations import save_pickle

    if applied is not None:
        properties = dict(properties, **{PKL_MARK: [*properties.get(PKL_MARK, []), applied]})
    save_pickle(properties, path)


def export_case(logits, fold_logits, properties: dict, configuration_manager, plans_manager, dataset_json: dict,
                ofile: str, options: ExportOptions) -> None:
    """Write one case (module docstring): segmentation, npz/pkl, maps, fold probabilities."""
    case = os.path.basename(ofile)
    fe = dataset_json["file_ending"]
    calibrated = options.temperatures is not None
    if not calibrated and not options.save_probabilities:
        # nnU-Net's own export: the segmentation as nnUNetv2_predict decides it without probabilities
        export_prediction_from_logits(logits, properties, configuration_manager, plans_manager, dataset_json, ofile,
                                      False)
        if not (options.uncertainty or options.per_fold):
            return
    lm = _label_manager(plans_manager, dataset_json, options)
    rw = plans_manager.image_reader_writer_class()
    # the steps of nnU-Net's export_prediction_from_logits with probabilities (bit for bit when not calibrated)
    seg, probs = convert_predicted_logits_to_segmentation_with_correct_shape(
        logits, plans_manager, configuration_manager, lm, properties, return_probabilities=True)
    if calibrated or options.save_probabilities:
        if options.save_probabilities:
            np.savez_compressed(ofile + ".npz", probabilities=probs)
            _save_pkl(properties, ofile + ".pkl", options.applied if calibrated else None)
        rw.write_seg(seg, ofile + fe, properties)
    del logits
    udir = os.path.join(options.root, UNCERTAINTY_DIR)
    if options.uncertainty:
        os.makedirs(udir, exist_ok=True)
        write_float_map(rw, uncertainty_maps.normalised_entropy(probs, options.regions),
                        os.path.join(udir, f"{case}_entropy{fe}"), properties)
    if not options.per_fold:
        return
    acc = uncertainty_maps.FoldAccumulator(seg, options.regions) if options.uncertainty else None
    single = len(fold_logits) == 1  # one fold: its probabilities are the ensemble's
    if not single:
        del probs
    for name, fl in zip(options.fold_names, fold_logits):
        if single:
            seg_k, p_k = seg, probs
        else:
            seg_k, p_k = convert_predicted_logits_to_segmentation_with_correct_shape(
                fl, plans_manager, configuration_manager, lm, properties, return_probabilities=True)
        if options.save_fold_probabilities:
            fdir = os.path.join(options.root, FOLD_PROBABILITIES_DIR, f"fold_{name}")
            os.makedirs(fdir, exist_ok=True)
            np.savez_compressed(os.path.join(fdir, case + ".npz"), probabilities=p_k)
        if acc is not None:
            acc.add(p_k, seg_k)
        del seg_k, p_k
    if acc is not None and len(options.fold_names) > 1:
        for name, values in acc.maps().items():
            write_float_map(rw, values, os.path.join(udir, f"{case}_{name}{fe}"), properties)


# -- the predictor -----------------------------------------------------------------------------------
class CalibratedPredictor(nnUNetPredictor):
    """nnU-Net's predictor that can keep each fold's logits of the current case (``keep_fold_logits``;
    then in :attr:`fold_logits` after :meth:`predict_logits_from_preprocessed_data`)."""

    keep_fold_logits: bool = False
    fold_logits: Optional[list] = None

    @torch.inference_mode()
    def predict_logits_from_preprocessed_data(self, data: torch.Tensor) -> torch.Tensor:
        """nnU-Net's method; with ``keep_fold_logits`` also each fold's logits. The ensemble is built
        with nnU-Net's operations in nnU-Net's order (sum in the first fold's CPU tensor, then
        division), so it is bit-for-bit nnU-Net's."""
        if not self.keep_fold_logits or len(self.list_of_parameters) < 2:
            prediction = super().predict_logits_from_preprocessed_data(data)
            self.fold_logits = [prediction] if self.keep_fold_logits else None
            return prediction
        n_threads = torch.get_num_threads()
        torch.set_num_threads(default_num_processes if default_num_processes < n_threads else n_threads)
        prediction = None
        folds = []
        for params in self.list_of_parameters:
            if not isinstance(self.network, OptimizedModule):
                self.network.load_state_dict(params)
            else:
                self.network._orig_mod.load_state_dict(params)
            fold = self.predict_sliding_window_return_logits(data).to('cpu')
            if prediction is None:
                folds.append(fold.clone())  # `prediction` is this tensor and is summed into in place
                prediction = fold
            else:
                folds.append(fold)
                prediction += fold
        prediction /= len(self.list_of_parameters)
        torch.set_num_threads(n_threads)
        self.fold_logits = folds
        return prediction

    def input_lists(self, input_folder: str) -> list:
        """nnU-Net's list of image files per case (``create_lists_from_splitted_dataset_folder``'s
        result, built with its own helpers in this process: nnU-Net's version forks a pool of 12
        processes, which can deadlock in a process whose torch threads are running)."""
        from batchgenerators.utilities.file_and_folder_operations import subfiles
        from nnunetv2.utilities.utils import create_paths_fn, get_identifiers_from_splitted_dataset_folder

        fe = self.dataset_json["file_ending"]
        files = subfiles(input_folder, suffix=fe, join=False, sort=True)
        return [create_paths_fn(input_folder, files, fe, case)
                for case in get_identifiers_from_splitted_dataset_folder(input_folder, fe)]

    def _cases(self, lists, ofiles, npp: int):
        """Preprocessed cases: nnU-Net's background iterator (``npp`` > 0) or, with ``npp == 0``,
        nnU-Net's preprocessor in this process (as ``predict_from_files_sequential``)."""
        if npp > 0:
            yield from self._internal_get_data_iterator_from_lists_of_filenames(lists, [None] * len(lists), ofiles,
                                                                                npp)
            return
        preprocessor = self.configuration_manager.preprocessor_class(verbose=self.verbose)
        for li, of in zip(lists, ofiles):
            data, _, props = preprocessor.run_case(li, None, self.plans_manager, self.configuration_manager,
                                                   self.dataset_json)
            yield {"data": torch.from_numpy(data), "data_properties": props, "ofile": of}

    def predict_folder(self, input_folder: str, out_folder: str, options: ExportOptions, npp: int, nps: int) -> int:
        """Predict every case of ``input_folder`` into ``out_folder`` (which exists); returns the count."""
        import multiprocessing

        lists, ofiles, _ = self._manage_input_and_output_lists(self.input_lists(input_folder), out_folder, None,
                                                               True, 0, 1, options.save_probabilities)
        self.keep_fold_logits = options.per_fold
        args = (self.configuration_manager, self.plans_manager, self.dataset_json)
        progress = tqdm(total=len(lists), desc="calib-predict: cases", unit="case", disable=not self.allow_tqdm)
        if nps == 0:
            for pre in self._cases(lists, ofiles, npp):
                logits = self._logits(pre)
                export_case(logits, self.fold_logits, pre["data_properties"], *args, pre["ofile"], options)
                self.fold_logits = None
                progress.update()
        else:
            with multiprocessing.get_context("spawn").Pool(nps) as pool:
                workers = list(pool._pool)
                results = []
                for pre in self._cases(lists, ofiles, npp):
                    while check_workers_alive_and_busy(pool, workers, results, allowed_num_queued=2):
                        sleep(0.1)
                    logits = self._logits(pre)
                    results.append(pool.apply_async(export_case, (logits, self.fold_logits, pre["data_properties"],
                                                                  *args, pre["ofile"], options)))
                    self.fold_logits = None
                for r in results:
                    while True:
                        if not all(w.is_alive() for w in workers):
                            raise RuntimeError("an export worker died (out of memory?)")
                        try:
                            r.get(timeout=0.1)
                            break
                        except multiprocessing.TimeoutError:
                            pass
                    progress.update()
        progress.close()
        from nnunetv2.inference.sliding_window_prediction import compute_gaussian
        from nnunetv2.utilities.helpers import empty_cache

        compute_gaussian.cache_clear()  # as nnU-Net's predict_from_data_iterator
        empty_cache(self.device)
        return len(lists)

    def _logits(self, pre: dict) -> np.ndarray:
        data = pre["data"]
        if isinstance(data, str):  # nnU-Net's iterator may hand over a temporary .npy file
            path = data
            data = torch.from_numpy(np.load(path))
            os.remove(path)
        logits = self.predict_logits_from_preprocessed_data(data).cpu().detach().numpy()
        if self.fold_logits is not None:
            self.fold_logits = [f.cpu().detach().numpy() for f in self.fold_logits]
        return logits
