"""Experiments: ``calib-experiment`` (trainers x folds, locally or on SLURM), reports, and ``calib-demo``.

Modules (dependencies flow downwards; nothing here is imported by the other subpackages):

- :mod:`.config`: the experiment file (YAML), its validation against nnU-Net, where trainings go
  (hyperparameter variants get their own ``nnUNet_results`` tree);
- :mod:`.runner`: fold state (finished / interrupted / not started), the local backend, one fold's job;
- :mod:`.slurm`: the SLURM backend (``sbatch`` job arrays + a dependent report job);
- :mod:`.status`: what every (trainer, fold) is doing;
- :mod:`.report`: the papers' table with Friedman ranks, Wilcoxon tests, cross-fitted temperature /
  vector scaling, the softmax-threshold sweep and plots, split by job: :mod:`.report.gather` (reads
  folders through :func:`nnunet_calibration.evaluation.evaluate_folders`), :mod:`.report.tables`
  (computes), :mod:`.report.render` (markdown, CSV, JSON), :mod:`.report.plots` (PNG);
- :mod:`.stats`, :mod:`.posthoc`: the numpy/scipy parts of the report (ranks and tests; temperature
  and vector scaling, threshold sweep);
- :mod:`.cli` (``calib-experiment``) and :mod:`.demo` (``calib-demo``; its experiment files
  ``demo_acdc.yaml`` and ``demo_synthetic.yaml`` ship with the package).
"""
