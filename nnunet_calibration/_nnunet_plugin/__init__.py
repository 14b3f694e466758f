"""Installed as ``nnunetv2.training.nnUNetTrainer.zz_nnunet_calibration``.

nnU-Net finds ``-tr`` trainer classes only by name, by importing every module below
``nnunetv2/training/nnUNetTrainer/``. The wheel of nnunet-calibration ships this tiny folder
there (see ``[tool.setuptools.package-dir]`` in pyproject.toml); its only module re-exports the
trainers whose code lives in :mod:`nnunet_calibration.trainers`. Nothing is copied at run time.

For an editable install (``pip install -e .``) this folder is *not* inside nnU-Net's tree; point
nnU-Net at it instead::

    export nnUNet_extTrainer=/path/to/repo/nnunet_calibration/_nnunet_plugin
"""
