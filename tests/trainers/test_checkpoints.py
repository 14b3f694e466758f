"""Checkpoints that survive any kill, and the time-limit stop outside the epoch loop (real nnU-Net).

``test_kill_during_checkpoint_write_then_resume_from_previous_good_checkpoint``: a real
``nnUNetv2_train`` (``nnUNetTrainerDiceCE``, ``save_every=1``) is frozen the moment its temporary
``checkpoint_latest.pth`` file appears and killed with SIGKILL (a kill during the write):
``checkpoint_latest.pth`` and ``checkpoint_previous.pth`` are complete older ones, only the
temporary files are partial. Then ``checkpoint_latest.pth`` is made unreadable (what nnU-Net's
in-place writer leaves after such a kill) and ``--c`` runs twice with the time-limit stop file
(``NNUNET_CALIB_STOP_FILE``): first with the file present from the start (the run loads
``checkpoint_previous.pth``, says so in its log, restores ``checkpoint_latest.pth``, records the
fallback for ``calib-experiment status`` and leaves with 75 at the end of start-up, before any
epoch), then with the file created once the first epoch has started (the training continues from
the previous good checkpoint, stops after that epoch with 75 and a new checkpoint; the stale
temporary files are gone).

``test_ddp_two_ranks_timelimit_barrier_rank0_write``: the DDP code path of ``-num_gpus`` on two gloo
ranks on CPU: only rank 1 gets the signal, yet both stop (all-reduce); rank 0 reaches the checkpoint
2 s late and rank 1 waits at the barrier until rank 0 has written (it finds the complete file when it
goes on); rank 1 writes nothing; a second save keeps the older copy; a load with an unreadable latest
checkpoint falls back to it on both ranks.
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nnunet_calibration.nnunet_utils import nnunet_command, training_env
from nnunet_calibration.timelimit import LATEST_CHECKPOINT, PREVIOUS_CHECKPOINT, RECOVERY_FILE, STOP_FILE_ENV
from trainers_testlib import model_folder

pytestmark = pytest.mark.nnunet

TRAINER = "nnUNetTrainerDiceCE"
HPARAMS = "num_epochs=6,num_iterations_per_epoch=2,num_val_iterations_per_epoch=1,save_every=1"


def _epoch(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["current_epoch"])


def _temps(fold: Path) -> list[str]:
    return sorted(p.name for p in fold.iterdir() if ".tmp-" in p.name)


def _kill_during_latest_write(cmd: list, env: dict, fold: Path, timeout: float = 240.0) -> str:
    """Run ``cmd``; once ``checkpoint_previous.pth`` exists (third write), freeze the training (SIGSTOP) as soon as a
    temporary file of a new one appears; if the rename has not happened yet, SIGKILL it (a kill during
    the write), else let it go on and wait for the next write. Returns the temporary file's name."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    prefix = f".{LATEST_CHECKPOINT}.tmp-"
    try:
        end = time.monotonic() + timeout
        while time.monotonic() < end and proc.poll() is None:
            names = os.listdir(fold) if fold.is_dir() else []
            temp = next((n for n in names if n.startswith(prefix)), None)
            if temp is None or PREVIOUS_CHECKPOINT not in names:  # from the third write on
                time.sleep(0.0005)
                continue
            os.killpg(proc.pid, signal.SIGSTOP)
            if (fold / temp).exists():  # still writing (or fsync-ing): not renamed yet
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(60)
                return temp
            os.killpg(proc.pid, signal.SIGCONT)  # the write was faster than us: the next one
        pytest.fail(f"no checkpoint write caught (exit {proc.poll()}); fold: {sorted(os.listdir(fold))}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)


def _run(cmd: list, env: dict, until=None, then=None, timeout: float = 300.0) -> int:
    """Run ``cmd``; when ``until()`` first holds, call ``then()``. Returns the exit status."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        end = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < end:
            if until is not None and until():
                then()
                until = None
            time.sleep(0.2)
        return proc.wait(5)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(60)


def _newest_log(fold: Path) -> str:
    logs = sorted(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text() if logs else ""


def test_kill_during_checkpoint_write_then_resume_from_previous_good_checkpoint(synthetic_labels, tmp_path):
    import yaml

    from nnunet_calibration.experiments.nnunet_checks import validate
    from nnunet_calibration.experiments.status import fold_statuses
    from nnunet_calibration.settings import load_experiment

    ds = synthetic_labels
    env = training_env(dict(ds.env, NNUNET_CALIB_HPARAMS=HPARAMS, nnUNet_results=str(tmp_path / "results")))
    env.pop("SLURM_JOB_ID", None)
    cmd = nnunet_command("nnUNetv2_train") + [str(ds.dataset_id), "2d", "0", "-tr", TRAINER, "-device", "cpu"]
    fold = model_folder(env, ds.name, TRAINER, "2d") / "fold_0"

    # 1. killed while writing a new checkpoint_latest.pth: the old one and the previous one are intact
    temp = _kill_during_latest_write(cmd, env, fold)
    latest, previous = fold / LATEST_CHECKPOINT, fold / PREVIOUS_CHECKPOINT
    pid = temp.split(".tmp-")[1].split("-")[0]  # only the killed process's partial files (latest; maybe previous)
    assert (fold / temp).exists() and all(f".tmp-{pid}-" in t for t in _temps(fold)), _temps(fold)
    good = _epoch(latest)
    # the older one; the same one if the kill came between keeping it and the rename of the new latest
    back = _epoch(previous)
    assert good >= 2 and back in (good - 1, good), (good, back)

    # 2. checkpoint_latest.pth unreadable (half of it: what an in-place write leaves) -> --c falls back
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])
    resume = cmd + ["--c"]
    stop = tmp_path / "stop"
    stop.touch()  # the time-limit warning came before start-up ended: no epoch is trained
    rc = _run(resume, dict(env, **{STOP_FILE_ENV: str(stop)}))
    log = _newest_log(fold)
    assert rc == 75, log[-3000:]
    assert "is unreadable" in log and f"resumed from {PREVIOUS_CHECKPOINT}" in log
    assert "warning during start-up: stopped before training" in log and not re.search(r": Epoch \d+\s*$", log, re.M)
    assert _epoch(latest) == _epoch(previous) == back  # restored from the previous good checkpoint
    f = tmp_path / "e.yaml"
    f.write_text(yaml.safe_dump(dict(name="ckpt", dataset=ds.dataset_id, configuration="2d", folds=[0], device="cpu",
                                     trainers=[TRAINER], nnunet_paths={"results": str(tmp_path / "results")},
                                     state_dir=str(tmp_path / "state"))))
    row = fold_statuses(validate(load_experiment(f), check_trainers=False), use_slurm=False)[0]
    assert row["status"] == "interrupted", row
    assert f"resumed from {PREVIOUS_CHECKPOINT} (epoch {back})" in row["detail"], row
    assert f"{LATEST_CHECKPOINT} was unreadable" in row["detail"] and (fold / RECOVERY_FILE).is_file()

    # 3. the training continues from there; the warning during its first epoch stops it after that epoch
    stop.unlink()
    rc = _run(resume, dict(env, **{STOP_FILE_ENV: str(stop)}),
              until=lambda: re.search(rf": Epoch {back}\s*$", _newest_log(fold), re.M), then=stop.touch)
    log = _newest_log(fold)
    assert rc == 75, log[-3000:]
    assert f"time limit: stopped after epoch {back}" in log and "is unreadable" not in log
    assert _epoch(latest) == back + 1 and _epoch(previous) == back
    assert _temps(fold) == []  # the killed run's temporary files were removed by the next write


_DDP_SCRIPT = r'''
import gc, os, signal, sys, time
sys.path[:0] = [sys.argv[1], os.path.dirname(sys.argv[1])]  # tests/trainers and tests/, as pytest does
os.environ["nnUNet_results"] = sys.argv[3]  # before nnU-Net reads its folders
os.environ["NNUNET_CALIB_TIMELIMIT"] = "1"
import torch, torch.distributed as dist, torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

PRE, PORT = sys.argv[2], sys.argv[4]


def run(rank, world):
    from trainers_testlib import ddp_rank_trainer
    from nnunet_calibration.trainers import nnUNetTrainerDiceCE
    from nnunet_calibration.trainers.timelimit import TimeLimitStop
    from nnunet_calibration.timelimit import LATEST_CHECKPOINT, PREVIOUS_CHECKPOINT, RECOVERY_FILE

    tr = ddp_rank_trainer(nnUNetTrainerDiceCE, PRE, PORT, rank, world)
    tr.local_rank = rank
    tr.network = DDP(tr.network)
    os.makedirs(tr.output_folder, exist_ok=True)
    latest = os.path.join(tr.output_folder, LATEST_CHECKPOINT)
    previous = os.path.join(tr.output_folder, PREVIOUS_CHECKPOINT)
    epoch = lambda p: torch.load(p, map_location="cpu", weights_only=False)["current_epoch"]

    # the time-limit flag is all-reduced: only rank 1 gets the signal, both stop
    assert tr.install_timelimit_handler()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGUSR1)
    assert tr._timelimit_requested is (rank == 1)
    assert tr.timelimit_stop_requested() is True, rank
    # rank 0 writes; rank 1 waits at the barrier until it has (rank 0 arrives 2 s late)
    if rank == 0:
        time.sleep(2)
    t0 = time.monotonic()
    try:
        tr.stop_for_timelimit(0)
        raise AssertionError("no exit")
    except TimeLimitStop as e:
        assert e.code == 75
    waited = time.monotonic() - t0
    assert os.path.isfile(latest) and epoch(latest) == 1, rank  # complete when rank 1 goes on
    if rank == 1:
        assert waited > 1.5, waited
    assert not [n for n in os.listdir(tr.output_folder) if ".tmp-" in n]
    dist.barrier()  # every rank has looked before rank 0's next write
    # a second save keeps the older copy
    tr.current_epoch = 1
    tr.save_checkpoint(latest)
    assert epoch(latest) == 2 and epoch(previous) == 1
    # an unreadable latest checkpoint: every rank loads the previous one
    if rank == 0:
        with open(latest, "r+b") as fh:
            fh.truncate(1000)
    dist.barrier()
    tr.load_checkpoint(latest)
    assert tr.current_epoch == 1, (rank, tr.current_epoch)
    dist.barrier()
    assert epoch(latest) == 1 and os.path.isfile(os.path.join(tr.output_folder, RECOVERY_FILE))
    print(f"rank {rank}: stopped together, waited {waited:.1f} s for rank 0's checkpoint, fallback OK", flush=True)
    dist.barrier()
    del tr
    gc.collect()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # torch 2.14's gloo threads can abort at interpreter exit (see test_sdf_head_ddp2.py)


if __name__ == "__main__":
    mp.spawn(run, args=(2,), nprocs=2, join=True)
    print("DDP 2 ranks OK")
'''


def test_ddp_two_ranks_timelimit_barrier_rank0_write(synthetic_labels, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "ddp_ckpt.py"
    script.write_text(_DDP_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_JOB_ID", STOP_FILE_ENV)}
    proc = subprocess.run([sys.executable, str(script), str(Path(__file__).parent), str(synthetic_labels.preprocessed),
                           str(tmp_path / "results"), str(port)], capture_output=True, text=True, timeout=600, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "DDP 2 ranks OK" in proc.stdout, out[-4000:]
    for rank in (0, 1):
        assert f"rank {rank}: stopped together" in proc.stdout, out[-4000:]
