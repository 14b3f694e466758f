"""Experiments: ``calib-experiment`` (trainers x folds, locally or on SLURM), reports, and ``calib-demo``.

Modules (dependencies flow downwards; nothing here is imported by the other subpackages). The
experiment file itself is :class:`nnunet_calibration.settings.Experiment` (read by
:func:`nnunet_calibration.settings.load_experiment`).

- :mod:`.environment`: the environment of the experiment's nnU-Net commands (folders, plugin trainers, device);
- :mod:`.folds`: fold results (the folder layout, :class:`~.folds.FoldStatus`, what a fold was trained with);
- :mod:`.nnunet_checks`: the experiment checked against nnU-Net (dataset, plans, trainers, recorded folds);
- :mod:`.runner`: one fold's training command and environment, the local backend;
- :mod:`.slurm`: the SLURM backend (``sbatch`` job arrays + a dependent report job, the array task);
- :mod:`.status`: what every (trainer, fold) is doing, from nnU-Net's logs;
- :mod:`.report`: the papers' table with Friedman ranks, Wilcoxon tests, cross-fitted temperature /
  vector scaling, the softmax-threshold sweep and plots, split by job: :mod:`.report.gather` (reads
  folders through :func:`nnunet_calibration.evaluation.evaluate_folders`), :mod:`.report.tables`
  (computes), :mod:`.report.render` (markdown, CSV, JSON), :mod:`.report.plots` (PNG);
- :mod:`.stats`, :mod:`.posthoc`: the numpy/scipy parts of the report (ranks and tests; the
  threshold sweep and voxel sampling);
- :mod:`.small_config` (``calib-plan-small``), :mod:`.cli` (``calib-experiment``) and :mod:`.demo`
  (``calib-demo``; its experiment files ``demo_acdc.yaml`` and ``demo_synthetic.yaml`` ship with the
  package).
"""
