"""Evaluating the cases: in the caller's process (one process) or in worker processes of its own.

Worker processes (``multiprocessing``'s "spawn" start method, one duplex pipe each): the main
process sends a worker the set-up (labels, options, reader) and then one case at a time, and waits
on the pipes and the processes' sentinels together, so it always knows which case each worker is
evaluating:

* a worker that dies (killed, e.g. by the out-of-memory killer) is an error naming its case;
* an interrupt (Ctrl-C, SIGTERM through ``calib-evaluate``) or any error kills every worker at once
  (SIGKILL: they hold nothing worth saving) and waits for them, so the process exits within
  seconds, also while the workers are still starting;
* a worker dies with the main process even when that is killed with SIGKILL: first thing, before its
  heavy imports, it asks Linux for SIGKILL when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and then
  checks that its parent is still the process that started it (else it was orphaned before the
  request took effect and exits). Elsewhere an idle worker still ends when its pipe closes;
* SIGINT and SIGTERM are blocked in the main process while it starts a worker (as ``multiprocessing``
  does for its resource tracker): one arriving then takes effect right after the start, so a worker
  is never left half-started, and the worker inherits them blocked. Its first thing, it ignores
  SIGINT (a Ctrl-C in a terminal reaches the whole process group; the main process stops the
  workers) and unblocks SIGTERM, so a Ctrl-C while it is still starting shows no traceback.

This module imports only the standard library at import time: it is what a worker process loads
before asking for the parent-death signal. Process-wide settings (the signal, ``keep_freed_memory``,
SIGINT ignored: Ctrl-C reaches the whole process group and the main process stops the workers) are
made in the worker processes only.
"""
from __future__ import annotations

import contextlib
import ctypes
import multiprocessing
import os
import signal
import traceback
from multiprocessing.connection import wait as wait_any
from typing import List

from .errors import EvaluationInputError

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # blocked while a worker is started (see the module docstring)
_STOP_TIMEOUT = 10.0


def run_jobs(jobs, setup: tuple, n_proc: int, bar) -> List[tuple]:
    """``[(case_entry, accumulator)]`` in the order of ``jobs``. ``setup``: the arguments of
    :func:`~.case.evaluate_case` after the job (``lm, class_names, regions, options, reader``);
    ``bar``: a tqdm progress bar. ``n_proc == 1``: in this process (the caller decides on its
    allocator, see ``calib-evaluate``)."""
    if n_proc > 1:
        return _Pool(n_proc, setup).run(jobs, bar)
    from .case import evaluate_case

    results = []
    for job in jobs:
        results.append(evaluate_case(job, *setup))
        bar.update(1)
    return results


# -- worker side ------------------------------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    """SIGKILL this process when its parent dies (Linux); exit now if that already happened."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # the C library's, already loaded
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: an idle worker still ends when its pipe closes
        pass
    if os.getppid() != parent_pid:  # the parent died before the request took effect
        os._exit(1)


def worker_main(conn, parent_pid: int) -> None:
    """A worker process: the set-up, then ``(index, job)`` messages until ``None`` or end of pipe;
    answers ``("ok" | "input-error" | "bug", index, payload)``."""
    _die_with_parent(parent_pid)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the workers
    if hasattr(signal, "pthread_sigmask"):  # blocked since the start (inherited): a held Ctrl-C was just discarded
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _HELD_SIGNALS)
    from nnunet_calibration.utils import keep_freed_memory

    from .case import evaluate_case

    keep_freed_memory()  # a worker evaluates many large cases: reuse freed memory (see its docstring)
    try:
        setup = conn.recv()
        while True:
            msg = conn.recv()
            if msg is None:
                return
            i, job = msg
            try:
                conn.send(("ok", i, evaluate_case(job, *setup)))
            except EvaluationInputError as e:
                conn.send(("input-error", i, str(e)))
            except Exception:  # a bug: its traceback goes to the main process
                conn.send(("bug", i, traceback.format_exc()))
    except (EOFError, BrokenPipeError, ConnectionResetError):
        return  # the main process is gone


