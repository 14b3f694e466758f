"""The environment of an experiment's nnU-Net commands: nnU-Net's folders, the plugin's trainers, the device.

Nothing here changes the process environment: functions return environment dicts that callers
pass to subprocesses.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from nnunet_calibration.nnunet_utils import CPU_FRIENDLY_ENV, TRAINING_ENV, nnunet_env
from nnunet_calibration.settings import Experiment, ExperimentError


def with_plugin_trainers(env: dict) -> dict:
    """Make nnU-Net find nnunet-calibration's trainers (``env`` updated and returned).

    After a normal ``pip install`` they sit inside nnU-Net's trainer folder and nothing is needed.
    With an editable install (the repository checkout) ``nnUNet_extTrainer`` must point at
    ``nnunet_calibration/_nnunet_plugin``; it is appended if missing.
    """
    import nnunetv2

    inside = (Path(nnunetv2.__path__[0]) / "training" / "nnUNetTrainer" / "zz_nnunet_calibration"
              / "nnunet_calibration_trainers.py")
    plugin = Path(__file__).resolve().parents[1] / "_nnunet_plugin"
    if inside.is_file() or not plugin.is_dir():
        return env
    paths = [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    if str(plugin) not in paths:
        env["nnUNet_extTrainer"] = os.pathsep.join(paths + [str(plugin)])
    return env


#: nnU-Net's CPU-friendly settings (planning, prediction and training): never in a GPU job
CPU_SETTINGS = {**CPU_FRIENDLY_ENV, **TRAINING_ENV}
#: set by a SLURM job that copied the preprocessed data to node-local scratch: that copy is nnUNet_preprocessed
STAGED_ENV = "NNUNET_CALIB_STAGED_PREPROCESSED"


def experiment_env(exp: Experiment, base: dict | None = None, device: str = "cpu") -> dict:
    """Environment for the experiment's nnU-Net commands: ``base`` (default ``os.environ``, copied) with
    the experiment's nnU-Net folders (``nnUNet_preprocessed``: the job's node-local copy if
    :data:`STAGED_ENV` names one) and the plugin's trainers. On ``device="cpu"`` nnU-Net's CPU-friendly
    settings are added where unset (:data:`nnunet_calibration.nnunet_utils.CPU_FRIENDLY_ENV`); on a GPU
    nnU-Net's own defaults stay (compile, worker processes): they are what make it fast there. Last,
    the experiment file's ``environment:`` overrides anything."""
    env = with_plugin_trainers(nnunet_env(None, base=base, cpu_friendly=device == "cpu"))
    for key in ("raw", "preprocessed", "results"):
        try:
            env[f"nnUNet_{key}"] = str(exp.nnunet_folder(key))
        except ExperimentError:
            if key != "raw":  # raw is not needed for training
                raise
    if env.get(STAGED_ENV):
        env["nnUNet_preprocessed"] = env[STAGED_ENV]
    env.update(exp.environment)
    return env


def job_settings(exp: Experiment, device: str) -> dict:
    """nnU-Net's speed settings of a SLURM training job for ``device`` (``None``: removed from the job's
    environment), before the file's ``environment:`` (which overrides them): on ``cpu``
    :data:`CPU_SETTINGS`; on ``cuda`` none of them (nnU-Net's GPU defaults: ``torch.compile``, worker
    processes), and ``nnUNet_n_proc_DA`` = ``slurm.cpus`` per GPU (nnU-Net's value is per GPU)."""
    if device == "cpu":
        return dict(CPU_SETTINGS)
    out: dict = dict.fromkeys(CPU_SETTINGS)
    out["nnUNet_n_proc_DA"] = str(max(1, exp.slurm.cpus // max(1, exp.slurm.gpu_count)))
    return out


def resolve_device(exp: Experiment, slurm: bool = False) -> str:
    """``cpu`` or ``cuda``: the experiment's ``device``, or for ``auto`` cuda when SLURM asks for GPUs
    (``slurm=True``) or when this machine has CUDA."""
    if exp.device in ("cpu", "cuda"):
        return exp.device
    if slurm:
        return "cuda" if exp.slurm.gpu_count > 0 else "cpu"
    import torch  # deferred: heavy

    return "cuda" if torch.cuda.is_available() else "cpu"


#: variables of the submitting environment that SLURM jobs need as they are
_PASS_ENV = ("nnUNet_extTrainer", "SLURM_CONF")


def job_environment(exp: Experiment, settings: dict, what: str) -> list[tuple[str, dict]]:
    """A SLURM job's environment as (title, {name: value or None to remove}) sections, in order: this
    Python environment and nnU-Net's folders (with ``nnUNet_extTrainer`` and ``SLURM_CONF`` if set
    here), ``settings`` (:func:`job_settings`) where the file does not set them, the file's
    ``environment:``."""
    folders = {"PATH": str(Path(sys.executable).parent) + ":$PATH"}
    for key in ("raw", "preprocessed", "results"):
        try:
            folders[f"nnUNet_{key}"] = str(exp.nnunet_folder(key))
        except ExperimentError:
            if key != "raw":
                raise
    base = with_plugin_trainers(dict(os.environ))
    folders.update({k: base[k] for k in _PASS_ENV if base.get(k)})
    sections = [("this Python environment and nnU-Net's folders", folders)]
    own = {k: v for k, v in settings.items() if k not in exp.environment}
    if own:
        sections.append((f"nnU-Net's settings for {what}", own))
    if exp.environment:
        sections.append(("environment: from the experiment file (overrides the settings above)",
                         dict(exp.environment)))
    return sections
