"""The environment of an experiment's nnU-Net commands: nnU-Net's folders, the plugin's trainers, the device.

Nothing here changes the process environment: functions return environment dicts that callers
pass to subprocesses.
"""
from __future__ import annotations

import os
from pathlib import Path

from nnunet_calibration.nnunet_utils import nnunet_env
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


def experiment_env(exp: Experiment, base: dict | None = None, device: str = "cpu") -> dict:
    """Environment for the experiment's nnU-Net commands: ``base`` (default ``os.environ``, copied) with
    the experiment's nnU-Net folders and the plugin's trainers. On ``device="cpu"`` nnU-Net's
    CPU-friendly settings are added where unset (:data:`nnunet_calibration.nnunet_utils.CPU_FRIENDLY_ENV`);
    on a GPU nnU-Net's own defaults stay (compile, worker processes): they are what make it fast there."""
    env = with_plugin_trainers(nnunet_env(None, base=base, cpu_friendly=device == "cpu"))
    for key in ("raw", "preprocessed", "results"):
        try:
            env[f"nnUNet_{key}"] = str(exp.nnunet_folder(key))
        except ExperimentError:
            if key != "raw":  # raw is not needed for training
                raise
    return env


def resolve_device(exp: Experiment, slurm: bool = False) -> str:
    """``cpu`` or ``cuda``: the experiment's ``device``, or for ``auto`` cuda when SLURM asks for GPUs
    (``slurm=True``) or when this machine has CUDA."""
    if exp.device in ("cpu", "cuda"):
        return exp.device
    if slurm:
        return "cuda" if exp.slurm.gpus > 0 else "cpu"
    import torch  # deferred: heavy

    return "cuda" if torch.cuda.is_available() else "cpu"