# -- main side --------------------------------------------------------------------------------------
@contextlib.contextmanager
def _signals_held():
    """SIGINT / SIGTERM arriving inside the block are held (blocked in this thread) and take effect
    right after it; a process started inside inherits them blocked (see the module docstring)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _died(process) -> str:
    process.join(1.0)
    code = process.exitcode
    if code is not None and code < 0:
        return f"killed by signal {-code}"
    return f"exit status {code}"


class _Pool:
    """``n`` worker processes evaluating ``jobs`` (see the module docstring)."""

    def __init__(self, n: int, setup: tuple):
        self.n, self.setup = n, setup
        self.ctx = multiprocessing.get_context("spawn")
        self.workers = []  # [(process, connection)]
        self.busy = {}  # worker index -> job index
        self.todo = []

    def _start(self) -> None:
        from multiprocessing import resource_tracker

        # started by the first worker's start otherwise, which unblocks SIGINT / SIGTERM afterwards
        resource_tracker.ensure_running()
        for _ in range(self.n):
            with _signals_held():  # a started worker is always in self.workers
                conn, child_conn = self.ctx.Pipe()
                p = self.ctx.Process(target=worker_main, args=(child_conn, os.getpid()), daemon=True,
                                     name="calib-evaluate-worker")
                p.start()
                self.workers.append((p, conn))
                child_conn.close()  # else the worker's end stays open here and its death is no end of pipe

    def _send(self, w: int, msg, jobs) -> None:
        try:
            self.workers[w][1].send(msg)
        except OSError:  # BrokenPipeError: the worker is gone
            raise self._lost(w, jobs) from None

    def _next(self, w: int, jobs) -> None:
        """Give worker ``w`` the next job, or tell it to stop."""
        if self.todo:
            i, job = self.todo.pop(0)
            self.busy[w] = i
            self._send(w, (i, job), jobs)
        else:
            self.busy.pop(w, None)
            self._send(w, None, jobs)

    def _lost(self, w: int, jobs) -> EvaluationInputError:
        case = jobs[self.busy[w]]["case"] if w in self.busy else None
        return EvaluationInputError(
            f"a worker process died ({_died(self.workers[w][0])}; killed, e.g. out of memory?) while evaluating "
            f"case(s) {[case] if case else []}; nothing written. Retry with fewer -np or more memory")

    def _receive(self, w: int, jobs, results: dict, bar) -> None:
        try:
            status, i, payload = self.workers[w][1].recv()
        except (EOFError, OSError):
            raise self._lost(w, jobs) from None
        if status == "input-error":
            raise EvaluationInputError(payload)
        if status == "bug":
            raise RuntimeError(f"calib-evaluate worker failed on case {jobs[i]['case']}:\n{payload}")
        results[i] = payload
        bar.update(1)
        self._next(w, jobs)

    def run(self, jobs, bar) -> List[tuple]:
        self.todo = list(enumerate(jobs))
        results = {}
        try:
            self._start()
            for w in range(self.n):
                self._send(w, self.setup, jobs)
                self._next(w, jobs)
            while len(results) < len(jobs):
                waiting = {}
                for w in self.busy:
                    p, conn = self.workers[w]
                    waiting[conn], waiting[p.sentinel] = w, w
                for ready in wait_any(list(waiting)):
                    w = waiting[ready]
                    if w not in self.busy:
                        continue
                    if ready is self.workers[w][1] or self.workers[w][1].poll():
                        self._receive(w, jobs, results, bar)
                    else:
                        raise self._lost(w, jobs)
        finally:
            self._stop(kill=len(results) < len(jobs))
        return [results[i] for i in range(len(jobs))]

    def _stop(self, kill: bool) -> None:
        """Kill the workers (``kill``: after an error or interrupt) or let them end, then reap them."""
        for p, conn in self.workers:
            if kill and p.pid is not None and p.exitcode is None:
                with contextlib.suppress(OSError):
                    p.kill()
        for p, conn in self.workers:
            p.join(_STOP_TIMEOUT)
            if p.exitcode is None:
                p.kill()
                p.join()
            conn.close()
