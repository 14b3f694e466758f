"""The SLURM job scripts as a cluster user gets them (no SLURM, no training: fake ``sbatch``/``squeue``).

- a ``device: cuda`` experiment's training script has none of nnU-Net's CPU settings (they are unset),
  nnU-Net's augmentation workers = cpus per GPU, the typed ``gres``, the ``setup`` lines, the container
  prefix and the node-local staging of the preprocessed data; the file's ``environment:`` overrides;
  its report job has no GPU and only ``report_extra_args``;
- a ``device: cpu`` experiment's script exports the CPU settings;
- one job array for every (trainer, fold) of the study, throttled by ``max_parallel`` as a whole;
  submitting again while the tasks are queued submits no training.
"""
import json
import os
import stat

from experiments_testlib import write_experiment
from nnunet_calibration.experiments.environment import CPU_SETTINGS
from nnunet_calibration.settings import load_experiment

DATASET = "Dataset027_ACDC"


def _experiment(tmp_path, device: str, **cfg):
    pre = tmp_path / "pre" / DATASET
    pre.mkdir(parents=True, exist_ok=True)
    (pre / "nnUNetPlans.json").write_text(json.dumps({"configurations": {
        "2d": {"data_identifier": "nnUNetPlans_2d"}, "2d_small": {"inherits_from": "2d"}}}))
    f = write_experiment(tmp_path / f"{device}.yaml", **dict(dict(
        name="acdc", dataset=27, configuration="2d", device=device, state_dir=str(tmp_path / "state"),
        trainers=["nnUNetTrainerDiceCE", "nnUNetTrainerSDC_DC"],
        nnunet_paths={"preprocessed": str(tmp_path / "pre"), "results": str(tmp_path / "res")}), **cfg))
    return load_experiment(f).with_dataset_name(DATASET)


GPU_SLURM = {"gres": "gpu:a100:1", "cpus": 12, "partition": "gpu", "extra_args": ["--account=lab", "--qos=high"],
             "report_extra_args": ["--account=lab"], "report_partition": "cpu", "setup": ["module load cuda/12.4"],
             "container": "apptainer exec --nv /images/nnunet.sif", "scratch": "$TMPDIR", "max_parallel": 8}


def _exported(script: str) -> dict:
    """{name: value} of the script's ``export`` lines (the last one wins) and {name: None} of ``unset``."""
    out = {}
    for line in script.splitlines():
        if line.startswith("unset "):
            out.update(dict.fromkeys(line.split()[1:]))
        elif line.startswith("export "):
            k, v = line[7:].split("=", 1)
            out[k] = v
    return out


def test_gpu_and_cpu_job_scripts(tmp_path):
    from nnunet_calibration.experiments.slurm import report_script, training_script

    gpu = _experiment(tmp_path, "cuda", slurm=GPU_SLURM, environment={"nnUNet_compile": False})
    script = training_script(gpu, "cuda", tmp_path / "tasks_0.json", 10)
    env = _exported(script)
    for k in CPU_SETTINGS:  # never a CPU setting in a GPU job: unset, or the file's own value
        assert env.get(k) != CPU_SETTINGS[k] or k == "nnUNet_compile", (k, script)
    assert env["nnUNet_n_proc_DA"] == "12" and env["nnUNet_compile"] == "false"  # the file overrides
    assert script.index("export nnUNet_compile=false") > script.index("unset ")
    for opt in ("--gres=gpu:a100:1", "--cpus-per-task=12", "--partition=gpu", "--account=lab", "--qos=high",
                "--array=0,1,2,3,4,5,6,7,8,9%8", "--signal=B:USR1@600", "--requeue"):
        assert f"#SBATCH {opt}\n" in script, opt
    assert "\nmodule load cuda/12.4\n" in script
    assert "exec apptainer exec --nv /images/nnunet.sif " in script and "train-fold" in script
    pre = tmp_path / "pre" / DATASET
    assert f"cp -r {pre}/gt_segmentations {pre}/nnUNetPlans_2d {pre}/*.json" in script
    assert env["nnUNet_preprocessed"] == '"$NNUNET_CALIB_STAGED_PREPROCESSED"'

    report = report_script(gpu)
    assert "--gres" not in report and "--qos" not in report and "--partition=cpu" in report
    assert "--account=lab" in report and "--cpus-per-task=2" in report

    cpu = _experiment(tmp_path, "cpu", slurm={"cpus": 2})
    script = training_script(cpu, "cpu", tmp_path / "tasks_0.json", 4)
    env = _exported(script)
    assert {k: env.get(k) for k in CPU_SETTINGS} == CPU_SETTINGS
    assert "--gres" not in script and "--array=0,1,2,3\n" in script and "cp -r" not in script


