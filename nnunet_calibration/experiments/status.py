"""What every (trainer, fold) of an experiment is doing: finished, running/pending, failed, ..."""
from __future__ import annotations

from nnunet_calibration.experiments.config import Experiment, ExperimentError
from nnunet_calibration.experiments.runner import (FINISHED, INTERRUPTED, NOT_STARTED, fold_state, has_npz, log_path,
                                                   read_local_state)


def fold_statuses(exp: Experiment, use_slurm: bool = True) -> list[dict]:
    """One dict per (trainer, fold): label, trainer, fold, status, detail, log, folder.

    status: ``finished``; ``running`` / ``pending`` (and other SLURM states) for tasks SLURM still
    lists; ``failed`` (the last local run or SLURM task ended without a finished fold); ``interrupted``
    (a checkpoint exists, not running); ``not started``.
    """
    from nnunet_calibration.experiments import slurm

    jobs = {"submissions": []}
    active = {}
    slurm_note = ""
    if use_slurm:
        try:
            jobs = slurm.read_jobs(exp)
            if jobs.get("submissions"):
                active = slurm.active_tasks(exp, jobs)
        except (ExperimentError, OSError) as e:
            slurm_note = f"(SLURM queue not readable: {e})"
    submitted = {}
    for sub in jobs.get("submissions", []):
        for label, rec in sub.get("trainers", {}).items():
            for fold in rec["folds"]:
                submitted[(label, fold)] = f"{rec['job_id']}_{fold}"
    local = read_local_state(exp)
    out = []
    for spec in exp.trainers:
        for fold in exp.folds:
            st = fold_state(exp, spec, fold)
            log = log_path(exp, spec.label, fold)
            rec = {"label": spec.label, "trainer": spec.name, "fold": fold, "status": st, "detail": "",
                   "log": str(log) if log.exists() else "", "folder": str(exp.fold_folder(spec, fold))}
            key = (spec.label, fold)
            if key in active:
                jid, state = active[key]
                rec["status"] = state.lower()
                rec["detail"] = f"SLURM job {jid}"
            elif st == FINISHED:
                if not has_npz(exp, spec, fold):
                    rec["detail"] = "validation without --npz probabilities (run again to add them)"
            elif key in submitted:
                rec["status"] = "failed"
                rec["detail"] = f"SLURM job {submitted[key]} ended without a finished fold ({st})"
                rec["log"] = str(log)
            elif local.get(f"{spec.label}/{fold}", {}).get("status") == "failed":
                r = local[f"{spec.label}/{fold}"]
                rec["status"] = "failed"
                rec["detail"] = f"local run exited with {r.get('returncode')} at {r.get('time')} ({st})"
                rec["log"] = r.get("log", str(log))
            elif st == INTERRUPTED:
                rec["detail"] = "checkpoint present; run again to continue (--c)"
            elif st == NOT_STARTED:
                pass
            if slurm_note and not rec["detail"]:
                rec["detail"] = slurm_note
            out.append(rec)
    return out


def report_job_status(exp: Experiment) -> dict | None:
    from nnunet_calibration.experiments import slurm

    try:
        jobs = slurm.read_jobs(exp)
    except (OSError, ValueError):
        return None
    if not jobs.get("submissions"):
        return None
    rep = jobs["submissions"][-1].get("report")
    if not rep:
        return None
    jid = rep["job_id"]
    try:
        queue = slurm.queue_states()
        state = queue.get(jid) or slurm.job_state(jid) or "unknown (no longer listed by SLURM)"
    except ExperimentError as e:
        state = f"unknown ({e})"
    return {"job_id": jid, "state": state, "log": str(exp.state_dir / "logs" / "report.log")}


def format_statuses(rows: list[dict]) -> str:
    w = max([len(r["label"]) for r in rows] + [7])
    lines = [f"{'trainer':<{w}}  fold  {'status':<12}  detail / log"]
    for r in rows:
        tail = " ".join(x for x in (r["detail"], f"log: {r['log']}" if r["status"] == "failed" or
                                    (r["log"] and r["status"] not in ("finished", "not started")) else "") if x)
        lines.append(f"{r['label']:<{w}}  {r['fold']:>4}  {r['status']:<12}  {tail}")
    return "\n".join(lines)
