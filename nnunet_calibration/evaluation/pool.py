"""Evaluating the cases: in the caller's process (one process) or in a pool of spawned worker
processes; a worker that dies is an error naming the case(s) it was evaluating."""
from __future__ import annotations

import multiprocessing
import os
import queue as queue_mod
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import List

from .case import _init_worker, _worker
from .errors import EvaluationInputError


def run_jobs(jobs, lm, class_names, regions, options, reader, n_proc, bar) -> List[tuple]:
    """``[(case_entry, accumulator)]`` in the order of ``jobs``; ``bar``: a tqdm progress bar."""
    if n_proc == 1:  # in this process (the caller decides on its allocator: see calib-evaluate)
        results = []
        for job in jobs:
            status, payload = _worker(job, lm, class_names, regions, options, reader)
            if status != "ok":
                raise EvaluationInputError(payload)
            results.append(payload)
            bar.update(1)
        return results
    return _run_pool(jobs, (lm, class_names, regions, options, reader), n_proc, bar)


def _run_pool(jobs, args, n_proc, bar) -> List[tuple]:
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Queue()
    pids, running = set(), {}  # running: pid -> case it started last

    def drain():
        while True:
            try:
                pid, case = started.get_nowait()
            except (queue_mod.Empty, OSError, ValueError):
                return
            pids.add(pid)
            if case is not None:
                running[pid] = case

    ex = ProcessPoolExecutor(n_proc, mp_context=ctx, initializer=_init_worker, initargs=(started,))
    futures = {}
    done_cases = set()
    results = {}
    try:
        for i, job in enumerate(jobs):
            futures[ex.submit(_worker, job, *args)] = i
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
            drain()
            for fut in done:
                i = futures[fut]
                try:
                    status, payload = fut.result()
                except BrokenProcessPool:
                    time.sleep(0.2)  # let the queue's feeder threads deliver the last "started" records
                    drain()
                    lost = sorted({c for c in running.values() if c not in done_cases})
                    raise EvaluationInputError(
                        "a worker process died (killed, e.g. out of memory?) while evaluating case(s) "
                        f"{lost or [jobs[i]['case']]}; nothing written. Retry with fewer -np or more memory") from None
                if status != "ok":
                    raise EvaluationInputError(payload)
                results[i] = payload
                done_cases.add(jobs[i]["case"])
                bar.update(1)
    except BaseException:
        drain()
        ex.shutdown(wait=False, cancel_futures=True)
        for pid in pids:  # our own workers only, by pid
            try:
                os.kill(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        raise
    ex.shutdown(wait=True)
    return [results[i] for i in range(len(jobs))]