def _fake_slurm(tmp_path, monkeypatch) -> tuple:
    """``sbatch`` (ids 100, 101, ...; records its arguments) and ``squeue`` (prints queue.txt) on PATH."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    calls, queue = tmp_path / "sbatch_calls.txt", tmp_path / "queue.txt"
    queue.write_text("")
    (bin_ / "sbatch").write_text(f'#!/bin/bash\necho "$*" >> {calls}\necho $((99 + $(wc -l < {calls})))\n')
    (bin_ / "squeue").write_text(f"#!/bin/bash\ncat {queue}\n")
    for p in bin_.iterdir():
        p.chmod(p.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_}{os.pathsep}{os.environ['PATH']}")
    return calls, queue


def test_one_array_for_the_whole_study_throttled(tmp_path, monkeypatch, capsys):
    from nnunet_calibration.experiments import cli
    from nnunet_calibration.experiments.slurm import read_jobs, submit

    calls, queue = _fake_slurm(tmp_path, monkeypatch)
    exp = _experiment(tmp_path, "cpu", folds=[0, 1], slurm={"max_parallel": 2})
    rec = submit(exp)
    arr = rec["array"]
    assert arr["job_id"] == "100" and rec["report"]["depends_on"] == ["100"]
    assert arr["tasks"] == [["nnUNetTrainerDiceCE", 0], ["nnUNetTrainerSDC_DC", 0],
                            ["nnUNetTrainerDiceCE", 1], ["nnUNetTrainerSDC_DC", 1]]
    table = json.loads(open(arr["table"]).read())["tasks"]
    assert [(t["label"], t["fold"]) for t in table] == [tuple(t) for t in arr["tasks"]]
    assert "#SBATCH --array=0,1,2,3%2\n" in open(arr["script"]).read()
    assert "--dependency=afterok:100 --kill-on-invalid-dep=yes" in calls.read_text().splitlines()[1]

    # again while the tasks are queued: no second training, the waiting report job is kept
    queue.write_text("100_0|RUNNING\n100_1|PENDING\n100_2|PENDING\n100_3|PENDING\n101|PENDING\n")
    again = submit(exp)
    assert again["array"] is None and again["report"]["reused"]
    assert again["skipped"]["nnUNetTrainerSDC_DC"] == {0: "already pending as job 100_1",
                                                       1: "already pending as job 100_3"}
    assert len(calls.read_text().splitlines()) == 2 and len(read_jobs(exp)["submissions"]) == 1

    # records of the earlier one-array-per-trainer submissions are still understood
    from nnunet_calibration.experiments.slurm import submitted_tasks
    old = {"submissions": [{"trainers": {"A": {"job_id": "7", "folds": [0, 3]}}}, {"array": {
        "job_id": "9", "tasks": [["A", 3], ["B", 0]]}}]}
    assert submitted_tasks(old) == {("A", 0): "7_0", ("A", 3): "9_0", ("B", 0): "9_1"}

    # the CLI's summary of a new submission
    queue.write_text("")
    assert cli._submit(exp, None) == 0
    out = capsys.readouterr().out
    assert "submitted job array 102: 4 tasks, at most 2 at once" in out
    assert "  nnUNetTrainerSDC_DC: folds [0, 1]" in out
