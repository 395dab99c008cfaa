"""Worker processes for the parallel work of the core (decoding images, rendering the synthetic dataset).

Each worker is a fresh interpreter (`python -c`, never a fork: the caller may hold torch's OpenMP threads
or Ray's, which a forked child would inherit half-made) that imports asl_tune and nothing of the caller's.
multiprocessing's spawn start method re-runs the caller's main module in every worker, so a script without
an `if __name__ == "__main__":` guard, or code piped into `python -`, made its pool replace a dying worker
forever. Here a worker runs only the functions it is sent, so the library works the same from a script,
`python -`, `python -c`, a notebook or a Ray worker; and a worker that dies fails the call instead of hanging it.

A task is one pickled (function, argument) frame on the worker's stdin; the answer, one pickled frame on a
private copy of its stdout (its fd 1 then points at stderr, so nothing a task prints can corrupt the answers).
"""

from __future__ import annotations

import os
import pickle
import selectors
import subprocess
import sys
import traceback
from collections import deque
from typing import Any, Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# The worker's first frame is the caller's sys.path, so it imports asl_tune (and the task's modules) from
# where the caller did: an editable install, a folder on PYTHONPATH or code Ray shipped to a node.
_BOOT = "import pickle, sys; sys.path[:] = pickle.load(sys.stdin.buffer); from asl_tune.workers import serve; serve()"


class WorkerError(Exception):
    """A worker's traceback, as the cause of the exception it raised (which is re-raised in the caller)."""


def run_in_workers(fn: Callable[[T], R], tasks: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """(task, fn(task)) for every task, computed by up to `workers` worker processes, in the order they finish
    (in this process, in order, when workers <= 1 or there is one task).

    fn must be importable by name (a module-level function of an installed module). An exception in fn is
    raised here, with the worker's traceback as its cause; a worker that dies raises RuntimeError. Leaving the
    loop early (an exception, a break) stops every worker.
    """
    todo = deque(tasks)
    if workers <= 1 or len(todo) <= 1:  # not worth a process: in this one
        for task in todo:
            yield task, fn(task)
        return
    procs: list[subprocess.Popen] = []
    busy: dict[subprocess.Popen, T] = {}
    finished = False
    with selectors.DefaultSelector() as ready:
        try:
            for _ in range(min(workers, len(todo))):
                procs.append(proc := _start())
                ready.register(proc.stdout, selectors.EVENT_READ, proc)
                _give(proc, fn, todo, busy)
            while busy:
                for key, _ in ready.select():
                    proc = key.data
                    task, value = busy.pop(proc), _answer(proc)
                    _give(proc, fn, todo, busy)
                    if proc not in busy:  # nothing left for it: its end of file, when it exits, is no answer
                        ready.unregister(proc.stdout)
                    yield task, value
            finished = True
        finally:
            _stop(procs, finished)


def _start() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _BOOT], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    _send(proc, [os.getcwd() if p == "" else p for p in sys.path])  # "" is the caller's working folder
    return proc


def _give(proc: subprocess.Popen, fn: Callable, todo: deque, busy: dict) -> None:
    """Send the worker the next task, if any is left.

    One task at a time: its answer is then the only frame in its pipe, so reading it never buffers the next
    one out of select's sight, and no pipe fills while the other end waits (callers hand out chunks of work,
    so the round trip is small beside a task)."""
    if todo:
        busy[proc] = todo.popleft()
        _send(proc, (fn, busy[proc]))


def _send(proc: subprocess.Popen, frame: Any) -> None:
    try:
        pickle.dump(frame, proc.stdin)
        proc.stdin.flush()
    except BrokenPipeError:
        raise RuntimeError(f"a worker process (pid {proc.pid}) died with exit status {proc.wait()}") from None


def _answer(proc: subprocess.Popen) -> Any:
    """The worker's answer to its task: the value, or the task's exception raised here."""
    try:
        ok, value, remote_traceback = pickle.load(proc.stdout)
    except EOFError:
        raise RuntimeError(f"a worker process (pid {proc.pid}) died with exit status {proc.wait()} before it answered") from None
    if not ok:
        raise value from WorkerError(remote_traceback)
    return value


def _stop(procs: list[subprocess.Popen], finished: bool) -> None:
    """Close the workers' stdin (they exit when they read its end); kill them when the loop was left early."""
    for proc in procs:
        if not finished:
            proc.kill()
        try:
            proc.stdin.close()
        except OSError:  # the pipe broke: the worker is already gone
            pass
    for proc in procs:
        proc.wait()
        proc.stdout.close()


def serve() -> None:
    """A worker's loop: run each (function, argument) frame from stdin and answer (ok, value, traceback)."""
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # a task's prints go to stderr, never into the answers
    tasks = sys.stdin.buffer
    try:
        while True:
            try:
                fn, arg = pickle.load(tasks)
            except EOFError:  # the caller closed the pipe: no more work
                return
            try:
                answer = pickle.dumps((True, fn(arg), ""))
            except Exception as e:
                answer = _failure(e)
            answers.write(answer)
            answers.flush()
    except (KeyboardInterrupt, BrokenPipeError):  # Ctrl-C reaches the whole process group; the caller reports it
        sys.exit(1)


def _failure(e: Exception) -> bytes:
    """The pickled answer for a task that raised: the exception itself when it pickles, else a RuntimeError naming it."""
    text = "".join(traceback.format_exception(e))
    try:
        return pickle.dumps((False, e, text))
    except Exception:
        return pickle.dumps((False, RuntimeError(f"{type(e).__name__}: {e}"), text))
