"""Every trainer of the package carries the time-limit handling (through the common base trainer).

The behaviour itself (signal -> checkpoint at the end of the epoch -> exit 75 -> requeue -> ``--c``;
in the last epoch -> ``--val``) is tested with real nnU-Net trainings on a real SLURM in
``tests/experiments/test_experiment_slurm.py::test_slurm_requeue_on_time_limit_signal``; the atomic
checkpoints, the fallback and DDP in ``tests/trainers/test_checkpoints.py``.
"""
import inspect

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

import nnunet_calibration.trainers as T
from nnunet_calibration.trainers.timelimit import SafeCheckpointMixin, TimeLimitMixin


def test_every_trainer_has_the_time_limit_hook():
    trainers = [c for _, c in inspect.getmembers(T, inspect.isclass) if issubclass(c, nnUNetTrainer)]
    assert len(trainers) > 20 and T.nnUNetTrainerDiceCE in trainers and T.nnUNetTrainerSDC in trainers
    missing = [c.__name__ for c in trainers
               if not (issubclass(c, TimeLimitMixin) and issubclass(c, SafeCheckpointMixin))]
    assert not missing, missing
    for c in trainers:
        # the mixin's hooks come before nnU-Net's own in the method resolution order
        mro = c.__mro__
        assert mro.index(TimeLimitMixin) < mro.index(nnUNetTrainer), c.__name__
        # and no trainer overrides them past the mixin (an override would have to call super())
        assert c.on_epoch_end is TimeLimitMixin.on_epoch_end, c.__name__
        assert c.on_train_start is TimeLimitMixin.on_train_start, c.__name__
        assert c.perform_actual_validation is TimeLimitMixin.perform_actual_validation, c.__name__
        # atomic checkpoints with the fallback to checkpoint_previous.pth
        assert mro.index(SafeCheckpointMixin) < mro.index(nnUNetTrainer), c.__name__
        assert c.save_checkpoint is SafeCheckpointMixin.save_checkpoint, c.__name__
        assert c.load_checkpoint is SafeCheckpointMixin.load_checkpoint, c.__name__
