"""``slurm:`` of the experiment file: the SLURM backend's resources, cluster environment and time-limit
handling (:class:`Slurm`), with SLURM's ``--time``, ``--mem`` and ``--gres`` formats."""
from __future__ import annotations

import re
from dataclasses import dataclass

from ._typed import BOOL, NON_NEGATIVE_INT, OPTIONAL_TEXT, POSITIVE_INT, Rule, Settings, SettingsError, is_int, setting


# -- SLURM formats -------------------------------------------------------------------------------
_MEM_RE = re.compile(r"^\d+(\.\d+)?[KMGT]?B?$", re.IGNORECASE)
# SLURM's --time formats: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS
_TIME_RE = re.compile(r"^(?:(\d+)-(\d+)(?::(\d+)(?::(\d+))?)?|(\d+)(?::(\d+)(?::(\d+))?)?)$")


def slurm_time_seconds(text: str) -> int | None:
    """Seconds of a SLURM ``--time`` value (``MM``, ``MM:SS``, ``HH:MM:SS``, ``D-HH[:MM[:SS]]``); None if invalid."""
    m = _TIME_RE.match(str(text).strip())
    if not m:
        return None
    if m.group(1) is not None:
        d, h, mi, se = (int(x) if x else 0 for x in m.group(1, 2, 3, 4))
        return ((d * 24 + h) * 60 + mi) * 60 + se
    parts = [int(x) for x in m.group(5, 6, 7) if x is not None]  # MM, MM:SS or HH:MM:SS
    return sum(p * w for p, w in zip(parts, {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(parts)]))


_TIME = Rule(lambda v: v is None or (isinstance(v, str) and slurm_time_seconds(v) is not None),
             'a quoted SLURM time such as "24:00:00", "1-00:00:00" or "120" (minutes); YAML reads an unquoted '
             '24:00:00 as a number')
_MEM = Rule(lambda v: v is None or (is_int(v) and v > 0) or (isinstance(v, str) and bool(_MEM_RE.match(v.strip()))),
            "SLURM's --mem: MB as an integer or a text like 32G")
_ARGS = Rule(lambda v: isinstance(v, (str, tuple, list)) and (isinstance(v, str) or all(isinstance(a, str) for a in v)),
             "a list of sbatch options (texts)")
_LINES = Rule(lambda v: isinstance(v, tuple) and all(isinstance(a, str) and "\n" not in a for a in v),
              "a list of shell lines (texts)")
_OPTIONAL_POSITIVE_INT = Rule(lambda v: v is None or (is_int(v) and v > 0), "a positive integer or null")
_GRES_RE = re.compile(r"^[A-Za-z][\w-]*(:[\w.-]+)*(,[A-Za-z][\w-]*(:[\w.-]+)*)*$")
_GRES = Rule(lambda v: v is None or (isinstance(v, str) and bool(_GRES_RE.match(v))), 'a --gres text like "gpu:a100:1"')


def gres_gpus(gres: str | None) -> int | None:
    """GPUs a ``--gres`` text asks for (``gpu:a100:2`` -> 2, ``gpu:a100`` -> 1); None if it names none."""
    for item in (gres or "").split(","):
        parts = item.split(":")
        if parts[0] == "gpu":
            return int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return None


@dataclass(frozen=True)
class Slurm(Settings):
    """``slurm:``: resources, cluster environment and time-limit handling of the SLURM backend."""

    SECTION = "slurm"

    gpus: int = setting(0, NON_NEGATIVE_INT, "--gres=gpu:N (0: none); > 1: nnU-Net's multi-GPU mode (-num_gpus N)")
    gres: str | None = setting(None, _GRES, "--gres of a training task instead of gpu:N (typed GPUs: gpu:a100:1)")
    cpus: int = setting(4, POSITIVE_INT, "--cpus-per-task; on a GPU also nnU-Net's augmentation workers")
    mem: str | None = setting("16G", _MEM, "--mem")
    time: str | None = setting("24:00:00", _TIME, "--time of a training task")
    partition: str | None = setting(None, OPTIONAL_TEXT, "--partition")
    extra_args: tuple = setting((), _ARGS, "further sbatch options of the training tasks")
    setup: tuple = setting((), _LINES, "shell lines run first in every job (module load, source .../activate)")
    container: str | None = setting(None, OPTIONAL_TEXT, "prefix of the job's command (apptainer exec --nv IMAGE)")
    scratch: str | None = setting(None, OPTIONAL_TEXT, "node-local folder (e.g. $TMPDIR): a training task copies "
                                                       "the configuration's preprocessed data there first")
    report_cpus: int = setting(2, POSITIVE_INT, "--cpus-per-task of the report job")
    report_mem: str | None = setting("8G", _MEM, "--mem of the report job")
    report_time: str | None = setting("04:00:00", _TIME, "--time of the report job")
    report_partition: str | None = setting(None, OPTIONAL_TEXT, "--partition of the report job (default: partition)")
    report_extra_args: tuple | None = setting(None, _ARGS, "sbatch options of the report job (default: extra_args; "
                                                           "[]: none); it never gets the GPUs")
    signal_seconds: int = setting(600, NON_NEGATIVE_INT, "SIGUSR1 this long before the limit (--signal=B:USR1@N); "
                                                         "0: none; default 600, at most half of time")
    requeue: bool = setting(True, BOOL, "on that signal: stop cleanly, requeue the task (--c, or --val)")
    max_parallel: int | None = setting(None, _OPTIONAL_POSITIVE_INT, "at most this many (trainer, fold) tasks of the "
                                                                     "study at once (--array=...%N); null: no limit")

    def __post_init__(self):
        for k in ("mem", "report_mem"):
            if is_int(getattr(self, k)):
                object.__setattr__(self, k, str(getattr(self, k)))
        for k in ("extra_args", "report_extra_args", "setup"):  # a text: one line, or options split at blanks
            if isinstance(v := getattr(self, k), str):
                object.__setattr__(self, k, (v,) if k == "setup" else tuple(v.split()))
        super().__post_init__()

    @property
    def gpu_count(self) -> int:
        """GPUs of one training task: ``gres``'s if it names GPUs, else ``gpus``."""
        n = gres_gpus(self.gres)
        return self.gpus if n is None else n

    @classmethod
    def prepare(cls, data: dict) -> dict:
        limit = slurm_time_seconds(data.get("time", cls.time)) if data.get("time", cls.time) else None
        if "signal_seconds" not in data and limit is not None and isinstance(limit, int):
            data["signal_seconds"] = min(600, limit // 2)  # default: 600 s, at most half the limit
        return data

    def check(self) -> None:
        limit = slurm_time_seconds(self.time) if self.time else None
        if self.signal_seconds and limit is not None and self.signal_seconds >= limit:
            raise SettingsError(f"signal_seconds ({self.signal_seconds} s) must be shorter than slurm.time "
                                f"({self.time!r} = {limit} s)")
        n = gres_gpus(self.gres)
        if n is not None and self.gpus and n != self.gpus:
            raise SettingsError(f"gpus ({self.gpus}) and gres ({self.gres!r}, {n} GPUs) disagree: give one")
