"""The error types users see, and the exit status each gives.

The CLI prints the message on one line (stderr) and exits with the error's `status`:

    0    the command did what it was asked; for a sweep, every trial ended without an error
    2    bad input (an option, a file, a key) or an environment that cannot run it: nothing was created
    3    TrialsErrored: the sweep ran to its end, but some trials errored (named, with their log files)
    4    RayFailed: Ray failed under a running sweep (a process killed for memory, a lost head node,
         an unexpected error); the results so far are written and `asl-tune resume NAME` goes on
    128 + N  Stopped: a signal (SIGTERM from a scheduler, Ctrl-C) stopped the sweep after Tune saved its state
"""

BAD_INPUT = 2
TRIALS_ERRORED = 3
RAY_FAILED = 4


class AslTuneError(Exception):
    """A problem with the user's input or environment, worded for the user."""

    status = BAD_INPUT


class Stopped(AslTuneError):
    """A sweep stopped by a signal (SIGTERM from a scheduler, Ctrl-C) once Tune saved its state; resumable."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.status = 128 + signum


class TrialsErrored(AslTuneError):
    """A sweep that ran to its end with some trials errored; the message names them and their log files."""

    status = TRIALS_ERRORED


class RayFailed(AslTuneError):
    """Ray failed under a running sweep; the traceback is in the sweep's log and `asl-tune resume` goes on."""

    status = RAY_FAILED
