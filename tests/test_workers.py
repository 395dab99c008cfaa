"""asl_tune.workers: each task's answer comes back, a task's exception is raised in the caller, and a worker that
dies fails the call instead of hanging it (multiprocessing's pool replaced a dead worker and waited forever)."""

from __future__ import annotations

import os

import pytest

from asl_tune.workers import WorkerError, run_in_workers


@pytest.mark.timeout(120)
def test_every_task_is_answered_by_other_processes():
    answers = dict(run_in_workers(_pid_of, list(range(6)), 2))
    assert sorted(answers) == list(range(6))
    assert os.getpid() not in set(answers.values()) and 1 <= len(set(answers.values())) <= 2


def _pid_of(_task: int) -> int:
    return os.getpid()


@pytest.mark.timeout(120)
def test_a_tasks_exception_is_raised_here_with_the_workers_traceback():
    with pytest.raises(ValueError, match="invalid literal for int") as raised:
        list(run_in_workers(int, ["1", "x", "3"], 2))
    assert isinstance(raised.value.__cause__, WorkerError) and "Traceback" in str(raised.value.__cause__)


@pytest.mark.timeout(120)
def test_a_worker_that_dies_fails_the_call():
    with pytest.raises(RuntimeError, match=r"a worker process \(pid \d+\) died with exit status 3"):
        list(run_in_workers(os._exit, [3, 3, 3], 2))
